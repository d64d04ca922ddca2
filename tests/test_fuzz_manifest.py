"""Fuzz the package loader with hypothesis: mutated manifests and mutated files.

Property: loading a damaged package either succeeds, and then every tensor view lies inside the
bytes of its file, or raises `EdgesparseError` (one line). Any other exception fails the test.

- `test_fuzz_parse_manifest`: mutated manifest dicts straight into `format.parse_manifest`
  (no disk, thousands per second);
- `test_fuzz_package_on_disk`: a copy of the tiny package with a mutated manifest and/or mutated
  files (truncated, extended, zeroed, bit-flipped, deleted, replaced by a directory), loaded by
  `runtime.model.Model` (which mmaps the raw files and loads the ONNX graphs), its tokenizer,
  and one prefill + one decode step; `verify` must name the first file whose bytes changed;
- `test_fuzz_manifest_bytes_on_disk`: byte-level damage to manifest.json (truncation, flipped or
  inserted bytes, NaN/-Infinity/huge numbers, deep nesting, bad UTF-8) through `read_manifest`
  and `Package`.

CI runs ~300 examples in total (derandomized, so every run checks the same ones). The `_long`
variants run thousands; they are marked `long` and skipped unless the environment variable
EDGESPARSE_LONG=1 is set:

    EDGESPARSE_LONG=1 python -m pytest tests/test_fuzz_manifest.py -m long
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context, event as _event

from edgesparse.errors import EdgesparseError
from edgesparse.format import DTYPES, MANIFEST, PAGE, parse_manifest, read_manifest, verify_hashes

LONG = os.environ.get("EDGESPARSE_LONG") == "1"

_common = dict(deadline=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                      HealthCheck.filter_too_much])
# Profiles are registered under their own names and applied per test, never loaded globally, so
# other test modules keep their own hypothesis settings.
settings.register_profile("edgesparse-fuzz-ci", derandomize=True, database=None, **_common)
settings.register_profile("edgesparse-fuzz-long", **_common)


def ci(n: int) -> settings:
    return settings(settings.get_profile("edgesparse-fuzz-ci"), max_examples=n)


def long(n: int) -> settings:
    return settings(settings.get_profile("edgesparse-fuzz-long"), max_examples=n)


# -- values ------------------------------------------------------------------------------------
# JSON can hold integers of any size (Python's json reads up to 4300 digits): 10**400 is a valid
# manifest value that overflows float().
HUGE_INTS = [2**31, 2**32, 2**63 - 1, 2**63, 2**64, -2**63, 10**30, 10**400, -10**400]
SPECIAL_INTS = st.sampled_from([0, 1, -1, 2, 3, PAGE - 1, PAGE, PAGE + 1, -PAGE, 100 * PAGE] + HUGE_INTS)
SPECIAL_FLOATS = st.sampled_from([0.0, -0.0, 0.5, -1.0, 1e-300, -1e-300, 1e308, -1e308, math.inf,
                                  -math.inf, math.nan, float(PAGE), 1.5])
STRINGS = st.one_of(st.text(max_size=12), st.sampled_from([
    "", ".", "..", "/", "//", "../x", "/etc/passwd", "a\\b", "ffn/../embed.bin", "./embed.bin",
    "ffn//000.bin", "ffn/000.bin", "attn/000.onnx", "embed.bin", "rope.bin", "tokenizer.json",
    "manifest.json", "raw", "onnx", "tokenizer", "float32", "float16", "int32", "float64",
    "embed", "lm_head", "rope.cos", "layers.0.ffn", "edgesparse", "none", "paper", "rms", "silu",
    "NaN", "Infinity", "0" * 64, "g" * 64, "A" * 64]))
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), SPECIAL_INTS, st.floats(), SPECIAL_FLOATS,
                    STRINGS)
JSON_VALUES = st.recursive(SCALARS, lambda c: st.lists(c, max_size=4)
                           | st.dictionaries(st.text(max_size=8), c, max_size=4), max_leaves=8)
SIZES = st.one_of(SPECIAL_INTS, st.integers(-2 * PAGE, 400_000), SCALARS)
DIMS = st.one_of(st.integers(-3, 300), SPECIAL_INTS, st.just(True), st.just(1.0), st.just("3"))
SHAPES = st.one_of(st.lists(DIMS, max_size=4), SCALARS)
THRESHOLDS = st.one_of(SPECIAL_FLOATS, SPECIAL_INTS, st.floats(), st.booleans(), st.none(),
                       st.sampled_from(["0.5", [0.5], {"t": 0}]))
DTYPE_NAMES = st.one_of(st.sampled_from(sorted(DTYPES) + ["float64", "bfloat16", "int8", "uint16", "<f4",
                                                          "Float32", "float32 ", "f4", ""]), SCALARS)


def _paths(node, prefix=()):
    """Every (key/index path) inside a JSON document, the root first."""
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, prefix + (i,))


def _get(doc, path):
    for p in path:
        doc = doc[p]
    return doc


@st.composite
def mutated_docs(draw, base: dict) -> dict:
    """The base manifest with 1-4 mutations: structural (replace any value with anything, delete any
    key or element) and targeted (shapes, offsets, thresholds, dtypes, paths, sizes, hashes,
    duplicates, config values, version)."""
    doc = copy.deepcopy(base)
    n = draw(st.sampled_from([1, 1, 1, 2, 2, 3, 4]))   # mostly one: more of them get past the first check
    for _ in range(n):
        op = draw(st.sampled_from(["replace", "delete", "shape", "dim", "offset", "threshold", "dtype",
                                   "path", "size", "sha", "duplicate", "config", "version", "layers",
                                   "tensor_file", "top"]))
        tensors = doc.get("tensors") if isinstance(doc.get("tensors"), dict) else {}
        files = doc.get("files") if isinstance(doc.get("files"), list) else []
        layers = doc.get("layers") if isinstance(doc.get("layers"), list) else []
        tnames = [k for k, v in tensors.items() if isinstance(v, dict)]
        fdicts = [f for f in files if isinstance(f, dict)]
        ldicts = [l for l in layers if isinstance(l, dict)]
        note(f"op {op}")
        if op == "replace":
            path = draw(st.sampled_from(list(_paths(doc))))
            value = draw(JSON_VALUES)
            if not path:
                doc = value
                if not isinstance(doc, dict):
                    return doc
            else:
                _get(doc, path[:-1])[path[-1]] = value
        elif op == "delete":
            paths = [p for p in _paths(doc) if p]
            if paths:
                path = draw(st.sampled_from(paths))
                del _get(doc, path[:-1])[path[-1]]
        elif op == "shape" and tnames:
            tensors[draw(st.sampled_from(tnames))]["shape"] = draw(SHAPES)
        elif op == "dim" and tnames:
            t = tensors[draw(st.sampled_from(tnames))]
            if isinstance(t.get("shape"), list) and t["shape"]:
                i = draw(st.integers(0, len(t["shape"]) - 1))
                d = t["shape"][i]
                t["shape"][i] = draw(st.one_of(DIMS, st.just(d + 1 if isinstance(d, int) else 0),
                                               st.just(d - 1 if isinstance(d, int) else 0),
                                               st.just(-d if isinstance(d, int) else -1)))
            if draw(st.booleans()) and isinstance(t.get("shape"), list):
                t["shape"] = t["shape"] + [draw(DIMS)] if draw(st.booleans()) else t["shape"][:-1]
        elif op == "offset" and tnames:
            tensors[draw(st.sampled_from(tnames))]["offset"] = draw(st.one_of(
                SPECIAL_INTS, st.integers(-4, 64).map(lambda k: k * PAGE), st.integers(), SCALARS))
        elif op == "threshold" and ldicts:
            draw(st.sampled_from(ldicts))["threshold"] = draw(THRESHOLDS)
        elif op == "dtype" and tnames:
            tensors[draw(st.sampled_from(tnames))]["dtype"] = draw(st.one_of(st.sampled_from(sorted(DTYPES)),
                                                                            DTYPE_NAMES))
        elif op == "path" and fdicts:
            draw(st.sampled_from(fdicts))["path"] = draw(STRINGS)
        elif op == "size" and fdicts:
            f = draw(st.sampled_from(fdicts))
            f["size"] = draw(st.one_of(SIZES, st.just(f["size"] + 1 if isinstance(f.get("size"), int) else 0),
                                       st.just(f["size"] - 1 if isinstance(f.get("size"), int) else 0)))
        elif op == "sha" and fdicts:
            draw(st.sampled_from(fdicts))["sha256"] = draw(st.one_of(STRINGS, SCALARS))
        elif op == "duplicate" and fdicts:
            f = copy.deepcopy(draw(st.sampled_from(fdicts)))
            if draw(st.booleans()):
                f["kind"] = draw(st.sampled_from(["raw", "onnx", "tokenizer", "pickle"]))
            files.insert(draw(st.integers(0, len(files))), f)
        elif op == "config" and isinstance(doc.get("config"), dict):
            cfg = doc["config"]
            key = draw(st.sampled_from(sorted(cfg) + ["unknown_key"]))
            v = cfg.get(key)
            nudged = ([v * 2, v // 2, v + 1, v - 1, 0, -v] if type(v) is int else
                      [v * 2, v / 2, 0.0, -v, math.inf] if type(v) is float else
                      [v[:0], v + [0], [-1], [10**30]] if type(v) is list else [None])
            cfg[key] = draw(st.one_of(st.sampled_from(nudged), SCALARS, SPECIAL_INTS, st.integers(-2, 600),
                                      st.lists(SCALARS, max_size=3)))
        elif op == "version":
            doc[draw(st.sampled_from(["format", "format_version"]))] = draw(st.one_of(
                st.sampled_from([0, 1, 2, -1, 1.0, True, "1", "edgesparse", "EdgeSparse", None]), SCALARS))
        elif op == "layers" and isinstance(layers, list):
            how = draw(st.sampled_from(["drop", "dup", "swap", "attention", "ffn"]))
            if how == "drop" and layers:
                layers.pop(draw(st.integers(0, len(layers) - 1)))
            elif how == "dup" and layers:
                layers.append(copy.deepcopy(layers[draw(st.integers(0, len(layers) - 1))]))
            elif how == "swap" and len(layers) > 1:
                layers[0], layers[-1] = layers[-1], layers[0]
            elif how == "attention" and ldicts:
                draw(st.sampled_from(ldicts))["attention"] = draw(STRINGS)
            elif how == "ffn" and ldicts:
                draw(st.sampled_from(ldicts))["ffn"] = draw(st.one_of(STRINGS, st.sampled_from(tnames or ["x"])))
        elif op == "tensor_file" and tnames:
            t = tensors[draw(st.sampled_from(tnames))]
            t["file"] = draw(st.one_of(st.sampled_from([f.get("path") for f in fdicts] or ["x"]), STRINGS))
        elif op == "top":
            key = draw(st.sampled_from(["sparsity", "chat_template", "source", "exporter", "extra"]))
            doc[key] = draw(st.one_of(JSON_VALUES, st.just({"method": draw(STRINGS)})))
    return doc


# -- checks ------------------------------------------------------------------------------------
def event(what: str) -> None:
    """Count outcomes in --hypothesis-show-statistics; a no-op outside hypothesis."""
    if currently_in_test_context():
        _event(what)


def one_line(e: EdgesparseError) -> None:
    msg = str(e)
    event(f"rejected: {type(e).__name__}")
    assert msg and "\n" not in msg, f"error message is not one line: {msg!r}"


def check_manifest(m) -> None:
    """What a manifest that parse_manifest accepted guarantees."""
    for f in m.files.values():
        assert not f.path.startswith("/") and ".." not in f.path.split("/"), f.path
        assert isinstance(f.size, int) and f.size >= 0
    for t in m.tensors.values():
        assert t.file in m.files and m.files[t.file].kind == "raw"
        assert t.dtype in DTYPES
        assert t.shape and all(type(s) is int and s > 0 for s in t.shape)
        assert type(t.offset) is int and t.offset >= 0 and t.offset % PAGE == 0
        assert t.offset + t.nbytes <= m.files[t.file].size, (t, m.files[t.file].size)
    assert len(m.layers) == m.config.n_layers
    for l in m.layers:
        assert l.attention in m.files and m.files[l.attention].kind == "onnx"
        assert l.ffn in m.tensors
        assert isinstance(l.threshold, float) and l.threshold >= 0 and not math.isnan(l.threshold)


def check_parse(doc) -> bool:
    try:
        m = parse_manifest(doc, "manifest.json")
    except EdgesparseError as e:
        one_line(e)
        return False
    check_manifest(m)
    event("accepted")
    return True


def _mmap_of(a: np.ndarray):
    base = a
    while isinstance(base, np.ndarray):
        base = base.base
    return base


def check_views(pkg_dir: Path, model) -> None:
    """Every tensor view is a window of its file's read-only mmap, inside the file's bytes."""
    m = model.pkg.manifest
    for t in m.tensors.values():
        a = model.pkg.tensor(t.name)
        mm = _mmap_of(a)
        size = (pkg_dir / t.file).stat().st_size
        assert mm is not None and len(mm) == size, (t.name, mm, size)
        start = np.frombuffer(mm, np.uint8).ctypes.data
        assert a.ctypes.data - start == t.offset
        assert a.nbytes == t.nbytes and t.offset + a.nbytes <= size, (t, size)
        assert not a.flags.writeable
        a.view(np.uint8).sum()      # touch every byte of the view: no SIGBUS past the end


def load_model(pkg_dir: Path) -> bool:
    """Load like `edgesparse run` does (Model, tokenizer) and run a prefill and a decode step."""
    from edgesparse.runtime.model import Model
    from edgesparse.runtime.text import TextCodec
    try:
        model = Model(pkg_dir, ctx=16, threads=1)
        TextCodec(model.pkg)
        model.forward([1, 5, 7])
        model.forward([3])
    except EdgesparseError as e:
        one_line(e)
        return False
    check_views(pkg_dir, model)
    event("loaded and ran")
    return True


# -- fixtures ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def base_doc(tiny_llama_pkg) -> dict:
    return json.loads((tiny_llama_pkg / MANIFEST).read_text())


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def test_base_package_passes_every_check(tiny_llama_pkg, base_doc, tmp_path):
    """The unmutated package goes through every check the fuzz tests use (they would prove nothing
    if it did not)."""
    assert check_parse(copy.deepcopy(base_doc))
    shutil.copytree(tiny_llama_pkg, tmp_path / "p")
    assert load_model(tmp_path / "p")
    verify_hashes(tmp_path / "p", read_manifest(tmp_path / "p"))


def test_check_manifest_catches_a_tensor_past_the_end(tiny_llama_pkg, tmp_path):
    """check_manifest itself can fail: a manifest whose embed.bin is one byte short of the embed
    tensor (built in memory, past parse_manifest) is rejected."""
    import dataclasses
    from edgesparse.format import FileEntry
    m = read_manifest(tiny_llama_pkg)
    f = m.files["embed.bin"]
    bad = dataclasses.replace(m, files={**m.files, "embed.bin": FileEntry(f.path, f.kind, f.size - 1, f.sha256)})
    with pytest.raises(AssertionError):
        check_manifest(bad)


# -- in-memory: parse_manifest -----------------------------------------------------------------
def _fuzz_parse(base_doc, data) -> None:
    doc = data.draw(mutated_docs(base_doc))
    check_parse(doc)


@ci(200)
@given(data=st.data())
def test_fuzz_parse_manifest(base_doc, data):
    _fuzz_parse(base_doc, data)


@pytest.mark.long
@pytest.mark.skipif(not LONG, reason="long fuzz run: set EDGESPARSE_LONG=1 to run it")
@long(10_000)
@given(data=st.data())
def test_fuzz_parse_manifest_long(base_doc, data):
    """10,000 mutated manifests. Skipped unless EDGESPARSE_LONG=1 (marked `long`)."""
    _fuzz_parse(base_doc, data)


# -- on disk: Package / Model ------------------------------------------------------------------
FILE_OPS = ["truncate", "truncate0", "extend", "zero", "flip", "delete", "dir", "same_size_garbage"]


@st.composite
def file_mutations(draw, files: list[dict]):
    out = []
    for _ in range(draw(st.integers(0, 3))):
        # raw files weigh most: they are what the loader maps
        f = draw(st.sampled_from([f for f in files if f["kind"] == "raw"] * 3 + files))
        op = draw(st.sampled_from(FILE_OPS))
        arg = None
        if op == "truncate":
            arg = draw(st.integers(0, max(f["size"] - 1, 0)))
        elif op == "extend":
            arg = draw(st.sampled_from([1, 3, PAGE, PAGE + 1]))
        elif op == "flip":
            arg = draw(st.lists(st.tuples(st.integers(0, max(f["size"] - 1, 0)), st.integers(0, 7)),
                                min_size=1, max_size=8))
        elif op == "same_size_garbage":
            arg = draw(st.sampled_from([b"\xff", b"\x7f\x80\x00\x00", b"\x00\x00\xc0\x7f"]))  # NaNs, -0, junk
        out.append((f["path"], op, arg))
    return out


def apply_file_mutation(pkg: Path, rel: str, op: str, arg) -> None:
    p = pkg / rel
    if not p.is_file():
        return
    data = p.read_bytes()
    if op in ("truncate", "truncate0"):
        new = data[: (0 if op == "truncate0" else arg)]
    elif op == "extend":
        new = data + b"\0" * arg
    elif op == "zero":
        new = bytes(len(data))
    elif op == "flip":
        b = bytearray(data)
        for pos, bit in arg:
            if b:
                b[pos % len(b)] ^= 1 << bit
        new = bytes(b)
    elif op == "same_size_garbage":
        new = (arg * (len(data) // len(arg) + 1))[: len(data)]
    elif op == "delete":
        p.unlink()
        return
    elif op == "dir":
        p.unlink()
        p.mkdir()
        return
    else:
        raise AssertionError(op)
    p.write_bytes(new)


def first_problem(pkg: Path, files: list[dict]) -> str | None:
    """The file verify must name: the first missing or resized file in manifest order, else the
    first whose sha256 differs."""
    import hashlib
    for f in files:
        p = pkg / f["path"]
        if not p.is_file() or p.stat().st_size != f["size"]:
            return f["path"]
    for f in files:
        if hashlib.sha256((pkg / f["path"]).read_bytes()).hexdigest() != f["sha256"]:
            return f["path"]
    return None


def _fuzz_on_disk(tiny_llama_pkg, base_doc, scratch, data) -> None:
    mutate_manifest = data.draw(st.booleans(), label="mutate manifest")
    doc = data.draw(mutated_docs(base_doc)) if mutate_manifest else base_doc
    fmuts = data.draw(file_mutations(base_doc["files"]))
    with tempfile.TemporaryDirectory(dir=scratch) as d:
        pkg = Path(d) / "p.esp"
        shutil.copytree(tiny_llama_pkg, pkg)
        if mutate_manifest:
            (pkg / MANIFEST).write_text(json.dumps(doc, allow_nan=True))
        for rel, op, arg in fmuts:
            apply_file_mutation(pkg, rel, op, arg)
        changed = [f["path"] for f in base_doc["files"] if not (pkg / f["path"]).is_file()
                   or (pkg / f["path"]).read_bytes() != (tiny_llama_pkg / f["path"]).read_bytes()]
        loaded = load_model(pkg)
        # verify: a manifest that loads plus any changed file -> verify names the first changed
        # file in manifest order (a missing, resized or re-hashed file is always a problem).
        if not mutate_manifest:
            first = first_problem(pkg, base_doc["files"])
            assert (first is None) == (not changed), (first, changed)
            if changed:
                with pytest.raises(EdgesparseError) as ei:
                    verify_hashes(pkg, read_manifest(pkg))
                one_line(ei.value)
                assert str(pkg / first) in str(ei.value), (first, str(ei.value))
            else:
                assert loaded
                verify_hashes(pkg, read_manifest(pkg))
        else:
            try:
                verify_hashes(pkg, read_manifest(pkg))
            except EdgesparseError as e:
                one_line(e)


@ci(80)
@given(data=st.data())
def test_fuzz_package_on_disk(tiny_llama_pkg, base_doc, scratch, data):
    _fuzz_on_disk(tiny_llama_pkg, base_doc, scratch, data)


@pytest.mark.long
@pytest.mark.skipif(not LONG, reason="long fuzz run: set EDGESPARSE_LONG=1 to run it")
@long(2_000)
@given(data=st.data())
def test_fuzz_package_on_disk_long(tiny_llama_pkg, base_doc, scratch, data):
    """2,000 damaged packages on disk. Skipped unless EDGESPARSE_LONG=1 (marked `long`)."""
    _fuzz_on_disk(tiny_llama_pkg, base_doc, scratch, data)


# -- on disk: manifest.json bytes --------------------------------------------------------------
@st.composite
def damaged_manifest_bytes(draw, text: bytes) -> bytes:
    op = draw(st.sampled_from(["truncate", "flip", "insert", "token", "nest", "prefix", "whole"]))
    note(f"bytes op {op}")
    if op == "truncate":
        return text[: draw(st.integers(0, len(text) - 1))]
    if op == "flip":
        b = bytearray(text)
        for _ in range(draw(st.integers(1, 4))):
            b[draw(st.integers(0, len(b) - 1))] ^= 1 << draw(st.integers(0, 7))
        return bytes(b)
    if op == "insert":
        i = draw(st.integers(0, len(text)))
        return text[:i] + draw(st.binary(min_size=1, max_size=8)) + text[i:]
    if op == "token":
        # replace one number in the manifest with a JSON-ish token that Python's json may accept
        nums = [i for i in range(len(text) - 1) if text[i:i + 2] in (b": ", b", ", b"[ ")
                and text[i + 2:i + 3].isdigit()] or [0]
        i = draw(st.sampled_from(nums)) + 2
        j = i
        while j < len(text) and (text[j:j + 1].isdigit() or text[j:j + 1] in b".e-+"):
            j += 1
        tok = draw(st.sampled_from([b"NaN", b"-Infinity", b"Infinity", b"1e999", b"-1e999", b"-0",
                                    b"1" + b"0" * 400, b"-" + b"9" * 400, b"1" + b"0" * 5000, b"0.0",
                                    b"true", b"null", b'"1"', b"[]", b"{}"]))
        return text[:i] + tok + text[j:]
    if op == "nest":
        depth = draw(st.sampled_from([10, 1000, 100_000]))
        return b"[" * depth + b"]" * depth
    if op == "prefix":
        return draw(st.sampled_from([b"\xef\xbb\xbf", b"\xff\xfe", b"\x00", b" \n", b"\x80"])) + text
    return draw(st.sampled_from([b"", b"null", b"[]", b"{}", b"0", b'"edgesparse"', b"\xff" * 10,
                                 text.decode().encode("utf-16")]))


def _fuzz_bytes(tiny_llama_pkg, scratch, data) -> None:
    from edgesparse.runtime.package import Package
    text = (tiny_llama_pkg / MANIFEST).read_bytes()
    damaged = data.draw(damaged_manifest_bytes(text))
    with tempfile.TemporaryDirectory(dir=scratch) as d:
        pkg = Path(d) / "p.esp"
        shutil.copytree(tiny_llama_pkg, pkg)
        (pkg / MANIFEST).write_bytes(damaged)
        try:
            p = Package(pkg)
        except EdgesparseError as e:
            one_line(e)
            return
        check_manifest(p.manifest)
        for t in p.manifest.tensors.values():
            a = p.tensor(t.name)
            assert t.offset + a.nbytes <= (pkg / t.file).stat().st_size


@ci(40)
@given(data=st.data())
def test_fuzz_manifest_bytes_on_disk(tiny_llama_pkg, scratch, data):
    _fuzz_bytes(tiny_llama_pkg, scratch, data)


@pytest.mark.long
@pytest.mark.skipif(not LONG, reason="long fuzz run: set EDGESPARSE_LONG=1 to run it")
@long(2_000)
@given(data=st.data())
def test_fuzz_manifest_bytes_on_disk_long(tiny_llama_pkg, scratch, data):
    """2,000 byte-damaged manifests. Skipped unless EDGESPARSE_LONG=1 (marked `long`)."""
    _fuzz_bytes(tiny_llama_pkg, scratch, data)


# -- what the fuzzer found ---------------------------------------------------------------------
# Each of these was a traceback (OverflowError, OSError, ORT's RuntimeError, numba's
# ZeroDivisionError, numpy's ValueError) before the library checked it; now it is one line.
def _set(path, value):
    def fn(doc):
        _get(doc, path[:-1])[path[-1]] = value
    return fn


def _dir_instead_of_norm_bin(pkg: Path) -> None:
    doc = json.loads((pkg / MANIFEST).read_text())
    next(f for f in doc["files"] if f["path"] == "norm.bin")["size"] = PAGE
    (pkg / MANIFEST).write_text(json.dumps(doc))
    (pkg / "norm.bin").unlink()
    (pkg / "norm.bin").mkdir()       # a directory's st_size is 4096 on ext4/tmpfs-like filesystems


def _nan_embeddings(pkg: Path) -> None:
    f = pkg / "embed.bin"
    f.write_bytes(b"\xff" * f.stat().st_size)   # every float is NaN; sizes still match


FOUND = {
    "threshold 10**400": (_set(("layers", 0, "threshold"), 10**400), ["layers[0]", "threshold"]),
    "norm_eps 10**400": (_set(("config", "norm_eps"), 10**400), ["config.norm_eps"]),
    "bos_token_id -1": (_set(("config", "bos_token_id"), -1), ["token id -1"]),
    "eos_token_ids 10**30": (_set(("config", "eos_token_ids"), [10**30]), ["token id"]),
    "rope.cos float16": (_set(("tensors", "rope.cos", "dtype"), "float16"), ["'rope.cos'", "float32"]),
    "head_dim 32, n_heads 12": (lambda d: d["config"].update(head_dim=32, n_heads=12), ["layers.0.qkv", "config"]),
}


@pytest.mark.parametrize("case", sorted(FOUND) + ["directory as norm.bin", "NaN embeddings"])
def test_found_by_fuzzing(tiny_llama_pkg, tmp_path, capsys, case):
    from edgesparse.cli import main
    pkg = tmp_path / "p.esp"
    shutil.copytree(tiny_llama_pkg, pkg)
    if case in FOUND:
        edit, needles = FOUND[case]
        doc = json.loads((pkg / MANIFEST).read_text())
        edit(doc)
        (pkg / MANIFEST).write_text(json.dumps(doc))
    elif case == "directory as norm.bin":
        _dir_instead_of_norm_bin(pkg)
        needles = ["norm.bin", "not a regular file"]
    else:
        _nan_embeddings(pkg)
        needles = ["non-finite logits", "edgesparse verify"]
        assert load_model(pkg)       # damaged bytes load and run (NaN in, NaN out)...
    rc = main(["run", str(pkg), "-p", "w5 w6", "-n", "2"])
    out, err = capsys.readouterr()
    assert rc == 1 and "Traceback" not in out + err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("edgesparse: error: "), lines
    for n in needles:
        assert n in lines[0], (n, lines[0])

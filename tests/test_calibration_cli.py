"""`edgesparse calibrate` and `edgesparse eval` (runtime/sparsity/evaluate.py) through the CLI: the
manifest they write, eval's outputs, bad text and arguments, a calibrated package at sparsity 0,
--dump, and the real SmolLM2. References and tolerances: test_calibration.py's docstring."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from edgesparse.cli import main
from edgesparse.format import read_manifest
from edgesparse.runtime import kernels as K
from edgesparse.runtime.sparsity.calibrate import LEVELS, METHODS
from edgesparse.runtime.core.model import Model
from edgesparse.runtime.sparsity.textdata import token_windows
from helpers.calibration_ref import (CAL_TOKENS, EVAL_KEYS, RESULT_KEYS, TINY_WINDOW, achieved, calibrate_copy,
                                     calibrated_pkg, cli_error, hf_ffn_values, hf_nll, run_ok, text_file, text_ids,
                                     tree_digest)


# == 6. the CLI ==================================================================================
def test_cli_calibrate_writes_a_valid_manifest(calibrated_pkg, tiny_llama_pkg, text_file):
    m = read_manifest(calibrated_pkg)
    sp = m.sparsity
    cal = sp["calibration"]
    L, N, D = m.config.n_layers, m.config.ffn_dim, m.config.d_model
    assert sp["method"] == "paper" and sp["level"] == 0.5
    assert cal["tokens"] == CAL_TOKENS and cal["window"] == TINY_WINDOW and cal["text"] == str(text_file)
    assert cal["levels"] == list(LEVELS)
    assert set(cal["thresholds"]) == set(cal["histograms"]) == set(METHODS)
    for method in METHODS:
        th = np.array(cal["thresholds"][method], np.float64)
        print(method, "\n", th)
        assert th.shape == (len(LEVELS), L)
        assert np.all(np.isfinite(th))
        assert np.all(th[0] == 0.0)
        assert np.all(th[1:] > 0.0)
        assert np.all(np.diff(th, axis=0) >= 0.0), f"{method}: thresholds decrease with the level"
        hist = cal["histograms"][method]
        total = np.sum(hist["counts"], axis=1) + np.array(hist["zeros"]) + np.array(hist["overflow"])
        per_token = D if method == "input" else N
        np.testing.assert_array_equal(total, CAL_TOKENS * per_token)   # every value seen once
        assert len(hist["log10_edges"]) == len(hist["counts"][0]) + 1
    active = cal["thresholds"]["paper"][LEVELS.index(0.5)]
    assert [l.threshold for l in m.layers] == active
    # everything but the calibration is the exported manifest
    base = read_manifest(tiny_llama_pkg)
    assert (m.config, m.files, m.tensors, m.chat_template) == (base.config, base.files, base.tensors,
                                                               base.chat_template)
    assert [(l.attention, l.ffn) for l in m.layers] == [(l.attention, l.ffn) for l in base.layers]
    assert Model(calibrated_pkg, ctx=64).thresholds.tolist() == np.float32(active).tolist()


@pytest.mark.parametrize("method,target", [("gate", "0.3"), ("input", "0.9"), ("paper", "0")])
def test_cli_calibrate_activates_method_and_level(tiny_llama_pkg, text_file, tmp_path, capsys, method, target):
    pkg = calibrate_copy(tiny_llama_pkg, tmp_path / "pkg", text_file, "--method", method, "--target", target)
    _, err = capsys.readouterr()
    m = read_manifest(pkg)
    sp = m.sparsity
    level = float(target)
    print(err)
    assert sp["method"] == method and sp["level"] == level
    assert [l.threshold for l in m.layers] == sp["calibration"]["thresholds"][method][LEVELS.index(level)]
    rt = Model(pkg, ctx=64)
    assert rt.method == method
    assert (rt.thresholds > 0).all() == (level > 0)


@pytest.fixture(scope="module")
def eval_out(calibrated_pkg, text_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "out"
    rc = main(["eval", str(calibrated_pkg), "--text", str(text_file), "--ctx", "128", "--windows", "3",
               "--sparsity", "0,0.5", "-o", str(out), "-q"])
    assert rc == 0
    return out


def test_cli_eval_outputs(eval_out, text_file, tiny_hf, capsys):
    def no_constants(name):
        raise ValueError(f"{name} is not JSON")
    res = json.loads((eval_out / "eval.json").read_text(), parse_constant=no_constants)
    print(json.dumps(res, indent=1)[:1500])
    assert set(res) == EVAL_KEYS
    assert res["windows"] == 3 and res["window_tokens"] == 128 and res["predicted_tokens"] == 3 * 127
    assert res["text"] == str(text_file) and res["threads"] >= 1 and res["seconds"] > 0
    rs = res["results"]
    # dense once, then each calibrated method at 0.5: the active one (paper) first, then gate, input
    assert [(r["method"], r["target"]) for r in rs] == [("dense", 0.0), ("paper", 0.5), ("gate", 0.5),
                                                        ("input", 0.5)]
    for r in rs:
        assert set(r) == RESULT_KEYS
        assert math.isfinite(r["perplexity"]) and r["perplexity"] > 1
        assert len(r["achieved_sparsity_per_layer"]) == 3
        assert r["achieved_sparsity_mean"] == pytest.approx(np.mean(r["achieved_sparsity_per_layer"]), abs=1e-12)
        # eval text = calibration text here (other positions): achieved close to the target
        assert abs(r["achieved_sparsity_mean"] - r["target"]) <= 0.03
        skip = r["achieved_sparsity_mean"] * (2 / 3 if r["method"] == "input" else 1)
        assert r["ffn_bytes_skippable"] == pytest.approx(skip, abs=1e-12)
    assert rs[0]["achieved_sparsity_per_layer"] == [0.0, 0.0, 0.0]
    # the dense perplexity is transformers' on the same windows
    wins = token_windows(text_ids(text_file), 128, 3)
    ppl_hf = math.exp(np.concatenate([hf_nll(tiny_hf, w) for w in wins]).mean())
    print(f"eval dense ppl {rs[0]['perplexity']:.6f}, HF {ppl_hf:.6f}")
    assert abs(rs[0]["perplexity"] / ppl_hf - 1) <= 1e-4
    # sparse results differ from dense (the thresholds were applied) but not wildly, on this model
    assert all(r["perplexity"] != rs[0]["perplexity"] for r in rs[1:])
    md = (eval_out / "eval.md").read_text().splitlines()
    # what the numbers are, then the table
    assert md[0].startswith("edgesparse's perplexity on ") and "3 non-overlapping windows of 128 tokens" in md[0]
    assert f"all 127 positions of each scored ({3 * 127} predictions in all)" in md[0]
    assert md[2].startswith("| method | target | perplexity") and md[4 + len(rs)] == ""
    assert md[4].startswith("| dense | 0.0 | ") and f"{rs[0]['perplexity']:.2f}" in md[4]
    # then the KL divergence from dense on the same windows (the tiny package has no chat template)
    assert md[5 + len(rs)].startswith("KL divergence from the dense model on the text") and "chat" not in res
    pngs = sorted(p.name for p in eval_out.glob("*.png"))
    print(pngs)
    assert pngs == ["activation_histograms.png", "perplexity_vs_sparsity.png", "quality_vs_sparsity.png",
                    "sparsity_per_layer.png"]
    for p in eval_out.glob("*.png"):
        data = p.read_bytes()
        assert len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n"


def _bad_text(kind: str, tmp_path: Path) -> Path:
    p = tmp_path / f"{kind}.txt"
    if kind == "non-utf8":
        p.write_bytes(b"w5 w6 w7 \xff\xfe w8\n")
    elif kind == "empty":
        p.write_bytes(b"")
    elif kind == "blank":
        p.write_text("  \n\n \t\n")
    elif kind == "short":
        p.write_text("w5 w6 w7\n")
    return p


@pytest.mark.parametrize("cmd", ["eval", "calibrate"])
@pytest.mark.parametrize("kind,needles", [
    ("non-utf8", ["not UTF-8", "byte 9"]),
    ("empty", ["empty"]),
    ("blank", ["empty"]),
    ("missing", ["--text", "no such file"]),
    ("short", ["3 tokens", "fewer than one window"]),
])
def test_cli_bad_text(capsys, calibrated_pkg, tmp_path, cmd, kind, needles):
    p = _bad_text(kind, tmp_path)
    extra = ["--ctx", "128", "--sparsity", "0"] if cmd == "eval" else []
    before = tree_digest(calibrated_pkg)
    line = cli_error(capsys, [cmd, calibrated_pkg, "--text", p, *extra, "-q"], *needles)
    if kind != "short":
        assert str(p) in line
    assert tree_digest(calibrated_pkg) == before            # a failed calibrate leaves the package alone


@pytest.mark.parametrize("args,needles", [
    (["--sparsity", "1.0"], ["--sparsity", "[0, 1)", "'1.0'"]),
    (["--sparsity", "-0.1"], ["--sparsity", "'-0.1'"]),
    (["--sparsity", "abc"], ["--sparsity", "'abc'"]),
    (["--sparsity", "0,0.5,x"], ["--sparsity", "'0,0.5,x'"]),
    (["--sparsity", ""], ["--sparsity"]),
    (["--ctx", "1"], ["--ctx", "1"]),
    (["--windows", "0"], ["--windows", "0"]),
    (["--methods", "bogus", "--sparsity", "0.5"], ["'bogus'"]),
    (["--methods", "bogus", "--sparsity", "0"], ["'bogus'"]),
    (["--sparsity", "0.55"], ["0.55", "not a calibrated level"]),
])
def test_cli_eval_bad_arguments(capsys, calibrated_pkg, text_file, tmp_path, args, needles):
    out = tmp_path / "out"
    cli_error(capsys, ["eval", calibrated_pkg, "--text", text_file, "--ctx", "128", "--windows", "1", *args,
                       "-o", out, "-q"], *needles)


def test_cli_eval_sparse_on_uncalibrated_package(capsys, tiny_llama_pkg, text_file, tmp_path):
    cli_error(capsys, ["eval", tiny_llama_pkg, "--text", text_file, "--ctx", "128", "--sparsity", "0,0.5",
                       "-o", tmp_path / "out", "-q"], tiny_llama_pkg, "not calibrated")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args,needles", [
    (["--method", "bogus"], ["--method", "'bogus'"]),
    (["--target", "1.0"], ["--target", "'1.0'"]),
    (["--target", "0.25"], ["0.25", "not a calibrated level"]),
    (["--tokens", "100"], ["--tokens 100", "at least one window", "256"]),
])
def test_cli_calibrate_bad_arguments(capsys, tiny_llama_pkg, text_file, tmp_path, args, needles):
    pkg = tmp_path / "pkg"
    shutil.copytree(tiny_llama_pkg, pkg)
    before = tree_digest(pkg)
    cli_error(capsys, ["calibrate", pkg, "--text", text_file, "-q", *args], *needles)
    assert tree_digest(pkg) == before


def test_cli_run_sparsity_on_uncalibrated_package(capsys, tiny_llama_pkg):
    cli_error(capsys, ["run", tiny_llama_pkg, "-p", "w5 w6", "--sparsity", "0.5"], "not calibrated")


def run_stats(capsys, pkg, tmp_path, *args) -> tuple[str, dict]:
    js = tmp_path / "stats.json"
    out, _ = run_ok(capsys, "run", pkg, "-p", "w5 w6 w7 w8", "-n", 12, "--stats-json", js, *args)
    return out, json.loads(js.read_text())


def test_cli_run_uses_calibrated_thresholds(capsys, calibrated_pkg, tmp_path):
    """rows read = gate + up rows of every neuron + down columns of the kept ones: at 50% paper
    sparsity about (2 + 0.5) / 3 of the rows; dense reads all of them."""
    fractions = {}
    for level in ("0.5", "0.9", "0", None):
        _, s = run_stats(capsys, calibrated_pkg, tmp_path, *(["--sparsity", level] if level else []))
        fractions[level] = s["ffn_rows_read_fraction"]
    print(fractions)
    assert fractions["0"] == 1.0
    assert 0.75 < fractions["0.5"] < 0.92
    assert 2 / 3 < fractions["0.9"] < fractions["0.5"]
    assert fractions[None] == fractions["0.5"]             # the active level is 0.5
    cli_error(capsys, ["run", calibrated_pkg, "-p", "w5", "--sparsity", "0.55"], "0.55", "not a calibrated level")


# == 7. a calibrated package still runs like the exported one ========================================
@pytest.mark.parametrize("method", ["paper", "gate", "input"])
def test_calibrated_package_at_sparsity_0_is_the_exported_model(capsys, tiny_llama_pkg, text_file, tmp_path,
                                                                method):
    before = tree_digest(tiny_llama_pkg)
    pkg = calibrate_copy(tiny_llama_pkg, tmp_path / "pkg", text_file, "--method", method)
    after = tree_digest(pkg)
    assert {k for k in after if after[k] != before[k]} == {"manifest.json"}
    assert after.keys() == before.keys()                    # nothing added, nothing removed
    out, _ = run_ok(capsys, "verify", pkg)
    assert "ok" in out
    # the CLI: greedy text at --sparsity 0 equals the exported package's, and differs with the
    # active calibrated thresholds only if the thresholds do something (checked on the logits below)
    args = ["-p", "w5 w6 w7", "-n", 16]
    dense, _ = run_ok(capsys, "run", tiny_llama_pkg, *args)
    zero, _ = run_ok(capsys, "run", pkg, *args, "--sparsity", "0")
    assert zero == dense
    # the library, as `run --sparsity 0` sets it up: prefill and decode logits bit for bit
    ids = np.random.default_rng(8).integers(3, 211, 80)
    ref, cal = Model(tiny_llama_pkg, ctx=128), Model(pkg, ctx=128)
    assert cal.method == method and (cal.thresholds > 0).all()
    sparse = cal.forward(ids, all_logits=True).copy()
    cal.set_thresholds([0.0] * cal.cfg.n_layers)
    for m in (ref, cal):
        m.reset()
    a, b = ref.forward(ids, all_logits=True).copy(), cal.forward(ids, all_logits=True).copy()
    for m in (ref, cal):
        m.reset()
        m.forward(ids[:10])
    da = np.array([ref.forward([int(tok)]).copy() for tok in ids[10:20]])
    db = np.array([cal.forward([int(tok)]).copy() for tok in ids[10:20]])
    print(f"{method} at t=0 vs exported: max|logit diff| prefill {np.abs(a - b).max():.3g}, "
          f"decode {np.abs(da - db).max():.3g}")
    np.testing.assert_array_equal(da, db)     # decode: ffn_glu computes h the same way in every mode
    if method == "gate":
        # Not bit for bit: in the BLAS prefill path glu_threshold evaluates act() through another
        # code path in gate mode than in paper mode (LLVM versions the loop on `mode`), so h differs
        # in the last ulp (~5e-7 on values of O(1)). Within test_tiny_llama's LOGIT_TOL.
        assert np.abs(a - b).max() <= 2e-5
    else:
        np.testing.assert_array_equal(a, b)
    change = float(np.abs(sparse - a).max())
    print(f"{method}: max|logit change| from the active 50% thresholds {change:.3g}")
    assert change > 1e-3


# == 8. --dump ====================================================================================
def test_cli_calibrate_dump(tiny_llama_pkg, text_file, tiny_hf, tmp_path):
    import h5py
    pkg = tmp_path / "pkg"
    shutil.copytree(tiny_llama_pkg, pkg)
    dump = tmp_path / "acts.h5"
    tokens = 2 * TINY_WINDOW
    assert main(["calibrate", str(pkg), "--text", str(text_file), "--tokens", str(tokens), "--dump", str(dump),
                 "-q"]) == 0
    with h5py.File(dump, "r") as f:
        h = f["h"][...]
    cfg = read_manifest(pkg).config
    assert h.shape == (cfg.n_layers, tokens, cfg.ffn_dim) and h.dtype == np.float16
    wins = token_windows(text_ids(text_file), TINY_WINDOW, 2)

    # 1) the model's own dense activations for the first window (observer: gate/up pre-threshold)
    rt = Model(tiny_llama_pkg, ctx=256)
    own = {}

    def observe(l, f, g, u):
        a = np.empty_like(g)
        K.activation(g, rt.act, a)
        own[l] = a * u
    rt.observer = observe
    rt.forward(wins[0])
    for l in range(cfg.n_layers):
        # float16 rounding of a float32 value: at most half an ulp, 2^-11 relative (2^-25 subnormal)
        tol = 2.0 ** -11 * np.abs(own[l]) + 2.0 ** -25
        diff = np.abs(h[l, :TINY_WINDOW].astype(np.float64) - own[l])
        print(f"layer {l}: dump vs runtime h: max|diff| {diff.max():.3g}, max diff/tol {(diff / tol).max():.3g}")
        assert np.all(diff <= tol)

    # 2) transformers' h for both windows (the second checks the token offset): float16 rounding
    # plus the runtime-vs-HF float32 difference (~1e-6 of the layer's largest |h| observed)
    for w, win in enumerate(wins):
        ref = hf_ffn_values(tiny_hf, win)
        for l in range(cfg.n_layers):
            r = ref[l]["h"]
            tol = 2.0 ** -11 * np.abs(r) + 2.0 ** -25 + 1e-5 * np.abs(r).max()
            diff = np.abs(h[l, w * TINY_WINDOW:(w + 1) * TINY_WINDOW].astype(np.float64) - r)
            print(f"window {w} layer {l}: dump vs HF h: max|diff| {diff.max():.3g}, max diff/tol {(diff / tol).max():.3g}")
            assert np.all(diff <= tol)


# == slow: the real SmolLM2 ==========================================================================
@pytest.mark.slow
def test_smollm2_perplexity_matches_transformers(smollm2_pkg, smollm2_hf):
    from edgesparse.runtime.core.text import TextCodec
    from edgesparse.runtime.sparsity.textdata import load_text
    tok, hf = smollm2_hf
    rt = Model(smollm2_pkg, ctx=256, max_batch=256)
    text, desc = load_text("wikitext2", "test")
    ids = TextCodec(rt.pkg).encode(text[:20_000], special=False)   # 256 tokens need ~1 KB of text
    win = token_windows(ids, 256, 1)[0]
    nll = rt.nll(win)
    ref = hf_nll(hf, win)
    ppl, ppl_hf = math.exp(nll.mean()), math.exp(ref.mean())
    print(f"{desc}, one window of 256 tokens: runtime ppl {ppl:.4f}, transformers ppl {ppl_hf:.4f}, "
          f"rel {ppl / ppl_hf - 1:.2e}, max per-token |NLL diff| {np.abs(nll - ref).max():.2e}")
    assert 2 < ppl_hf < 200          # a real language model on English text
    assert abs(ppl / ppl_hf - 1) <= 0.005


@pytest.mark.slow
def test_smollm2_cli_calibration_reproduces_50_percent(smollm2_pkg, tmp_path, capsys):
    from edgesparse.runtime.core.text import TextCodec
    from edgesparse.runtime.sparsity.textdata import load_text
    pkg = tmp_path / "smol.esp"
    shutil.copytree(smollm2_pkg, pkg)
    # the paper's method: the text alone, 50 % active (the default adds chat answers and picks the level)
    run_ok(capsys, "calibrate", pkg, "--text", "wikitext2", "--tokens", 2048, "--chat", 0, "--target", 0.5, "-q")
    sp = read_manifest(pkg).sparsity
    cal = sp["calibration"]
    assert cal["tokens"] == 2048 and cal["window"] == 512 and cal["text"].startswith("wikitext2:valid")
    assert sp["method"] == "paper" and sp["level"] == 0.5
    rt = Model(pkg, ctx=512, max_batch=512)
    text, _ = load_text("wikitext2", "valid")
    wins = token_windows(TextCodec(rt.pkg).encode(text, special=False), 512, 4)
    ach = achieved(rt, wins)
    print(f"achieved at 0.5 on the calibration windows: mean {ach.mean():.4f}, per layer {np.round(ach, 4)}")
    assert abs(ach.mean() - 0.5) <= 0.01
    assert np.all(np.abs(ach - 0.5) <= 0.02)

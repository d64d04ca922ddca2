"""Calibration (`edgesparse calibrate`, runtime/calibrate.py) and the perplexity/sparsity
evaluation (`edgesparse eval`, runtime/evaluate.py, Model.nll), against real references:
numpy.quantile of the same values, transformers' logits and FFN activations, and the runtime's
own decode path.

The tiny package is calibrated on a synthetic text: random words w3..w210 of its WordLevel
vocabulary (one token each), written to a temporary file. Its max_position is 256, so the CLI
calibrates in windows of 256 tokens (512 for SmolLM2).

Tolerances:
- perplexity vs transformers: the runtime's logits match HF's to ~3e-7 (LOGIT_TOL = 2e-5 in
  test_tiny_llama.py, from the float32 error of the lm_head dot product). A log-softmax moves by
  at most 2 max|logit diff|, so each token's NLL agrees to 4e-5 and exp(mean NLL) to a relative
  4e-5. We assert 1e-4 per token and the issue's 0.5% on the perplexity; observed ~1e-6.
  SmolLM2 (30 layers, logits ~O(10), agree to ~1e-4 relative in test_smollm2.py): 0.5%.
- achieved sparsity vs target: the thresholds are percentiles of the dense model's values; on the
  calibration text layer 0 sees exactly the calibrated distribution (up to the histogram's
  in-bin interpolation, well under 0.5 points), later layers see inputs shifted by the upstream
  thresholding. The issue's bound is 1 point.
- dump: float16 has an 11-bit significand: rounding a float32 h moves it by at most 2^-11 |h|
  (2^-25 absolute in the subnormal range).
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from edgesparse.cli import main
from edgesparse.format import read_manifest
from edgesparse.runtime import kernels as K
from edgesparse.runtime.calibrate import BINS, LEVELS, LOG_HI, LOG_LO, METHODS, LogHistogram, calibrate
from edgesparse.runtime.model import SMALL_BATCH, Model
from edgesparse.runtime.textdata import token_windows

TEXT_WORDS = 3000
CAL_TOKENS = 2048
TINY_WINDOW = 256          # the CLI's window for the tiny package: min(512, max_position 256)
EVAL_KEYS = {"windows", "window_tokens", "predicted_tokens", "results", "text", "seconds", "threads"}
RESULT_KEYS = {"method", "target", "perplexity", "achieved_sparsity_mean", "achieved_sparsity_per_layer",
               "ffn_bytes_skippable"}
BIN_LOG10 = (LOG_HI - LOG_LO) / BINS           # width of one histogram bin in log10 units


# -- helpers -----------------------------------------------------------------------------------------
def run_ok(capsys, *args) -> tuple[str, str]:
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    assert rc == 0, err
    return out, err


def cli_error(capsys, argv, *needles) -> str:
    """A non-zero exit with exactly one line `edgesparse: error: ...` naming every needle."""
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert rc != 0, err
    assert "Traceback" not in out + err
    lines = err.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {lines}"
    assert lines[0].startswith("edgesparse: error: ")
    for n in needles:
        assert str(n) in lines[0], f"{n!r} not named in {lines[0]!r}"
    print(lines[0])
    return lines[0]


def tree_digest(d: Path) -> dict[str, str]:
    return {p.relative_to(d).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file()}


def text_ids(path: Path) -> list[int]:
    """The synthetic text's token ids: word wN is token N (WordLevel vocabulary, whitespace split)."""
    return [int(w[1:]) for w in path.read_text().split()]


def hf_nll(hf, window) -> np.ndarray:
    """Per-token cross-entropy of window[1:] from transformers' float32 logits, in float64."""
    import torch
    logits = hf(torch.tensor(np.asarray(window))[None]).logits[0].double()
    return torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(np.asarray(window[1:])),
                                             reduction="none").numpy()


def hf_ffn_values(hf, window) -> list[dict[str, np.ndarray]]:
    """Per layer, from transformers' own forward pass: the FFN input x [S, D] (float32, captured
    with a hook) and, from it in float64, a = act(gate.x) and h = a * (up.x) [S, N]."""
    import torch
    xs = []
    hooks = [layer.mlp.register_forward_hook(lambda mod, inp, out: xs.append(inp[0][0].detach().clone()))
             for layer in hf.model.layers]
    try:
        hf(torch.tensor(np.asarray(window))[None])
    finally:
        for hk in hooks:
            hk.remove()
    out = []
    for layer, x in zip(hf.model.layers, xs):
        mlp = layer.mlp
        x64 = x.double()
        g = x64 @ mlp.gate_proj.weight.double().T
        u = x64 @ mlp.up_proj.weight.double().T
        a = mlp.act_fn(g)
        out.append({"x": x.numpy(), "a": a.numpy(), "h": (a * u).numpy()})
    return out


def achieved(model: Model, windows) -> np.ndarray:
    """Per-layer fraction zeroed by the model's current thresholds over windows (each from pos 0)."""
    model.reset_counts()
    for w in windows:
        model.reset()
        model.forward(w)
    return 1.0 - model.counts[:, 0] / model.counts[:, 1]


# -- fixtures ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    rng = np.random.default_rng(2024)
    words = [f"w{i}" for i in rng.integers(3, 211, TEXT_WORDS)]
    p = tmp_path_factory.mktemp("text") / "cal.txt"
    p.write_text("\n".join(" ".join(words[i:i + 25]) for i in range(0, len(words), 25)) + "\n")
    return p


def calibrate_copy(src: Path, dst: Path, text: Path, *args) -> Path:
    shutil.copytree(src, dst)
    rc = main(["calibrate", str(dst), "--text", str(text), "--tokens", str(CAL_TOKENS), "-q", *map(str, args)])
    assert rc == 0
    return dst


@pytest.fixture(scope="module")
def calibrated_pkg(tiny_llama_pkg, text_file, tmp_path_factory) -> Path:
    """tiny_llama_pkg calibrated through the CLI (defaults: paper, 0.5). Read-only."""
    return calibrate_copy(tiny_llama_pkg, tmp_path_factory.mktemp("cal") / "pkg", text_file)


@pytest.fixture(scope="module")
def cal_windows(text_file) -> np.ndarray:
    """The windows the CLI calibrated on: the first 2048 tokens in windows of 256."""
    return token_windows(text_ids(text_file), TINY_WINDOW, CAL_TOKENS // TINY_WINDOW)


# == 2. LogHistogram ================================================================================
@pytest.mark.parametrize("sigma", [0.5, 2.0])
def test_log_histogram_quantiles_vs_numpy(sigma):
    """sigma 0.5: narrow, ~1.3% of the values per bin near the mode, so a quantile that ignored
    the position inside its bin would be off by more than the 0.5 points allowed."""
    rng = np.random.default_rng(int(sigma * 10))
    v = [rng.lognormal(-3.0, sigma, 70_000) * rng.choice([-1.0, 1.0], 70_000) for _ in range(3)]
    other = rng.lognormal(1.0, 1.0, 50_000)            # layer 1: another distribution
    hist = LogHistogram(2)
    for chunk in v:                                    # added in several batches, float64 in
        hist.add(0, chunk)
    hist.add(1, other.astype(np.float32))
    a = np.abs(np.concatenate(v)).astype(np.float32)   # what add() histograms: float32 |v|
    assert hist.counts[0].sum() == a.size and hist.counts[1].sum() == other.size
    worst = 0.0
    for layer, vals in ((0, a), (1, other.astype(np.float32))):
        for q in np.round(np.arange(0.1, 0.91, 0.1), 1):
            t = hist.quantile(layer, float(q))
            frac = float((vals < t).mean())
            t_np = float(np.quantile(vals, q))
            dlog = abs(math.log10(t / t_np))
            worst = max(worst, abs(frac - q))
            print(f"layer {layer} q={q}: t {t:.6g}, numpy {t_np:.6g} ({dlog / BIN_LOG10:.2f} bins), "
                  f"fraction below t {frac:.5f}")
            assert abs(frac - q) <= 0.005
            assert dlog <= 2 * BIN_LOG10       # the returned t lies in (or next to) numpy's bin
    print(f"max |fraction below t - q| = {worst:.2e}")
    assert hist.quantile(0, 0.0) == 0.0 and hist.quantile(1, 0.0) == 0.0


def test_log_histogram_exact_zeros():
    """ReLU-like data, 60% exact zeros: the 50% threshold zeroes exactly the zeros (and no more)."""
    rng = np.random.default_rng(6)
    n = 100_000
    v = rng.lognormal(-2.0, 1.5, n).astype(np.float32)
    v[rng.permutation(n)[: int(0.6 * n)]] = 0.0
    hist = LogHistogram(1)
    hist.add(0, v)
    t = hist.quantile(0, 0.5)
    print(f"t(0.5) = {t:g}, smallest non-zero |v| {float(v[v > 0].min()):g}")
    assert 0.0 < t <= float(v[v > 0].min())
    assert int((np.abs(v) < t).sum()) == int((v == 0).sum()) == int(0.6 * n)
    assert hist.quantile(0, 0.0) == 0.0
    t8 = hist.quantile(0, 0.8)                         # above the zeros: a real percentile again
    assert abs(float((v < t8).mean()) - 0.8) <= 0.005


def test_calibration_table_vs_numpy_quantiles_of_hf_activations(calibrated_pkg, cal_windows, tiny_hf):
    """Every stored threshold (3 methods x 9 levels x 3 layers) against numpy.quantile of the same
    quantity computed by transformers on the calibration windows: |h|, |act(gate.x)|, |x|."""
    cal = read_manifest(calibrated_pkg).sparsity["calibration"]
    per = [hf_ffn_values(tiny_hf, w) for w in cal_windows]
    L = len(per[0])
    worst = 0.0
    for method, key in (("paper", "h"), ("gate", "a"), ("input", "x")):
        for l in range(L):
            vals = np.abs(np.concatenate([p[l][key] for p in per]).ravel())
            for i, q in enumerate(cal["levels"]):
                t = cal["thresholds"][method][i][l]
                if q == 0.0:
                    assert t == 0.0
                    continue
                frac = float((vals < t).mean())
                worst = max(worst, abs(frac - q))
                assert abs(frac - q) <= 0.005, f"{method} layer {l} level {q}: {frac:.4f} of the values below t"
                assert abs(math.log10(t / np.quantile(vals, q))) <= 2 * BIN_LOG10
    print(f"max |fraction of HF values below t - level| = {worst:.2e}")


# == 1b. Model.nll / perplexity vs transformers =====================================================
@pytest.mark.parametrize("max_batch", [256, 48])
def test_nll_matches_transformers_tiny(tiny_llama_pkg, tiny_hf, max_batch):
    """max_batch 256: each 130-token window is one BLAS-path prefill; 48: chunks of 48+48+34
    through the Numba small-batch kernel, the NLL continuing across chunk boundaries."""
    wins = np.random.default_rng(11).integers(0, 211, (3, 130))
    rt = Model(tiny_llama_pkg, ctx=256, max_batch=max_batch)
    assert 130 > SMALL_BATCH >= 48
    ours = [rt.nll(w) for w in wins]
    ref = [hf_nll(tiny_hf, w) for w in wins]
    again = rt.nll(wins[0])                            # nll restarts at position 0 every call
    np.testing.assert_array_equal(again, ours[0])
    d = max(float(np.abs(a - b).max()) for a, b in zip(ours, ref))
    ppl, ppl_hf = math.exp(np.concatenate(ours).mean()), math.exp(np.concatenate(ref).mean())
    print(f"max_batch {max_batch}: ppl runtime {ppl:.6f}, HF {ppl_hf:.6f}, rel {ppl / ppl_hf - 1:.2e}, "
          f"max per-token |NLL diff| {d:.2e}")
    assert all(a.shape == (129,) and a.dtype == np.float64 for a in ours)
    assert d <= 1e-4
    assert abs(ppl / ppl_hf - 1) <= 0.005


# == 4. prefill (BLAS) vs decode: the same neurons zeroed ===========================================
BAND_REL = 1e-4   # the two paths' pre-threshold values differ by ~4e-6 relative (printed below)


@pytest.mark.parametrize("method", ["paper", "gate", "input"])
def test_prefill_and_decode_zero_the_same_neurons_end_to_end(tiny_llama_pkg, method):
    """100 tokens through the BLAS prefill path once and through decode one token at a time, with
    calibrated median thresholds. Prefill's decisions: the observer hands over each layer's
    pre-threshold gate/up projections (or FFN input), and glu_threshold / |x| >= t applied to a
    copy of them is bitwise the model's own decision (checked against model.counts). Decode's:
    model.h[l] (paper: every neuron's h; gate: 0 for a dropped neuron), checked against the
    per-step model.counts deltas. input (TEAL): per-token kept counts of the FFN input."""
    rng = np.random.default_rng(5)
    rt = Model(tiny_llama_pkg, ctx=256, max_batch=128)
    table = calibrate(rt, list(rng.integers(3, 211, 1024)), tokens=1024, window=128, progress=False)
    t = np.array(table["thresholds"][method][LEVELS.index(0.5)], np.float32)
    rt.set_thresholds(t, method)
    seq = rng.integers(3, 211, 100)
    L, N, S = rt.cfg.n_layers, rt.cfg.ffn_dim, seq.size
    assert S > SMALL_BATCH

    captured = {}
    rt.observer = lambda l, f, g, u: captured.__setitem__(l, (f.copy(), g.copy(), u.copy()))
    rt.reset()
    rt.reset_counts()
    rt.forward(seq)
    rt.observer = None
    pre_counts = rt.counts.copy()
    pre_keep, pre_q = [], []                            # [S, N] (input: [S, D]) per layer
    for l in range(L):
        f, g, u = captured[l]
        if method == "input":
            keep, q = np.abs(f) >= t[l], np.abs(f)
        else:
            h, kept = g.copy(), np.zeros(S, np.int64)
            K.glu_threshold(h, u.copy(), t[l], rt.act, kept, K.MODE_CODES[method])
            a = np.empty_like(g)
            K.activation(g, rt.act, a)
            keep, q = h != 0.0, np.abs(a * u) if method == "paper" else np.abs(a)
            assert int(kept.sum()) == int(keep.sum())
        assert int(keep.sum()) == pre_counts[l, 0], "recomputed prefill decisions differ from the model's"
        pre_keep.append(keep)
        pre_q.append(q)

    rt.reset()
    rt.reset_counts()
    dec_kept = np.zeros((L, S), np.int64)
    dec_h = np.zeros((L, S, N), np.float32)
    for s in range(S):
        before = rt.counts[:, 0].copy()
        rt.forward([int(seq[s])])
        dec_kept[:, s] = rt.counts[:, 0] - before
        dec_h[:, s] = rt.h
    if method != "input":
        assert rt.stats.ffn_kept == dec_kept.sum(0).tolist()

    n_dec = n_band = n_flip = 0
    for l in range(L):
        band = np.abs(pre_q[l] - t[l]) <= BAND_REL * t[l]
        n_band += int(band.sum())
        if method == "input":
            n_dec += pre_keep[l].size
            diff = pre_keep[l].sum(1) - dec_kept[l]
            n_flip += int(np.abs(diff).sum())
            bad = np.flatnonzero(np.abs(diff) > band.sum(1))
            assert bad.size == 0, f"layer {l}: tokens {bad} keep different FFN-input counts in decode"
            continue
        n_dec += S * N
        dk = np.abs(dec_h[l]) >= t[l] if method == "paper" else dec_h[l] != 0.0
        np.testing.assert_array_equal(dk.sum(1), dec_kept[l])   # decode's set is the model's decision
        flip = dk != pre_keep[l]
        n_flip += int(flip.sum())
        bad = np.argwhere(flip & ~band)
        assert bad.size == 0, f"layer {l}: (token, neuron) {bad[:5].tolist()} zeroed differently by prefill and decode"
        # where both kept a neuron, both computed the same h up to float32 rounding
        h_pre = np.where(pre_keep[l], pre_q[l], 0.0) if method == "paper" else None
        if h_pre is not None:
            both = dk & pre_keep[l]
            rel = float((np.abs(np.abs(dec_h[l][both]) - h_pre[both]) / h_pre[both]).max())
            print(f"layer {l}: max relative |h| difference prefill vs decode {rel:.2e}")
            assert rel <= BAND_REL / 10
        frac = 1.0 - dk.mean()
        assert 0.3 < frac < 0.7, f"layer {l}: {frac:.2f} zeroed; the thresholds should zero about half"
    print(f"{method}: {n_dec} decisions, {n_band} within {BAND_REL:g} relative of t, {n_flip} differ")
    assert n_band < 0.005 * n_dec


# == 5. calibration reproduces its targets ==========================================================
def test_calibration_reproduces_targets_tiny(tiny_llama_pkg, text_file):
    """Library call on the synthetic text (windows of 128), then the model run with each level's
    thresholds over the same windows: achieved sparsity within 1 point of the target, mean and
    per layer; all 9 paper levels, gate and input at 0.5."""
    ids = text_ids(text_file)
    rt = Model(tiny_llama_pkg, ctx=256, max_batch=128)
    table = calibrate(rt, ids, tokens=1024, window=128, progress=False)
    assert table["tokens"] == 1024 and table["window"] == 128 and table["levels"] == list(LEVELS)
    np.testing.assert_array_equal(rt.thresholds, 0.0)     # calibrate restores the model's thresholds
    wins = token_windows(ids, 128, 8)
    worst_mean = worst_layer = 0.0
    runs = [("paper", q) for q in LEVELS[1:]] + [("gate", 0.5), ("input", 0.5)]
    for method, q in runs:
        rt.set_thresholds(table["thresholds"][method][LEVELS.index(q)], method)
        ach = achieved(rt, wins)
        dev = ach - q
        worst_mean, worst_layer = max(worst_mean, abs(dev.mean())), max(worst_layer, float(np.abs(dev).max()))
        print(f"{method} {q}: achieved mean {ach.mean():.4f}, per-layer deviation (points) {np.round(100 * dev, 3)}")
        assert abs(dev.mean()) <= 0.01
        assert np.all(np.abs(dev) <= 0.01)
    print(f"max |mean deviation| {100 * worst_mean:.3f} points, max per-layer {100 * worst_layer:.3f} points")


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
    # dense once, then each calibrated method at 0.5
    assert [(r["method"], r["target"]) for r in rs] == [("dense", 0.0), ("gate", 0.5), ("input", 0.5),
                                                        ("paper", 0.5)]
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
    assert md[0].startswith("| method | target | perplexity") and len(md) == 2 + len(rs)
    assert md[2].startswith("| dense | 0.0 | ") and f"{rs[0]['perplexity']:.2f}" in md[2]
    pngs = sorted(p.name for p in eval_out.glob("*.png"))
    print(pngs)
    assert pngs == ["activation_histograms.png", "perplexity_vs_sparsity.png", "sparsity_per_layer.png"]
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
    from edgesparse.runtime.text import TextCodec
    from edgesparse.runtime.textdata import load_text
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
    from edgesparse.runtime.text import TextCodec
    from edgesparse.runtime.textdata import load_text
    pkg = tmp_path / "smol.esp"
    shutil.copytree(smollm2_pkg, pkg)
    run_ok(capsys, "calibrate", pkg, "--text", "wikitext2", "--tokens", 2048, "-q")
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

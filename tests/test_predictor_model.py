"""The model's predict mode (`--ffn predict`) against a float64 NumPy Llama with the predict rule:
logits, candidate sets, counts, and the prefill paths against decode. References and tolerances:
tests/helpers/predictor_ref.py (and the docstring of test_predictor_kernels.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from edgesparse.errors import EdgesparseError
from edgesparse.runtime import kernels as K
from edgesparse.runtime.sparsity.levels import configure
from edgesparse.runtime.core.model import SMALL_BATCH, Model
from helpers.predictor_ref import (LOGIT_TOL, act_ref, assert_logits, decode_logits, pred_pkg, pred_rows, ref,  # noqa: F401
                                    text_file)


def test_predict_at_zero_is_the_dense_model(pred_pkg):
    """t_pred = 0 and t = 0: every neuron is a candidate and survives; the same logits as the
    threshold mode at 0 on all three FFN paths (decode, short prefill, BLAS prefill)."""
    L = 3
    dense, pred = Model(pred_pkg, ctx=128), Model(pred_pkg, ctx=128)
    configure(dense, "threshold", 0.0)
    configure(pred, "predict", 0.0)
    assert pred.ffn_mode == "predict" and not pred.thresholds.any() and not pred.t_pred.any()
    N = pred.cfg.ffn_dim
    rng = np.random.default_rng(31)
    short, long = rng.integers(0, 211, 24), rng.integers(0, 211, 100)
    assert len(long) > SMALL_BATCH
    for what, x in (("short prefill", short), ("long prefill", long)):
        for m in (dense, pred):
            m.reset()
            m.reset_counts()
        a = dense.forward(x, all_logits=True)
        b = pred.forward(x, all_logits=True)
        assert_logits(f"predict at 0 vs dense, {what}", b, a)
        np.testing.assert_array_equal(pred.counts[:, 2], pred.counts[:, 1])    # all candidates
        np.testing.assert_array_equal(pred.counts[:, 0], pred.counts[:, 1])    # all kept
    a, b = decode_logits(dense, short, 5), decode_logits(pred, short, 5)
    assert_logits("predict at 0 vs dense, decode", b, a)
    assert pred.stats.ffn_rows == [3 * N * L] * (len(short) - 5) == dense.stats.ffn_rows


def test_dense_mode_ignores_the_active_thresholds(pred_pkg):
    """--ffn dense on a calibrated package (active: paper at 0.5) is the dense model: every
    neuron on every path, the same logits as thresholds 0, every row read."""
    rt, zero = Model(pred_pkg, ctx=128), Model(pred_pkg, ctx=128)
    assert rt.thresholds.all()
    rt.set_ffn_mode("dense")
    zero.set_thresholds([0.0] * 3)
    N = rt.cfg.ffn_dim
    rng = np.random.default_rng(33)
    for n in (24, 100):                          # short and BLAS prefill
        x = rng.integers(0, 211, n)
        for m in (rt, zero):
            m.reset()
            m.reset_counts()
        assert_logits(f"dense mode vs t=0, prefill of {n}", rt.forward(x, all_logits=True),
                      zero.forward(x, all_logits=True).astype(np.float64), tol=0.0)
        np.testing.assert_array_equal(rt.counts[:, 0], rt.counts[:, 1])
    x = rng.integers(0, 211, 12)
    assert_logits("dense mode vs t=0, decode", decode_logits(rt, x, 4), decode_logits(zero, x, 4), tol=0.0)
    assert rt.stats.ffn_rows == [3 * N * 3] * 8


def test_predict_t_pred_inf_removes_the_ffn(pred_pkg, ref):
    rt = Model(pred_pkg, ctx=64)
    L = rt.cfg.n_layers
    rt.set_thresholds([0.0] * L, "paper")
    rt.set_ffn_mode("predict", [math.inf] * L)
    ids = np.random.default_rng(32).integers(0, 211, 16)
    lr, _, _, _ = ref.forward(ids, [math.inf] * L)
    assert_logits("t_pred=inf prefill vs numpy without FFN", rt.forward(ids, all_logits=True), lr)
    assert_logits("t_pred=inf decode vs numpy without FFN", decode_logits(rt, ids, 10), lr[9:])
    assert rt.stats.ffn_rows == [0] * 6 and rt.stats.ffn_kept == [0] * 6
    assert not rt.counts[:, 2].any()


def test_set_ffn_mode_checks(pred_pkg, tiny_llama_pkg):
    rt = Model(pred_pkg, ctx=32)
    before = rt.t_pred.copy()
    for bad in ([0.1, float("nan"), 0.1], [0.1, -1.0, 0.1], [0.1, 0.1]):
        with pytest.raises(EdgesparseError, match="predictor thresholds"):
            rt.set_ffn_mode("predict", bad)
        np.testing.assert_array_equal(rt.t_pred, before)
    with pytest.raises(EdgesparseError, match="--ffn"):
        rt.set_ffn_mode("bogus")
    with pytest.raises(EdgesparseError, match="needs a predictor"):
        Model(tiny_llama_pkg, ctx=32).set_ffn_mode("predict")


def test_predict_decode_matches_reference(pred_pkg, ref, monkeypatch):
    """The calibrated predictor at 0.5 (t_pred and the paper thresholds of the package) against
    the float64 reference with the candidate mask: logits of a short prefill and of every decode
    step, each layer's candidate set (h != 0) exactly, the kept and row counts. Exact set
    comparison is meaningful only if no |h| or |h^| lies within the runtime's error of its
    threshold: asserted below from the measured errors, with a 10x margin."""
    rt = Model(pred_pkg, ctx=64)
    configure(rt, "predict", 0.5)
    sp = rt.pkg.manifest.sparsity
    i50 = sp["calibration"]["levels"].index(0.5)
    ts = np.array(sp["calibration"]["thresholds"]["paper"][i50], np.float32)
    tps = np.array(sp["calibration"]["thresholds"]["predicted"][i50], np.float32)
    np.testing.assert_array_equal(rt.thresholds, ts)
    np.testing.assert_array_equal(rt.t_pred, tps)
    np.testing.assert_array_equal(tps, np.float32([l.pred_threshold for l in rt.pkg.manifest.layers]))
    L, N = rt.cfg.n_layers, rt.cfg.ffn_dim
    wq = pred_rows(rt.pkg)
    n0 = 4

    def margins(hs, hps):
        """Absolute distance of the nearest candidate's |h| to t, and of the nearest |h^| to t_pred."""
        cand = [np.abs(hp) >= tp for hp, tp in zip(hps, tps)]
        return (min(float(np.abs(np.abs(h[c]) - t).min()) for h, c, t in zip(hs, cand, ts)),
                min(float(np.abs(np.abs(hp) - tp).min()) for hp, tp in zip(hps, tps)))
    # Of a few random token sequences, the one whose values stay farthest from the thresholds in
    # the reference (chosen from the reference alone; the runtime's errors are checked below).
    runs = []
    for seed in range(6):
        ids = np.random.default_rng(seed).integers(0, 211, 16)
        # float64 thresholds equal to the float32 ones the runtime compares with
        out = ref.forward(ids, ts.astype(np.float64), wq, tps.astype(np.float64))
        runs.append((min(margins(out[2], out[3])), seed, ids, out))
    _, seed, ids, (lr, fs, hs, hps) = max(runs, key=lambda r: r[0])
    lt, _, _, _ = ref.forward(ids, ts.astype(np.float64))
    cand = [np.abs(hp) >= tp for hp, tp in zip(hps, tps)]
    keep = [c & (np.abs(h) >= t) for c, h, t in zip(cand, hs, ts)]
    frac = [float(c.mean()) for c in cand]
    change = float(np.abs(lr - lt).max())
    print(f"candidate fractions {np.round(frac, 3)}, logit change from the predictor vs threshold only {change:.3g}")
    assert all(0.3 < f < 0.7 for f in frac)
    assert change > 100 * LOGIT_TOL          # a runtime ignoring the predictor fails by far

    seen = {}                                # decode: the FFN input each layer's kernel got

    def spy(w, ws, b, pq, ps, x, *rest):
        seen.setdefault(id(pq), []).append(x.copy())
        return orig(w, ws, b, pq, ps, x, *rest)
    orig = K.ffn_predict
    monkeypatch.setattr(K, "ffn_predict", spy)

    rt.reset()
    rt.reset_counts()
    assert_logits("predict prefill (4 tokens) vs numpy", rt.forward(ids[:n0], all_logits=True), lr[:n0])
    assert rt.counts[:, 2].tolist() == [int(c[:n0].sum()) for c in cand]
    h_err = 0.0
    for p in range(n0, len(ids)):
        before = rt.counts.copy()
        assert_logits(f"predict decode at {p}", rt.forward([int(ids[p])]), lr[p])
        d = rt.counts - before
        for l in range(L):
            got_cand = rt.h[l] != 0.0
            np.testing.assert_array_equal(got_cand, cand[l][p], err_msg=f"layer {l} position {p}: candidates")
            h_err = max(h_err, float(np.abs(rt.h[l][got_cand] - hs[l][p][got_cand]).max(initial=0.0)))
            assert d[l, 2] == int(cand[l][p].sum()) and d[l, 0] == int(keep[l][p].sum())
        assert rt.stats.ffn_kept[-1] == sum(int(k[p].sum()) for k in keep)
        assert rt.stats.ffn_rows[-1] == sum(2 * int(c[p].sum()) + int(k[p].sum()) for c, k in zip(cand, keep))
    # the runtime's h^ (from the FFN inputs its kernels saw) against the reference's
    hp_err = 0.0
    for l in range(L):
        f = np.array(seen[id(rt.layers[l].pred_q)], np.float64)              # [steps, D]
        hp_rt = act_ref("silu", f @ wq[l][:, 0].T) * (f @ wq[l][:, 1].T)
        hp_err = max(hp_err, float(np.abs(hp_rt - hps[l][n0:]).max()))
    m_h, m_hp = margins(hs, hps)
    print(f"seed {seed}: max|h diff| {h_err:.3g}, max|h^ diff| {hp_err:.3g}; nearest |h| to t {m_h:.3g}, "
          f"nearest |h^| to t_pred {m_hp:.3g}")
    assert m_h > 10 * h_err and m_hp > 10 * max(hp_err, h_err)


def test_prefill_paths_agree_with_decode_on_candidates(pred_pkg, monkeypatch):
    """100 tokens through the BLAS prefill (dense gate/up, glu_threshold, then the quantized
    rows dequantized for BLAS and predict_mask), the first 40 through the short-prefill kernel
    (ffn_predict_batch), and all 100 one at a time through decode (ffn_predict), with the
    calibrated t_pred and thresholds at 0.5. The three compute h and h^ in different orders
    (BLAS, and prefill vs decode attention in ORT), so decisions may differ only for values within
    rounding of their threshold: BAND_REL relative, where the paths' values differ by ~1e-6
    relative (printed). Where both paths keep a neuron, h agrees within the same relative bound."""
    BAND_REL = 1e-4
    rt = Model(pred_pkg, ctx=128, max_batch=128)
    configure(rt, "predict", 0.5)
    L, N = rt.cfg.n_layers, rt.cfg.ffn_dim
    t, tp = rt.thresholds.copy(), rt.t_pred.copy()
    wq = pred_rows(rt.pkg)
    wx = [rt.ffn[l].astype(np.float64) for l in range(L)]
    layer_of = {id(rt.layers[l].pred_q): l for l in range(L)}
    seq = np.random.default_rng(5).integers(3, 211, 100)
    S, S_short = seq.size, 40
    assert S > SMALL_BATCH >= S_short

    blas = {}
    orig_mask = K.predict_mask

    def spy_mask(h, gp, up, t_pred, act, cand):
        orig_mask(h, gp, up, t_pred, act, cand)
        blas[len(blas)] = (h.copy(), cand.copy())
    monkeypatch.setattr(K, "predict_mask", spy_mask)
    rt.reset()
    rt.reset_counts()
    rt.forward(seq)
    assert len(blas) == L
    for l in range(L):
        assert rt.counts[l, 2] == int(blas[l][1].sum())
        assert rt.counts[l, 0] == int(np.count_nonzero(blas[l][0]))

    short = {}
    orig_batch = K.ffn_predict_batch

    def spy_batch(w, ws, b, pq, ps, X, base, t_pred, thr, act, out, h_out, *rest):
        r = orig_batch(w, ws, b, pq, ps, X, base, t_pred, thr, act, out, h_out, *rest)
        short[layer_of[id(pq)]] = (h_out.copy(), r)
        return r
    monkeypatch.setattr(K, "ffn_predict_batch", spy_batch)
    rt.reset()
    rt.forward(seq[:S_short])
    assert len(short) == L

    dec_h = np.zeros((L, S, N), np.float32)
    dec_f = np.zeros((L, S, rt.cfg.d_model), np.float32)
    orig_one = K.ffn_predict

    def spy_one(w, ws, b, pq, ps, x, *rest):
        dec_f[layer_of[id(pq)], rt.pos] = x
        return orig_one(w, ws, b, pq, ps, x, *rest)
    monkeypatch.setattr(K, "ffn_predict", spy_one)
    rt.reset()
    for s in range(S):
        rt.forward([int(seq[s])])
        dec_h[:, s] = rt.h

    n_band = n_flip = 0
    worst_rel = 0.0
    for l in range(L):
        f = dec_f[l].astype(np.float64)
        h64 = act_ref("silu", f @ wx[l][:, 0].T) * (f @ wx[l][:, 1].T)          # [S, N] from decode's input
        hp64 = act_ref("silu", f @ wq[l][:, 0].T) * (f @ wq[l][:, 1].T)
        band_c = np.abs(np.abs(hp64) - tp[l]) <= BAND_REL * tp[l]
        band = band_c | (np.abs(np.abs(h64) - t[l]) <= BAND_REL * t[l])
        dec_cand = dec_h[l] != 0.0
        dec_keep = dec_cand & (np.abs(dec_h[l]) >= t[l])
        # decode's own candidate set is the |h^| >= t_pred set of its input, up to rounding
        assert not np.any((dec_cand != (np.abs(hp64) >= tp[l])) & ~band_c)
        h_blas, cand_blas = blas[l]
        blas_keep = h_blas != 0.0                          # t > 0: a kept h is nonzero
        h_short, (k_short, c_short) = short[l]
        short_cand = h_short != 0.0
        short_keep = short_cand & (np.abs(h_short) >= t[l])
        assert k_short == int(short_keep.sum()) and c_short == int(short_cand.sum())
        for what, keep_x, h_x, n in (("BLAS prefill", blas_keep, h_blas, S),
                                     ("short prefill", short_keep, h_short, S_short)):
            flip = keep_x != dec_keep[:n]
            n_flip += int(flip.sum())
            bad = np.argwhere(flip & ~band[:n])
            assert bad.size == 0, \
                f"layer {l} {what}: (token, neuron) {bad[:5].tolist()} decided differently from decode"
            both = keep_x & dec_keep[:n]
            rel = np.abs(h_x[both].astype(np.float64) - dec_h[l][:n][both]) / np.abs(dec_h[l][:n][both])
            worst_rel = max(worst_rel, float(rel.max(initial=0.0)))
            assert np.all(rel <= BAND_REL), \
                f"layer {l} {what}: kept h differs from decode's by {rel.max():.3g} relative"
        # candidates: the short kernel reports them (h != 0); BLAS only their count per token
        flip = short_cand != dec_cand[:S_short]
        assert not np.any(flip & ~band_c[:S_short]), f"layer {l}: short prefill candidates differ from decode"
        off = np.abs(cand_blas[:S] - dec_cand.sum(axis=1))
        assert np.all(off <= band_c.sum(axis=1)), f"layer {l}: BLAS candidate counts differ from decode"
        n_band += int(band.sum())
        assert 0.2 < dec_cand.mean() < 0.8 and 0.05 < dec_keep.mean() < dec_cand.mean()
    print(f"{n_band} (token, neuron) pairs within {BAND_REL:g} of a threshold, {n_flip} decided differently; "
          f"max relative |h| difference where both keep {worst_rel:.3g}")

"""The activation predictor (`--ffn predict`): runtime/predictor.py, the Numba kernels
ffn_predict_batch / ffn_predict / dequant_pred / predict_mask, here: the quantizer and
the kernels (the model: test_predictor_model.py; the CLI and manifest: test_predictor_cli.py).

The predictor's layout: pq [N, 2, D] int8 (q = round(w / scale), |q| <= 127, row 0 gate, row 1
up) and ps [N, 2] float32 (one scale per row, max|w| / 127).

References are plain NumPy in float64. The predictor's weights are q * scale with q an int8 and
scale a float32: exact in float64, so the reference uses exactly the numbers the kernel reads, and
the only differences are the kernel's float32 rounding.

Tolerances follow tests/test_kernels.py and tests/test_sparsity_modes.py: a float32 sum of n
terms, in any order, is within (n - 1) u sum|terms| of the exact sum (u = 2**-24); we use
n * eps32 = 2 n u. The predicted dot product scale * (sum_k q_k x_k) has one rounding per
product q_k x_k, D - 1 additions and one product by the scale: at most D + 1 <= 2 D roundings
of terms bounded by |q_k scale x_k|, so D * eps32 * sum|wq_k x_k| bounds it, the same bound as
the exact rows'.
Activations: 8 eps32 (|act(g)| + |g|) (gelu's 1 + erf cancels for negative g, see
test_sparsity_modes.py). Decisions (candidate or not, kept or not) are compared exactly except
where the exact value lies within that rounding bound of the threshold (the "band"), and where
possible the thresholds are placed in a gap so that the band is empty and sets must agree exactly.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from edgesparse.runtime import kernels as K
from edgesparse.runtime.sparsity import predictor as P
from helpers.predictor_ref import (ACTS, CHUNKS, DTYPES, EPS32, GLU, QMAX, act_err, act_ref, assert_within,
                                   exact_dequant, gap_threshold, make_case, nob, nos, out_ref, rule, run_batch,
                                   run_one)


# == 1. quantize / dequantize ========================================================================
def test_quantize_layout_by_hand():
    """scale = max|w| / 127 per row, q = round(w / scale), stored as int8 q itself."""
    assert P.QMAX == QMAX
    w = np.zeros((1, 3, 4), np.float32)
    w[0, 0] = [QMAX, -QMAX, 1.0, 0.0]                    # scale 1: q = w
    w[0, 1] = [0.5, -QMAX / 2, 2.0, -1.0]               # scale 0.5: q = 1, -QMAX, 4, -2
    w[0, 2] = 99.0                                       # the down row is not part of the predictor
    pq, ps = P.quantize(w)
    assert pq.dtype == np.int8 and ps.dtype == np.float32
    assert pq.shape == (1, 2, 4) and ps.shape == (1, 2)
    np.testing.assert_array_equal(ps[0], [1.0, 0.5])
    np.testing.assert_array_equal(pq[0], [[QMAX, -QMAX, 1, 0], [1, -QMAX, 4, -2]])
    np.testing.assert_array_equal(P.dequantize(pq, ps), w[:, :2])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,D", [(37, 96), (37, 20), (5, 6), (5, 7)])
def test_quantize_round_trip(N, D, dtype):
    rng = np.random.default_rng((N + 1) * D)
    w = (rng.standard_normal((N, 3, D)) / math.sqrt(D)).astype(np.float32)
    w[3, 0] = 0.0                            # an all-zero row: scale 0, dequantizes to 0
    w[4, 1] *= 1e-3                          # a row of tiny values with one outlier
    w[4, 1, D // 2] = 3.0
    w[2, 1] *= 1e4                           # a large row
    w = w.astype(np.float16) if dtype == "float16" else w
    src = w.copy()
    pq, ps = P.quantize(w)
    np.testing.assert_array_equal(w, src)    # input untouched
    assert pq.shape == (N, 2, D) and pq.dtype == np.int8 and pq.flags.c_contiguous
    assert ps.shape == (N, 2) and ps.dtype == np.float32 and ps.flags.c_contiguous
    q = pq.astype(np.int64)
    assert np.abs(q).max() <= QMAX                       # symmetric: never -128
    wr = w[:, :2].astype(np.float32)
    np.testing.assert_array_equal(ps, np.abs(wr).max(axis=2) / np.float32(QMAX))
    # the down row does not enter the predictor
    w2 = w.copy()
    w2[:, 2] = -w2[:, 2] + 1
    pq2, ps2 = P.quantize(w2)
    np.testing.assert_array_equal(pq2, pq)
    np.testing.assert_array_equal(ps2, ps)

    deq = P.dequantize(pq, ps)
    assert deq.shape == (N, 2, D) and deq.dtype == np.float32
    # Round trip: |q - w/s| <= 1/2 plus the rounding of w/s in float32 (|w/s| <= QMAX, so
    # <= (QMAX + 1) u), and q*s rounds once more (<= QMAX u s):
    # |deq - w| <= s/2 + (2 QMAX + 1) u s < s/2 + (QMAX + 1) eps32 s.
    s = np.repeat(ps.astype(np.float64)[..., None], D, axis=2)   # [N, 2, D]
    tol = s / 2 + (QMAX + 1) * EPS32 * s
    assert_within("quantize round trip", deq, w[:, :2].astype(np.float64), tol + 1e-300)
    assert np.all(deq[3, 0] == 0.0) and ps[3, 0] == 0.0
    # symmetric full range: each row's largest |w| becomes +-QMAX * scale
    amax = np.abs(wr).argmax(axis=2)[..., None]
    big = np.take_along_axis(np.abs(q), amax, axis=2)[..., 0]
    assert np.all((big == QMAX) | (ps == 0))
    # the NumPy reference and the Numba kernel dequantize bit for bit
    out = np.full((N, 2, D), np.nan, np.float32)
    K.dequant_pred(pq, ps, out)
    print("dequant_pred vs dequantize: max|diff|", float(np.abs(out - deq).max()))
    np.testing.assert_array_equal(out.view(np.uint32), deq.view(np.uint32))
    # and both are exactly q * scale
    np.testing.assert_array_equal(deq.astype(np.float64), np.float32(exact_dequant(pq, ps)))


# == 2. the kernels against the NumPy reference ======================================================
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("C", CHUNKS)
@pytest.mark.parametrize("S", [1, 3])
def test_predict_t_pred_zero_is_dense_and_inf_is_nothing(S, C, dtype, act):
    """t_pred = 0: every neuron is a candidate (|h^| >= 0), so the kernel computes what
    ffn_glu_batch does with the same per-neuron code: the same h, out and kept count, at t = 0 and
    at a percentile threshold. Not bit for bit: fastmath lets LLVM reassociate the inlined dot
    products differently in each kernel (1 ulp seen), so within a few float32 ulps of each
    value's magnitude. t_pred = +inf: no candidate, out is base bit for bit."""
    N, D = 37, 96
    w, wx, pq, ps, X, base = make_case(S * 100 + C, N, D, S, dtype)
    refs = [GLU(wx[:, 0], wx[:, 1], X[s], act) for s in range(S)]
    t_mid = float(np.float32(np.percentile(np.abs([r.h for r in refs]), 60)))
    for thr in (0.0, t_mid):
        out, h, k, c = run_batch(w, pq, ps, X, base, 0.0, thr, act, C)
        out_g = np.full((S, D), np.nan, np.float32)
        h_g = np.full((S, N), np.nan, np.float32)
        k_g = K.ffn_glu_batch(w, nos(w), nob(w), X, base, np.float32(thr), K.ACT_CODES[act], out_g, h_g,
                              np.full((C, S, D), np.nan, np.float32), np.zeros(C, np.int64))
        print(f"t_pred=0 thr={thr:.3g} vs ffn_glu_batch: max|out diff| {float(np.abs(out - out_g).max()):.3g}, "
              f"max|h diff| {float(np.abs(h - h_g).max()):.3g}")
        # a few ulps of each value (both kernels accumulate the same D products in float32)
        np.testing.assert_allclose(h, h_g, rtol=8 * EPS32, atol=1e-30)
        np.testing.assert_allclose(out, out_g, rtol=0, atol=8 * EPS32 * float(np.abs(out_g).max()))
        assert c == S * N and k == k_g
        if thr == 0.0:       # all but exact zeros (relu): their down column is never read
            assert k == int(np.count_nonzero(h))
        for s, r in enumerate(refs):           # and against float64
            assert_within(f"h token {s} (t_pred=0, thr={thr:.3g})", h[s], r.h, r.err)
            band = (np.abs(np.abs(r.h) - thr) <= r.err) | (np.abs(r.h) <= r.err)
            keep = np.where(band, rule(h[s], np.float32(thr)), rule(r.h, thr))
            ro, tol = out_ref(wx, base[s], r.h, r.err, keep, C)
            assert_within(f"out token {s} (t_pred=0, thr={thr:.3g})", out[s], ro, tol)
    for thr in (0.0, t_mid, np.inf):
        out, h, k, c = run_batch(w, pq, ps, X, base, np.inf, thr, act, C)
        print(f"t_pred=inf thr={thr}: max|out - base| {float(np.abs(out - base).max())}")
        assert (k, c) == (0, 0)
        np.testing.assert_array_equal(out, base)
        assert np.all(h == 0.0)                 # non-candidates report h = 0
    if S == 1:                                  # the decode wrapper: the same call with S = 1
        for t_pred, thr in ((0.0, 0.0), (0.0, t_mid), (np.inf, 0.0)):
            o1, h1, k1, c1 = run_one(w, pq, ps, X[0], base[0], t_pred, thr, act, C)
            ob, hb, kb, cb = run_batch(w, pq, ps, X, base, t_pred, thr, act, C)
            np.testing.assert_array_equal(o1, ob[0])
            np.testing.assert_array_equal(h1, hb[0])
            assert (k1, c1) == (kb, cb)


@pytest.mark.parametrize("predictor", ["own", "other"])
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("C", CHUNKS)
@pytest.mark.parametrize("S", [1, 3])
def test_predict_candidates_vs_reference(S, C, dtype, act, predictor):
    """t_pred in a gap of the reference |h^| (no neuron within rounding of it), so the candidate
    set must equal NumPy's exactly; the exact h of candidates, 0 for the others; the threshold on
    the exact |h| among candidates (band allowed); out and both counts."""
    N, D = 37, 96
    seed = 1000 + S * 100 + C * 10 + DTYPES.index(dtype) + 7 * ACTS.index(act)
    w, wx, pq, ps, X, base = make_case(seed, N, D, S, dtype, predictor)
    wq = exact_dequant(pq, ps)
    preds = [GLU(wq[:, 0], wq[:, 1], X[s], act) for s in range(S)]
    exact = [GLU(wx[:, 0], wx[:, 1], X[s], act) for s in range(S)]
    hp = np.abs(np.stack([p.h for p in preds]))                          # [S, N]
    err_hp = np.stack([p.err for p in preds])
    # 55th-80th percentile: relu makes about half of all h^ exactly 0
    t_pred, margin = gap_threshold(hp, 0.55, 0.8)
    # no neuron's |h^| within 10x its rounding bound of t_pred: the candidate set is determined
    near = np.abs(hp - t_pred) <= 10 * err_hp
    assert t_pred > 0 and not near.any(), "t_pred within rounding of some |h^|; pick another seed"
    want_cand = hp >= t_pred
    assert 0 < want_cand.sum() < S * N
    if predictor == "other":       # guard: with unrelated quantized rows the sets really differ from |h|'s
        top = np.abs(np.stack([e.h for e in exact])) >= np.percentile(np.abs([e.h for e in exact]), 70)
        assert np.sum(want_cand != top) >= 5
    hc = np.abs(np.stack([e.h for e in exact]))[want_cand]
    thr_mid = float(np.float32(np.percentile(hc, 50)))
    for thr in (0.0, thr_mid):
        out, h, k, c = run_batch(w, pq, ps, X, base, t_pred, thr, act, C)
        print(f"t_pred={t_pred:.4g} (nearest |h^| {margin:.3g} away, max bound {float(err_hp.max()):.3g}) "
              f"thr={thr:.4g}: "
              f"{c} candidates, {k} kept of {S * N}")
        assert c == int(want_cand.sum())
        n_kept = 0
        for s in range(S):
            e, cs = exact[s], want_cand[s]
            assert np.all(h[s][~cs] == 0.0), f"token {s}: a non-candidate reports h != 0"
            assert_within(f"candidate h token {s}", h[s][cs], e.h[cs], e.err[cs])
            band = cs & ((np.abs(np.abs(e.h) - thr) <= e.err) | (np.abs(e.h) <= e.err))
            want_keep = cs & rule(e.h, thr)
            got_keep = cs & rule(h[s], np.float32(thr))
            bad = np.flatnonzero((want_keep != got_keep) & ~band)
            assert bad.size == 0, f"token {s}: neurons {bad} kept/zeroed differently from the reference"
            keep = np.where(band, got_keep, want_keep)
            n_kept += int(keep.sum())
            ro, tol = out_ref(wx, base[s], e.h, e.err, keep, C)
            assert_within(f"out token {s} thr={thr:.3g}", out[s], ro, tol)
        assert k == n_kept
        if thr == 0.0:                  # every candidate but exact zeros (relu) survives t = 0
            assert k == c - int(sum(np.count_nonzero(want_cand[s] & (h[s] == 0)) for s in range(S)))
        # one token at a time through the decode wrapper: the same per-neuron code, bit for bit
        for s in range(S):
            o1, h1, _, c1 = run_one(w, pq, ps, X[s], base[s], t_pred, thr, act, C)
            np.testing.assert_array_equal(h1, h[s])
            np.testing.assert_array_equal(o1, out[s])
            assert c1 == int(want_cand[s].sum())
        # out may alias base (the model adds the FFN onto the residual in place)
        buf = base.copy()
        _, _, k2, c2 = run_batch(w, pq, ps, X, buf, t_pred, thr, act, C, out=buf)
        np.testing.assert_array_equal(buf, out)
        assert (k2, c2) == (k, c)


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("t_kind", ["zero", "inf", "percentile"])
def test_predict_mask_vs_reference(act, t_kind):
    """The BLAS prefill's mask: h <- 0 where |act(gp) * up| < t_pred, in place; cand per token."""
    S, N = 5, 41
    rng = np.random.default_rng(3)
    gp = (rng.standard_normal((S, N)) * 2).astype(np.float32)
    up = rng.standard_normal((S, N)).astype(np.float32)
    h0 = rng.standard_normal((S, N)).astype(np.float32)
    a = act_ref(act, gp)
    hp = a * up
    t = {"zero": 0.0, "inf": np.inf, "percentile": float(np.float32(np.percentile(np.abs(hp), 70)))}[t_kind]
    # exact float32 inputs: act's own rounding and one product
    err = 2 * (np.abs(up) * act_err(a, gp) + EPS32 * np.abs(hp)) + 1e-30
    band = np.abs(np.abs(hp) - t) <= err
    h = h0.copy()
    cand = np.full(S, -1, np.int64)
    K.predict_mask(h, gp, up, np.float32(t), K.ACT_CODES[act], cand)
    want = np.abs(hp) >= t
    got = h != 0.0                             # h0 has no exact zeros
    print(f"t={t}: {int(band.sum())} values within rounding of t")
    assert not np.any((got != want) & ~band)
    np.testing.assert_array_equal(cand, got.sum(axis=1))
    np.testing.assert_array_equal(h[got], h0[got])   # candidates keep their exact h untouched
    if t_kind == "zero":
        assert np.all(cand == N)
    if t_kind == "inf":
        assert np.all(h == 0.0) and np.all(cand == 0)


def test_predict_mask_threshold_is_inclusive():
    """|h^| == t_pred is a candidate: relu of small integers is exact."""
    gp = np.array([[2.0, 2.0, -1.0, 3.0]], np.float32)
    up = np.array([[3.0, 2.5, 9.0, -2.0]], np.float32)    # h^ = 6, 5, 0, -6
    h = np.ones((1, 4), np.float32)
    cand = np.zeros(1, np.int64)
    K.predict_mask(h, gp, up, np.float32(6.0), K.ACT_CODES["relu"], cand)
    np.testing.assert_array_equal(h, [[1.0, 0.0, 0.0, 1.0]])
    assert cand[0] == 2

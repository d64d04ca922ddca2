"""The activation predictor (`--ffn predict`): runtime/predictor.py, the Numba kernels
ffn_predict_batch / ffn_predict / dequant_pred / predict_mask, the model's predict mode, the CLI
(`calibrate --predictor`, `run --ffn predict`, `eval --methods predict`) and the manifest checks.

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

import hashlib
import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from edgesparse.cli import main
from edgesparse.errors import EdgesparseError
from edgesparse.format import read_manifest
from edgesparse.runtime import kernels as K
from edgesparse.runtime import predictor as P
from edgesparse.runtime.model import SMALL_BATCH, Model
from edgesparse.runtime.package import Package
from edgesparse.runtime.textdata import token_windows

EPS32 = float(np.finfo(np.float32).eps)   # 2**-23
ACTS = ["silu", "gelu_tanh", "gelu", "relu"]
DTYPES = ["float32", "float16"]
CHUNKS = [1, 2, 3]
ACT_SLOPE = 1.2                           # max |act'(g)| over the reals is 1.13 (gelu)
LOGIT_TOL = 2e-5                          # tests/test_tiny_llama.py: float32 lm_head dot product of length 96
TEXT_WORDS = 3000
CAL_TOKENS = 1024
TINY_WINDOW = 256                         # the CLI calibrates the tiny package in windows of min(512, 256)
PROMPT = ["-p", "w5 w6 w7 w8"]

_erf = np.vectorize(math.erf, otypes=[np.float64])

QMAX = 127                                # int8, symmetric: |q| <= 127, never -128

def rule(h, t):
    """The kernels' keep rule: |h| >= t, and never an exact zero (ReLU's natural zeros)."""
    return (h != 0) & (np.abs(h) >= t)


def nob(w):
    """"no input biases" for the FFN kernels: shape [0, R-1]."""
    return np.zeros((0, w.shape[1] - 1), np.float32)


def nos(w):
    """"no row scales" (float weights) for the FFN kernels: shape [0, R]."""
    return np.zeros((0, w.shape[1]), np.float32)



# -- helpers -----------------------------------------------------------------------------------------
def act_ref(name: str, g) -> np.ndarray:
    g = np.asarray(g, np.float64)
    if name == "silu":
        with np.errstate(over="ignore"):
            return g / (1.0 + np.exp(-g))
    if name == "gelu_tanh":
        return 0.5 * g * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (g + 0.044715 * g ** 3)))
    if name == "gelu":
        return 0.5 * g * (1.0 + _erf(g / math.sqrt(2.0)))
    if name == "relu":
        return np.maximum(g, 0.0)
    raise ValueError(name)


def act_err(a, g):
    return 8 * EPS32 * (np.abs(a) + np.abs(g)) + 1e-30


def report(what: str, diff: np.ndarray, tol: np.ndarray) -> None:
    ratio = float(np.max(diff / tol)) if diff.size else 0.0
    print(f"{what}: max|diff| {float(np.max(diff, initial=0.0)):.3g}, max diff/tol {ratio:.3g}")


def assert_within(what: str, got, ref, tol) -> None:
    diff = np.abs(np.asarray(got, np.float64) - ref)
    report(what, diff, tol)
    bad = np.flatnonzero(~(diff <= tol))
    assert bad.size == 0, f"{what}: {bad.size} elements out of tolerance, e.g. index {bad[:5]}: " \
                          f"got {np.ravel(got)[bad[:5]]}, ref {np.ravel(ref)[bad[:5]]}, tol {np.ravel(tol)[bad[:5]]}"


def exact_dequant(pq: np.ndarray, ps: np.ndarray) -> np.ndarray:
    """q * scale in float64 (exact: an int8 times a float32), [N, 2, D]."""
    return pq.astype(np.float64) * ps.astype(np.float64)[..., None]


class GLU:
    """act(a . x) * (b . x) in float64 for rows a, b [N, D] and one token x [D], with a bound on a
    float32 evaluation that accumulates in float32 (module docstring)."""

    def __init__(self, a: np.ndarray, b: np.ndarray, x: np.ndarray, act: str):
        D = x.shape[0]
        x = x.astype(np.float64)
        self.g, self.u = a @ x, b @ x
        self.a = act_ref(act, self.g)
        self.h = self.a * self.u
        err_g = D * EPS32 * (np.abs(a) @ np.abs(x))
        err_u = D * EPS32 * (np.abs(b) @ np.abs(x))
        self.err = 2 * (np.abs(self.u) * (ACT_SLOPE * err_g + act_err(self.a, self.g))
                        + np.abs(self.a) * err_u + EPS32 * np.abs(self.h)) + 1e-30


def out_ref(w: np.ndarray, base: np.ndarray, h: np.ndarray, err_h: np.ndarray, keep: np.ndarray, C: int):
    """base + sum over kept neurons of h_i down_i, and its bound: per-chunk float32 sums of up to
    N terms, then C + 1 more additions onto base (tests/test_kernels.py FFNRef.out)."""
    hk = np.where(keep, h, 0.0)
    down = w[:, 2]
    ref = base.astype(np.float64) + hk @ down
    n = w.shape[0] + C + 1
    mag = np.abs(base) + np.abs(hk) @ np.abs(down)
    tol = 2 * (n * EPS32 * mag + np.where(keep, err_h, 0.0) @ np.abs(down)) + 1e-30
    return ref, tol


def make_case(seed: int, N: int, D: int, S: int, dtype: str, predictor: str = "own"):
    """(w handed to the kernel, w exact float64, pq, ps, X [S, D], base [S, D]). The predictor is
    quantized from the same weights ("own", as calibrate builds it) or from unrelated ones
    ("other": then the candidate set has nothing to do with |h| and only the quantized rows decide)."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((N, 3, D)) / math.sqrt(D)).astype(np.float32)
    if dtype == "float16":
        w16 = w.astype(np.float16)
        warg, exact, src = w16.view(np.uint16), w16.astype(np.float64), w16
    else:
        warg, exact, src = w, w.astype(np.float64), w
    if predictor == "other":
        src = (rng.standard_normal((N, 3, D)) / math.sqrt(D)).astype(np.float32)
    pq, ps = P.quantize(src)
    for a in (warg, pq, ps):
        a.setflags(write=False)          # read-only, like the package's mmaps
    X = (rng.standard_normal((S, D)) * 2.0).astype(np.float32)
    base = rng.standard_normal((S, D)).astype(np.float32)
    return warg, exact, pq, ps, X, base


def _scratch(C: int, N: int) -> tuple:
    """The kernels' trailing scratch: kept [C], cand [C] and the per-thread candidate lists
    order [C, >=N] int32; all filled with garbage that must not matter."""
    return np.full(C, -7, np.int64), np.full(C, -7, np.int64), np.full((C, N + 3), -5, np.int32)


def run_batch(w, pq, ps, X, base, t_pred, thr, act, C, out=None):
    N, S, D = w.shape[0], X.shape[0], X.shape[1]
    out = np.full((S, D), np.nan, np.float32) if out is None else out
    h = np.full((S, N), np.nan, np.float32)
    partial = np.full((C, S + 2, D), np.nan, np.float32)   # garbage scratch, and partial [C, >=S, D]
    k, c = K.ffn_predict_batch(w, nos(w), nob(w), pq, ps, X, base, np.float32(t_pred), np.float32(thr), K.ACT_CODES[act],
                               out, h, partial, *_scratch(C, N))
    return out, h, int(k), int(c)


def run_one(w, pq, ps, x, base, t_pred, thr, act, C):
    N, D = w.shape[0], x.shape[0]
    out = np.full(D, np.nan, np.float32)
    h = np.full(N, np.nan, np.float32)
    partial = np.full((C, D), np.nan, np.float32)
    k, c = K.ffn_predict(w, nos(w), nob(w), pq, ps, x, base, np.float32(t_pred), np.float32(thr), K.ACT_CODES[act],
                         out, h, partial, *_scratch(C, N))
    return out, h, int(k), int(c)


def gap_threshold(values: np.ndarray, lo_q: float, hi_q: float) -> tuple[float, float]:
    """A float32 threshold in the widest gap between consecutive sorted values in the lo_q..hi_q
    quantile window, and its distance to the nearest value (so no value sits within rounding)."""
    s = np.sort(np.ravel(values))
    lo, hi = int(lo_q * (s.size - 1)), int(hi_q * (s.size - 1))
    i = lo + int(np.argmax(np.diff(s[lo:hi + 1])))
    t = float(np.float32((s[i] + s[i + 1]) / 2))
    return t, float(min(t - s[i], s[i + 1] - t))


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


# == 3. the tiny model ===============================================================================
class LlamaRef:
    """A whole Llama forward pass in float64 NumPy (copied from tests/test_tiny_llama.py), with the
    predict rule: neuron i of layer l is a candidate iff |act(gate^.f) * (up^.f)| >= t_pred[l]
    (gate^, up^ the quantized rows, exact), and a candidate contributes iff |h| >= t[l]."""

    def __init__(self, hf):
        c = hf.config
        d = lambda t: t.detach().double().numpy()  # noqa: E731
        self.H, self.Hkv = c.num_attention_heads, c.num_key_value_heads
        self.hd = c.hidden_size // self.H
        self.eps = c.rms_norm_eps
        self.embed = d(hf.model.embed_tokens.weight)
        self.head = d(hf.lm_head.weight)
        self.norm = d(hf.model.norm.weight)
        self.layers = []
        for layer in hf.model.layers:
            a, m = layer.self_attn, layer.mlp
            self.layers.append(dict(
                w_in=d(layer.input_layernorm.weight), w_post=d(layer.post_attention_layernorm.weight),
                q=d(a.q_proj.weight), k=d(a.k_proj.weight), v=d(a.v_proj.weight), o=d(a.o_proj.weight),
                gate=d(m.gate_proj.weight), up=d(m.up_proj.weight), down=d(m.down_proj.weight)))
        self.inv_freq = 1.0 / (c.rope_theta ** (np.arange(0, self.hd, 2) / self.hd))

    def rms(self, x, w):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + self.eps) * w

    def rope(self, x, pos):
        f = np.outer(pos, self.inv_freq)
        f = np.concatenate([f, f], -1)[:, None, :]
        half = x.shape[-1] // 2
        rot = np.concatenate([-x[..., half:], x[..., :half]], -1)
        return x * np.cos(f) + rot * np.sin(f)

    def forward(self, ids, thresholds, pred=None, t_pred=None):
        """-> (logits [S, V], per layer: f [S, D], h [S, N] exact, h^ [S, N] predicted or None).
        pred: per layer [N, 2, D] float64 quantized rows, or None for the plain threshold rule."""
        ids = np.asarray(ids)
        S, H, Hkv, hd = len(ids), self.H, self.Hkv, self.hd
        pos = np.arange(S)
        causal = np.triu(np.full((S, S), -np.inf), 1)
        x = self.embed[ids]
        fs, hs, hps = [], [], []
        for l, Pw in enumerate(self.layers):
            xn = self.rms(x, Pw["w_in"])
            q = self.rope((xn @ Pw["q"].T).reshape(S, H, hd), pos)
            k = self.rope((xn @ Pw["k"].T).reshape(S, Hkv, hd), pos)
            v = (xn @ Pw["v"].T).reshape(S, Hkv, hd)
            att = np.empty((S, H, hd))
            for h in range(H):
                kv = h // (H // Hkv)
                s = q[:, h] @ k[:, kv].T / math.sqrt(hd) + causal
                p = np.exp(s - s.max(-1, keepdims=True))
                att[:, h] = (p / p.sum(-1, keepdims=True)) @ v[:, kv]
            x = x + att.reshape(S, H * hd) @ Pw["o"].T
            f = self.rms(x, Pw["w_post"])
            hh = act_ref("silu", f @ Pw["gate"].T) * (f @ Pw["up"].T)
            keep = np.abs(hh) >= thresholds[l]
            hp = None
            if pred is not None:
                hp = act_ref("silu", f @ pred[l][:, 0].T) * (f @ pred[l][:, 1].T)
                keep &= np.abs(hp) >= t_pred[l]
            fs.append(f)
            hs.append(hh)
            hps.append(hp)
            x = x + np.where(keep, hh, 0.0) @ Pw["down"].T
        return self.rms(x, self.norm) @ self.head.T, fs, hs, hps


def assert_logits(what, got, ref, tol=LOGIT_TOL):
    diff = float(np.abs(np.asarray(got, np.float64) - ref).max())
    print(f"{what}: max|logit diff| {diff:.3g} (tol {tol:g})")
    assert np.shape(got) == np.shape(ref)
    assert diff <= tol, f"{what}: max|logit diff| {diff} > {tol}"


def decode_logits(rt: Model, ids, n_prefill: int) -> np.ndarray:
    rt.reset()
    out = [rt.forward(ids[:n_prefill]).copy()]
    for t in ids[n_prefill:]:
        out.append(rt.forward([int(t)]).copy())
    return np.array(out)


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


def pred_dirs(pkg: Path) -> list[str]:
    return sorted(p.name for p in pkg.iterdir() if p.name.lstrip(".").startswith("pred-"))


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    """Random words w3..w210 of the tiny WordLevel vocabulary: one token each."""
    rng = np.random.default_rng(2024)
    words = [f"w{i}" for i in rng.integers(3, 211, TEXT_WORDS)]
    p = tmp_path_factory.mktemp("text") / "cal.txt"
    p.write_text("\n".join(" ".join(words[i:i + 25]) for i in range(0, len(words), 25)) + "\n")
    return p


@pytest.fixture(scope="module")
def pred_pkg(tiny_llama_pkg, text_file, tmp_path_factory) -> Path:
    """tiny_llama_pkg calibrated with --predictor through the CLI (paper, 0.5). Read-only."""
    dst = tmp_path_factory.mktemp("pred") / "pkg"
    shutil.copytree(tiny_llama_pkg, dst)
    assert main(["calibrate", str(dst), "--text", str(text_file), "--tokens", str(CAL_TOKENS), "--predictor",
                 "-q"]) == 0
    return dst


@pytest.fixture(scope="module")
def ref(tiny_hf):
    return LlamaRef(tiny_hf)


def pred_rows(pkg) -> list[np.ndarray]:
    return [exact_dequant(pq, ps) for pq, ps in P.load(pkg if isinstance(pkg, Package) else Package(pkg))]


def test_predict_at_zero_is_the_dense_model(pred_pkg):
    """t_pred = 0 and t = 0: every neuron is a candidate and survives; the same logits as the
    threshold mode at 0 on all three FFN paths (decode, short prefill, BLAS prefill)."""
    L = 3
    dense, pred = Model(pred_pkg, ctx=128), Model(pred_pkg, ctx=128)
    dense.configure("threshold", 0.0)
    pred.configure("predict", 0.0)
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
    rt.configure("predict", 0.5)
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
    rt.configure("predict", 0.5)
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


# == 4. the CLI ======================================================================================
def test_cli_calibrate_predictor_writes_the_predictor(pred_pkg, tiny_llama_pkg, text_file, capsys):
    m, base = read_manifest(pred_pkg), read_manifest(tiny_llama_pkg)
    cfg = m.config
    N, D, L = cfg.ffn_dim, cfg.d_model, cfg.n_layers
    cal = m.sparsity["calibration"]
    assert set(cal["thresholds"]) == {"paper", "gate", "input", "predicted"}
    assert cal["tokens"] == CAL_TOKENS and cal["window"] == TINY_WINDOW
    i50 = cal["levels"].index(0.5)
    assert [l.pred_threshold for l in m.layers] == cal["thresholds"]["predicted"][i50]
    assert all(l.pred_threshold > 0 for l in m.layers)
    for row in zip(*cal["thresholds"]["predicted"]):         # per layer, over the levels
        assert row[0] == 0.0 and all(a < b for a, b in zip(row, row[1:]))
    # one new directory with one file per layer, every other file untouched
    dirs = pred_dirs(pred_pkg)
    assert len(dirs) == 1 and re.fullmatch(r"pred-[0-9a-f]{8}", dirs[0]), dirs
    new = sorted(set(m.files) - set(base.files))
    assert new == [f"{dirs[0]}/{i:03d}.bin" for i in range(L)]
    assert set(base.files) <= set(m.files)
    before, after = tree_digest(tiny_llama_pkg), tree_digest(pred_pkg)
    assert {k for k in before if after.get(k) != before[k]} == {"manifest.json"}
    for i, l in enumerate(m.layers):
        q, s = m.tensors[l.pred_q], m.tensors[l.pred_scale]
        assert (q.dtype, q.shape, s.dtype, s.shape) == ("int8", (N, 2, D), "float32", (N, 2))
        assert q.file == s.file == f"{dirs[0]}/{i:03d}.bin"
    # the stored predictor is quantize() of the stored FFN rows
    pkg = Package(pred_pkg)
    for l, (pq, ps) in zip(m.layers, P.load(pkg)):
        want_q, want_s = P.quantize(pkg.tensor(l.ffn))
        np.testing.assert_array_equal(pq, want_q)
        np.testing.assert_array_equal(ps, want_s)
    out, _ = run_ok(capsys, "verify", pred_pkg)
    assert "ok" in out and f"{len(m.files)} files" in out

    # t_pred are percentiles of |h^| on the calibration windows (dense model), like the paper's
    # thresholds of |h|: within the histogram's 0.5 points (tests/test_calibrate_eval.py)
    rt = Model(pred_pkg, ctx=TINY_WINDOW)
    rt.set_thresholds([0.0] * L)
    wq = pred_rows(rt.pkg)
    fs = {l: [] for l in range(L)}
    rt.observer = lambda l, f, g, u: fs[l].append(f.astype(np.float64))
    ids = [int(w[1:]) for w in text_file.read_text().split()]
    for w in token_windows(ids, TINY_WINDOW, CAL_TOKENS // TINY_WINDOW):
        rt.reset()
        rt.forward(w)
    worst = 0.0
    for l in range(L):
        f = np.concatenate(fs[l])
        assert f.shape[0] == CAL_TOKENS
        hp = np.abs(act_ref("silu", f @ wq[l][:, 0].T) * (f @ wq[l][:, 1].T))
        for i, q in enumerate(cal["levels"]):
            if q > 0:
                frac = float((hp < cal["thresholds"]["predicted"][i][l]).mean())
                worst = max(worst, abs(frac - q))
    print(f"max |fraction of |h^| below t_pred - level| = {worst:.2e}")
    assert worst <= 0.005


def test_calibrate_tabulates_the_given_predictor(tiny_llama_pkg):
    """calibrate(..., predictor=...) tabulates |h^| of the predictor it is given: with int rows
    quantized from unrelated random weights, |h^| has nothing to do with |h| (an accurate int8
    predictor would hide a table of |h| instead), and the stored levels must be its percentiles."""
    from edgesparse.runtime.calibrate import calibrate
    rt = Model(tiny_llama_pkg, ctx=128, max_batch=128)
    L, N, D = rt.cfg.n_layers, rt.cfg.ffn_dim, rt.cfg.d_model
    rng = np.random.default_rng(77)
    pred = [P.quantize((rng.standard_normal((N, 3, D)) / math.sqrt(D)).astype(np.float32)) for _ in range(L)]
    ids = list(rng.integers(3, 211, 512))
    table = calibrate(rt, ids, tokens=512, window=128, progress=False, predictor=pred)
    assert set(table["thresholds"]) == {"paper", "gate", "input", "predicted"}
    assert set(table["histograms"]) == set(table["thresholds"])
    wq = [exact_dequant(pq, ps) for pq, ps in pred]
    fs = {l: [] for l in range(L)}
    rt.observer = lambda l, f, g, u: fs[l].append(f.astype(np.float64))
    for w in token_windows(ids, 128, 4):
        rt.reset()
        rt.forward(w)
    rt.observer = None
    worst, apart = 0.0, 0.0
    for l in range(L):
        f = np.concatenate(fs[l])
        hp = np.abs(act_ref("silu", f @ wq[l][:, 0].T) * (f @ wq[l][:, 1].T))
        for i, q in enumerate(table["levels"]):
            t = table["thresholds"]["predicted"][i][l]
            if q == 0:
                assert t == 0.0
                continue
            worst = max(worst, abs(float((hp < t).mean()) - q))
            apart = max(apart, abs(math.log10(t / table["thresholds"]["paper"][i][l])))
    print(f"max |fraction of |h^| below t_pred - level| {worst:.2e}; the tables differ by up to "
          f"{apart:.2f} decades")
    assert worst <= 0.005
    assert apart > 0.1              # guard: a table of |h| would fail the first check


def test_cli_run_predict(pred_pkg, tmp_path, capsys):
    """`run --ffn predict --stats`: the rows-read line, against the other two modes."""
    fr, text = {}, {}
    for ffn in ("dense", "threshold", "predict"):
        js = tmp_path / f"{ffn}.json"
        text[ffn], err = run_ok(capsys, "run", pred_pkg, *PROMPT, "-n", 12, "--ffn", ffn, "--stats",
                                "--stats-json", js)
        line = [x for x in err.splitlines() if x.startswith("FFN rows read per token")]
        assert len(line) == 1, err
        pct = float(re.search(r"\(([0-9.]+)%\)", line[0]).group(1))
        fr[ffn] = json.loads(js.read_text())["ffn_rows_read_fraction"]
        assert pct == pytest.approx(100 * fr[ffn], abs=0.05)
    # dense reads everything; the paper rule at 50% reads all gate/up rows and half the downs,
    # predict reads gate/up rows of about half the neurons and the downs of the survivors
    assert fr["dense"] == 1.0
    assert 0.75 < fr["threshold"] < 0.92
    assert 0.2 < fr["predict"] < 0.6 and fr["predict"] < fr["threshold"]
    # at level 0 predict is the dense model: the same greedy text
    zero, _ = run_ok(capsys, "run", pred_pkg, *PROMPT, "-n", 12, "--ffn", "predict", "--sparsity", 0)
    assert zero == text["dense"] and len(zero.split()) == 12
    print("rows read fractions", fr)       # last: run_ok reads (and checks) captured stdout


def test_cli_eval_predict(pred_pkg, text_file, tmp_path, capsys):
    out = tmp_path / "out"
    run_ok(capsys, "eval", pred_pkg, "--text", text_file, "--ctx", 128, "--methods", "paper,predict",
           "--sparsity", "0,0.5", "--windows", 1, "-o", out, "-q")
    res = json.loads((out / "eval.json").read_text())
    rs = res["results"]
    assert [(r["method"], r["target"]) for r in rs] == [("dense", 0.0), ("paper", 0.5), ("predict", 0.5)]
    dense, paper, pred = rs
    assert all(math.isfinite(r["perplexity"]) and r["perplexity"] > 1 for r in rs)
    assert pred["perplexity"] != dense["perplexity"] and pred["perplexity"] != paper["perplexity"]
    assert pred["ffn_bytes_skippable"] > 0
    cand, read = np.array(pred["candidates_per_layer"]), np.array(pred["rows_read_per_layer"])
    ach = np.array(pred["achieved_sparsity_per_layer"])
    assert np.all((0 < cand) & (cand < 1))
    # rows read = (gate + up of candidates + down of survivors) / 3N
    np.testing.assert_allclose(read, (2 * cand + 1 - ach) / 3, rtol=0, atol=1e-12)
    assert pred["ffn_bytes_skippable"] == pytest.approx(1 - read.mean(), abs=1e-12)
    assert np.all(ach >= 1 - cand - 1e-12)        # a non-candidate is never kept
    assert dense["ffn_bytes_skippable"] == 0 and dense["achieved_sparsity_mean"] == 0
    # without --methods: every calibrated method, the predictor's included
    out2 = tmp_path / "out2"
    run_ok(capsys, "eval", pred_pkg, "--text", text_file, "--ctx", 128, "--sparsity", "0.5", "--windows", 1,
           "-o", out2, "-q")
    rs2 = json.loads((out2 / "eval.json").read_text())["results"]
    assert [r["method"] for r in rs2] == ["gate", "input", "paper", "predict"]
    assert rs2[3]["perplexity"] == pytest.approx(pred["perplexity"], rel=1e-12)
    print(json.dumps(pred, indent=1))


def test_cli_recalibrate_keeps_the_predictor(pred_pkg, text_file, tmp_path, capsys):
    pkg = tmp_path / "pkg"
    shutil.copytree(pred_pkg, pkg)
    (d,) = pred_dirs(pkg)
    before = {k: v for k, v in tree_digest(pkg).items() if k.startswith(d)}
    m0 = read_manifest(pkg)
    # leftovers of a crashed calibration: an unlisted predictor and a half-written one
    (pkg / "pred-deadbeef").mkdir()
    (pkg / "pred-deadbeef" / "000.bin").write_bytes(b"x")
    (pkg / ".pred-0badf00d.partial").mkdir()
    run_ok(capsys, "calibrate", pkg, "--text", text_file, "--tokens", CAL_TOKENS, "--target", "0.3", "-q")
    m = read_manifest(pkg)
    assert pred_dirs(pkg) == [d]
    assert {k: v for k, v in tree_digest(pkg).items() if k.startswith(d)} == before
    assert [(l.pred_q, l.pred_scale) for l in m.layers] == [(l.pred_q, l.pred_scale) for l in m0.layers]
    cal = m.sparsity["calibration"]
    assert "predicted" in cal["thresholds"] and m.sparsity["level"] == 0.3
    assert [l.pred_threshold for l in m.layers] == cal["thresholds"]["predicted"][cal["levels"].index(0.3)]
    assert cal["thresholds"]["predicted"] == m0.sparsity["calibration"]["thresholds"]["predicted"]  # same text
    run_ok(capsys, "verify", pkg)
    # --predictor again on a package that has one: re-tabulated, not rebuilt
    run_ok(capsys, "calibrate", pkg, "--text", text_file, "--tokens", CAL_TOKENS, "--predictor", "--target", "0",
           "-q")
    assert pred_dirs(pkg) == [d]
    assert [l.pred_threshold for l in read_manifest(pkg).layers] == [0.0, 0.0, 0.0]
    # another active method: predict applies the paper rule, so it needs a level to take it from
    run_ok(capsys, "calibrate", pkg, "--text", text_file, "--tokens", CAL_TOKENS, "--method", "gate", "-q")
    assert pred_dirs(pkg) == [d]
    cli_error(capsys, ["run", pkg, *PROMPT, "--ffn", "predict"], "--ffn predict", "'gate'")
    run_ok(capsys, "run", pkg, *PROMPT, "-n", 4, "--ffn", "predict", "--sparsity", 0.5)
    run_ok(capsys, "verify", pkg)


def test_cli_predict_without_a_predictor(tiny_llama_pkg, text_file, tmp_path, capsys):
    cli_error(capsys, ["run", tiny_llama_pkg, *PROMPT, "--ffn", "predict"], tiny_llama_pkg, "needs a predictor",
              "--predictor")
    cli_error(capsys, ["eval", tiny_llama_pkg, "--text", text_file, "--ctx", 128, "--methods", "paper,predict",
                       "--sparsity", "0", "-o", tmp_path / "o", "-q"], "predict", "predictor")
    assert not (tmp_path / "o").exists()
    cli_error(capsys, ["eval", tiny_llama_pkg, "--text", text_file, "--ctx", 128, "--methods", "predicted",
                       "--sparsity", "0", "-o", tmp_path / "o", "-q"], "'predicted'")
    cli_error(capsys, ["bench", tiny_llama_pkg, "--ffn", "threshold,bogus", "-o", tmp_path / "b", "-q"],
              "--ffn", "bogus")
    assert not (tmp_path / "b").exists()


def test_cli_predict_with_a_partial_predictor(pred_pkg, tmp_path, capsys):
    """A manifest may give the predictor to some layers only (all three keys or none per layer);
    predict mode needs every layer's."""
    pkg = tmp_path / "pkg"
    shutil.copytree(pred_pkg, pkg)
    edit_manifest(pkg, lambda d: [d["layers"][2].pop(k) for k in ("pred_q", "pred_scale", "pred_threshold")])
    run_ok(capsys, "run", pkg, *PROMPT, "-n", 2)
    cli_error(capsys, ["run", pkg, *PROMPT, "--ffn", "predict"], "needs a predictor")


def test_export_calibrate_still_works(tiny_llama_dir, text_file, tmp_path, capsys):
    """`export --calibrate TEXT` runs the calibration with the defaults (no predictor)."""
    out = tmp_path / "pkg"
    run_ok(capsys, "export", tiny_llama_dir, "-o", out, "--calibrate", text_file, "-q")
    m = read_manifest(out)
    assert m.sparsity["method"] == "paper" and all(l.pred_q is None for l in m.layers)
    assert pred_dirs(out) == []


# == 5. the manifest =================================================================================
def edit_manifest(pkg: Path, fn) -> Path:
    m = pkg / "manifest.json"
    doc = json.loads(m.read_text())
    fn(doc)
    m.write_text(json.dumps(doc))
    return m


def _named(fn, name: str):
    fn.__name__ = name[:60]              # the pytest id
    return fn


def _set(layer: int, key: str, value):
    return _named(lambda d: d["layers"][layer].update({key: value}), f"layers[{layer}].{key}={value!r}")


def _pop(layer: int, key: str):
    return _named(lambda d: d["layers"][layer].pop(key), f"layers[{layer}].{key} missing")


def _tensor(name: str, **kw):
    return _named(lambda d: d["tensors"][name].update(kw), f"{name} {kw}")


@pytest.mark.parametrize("edit,needles", [
    (_pop(1, "pred_threshold"), ["layers[1]", "pred_threshold"]),
    (_set(1, "pred_threshold", None), ["layers[1]", "pred_threshold"]),
    (_pop(1, "pred_scale"), ["layers[1]", "pred_scale"]),
    (_pop(0, "pred_q"), ["layers[0]", "pred_q"]),
    (_set(1, "pred_threshold", -0.5), ["layers[1]", "pred_threshold", "-0.5"]),
    (_set(1, "pred_threshold", True), ["layers[1]", "pred_threshold"]),
    (_set(1, "pred_threshold", "0.1"), ["layers[1]", "pred_threshold"]),
    (_set(2, "pred_threshold", 10 ** 400), ["layers[2]", "pred_threshold"]),
    (_set(1, "pred_q", "layers.1.nope"), ["layers[1]", "layers.1.nope"]),
    (_tensor("layers.1.pred_q", dtype="float32", file="ffn/001.bin", offset=0), ["layers.1.pred_q", "int8"]),
    (_tensor("layers.1.pred_q", shape=[136, 2, 24]), ["layers.1.pred_q", "[136, 2, 24]"]),
    (_tensor("layers.1.pred_scale", dtype="int32"), ["layers.1.pred_scale", "float32"]),
    (_tensor("layers.1.pred_scale", file="ffn/001.bin", offset=0, shape=[136, 2, 1, 3]),
     ["layers.1.pred_scale", "[136, 2, 1, 3]"]),
    # not [N, 2]; the enlarged tensors are moved into a file large enough for them, so that their
    # shape is what is wrong
    (_tensor("layers.1.pred_scale", file="ffn/001.bin", offset=0, shape=[136, 2, 5]),
     ["layers.1.pred_scale", "[136, 2, 5]"]),
    (_tensor("layers.1.pred_scale", file="ffn/001.bin", offset=0, shape=[136, 1, 3]),
     ["layers.1.pred_scale", "[136, 1, 3]"]),
    (_set(1, "pred_q", "layers.1.ffn"), ["layers.1.ffn"]),
])
def test_manifest_predictor_entries_checked(pred_pkg, tmp_path, capsys, edit, needles):
    pkg = tmp_path / "pkg"
    shutil.copytree(pred_pkg, pkg)
    m = edit_manifest(pkg, edit)
    cli_error(capsys, ["run", pkg, *PROMPT], m, *needles)
    cli_error(capsys, ["verify", pkg], m, *needles)


def test_manifest_pred_threshold_round_trips(pred_pkg, tmp_path):
    """Integer pred_thresholds load as floats; the writer emits the three keys only for layers
    that have a predictor, and what it writes reads back the same."""
    from edgesparse.format import dump_manifest
    pkg = tmp_path / "pkg"
    shutil.copytree(pred_pkg, pkg)
    edit_manifest(pkg, lambda d: (d["layers"][0].update(pred_threshold=0), d["layers"][1].update(pred_threshold=2),
                                  [d["layers"][2].pop(k) for k in ("pred_q", "pred_scale", "pred_threshold")]))
    m = read_manifest(pkg)
    assert [l.pred_threshold for l in m.layers] == [0.0, 2.0, None]
    assert all(type(l.pred_threshold) is float for l in m.layers[:2])
    rt = Model(pkg, ctx=16)
    assert rt.t_pred.tolist() == [0.0, 2.0, 0.0] and not rt.has_predictor
    doc = json.loads(dump_manifest(m))
    assert [sorted(k for k in l if k.startswith("pred")) for l in doc["layers"]] == \
        [["pred_q", "pred_scale", "pred_threshold"]] * 2 + [[]]
    assert doc["layers"][0]["pred_threshold"] == 0.0 and doc["layers"][1]["pred_threshold"] == 2.0
    (pkg / "manifest.json").write_bytes(dump_manifest(m))
    assert read_manifest(pkg) == m


# == 6. edgesparse analyze ===========================================================================
def test_study_on_constructed_patterns():
    """The predictability study on active sets built to have known answers: layer 0 keeps one
    pattern per window (consecutive tokens and the previous-token predictor are perfect), layer 1
    is independent coin flips (consecutive overlap = chance), and the predictor sets equal the
    active sets (recall = precision = 1)."""
    from edgesparse.runtime import analyze
    rng = np.random.default_rng(5)
    L, W, n, N = 2, 128, 4, 40     # windows longer than analyze.PROMPT, so the prompt set is studied
    T = W * n
    A = np.zeros((L, T, N), bool)
    for w in range(n):
        A[0, w * W:(w + 1) * W] = rng.random(N) < 0.5
    A[1] = rng.random((T, N)) < 0.5
    sig = rng.standard_normal((T // analyze.CHUNK, 8))
    res = analyze.study(A, A.copy(), sig, W)
    l0, l1 = res["per_layer"]
    print("layer 0", {k: l0[k] for k in ("consecutive_jaccard", "random_pair_jaccard")},
          "layer 1", {k: l1[k] for k in ("consecutive_jaccard", "random_pair_jaccard")})
    assert l0["consecutive_jaccard"] == 1.0
    assert l0["previous_token"] == {"recall": 1.0, "precision": 1.0,
                                    "predicted_fraction": pytest.approx(A[0][np.arange(T) % W > 0].mean())}
    # two independent halves: Jaccard of two p = 1/2 sets is 1/3 on average (T-1 pairs of 40 bits)
    assert abs(l1["consecutive_jaccard"] - 1 / 3) < 0.03 and abs(l1["random_pair_jaccard"] - 1 / 3) < 0.03
    for row in (l0, l1):
        assert row["int8_predictor"]["recall"] == 1.0 and row["int8_predictor"]["precision"] == 1.0
        for name in ("previous_token", "static", "prompt_set"):
            assert 0.0 <= row[name]["recall"] <= 1.0 and 0.0 <= row[name]["precision"] <= 1.0
    assert "previous_layer" in l1 and "previous_layer" not in l0
    assert res["mean"]["int8_predictor"] == {"recall": 1.0, "precision": 1.0}


def test_analyze_cli(pred_pkg, text_file, tmp_path, capsys):
    """`edgesparse analyze` on the tiny package with its int8 predictor: JSON with every study per
    layer, and the predictor recalls nearly all of the active set (it ranks like h itself)."""
    out = tmp_path / "an"
    stdout, _ = run_ok(capsys, "analyze", pred_pkg, "--text", text_file, "--tokens", 512, "-o", out, "-q")
    res = json.loads((out / "analyze.json").read_text())
    assert res["layers"] == 3 and res["tokens"] == 512 and len(res["per_layer"]) == 3
    rec = [r["int8_predictor"]["recall"] for r in res["per_layer"]]
    print("int8 predictor recall per layer", rec, "| active fraction", res["active_fraction"])
    assert min(rec) > 0.9
    assert all(abs(f - 0.5) < 0.1 for f in res["active_fraction"])   # 'active' = the calibrated 50% rule
    assert "int8_predictor: recall / precision" in stdout and (out / "analyze.md").exists()
    # the per-layer cost (a package with a predictor): in the JSON, the table and its plot
    cost = res["cost"]
    assert len(cost["per_layer"]) == 3 and cost["level"] == 0.5 and cost["load"] == "mmap"
    assert "| predictor MB | predictor ms |" in stdout and "FFN bytes per token" in stdout
    assert (out / "analyze_cost.png").read_bytes()[:4] == b"\x89PNG"
    cli_error(capsys, ["analyze", pred_pkg, "--text", text_file, "--tokens", 100], "--tokens 100")
    cli_error(capsys, ["analyze", pred_pkg, "--text", text_file, "--load", "disk"], "--load", "disk")


def test_layer_cost_against_a_plain_decode(pred_pkg, text_file):
    """layer_cost.measure: per layer, candidates, survivors and rows read per token equal the counts
    of a separate predict-mode decode of the same tokens (rows = 2 per candidate + 1 per survivor);
    the predictor-only run (candidate thresholds at +inf) has no candidate, so it reads no FFN row;
    the predictor's bytes are its two tensors' sizes as the manifest declares them; the model's
    thresholds, mode and candidate thresholds are as before."""
    from edgesparse.runtime import layer_cost
    from edgesparse.runtime.text import TextCodec
    model = Model(pred_pkg, threads=2, ctx=128)
    model.configure("threshold", 0.3)
    before = model.thresholds.copy(), model.method, model.ffn_mode, model.t_pred.copy()
    ids = np.array(TextCodec(model.pkg).encode(text_file.read_text(), special=False)[:60])
    prompt, steps = 8, 20
    cost = layer_cost.measure(model, ids, 0.5, prompt=prompt, steps=steps, rounds=2, progress=False)
    assert (model.thresholds == before[0]).all() and model.method == before[1] and model.ffn_mode == before[2]
    assert (model.t_pred == before[3]).all() and model.ffn_seconds is None

    ref = Model(pred_pkg, threads=2, ctx=128)
    ref.configure("predict", 0.5)
    ref.forward(ids[:prompt])
    ref.reset_counts()
    for t in ids[prompt:prompt + steps]:
        ref.forward([int(t)])
    kept, total, cand = (ref.counts[:, i].astype(np.float64) for i in range(3))
    m = read_manifest(pred_pkg)
    tensor_bytes = lambda name: int(np.prod(m.tensors[name].shape)) * np.dtype(m.tensors[name].dtype).itemsize  # noqa: E731
    for l, row in enumerate(cost["per_layer"]):
        print(f"layer {l}: candidates {row['candidates']:.3f} survivors {row['survivors']:.3f} rows read "
              f"{row['rows_read_fraction']:.3f}; ms predictor {row['predictor_ms']:.4f} predict {row['predict_ms']:.4f} "
              f"dense {row['dense_ms']:.4f}")
        assert row["candidates"] == cand[l] / total[l] and row["survivors"] == kept[l] / total[l]
        assert row["rows_read_per_token"] == (2 * cand[l] + kept[l]) / steps
        assert 0.2 < row["candidates"] < 0.8 and row["survivors"] <= row["candidates"]
        assert row["predictor_candidates"] == 0
        lw = m.layers[l]
        assert row["predictor_bytes"] == tensor_bytes(lw.pred_q) + tensor_bytes(lw.pred_scale)
        assert row["ffn_bytes"] == tensor_bytes(lw.ffn)
        for k in ("predictor_ms", "predict_ms", "dense_ms"):
            assert math.isfinite(row[k]) and row[k] > 0
    with pytest.raises(EdgesparseError, match="69 tokens of text needed"):
        layer_cost.measure(model, ids[:30], 0.5, prompt=5, steps=64, progress=False)

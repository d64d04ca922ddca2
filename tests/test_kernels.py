"""Numba kernels (edgesparse.runtime.kernels) against plain-NumPy float64 references.

Tolerances come from a forward error bound rather than a guess. A float32 sum of n terms, in any
order (fastmath lets LLVM reorder it into SIMD lanes and use FMAs), is within
    (n - 1) * u * sum|terms|      u = 2**-24 (unit roundoff)
of the exact sum; we use n * eps32 = 2 n u, i.e. a 2x margin. Each elementwise float32 operation adds
at most a few ulps on top; that is what the small constant terms below cover.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from edgesparse.runtime import kernels as K

EPS32 = float(np.finfo(np.float32).eps)   # 2**-23
ACTS = ["silu", "gelu_tanh", "gelu", "relu"]
SHAPES = [(37, 29), (1, 7), (64, 33)]     # (N neurons, D model width): odd, tiny, and N > D
CHUNKS = [1, 2, 3]
DTYPES = ["float32", "float16"]
# |act'(g)| over the reals: silu 1.0998, gelu 1.1289, gelu_tanh ~1.129, relu 1.
ACT_SLOPE = 1.2

_erf = np.vectorize(math.erf, otypes=[np.float64])

def rule(h, t):
    """The kernels' keep rule: |h| >= t, and never an exact zero (ReLU's natural zeros: skipping
    their down column changes nothing, so it is not read even at t = 0)."""
    return (h != 0) & (np.abs(h) >= t)


NOSCALE = np.zeros(0, np.float32)     # "float weights, no row scales"


def nob(w):
    """"no input biases" for the FFN kernels: shape [0, R-1]."""
    return np.zeros((0, w.shape[1] - 1), np.float32)


def nos(w):
    """"no row scales" (float weights) for the FFN kernels: shape [0, R]."""
    return np.zeros((0, w.shape[1]), np.float32)



def act_ref(name: str, g: np.ndarray) -> np.ndarray:
    g = g.astype(np.float64)
    if name == "silu":
        return g / (1.0 + np.exp(-g))
    if name == "gelu_tanh":
        return 0.5 * g * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (g + 0.044715 * g ** 3)))
    if name == "gelu":
        return 0.5 * g * (1.0 + _erf(g / math.sqrt(2.0)))
    if name == "relu":
        return np.maximum(g, 0.0)
    raise ValueError(name)


def make_weights(rng, N: int, D: int, dtype: str):
    """Neuron-major [N, 3, D] weights: (the array handed to the kernel, its exact float64 value).
    float16 goes in as its uint16 bit pattern, as Model does. Read-only, like the package's mmaps."""
    w = (rng.standard_normal((N, 3, D)) / math.sqrt(D)).astype(np.float32)
    if dtype == "float16":
        w16 = w.astype(np.float16)
        exact = w16.astype(np.float64)
        arg = w16.view(np.uint16)
    else:
        exact = w.astype(np.float64)
        arg = w
    arg.setflags(write=False)
    return arg, exact


class FFNRef:
    """Float64 reference of one token's gated FFN, with per-neuron error bounds for a float32
    implementation that accumulates in float32."""

    def __init__(self, w: np.ndarray, x: np.ndarray, act: str):
        N, _, D = w.shape
        x = x.astype(np.float64)
        self.w = w
        self.g = w[:, 0] @ x
        self.u = w[:, 1] @ x
        a = act_ref(act, self.g)
        self.h = a * self.u
        # dot products of length D: error <= D * eps32 * sum|w_k x_k|
        err_g = D * EPS32 * (np.abs(w[:, 0]) @ np.abs(x))
        err_u = D * EPS32 * (np.abs(w[:, 1]) @ np.abs(x))
        # h = act(g) * u: slope of act times err_g, act's own few-ulp error, the product's rounding
        self.err_h = 2 * (np.abs(self.u) * (ACT_SLOPE * err_g + 8 * EPS32 * np.abs(a))
                          + np.abs(a) * err_u + EPS32 * np.abs(self.h)) + 1e-30

    def out(self, base: np.ndarray, keep: np.ndarray, C: int):
        """Exact base + sum over kept neurons of h_i * down_i, and its bound for the kernel:
        per-chunk float32 sums of up to N terms, then C + 1 more additions onto base."""
        hk = np.where(keep, self.h, 0.0)
        down = self.w[:, 2]                                    # [N, D]
        ref = base.astype(np.float64) + hk @ down
        n = self.w.shape[0] + C + 1
        mag = np.abs(base) + np.abs(hk) @ np.abs(down)
        tol = 2 * (n * EPS32 * mag + np.where(keep, self.err_h, 0.0) @ np.abs(down)) + 1e-30
        return ref, tol


def run_ffn(w, x, base, thr, act, C, out=None):
    N, _, D = w.shape
    out = np.full(D, np.nan, np.float32) if out is None else out
    h_out = np.full(N, np.nan, np.float32)
    partial = np.full((C, D), np.nan, np.float32)   # garbage in the scratch must not matter
    kept = np.full(C, -7, np.int64)
    total = K.ffn_glu(w, nos(w), nob(w), x, base, np.float32(thr), K.ACT_CODES[act], out, h_out, partial, kept)
    return out, h_out, int(total)


def report(what: str, diff: np.ndarray, tol: np.ndarray) -> None:
    ratio = float(np.max(diff / tol)) if diff.size else 0.0
    print(f"{what}: max|diff| {float(np.max(diff, initial=0.0)):.3g}, max diff/tol {ratio:.3g}")


def assert_within(what: str, got, ref, tol) -> None:
    diff = np.abs(np.asarray(got, np.float64) - ref)
    report(what, diff, tol)
    bad = np.flatnonzero(~(diff <= tol))
    assert bad.size == 0, f"{what}: {bad.size} elements out of tolerance, e.g. index {bad[:5]}: " \
                          f"got {np.asarray(got).ravel()[bad[:5]]}, ref {np.ravel(ref)[bad[:5]]}, tol {np.ravel(tol)[bad[:5]]}"


def inputs(seed, N, D, dtype):
    rng = np.random.default_rng(seed)
    warg, wexact = make_weights(rng, N, D, dtype)
    x = (rng.standard_normal(D) * 2.0).astype(np.float32)   # |g| up to a few units: all of act's range
    base = rng.standard_normal(D).astype(np.float32)
    return warg, wexact, x, base


# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("C", CHUNKS)
@pytest.mark.parametrize("N,D", SHAPES)
def test_ffn_glu_dense_and_off(N, D, C, dtype, act):
    warg, w, x, base = inputs(N * 1000 + D, N, D, dtype)
    ref = FFNRef(w, x, act)

    # threshold 0: every neuron passes |h| >= 0, so this is the dense FFN
    out, h, kept = run_ffn(warg, x, base, 0.0, act, C)
    assert_within("h (t=0)", h, ref.h, ref.err_h)
    assert kept == int(rule(ref.h, 0.0).sum())
    r, tol = ref.out(base, np.ones(N, bool), C)
    assert_within("out (t=0)", out, r, tol)

    # threshold +inf: no neuron passes, the FFN contributes nothing, out is base bit for bit
    out, h, kept = run_ffn(warg, x, base, np.inf, act, C)
    assert kept == 0
    print("out (t=inf) max|out-base|", float(np.abs(out - base).max()))
    np.testing.assert_array_equal(out, base)
    assert_within("h (t=inf)", h, ref.h, ref.err_h)   # h_out is still every neuron's h


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("C", CHUNKS)
@pytest.mark.parametrize("N,D", SHAPES)
def test_ffn_glu_threshold_percentiles(N, D, C, dtype, act):
    warg, w, x, base = inputs(N * 1000 + D + 1, N, D, dtype)
    ref = FFNRef(w, x, act)
    absh = np.abs(ref.h)
    for q in (30, 50, 90):
        t = float(np.float32(np.percentile(absh, q)))
        # Neurons whose exact |h| is within the kernel's rounding of t may go either way.
        band = np.abs(absh - t) <= ref.err_h
        want_keep = rule(ref.h, t)
        out, h, kept = run_ffn(warg, x, base, t, act, C)
        got_keep = rule(h, np.float32(t))            # what the kernel decided, from its own h
        print(f"q={q} t={t:.4g}: {int(band.sum())} neurons within rounding of t")
        assert_within(f"h (q={q})", h, ref.h, ref.err_h)
        mismatch = np.flatnonzero((got_keep != want_keep) & ~band)
        assert mismatch.size == 0, f"neurons {mismatch} kept/zeroed differently from the reference"
        # the returned count is the kernel's own kept set, and equals the reference's outside the band
        assert kept == int(got_keep.sum())
        assert kept - int(got_keep[band].sum()) == int(want_keep[~band].sum())
        keep = np.where(band, got_keep, want_keep)
        r, tol = ref.out(base, keep, C)
        assert_within(f"out (q={q})", out, r, tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("C", CHUNKS)
def test_ffn_glu_threshold_is_inclusive(C, dtype):
    """|h| == t is kept (only |h| < t is zeroed): set t to one neuron's exact float32 |h|."""
    N, D = 37, 29
    warg, w, x, base = inputs(7, N, D, dtype)
    _, h0, _ = run_ffn(warg, x, base, 0.0, "silu", C)
    j = int(np.argsort(np.abs(h0))[N // 2])
    t = float(np.abs(h0[j]))
    out, h1, kept = run_ffn(warg, x, base, t, "silu", C)
    np.testing.assert_array_equal(h1, h0)   # same inputs, same chunking: deterministic
    assert kept == int((np.abs(h0) >= np.float32(t)).sum())
    # neuron j is kept: removing its contribution by hand changes out by h_j * down_j
    _, h2, kept_above = run_ffn(warg, x, base, np.nextafter(np.float32(t), np.float32(np.inf)), "silu", C)
    assert kept_above == kept - int((np.abs(h0) == np.float32(t)).sum())
    print("kept at t:", kept, "just above t:", kept_above)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("C", CHUNKS)
def test_ffn_glu_out_aliases_base(C, dtype):
    """Model passes the residual as base and may pass the same array as out (in place)."""
    N, D = 37, 29
    warg, w, x, base = inputs(11, N, D, dtype)
    ref = FFNRef(w, x, "silu")
    srt = np.sort(np.abs(ref.h))
    t = float(np.float32((srt[N // 2 - 1] + srt[N // 2]) / 2))   # between two neurons, not on one
    sep_out, _, sep_kept = run_ffn(warg, x, base.copy(), t, "silu", C)
    buf = base.copy()
    _, _, kept = run_ffn(warg, x, buf, t, "silu", C, out=buf)
    print("aliased vs separate max diff", float(np.abs(buf - sep_out).max()))
    assert kept == sep_kept
    np.testing.assert_array_equal(buf, sep_out)
    keep = rule(ref.h, t)
    band = np.abs(np.abs(ref.h) - t) <= ref.err_h
    assert not band.any(), "test data has a neuron within rounding of t; pick another seed"
    r, tol = ref.out(base, keep, C)
    assert_within("aliased out", buf, r, tol)


def run_ffn_batch(w, X, base, thr, act, C, out=None):
    N, _, D = w.shape
    S = X.shape[0]
    out = np.full((S, D), np.nan, np.float32) if out is None else out
    h_out = np.full((S, N), np.nan, np.float32)
    partial = np.full((C, S + 2, D), np.nan, np.float32)   # the kernel allows partial [C, >=S, D]
    kept = np.full(C, -7, np.int64)
    total = K.ffn_glu_batch(w, nos(w), nob(w), X, base, np.float32(thr), K.ACT_CODES[act], out, h_out, partial, kept)
    return out, h_out, int(total)


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("C", CHUNKS)
@pytest.mark.parametrize("N,D", SHAPES)
def test_ffn_glu_batch_vs_reference(N, D, C, dtype, act):
    """Small-batch prefill kernel: S tokens at once, each against the float64 reference."""
    S = 5
    rng = np.random.default_rng(N + D + 99)
    warg, w, _, _ = inputs(N + D + 99, N, D, dtype)
    X = (rng.standard_normal((S, D)) * 2.0).astype(np.float32)
    base = rng.standard_normal((S, D)).astype(np.float32)
    refs = [FFNRef(w, X[s], act) for s in range(S)]
    t = float(np.float32(np.percentile(np.abs([r.h for r in refs]), 60)))
    for thr in (0.0, t, np.inf):
        out, h, kept = run_ffn_batch(warg, X, base, thr, act, C)
        want_total = 0
        for s, ref in enumerate(refs):
            assert_within(f"batch h token {s} t={thr:.3g}", h[s], ref.h, ref.err_h)
            band = np.abs(np.abs(ref.h) - thr) <= ref.err_h
            want, got = rule(ref.h, thr), rule(h[s], np.float32(thr))
            assert not np.any((want != got) & ~band), f"token {s}: kept set differs from the reference"
            keep = np.where(band, got, want)
            want_total += int(keep.sum())
            r, tol = ref.out(base[s], keep, C)
            assert_within(f"batch out token {s} t={thr:.3g}", out[s], r, tol)
        assert kept == want_total
        if thr == np.inf:
            assert kept == 0
            np.testing.assert_array_equal(out, base)


@pytest.mark.parametrize("dtype", DTYPES)
def test_ffn_glu_batch_out_aliases_base(dtype):
    S, N, D = 4, 37, 29
    rng = np.random.default_rng(17)
    warg, _, _, _ = inputs(17, N, D, dtype)
    X = (rng.standard_normal((S, D)) * 2.0).astype(np.float32)
    base = rng.standard_normal((S, D)).astype(np.float32)
    sep, _, k1 = run_ffn_batch(warg, X, base.copy(), 0.3, "silu", 2)
    buf = base.copy()
    _, _, k2 = run_ffn_batch(warg, X, buf, 0.3, "silu", 2, out=buf)
    print("aliased vs separate max diff", float(np.abs(buf - sep).max()))
    assert k1 == k2 and 0 < k1 < S * N
    np.testing.assert_array_equal(buf, sep)


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_prefill_and_decode_zero_the_same_neurons(dtype, act):
    """The same tokens and thresholds through the three FFN paths: BLAS gate/up + glu_threshold
    (long prefill), ffn_glu_batch (short prefill), ffn_glu (decode). Same neurons zeroed (except
    within rounding of t for the BLAS path, whose dot products are summed differently), same h.
    ffn_glu_batch and ffn_glu share the per-neuron code: their h must agree bit for bit."""
    N, D, S = 37, 29, 6
    rng = np.random.default_rng(5)
    warg, w, _, _ = inputs(5, N, D, dtype)
    X = (rng.standard_normal((S, D)) * 2.0).astype(np.float32)
    wf = w.astype(np.float32)               # what Model._prefill multiplies with (float16 widened)
    refs = [FFNRef(w, X[s], act) for s in range(S)]
    all_h = np.abs(np.stack([r.h for r in refs]))
    # 70th percentile, not the median: relu makes about half of all h exactly 0, so its median is 0
    t = float(np.float32(np.percentile(all_h, 70)))
    assert t > 0
    g = np.ascontiguousarray(X @ wf[:, 0, :].T)
    u = np.ascontiguousarray(X @ wf[:, 1, :].T)
    kept_s = np.full(S, -1, np.int64)
    K.glu_threshold(g, u, np.float32(t), K.ACT_CODES[act], kept_s)
    zeros = np.zeros((S, D), np.float32)
    out_b, h_b, kept_b = run_ffn_batch(warg, X, zeros, t, act, 2)
    n_band = 0
    total = 0
    for s in range(S):
        out_d, h, kept = run_ffn(warg, X[s], zeros[s], t, act, 2)
        dec_keep = rule(h, np.float32(t))
        np.testing.assert_array_equal(h_b[s], h)      # small-batch prefill == decode, bitwise
        np.testing.assert_array_equal(out_b[s], out_d)
        pre_keep = g[s] != 0.0              # t > 0, so a kept h is >= t > 0
        band = np.abs(np.abs(refs[s].h) - t) <= 2 * refs[s].err_h   # two implementations, two errors
        n_band += int(band.sum())
        diff = np.flatnonzero((dec_keep != pre_keep) & ~band)
        assert diff.size == 0, f"token {s}: neurons {diff} differ between prefill and decode"
        assert kept_s[s] == int(pre_keep.sum())
        assert kept == int(dec_keep.sum())
        total += kept
        both = dec_keep & pre_keep
        assert_within(f"token {s} kept h prefill vs decode", g[s][both], h[both].astype(np.float64),
                      2 * refs[s].err_h[both])
        assert np.all(g[s][~pre_keep] == 0.0)
    assert kept_b == total
    print(f"t={t:.4g}, {n_band} (token, neuron) pairs within rounding of t")


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("t_kind", ["zero", "inf", "median"])
def test_glu_threshold_vs_reference(act, t_kind):
    S, N = 5, 41
    rng = np.random.default_rng(3)
    g0 = (rng.standard_normal((S, N)) * 2).astype(np.float32)
    u0 = rng.standard_normal((S, N)).astype(np.float32)
    h = act_ref(act, g0) * u0
    t = {"zero": 0.0, "inf": np.inf, "median": float(np.float32(np.median(np.abs(h))))}[t_kind]
    # inputs are exact float32 values: only act and one product round (a few ulps of h)
    err = 2 * (ACT_SLOPE * EPS32 * np.abs(g0 * u0) + 8 * EPS32 * np.abs(h)) + 1e-30
    band = np.abs(np.abs(h) - t) <= err
    g = g0.copy()
    kept = np.full(S, -1, np.int64)
    K.glu_threshold(g, u0.copy(), np.float32(t), K.ACT_CODES[act], kept)
    want = rule(h, t)
    got = g != 0.0
    print(f"t={t}: {int(band.sum())} values within rounding of t")
    assert not np.any((got != want) & ~band)
    np.testing.assert_array_equal(kept, got.sum(axis=1))
    ref = np.where(got, h, 0.0)
    assert_within(f"glu_threshold t={t_kind}", g, ref, np.where(got, err, 1e-30))  # zeroed: exactly 0
    if t_kind == "inf":
        assert np.all(g == 0.0) and np.all(kept == 0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("C", CHUNKS)
@pytest.mark.parametrize("V,D", [(37, 29), (211, 96), (3, 1)])
def test_matvec(V, D, C, dtype):
    rng = np.random.default_rng(V + D)
    w = rng.standard_normal((V, D)).astype(np.float32)
    if dtype == "float16":
        w16 = w.astype(np.float16)
        arg, exact = w16.view(np.uint16), w16.astype(np.float64)
    else:
        arg, exact = w, w.astype(np.float64)
    x = rng.standard_normal(D).astype(np.float32)
    y = np.full(V, np.nan, np.float32)
    K.matvec(arg, NOSCALE, x, y, C)
    ref = exact @ x.astype(np.float64)
    tol = 2 * D * EPS32 * (np.abs(exact) @ np.abs(x.astype(np.float64))) + 1e-30  # length-D float32 dot
    assert_within("matvec", y, ref, tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("C", CHUNKS)
@pytest.mark.parametrize("O,D,S", [(37, 29, 1), (211, 96, 3), (3, 1, 2), (8, 16, 5)])
@pytest.mark.parametrize("extras", ["none", "bias", "base", "bias+base", "base aliases out"])
def test_linear(O, D, S, C, dtype, extras):
    """The attention projections: Y = X @ w.T (+ bias) (+ base), rows in blocks of 4 (O = 37, 211
    and 3 leave a remainder block; 8 splits evenly), several tokens per weight row."""
    rng = np.random.default_rng(O * D + S)
    w = rng.standard_normal((O, D)).astype(np.float32)
    if dtype == "float16":
        w16 = w.astype(np.float16)
        arg, exact = w16.view(np.uint16), w16.astype(np.float64)
    else:
        arg, exact = w, w.astype(np.float64)
    X = rng.standard_normal((S, D)).astype(np.float32)
    bias = rng.standard_normal(O).astype(np.float32) if "bias" in extras else np.zeros(0, np.float32)
    base = rng.standard_normal((S, O)).astype(np.float32) if "base" in extras else np.zeros((0, 1), np.float32)
    ref = X.astype(np.float64) @ exact.T
    ref += bias.astype(np.float64) if bias.size else 0.0
    ref += base.astype(np.float64) if base.size else 0.0
    if extras == "base aliases out":
        Y = base          # the residual add in place: out = base + w @ x
    else:
        Y = np.full((S, O), np.nan, np.float32)
    K.linear(arg, NOSCALE, X, bias, base, Y, C)
    # a length-D float32 dot product, then up to two float32 adds
    mag = np.abs(X.astype(np.float64)) @ np.abs(exact.T) + (np.abs(bias) if bias.size else 0.0) \
        + (np.abs(ref) if base.size else 0.0)
    tol = 2 * (D + 2) * EPS32 * mag + 1e-30
    assert_within(f"linear {extras}", Y, ref, tol)


@pytest.mark.parametrize("S,D", [(1, 29), (4, 96), (3, 1)])
@pytest.mark.parametrize("scale", [1.0, 1e-3, 1e3])
def test_rms_norm(S, D, scale):
    rng = np.random.default_rng(S * D)
    x = (rng.standard_normal((S, D)) * scale).astype(np.float32)
    weight = rng.uniform(0.5, 2.0, D).astype(np.float32)
    eps = 1e-6
    out = np.full((S, D), np.nan, np.float32)
    K.rms_norm(x, weight, eps, out)
    x64 = x.astype(np.float64)
    ref = x64 / np.sqrt((x64 ** 2).mean(axis=1, keepdims=True) + eps) * weight
    # float64 sum of squares (exact enough), then 1/sqrt rounded to float32 and two float32
    # multiplies: a few ulps of the result
    tol = 4 * EPS32 * np.abs(ref) + 1e-30
    assert_within(f"rms_norm scale={scale}", out, ref, tol)


def test_rms_norm_eps_dominates_tiny_input():
    x = np.full((1, 8), 1e-6, np.float32)
    out = np.empty_like(x)
    K.rms_norm(x, np.ones(8, np.float32), 1e-2, out)
    ref = 1e-6 / math.sqrt(1e-12 + 1e-2)
    assert_within("rms_norm eps", out, np.full((1, 8), ref), np.full((1, 8), 4 * EPS32 * ref))


@pytest.mark.parametrize("scale", [1.0, 3.5])
def test_gather_rows_float32_exact(scale):
    rng = np.random.default_rng(0)
    table = rng.standard_normal((37, 29)).astype(np.float32)
    ids = np.array([5, 0, 36, 5], np.int64)
    out = np.full((4, 29), np.nan, np.float32)
    K.gather_rows(table, NOSCALE, ids, np.float32(scale), out)
    # one float32 multiply per element, same as NumPy's: bit-identical
    want = table[ids] * np.float32(scale)
    print("gather_rows float32 max|diff|", float(np.abs(out - want).max()))
    np.testing.assert_array_equal(out, want)


def test_gather_rows_widens_every_finite_float16_exactly():
    """Every finite float16 bit pattern (subnormals, -0.0, +-65504) widens to the exact float32."""
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    finite = np.isfinite(bits.view(np.float16))
    table = bits[finite]
    assert table.size == 63488
    table = table.reshape(62, 1024)
    ids = np.arange(62, dtype=np.int64)[::-1].copy()
    out = np.full((62, 1024), np.nan, np.float32)
    K.gather_rows(table, NOSCALE, ids, np.float32(1.0), out)
    want = table.view(np.float16).astype(np.float32)[ids]
    n_bad = int((out.view(np.uint32) != want.view(np.uint32)).sum())
    print("float16 patterns widened wrongly:", n_bad)
    assert n_bad == 0     # bitwise, so -0.0 and +0.0 are told apart

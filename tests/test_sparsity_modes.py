"""The threshold modes of the Numba kernels against plain-NumPy float64 references:
gate mode (CATS, mode=1) of ffn_glu / ffn_glu_batch / glu_threshold, TEAL input masking
(mask_small), and the elementwise activation kernel calibration uses.

Tolerances follow tests/test_kernels.py: a float32 dot product of length n, summed in any order,
is within n * eps32 * sum|terms| of the exact value (a 2x margin over the (n-1) u bound). The
activation adds its own rounding: silu and relu are a few ulps of the result, but gelu and
gelu_tanh compute 0.5 g (1 + erf/tanh(...)), and 1 + erf(z) cancels for negative g, so their
error is a few eps32 of |g| in absolute terms, not of |act(g)|; the bound below, 8 eps32 (|a| + |g|),
covers both. Decisions (keep / zero) are compared exactly, except for values whose exact
magnitude lies within that rounding bound of t (the "band"), which may go either way; the band
sizes are printed.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from edgesparse.runtime import kernels as K

EPS32 = float(np.finfo(np.float32).eps)   # 2**-23
ACTS = ["silu", "gelu_tanh", "gelu", "relu"]
SHAPES = [(37, 29), (1, 7), (64, 33)]     # (N neurons, D width): odd, tiny, N > D
DTYPES = ["float32", "float16"]
ACT_SLOPE = 1.2                           # max |act'(g)| over the reals is 1.13 (gelu)
GATE = K.MODE_CODES["gate"]
assert GATE == 1 and K.MODE_CODES["paper"] == 0

_erf = np.vectorize(math.erf, otypes=[np.float64])

def nob(w):
    """"no input biases" for the FFN kernels: shape [0, R-1]."""
    return np.zeros((0, w.shape[1] - 1), np.float32)


def nos(w):
    """"no row scales" (float weights) for the FFN kernels: shape [0, R]."""
    return np.zeros((0, w.shape[1]), np.float32)



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


def act_err(a: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Bound on a float32 evaluation of act at an exact float32 g (see the module docstring)."""
    return 8 * EPS32 * (np.abs(a) + np.abs(g)) + 1e-30


def report(what, diff, tol):
    ratio = float(np.max(diff / tol)) if diff.size else 0.0
    print(f"{what}: max|diff| {float(np.max(diff, initial=0.0)):.3g}, max diff/tol {ratio:.3g}")


def assert_within(what, got, ref, tol):
    diff = np.abs(np.asarray(got, np.float64) - ref)
    report(what, diff, tol)
    bad = np.flatnonzero(~(diff <= tol))
    assert bad.size == 0, (f"{what}: {bad.size} values out of tolerance, e.g. index {bad[:5]}: got "
                           f"{np.ravel(got)[bad[:5]]}, ref {np.ravel(ref)[bad[:5]]}, tol {np.ravel(tol)[bad[:5]]}")


def make_weights(rng, N, D, dtype):
    """Neuron-major [N, 3, D]: (array handed to the kernel, its exact float64 value)."""
    w = (rng.standard_normal((N, 3, D)) / math.sqrt(D)).astype(np.float32)
    if dtype == "float16":
        w16 = w.astype(np.float16)
        arg, exact = w16.view(np.uint16), w16.astype(np.float64)
    else:
        arg, exact = w, w.astype(np.float64)
    arg.setflags(write=False)
    return arg, exact


class GateRef:
    """One token's FFN in float64 with the gate rule: keep neuron i iff |act(gate_i . x)| >= t."""

    def __init__(self, w, x, act):
        D = w.shape[2]
        x64 = x.astype(np.float64)
        self.w = w
        self.g = w[:, 0] @ x64
        self.u = w[:, 1] @ x64
        self.a = act_ref(act, self.g)
        self.h = self.a * self.u
        err_g = D * EPS32 * (np.abs(w[:, 0]) @ np.abs(x64))
        err_u = D * EPS32 * (np.abs(w[:, 1]) @ np.abs(x64))
        self.err_a = 2 * (ACT_SLOPE * err_g + act_err(self.a, self.g))
        self.err_h = 2 * (np.abs(self.u) * self.err_a + np.abs(self.a) * err_u + EPS32 * np.abs(self.h)) + 1e-30

    def decide(self, t):
        """(reference keep mask, band mask: |a| within rounding of t, or h within rounding of 0).
        An exact zero h (relu's a = 0) is never kept: its down column is not read."""
        absa = np.abs(self.a)
        return (absa >= t) & (self.h != 0), (np.abs(absa - t) <= self.err_a) | (np.abs(self.h) <= self.err_h)

    def out(self, base, keep, C):
        hk = np.where(keep, self.h, 0.0)
        down = self.w[:, 2]
        ref = base.astype(np.float64) + hk @ down
        n = self.w.shape[0] + C + 1
        tol = 2 * (n * EPS32 * (np.abs(base) + np.abs(hk) @ np.abs(down))
                   + np.where(keep, self.err_h, 0.0) @ np.abs(down)) + 1e-30
        return ref, tol


def gate_thresholds(absa):
    """0, three percentiles of |act(g)| (60/75/90: above relu's half of exact zeros), and +inf."""
    return [0.0] + [float(np.float32(np.percentile(absa, q))) for q in (60, 75, 90)] + [math.inf]


def check_token(what, ref, t, h, base, out, C):
    """Kernel h [N] and out [D] for one token at gate threshold t against the reference.
    Returns (the kernel's keep mask, band size; 0 for t = 0 or inf, where nothing is undecided)."""
    N = h.shape[0]
    want, band = ref.decide(t)
    got = h != 0.0                        # a dropped neuron reports exactly 0
    bad = np.flatnonzero((got != want) & ~band)
    assert bad.size == 0, f"{what}: neurons {bad} kept/dropped unlike the reference (|a| {np.abs(ref.a[bad])}, t {t})"
    keep = np.where(band, got, want)
    assert np.all(h[~keep] == 0.0), f"{what}: a dropped neuron reports h != 0"
    assert_within(f"{what} kept h", h[keep], ref.h[keep], ref.err_h[keep])
    r, tol = ref.out(base, keep, C)
    assert_within(f"{what} out", out, r, tol)
    return keep, int(band.sum()) if 0.0 < t < math.inf else 0


def ffn_glu(w, x, base, t, act, C, mode):
    N, _, D = w.shape
    out = np.full(D, np.nan, np.float32)
    h = np.full(N, np.nan, np.float32)
    total = K.ffn_glu(w, nos(w), nob(w), x, base, np.float32(t), K.ACT_CODES[act], out, h, np.full((C, D), np.nan, np.float32),
                      np.full(C, -7, np.int64), mode)
    return out, h, int(total)


def ffn_glu_batch(w, X, base, t, act, C, mode):
    N, _, D = w.shape
    S = X.shape[0]
    out = np.full((S, D), np.nan, np.float32)
    h = np.full((S, N), np.nan, np.float32)
    total = K.ffn_glu_batch(w, nos(w), nob(w), X, base, np.float32(t), K.ACT_CODES[act], out, h,
                            np.full((C, S + 1, D), np.nan, np.float32), np.full(C, -7, np.int64), mode)
    return out, h, int(total)


# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("C", [1, 3])
@pytest.mark.parametrize("N,D", SHAPES)
def test_ffn_glu_gate_mode(N, D, C, dtype, act):
    rng = np.random.default_rng(N * 100 + D)
    warg, w = make_weights(rng, N, D, dtype)
    x = (rng.standard_normal(D) * 2.0).astype(np.float32)
    base = rng.standard_normal(D).astype(np.float32)
    ref = GateRef(w, x, act)
    n_band = 0
    for t in gate_thresholds(np.abs(ref.a)):
        out, h, kept = ffn_glu(warg, x, base, t, act, C, GATE)
        keep, nb = check_token(f"ffn_glu gate t={t:.3g}", ref, t, h, base, out, C)
        n_band += nb
        assert kept == int(keep.sum())
        if t == math.inf:
            assert kept == 0 and np.all(h == 0.0)
            np.testing.assert_array_equal(out, base)
    print(f"{n_band} neurons within rounding of t")


@pytest.mark.parametrize("C", [1, 3])
def test_plain_mlp_gate_mode_is_the_paper_rule(C):
    """A plain MLP's h is its activation, so the gate rule and the paper rule are one rule there:
    the kernels must keep exactly the same neurons in both modes (the blocked kernels decide the
    down columns in a second pass and must not take gate mode's "h == 0 means dropped" shortcut
    for them), and keep none at t = inf."""
    rng = np.random.default_rng(8)
    N, D, S = 37, 29, 3
    w = (rng.standard_normal((N, 2, D)) * 0.3).astype(np.float32)
    X = rng.standard_normal((S, D)).astype(np.float32)
    base = rng.standard_normal((S, D)).astype(np.float32)
    for t in (0.0, 0.3, 1.0, math.inf):
        res = [ffn_glu_batch(w, X, base, t, "relu", C, mode) for mode in (0, 1)]
        np.testing.assert_array_equal(res[0][0], res[1][0])
        assert res[0][2] == res[1][2]
        if t == math.inf:
            assert res[1][2] == 0


def test_gate_and_paper_modes_differ():
    """Guards the test above: at the same t the two rules keep different neurons, so a kernel that
    ignored `mode` would fail it."""
    N, D = 64, 33
    rng = np.random.default_rng(64 * 100 + 33)
    warg, w = make_weights(rng, N, D, "float32")
    x = (rng.standard_normal(D) * 2.0).astype(np.float32)
    base = np.zeros(D, np.float32)
    ref = GateRef(w, x, "silu")
    t = float(np.float32(np.percentile(np.abs(ref.a), 60)))
    _, h_gate, k_gate = ffn_glu(warg, x, base, t, "silu", 2, GATE)
    _, h_paper, k_paper = ffn_glu(warg, x, base, t, "silu", 2, 0)
    gate_keep, paper_keep = h_gate != 0.0, np.abs(h_paper) >= np.float32(t)
    print("kept: gate", k_gate, "paper", k_paper, "differing neurons", int((gate_keep != paper_keep).sum()))
    assert (gate_keep != paper_keep).sum() >= 5
    assert np.all(h_paper != 0.0)        # paper mode reports every neuron's h, dropped or not


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,D", SHAPES)
def test_ffn_glu_batch_gate_mode(N, D, dtype, act):
    """S tokens at once, each against the reference; and bit for bit what ffn_glu gives per token
    (both call the same per-neuron code)."""
    S, C = 5, 2
    rng = np.random.default_rng(N + D + 7)
    warg, w = make_weights(rng, N, D, dtype)
    X = (rng.standard_normal((S, D)) * 2.0).astype(np.float32)
    base = rng.standard_normal((S, D)).astype(np.float32)
    refs = [GateRef(w, X[s], act) for s in range(S)]
    n_band = 0
    for t in gate_thresholds(np.abs(np.concatenate([r.a for r in refs]))):
        out, h, kept = ffn_glu_batch(warg, X, base, t, act, C, GATE)
        total = 0
        for s in range(S):
            keep, nb = check_token(f"batch token {s} t={t:.3g}", refs[s], t, h[s], base[s], out[s], C)
            n_band += nb
            total += int(keep.sum())
            out1, h1, k1 = ffn_glu(warg, X[s], base[s], t, act, C, GATE)
            np.testing.assert_array_equal(h[s], h1)
            np.testing.assert_array_equal(out[s], out1)
        assert kept == total
    print(f"{n_band} (token, neuron) pairs within rounding of t")


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("S,N", [(5, 41), (1, 3), (7, 136)])
def test_glu_threshold_gate_mode(S, N, act):
    rng = np.random.default_rng(S * N)
    g0 = (rng.standard_normal((S, N)) * 2).astype(np.float32)
    u0 = rng.standard_normal((S, N)).astype(np.float32)
    a = act_ref(act, g0)
    h = a * u0
    # inputs are exact float32: only act and the one product round
    err_a = 2 * act_err(a, g0)
    err_h = 2 * (np.abs(u0) * err_a + EPS32 * np.abs(h)) + 1e-30
    n_band = 0
    for t in gate_thresholds(np.abs(a)):
        g = g0.copy()
        kept = np.full(S, -1, np.int64)
        K.glu_threshold(g, u0.copy(), np.float32(t), K.ACT_CODES[act], kept, GATE)
        want = (np.abs(a) >= t) & (h != 0)
        band = (np.abs(np.abs(a) - t) <= err_a) | (np.abs(h) <= err_h)
        got = g != 0.0
        n_band += int(band.sum()) if 0.0 < t < math.inf else 0
        bad = np.argwhere((got != want) & ~band)
        assert bad.size == 0, f"t={t}: (token, neuron) {bad[:5].tolist()} kept/dropped unlike the reference"
        np.testing.assert_array_equal(kept, got.sum(axis=1))
        assert np.all(g[~got] == 0.0)
        assert_within(f"glu_threshold gate t={t:.3g}", g[got], h[got], err_h[got])
        if t == math.inf:
            assert np.all(kept == 0) and np.all(g == 0.0)
        if 0.0 < t < math.inf and S * N > 50:
            # the rule is on |a|, not |h|: a kernel applying the paper rule would keep another set
            assert np.sum(want != (np.abs(h) >= t)) > 5
    print(f"{n_band} values within rounding of t")


@pytest.mark.parametrize("S,D", [(1, 1), (3, 97), (64, 33)])
def test_mask_small(S, D):
    """TEAL input masking: out = x where |x| >= t else 0 (a compare and a copy: exact), kept per row."""
    rng = np.random.default_rng(S + D)
    x = (rng.standard_normal((S, D)) * rng.lognormal(0, 2, (S, 1))).astype(np.float32)
    x.flat[:: 7] *= -1
    x0 = x.copy()
    mags = np.sort(np.abs(x).ravel())
    t_mid = float(mags[mags.size // 2])          # exactly one entry's |x|: |x| == t must be kept
    for t in (0.0, t_mid, float(np.float32(np.percentile(mags, 80))), math.inf):
        out = np.full((S, D), np.nan, np.float32)
        kept = np.full(S, -1, np.int64)
        K.mask_small(x, np.float32(t), out, kept)
        keep = np.abs(x0) >= np.float32(t)
        want = np.where(keep, x0, np.float32(0.0))
        print(f"t={t:.4g}: kept {int(kept.sum())} of {x.size}")
        np.testing.assert_array_equal(out, want)
        np.testing.assert_array_equal(kept, keep.sum(axis=1))
        np.testing.assert_array_equal(x, x0)                  # the input is not modified
        if t == 0.0:
            assert np.all(kept == D)
        if t == math.inf:
            assert np.all(kept == 0)
        if t == t_mid:
            assert int(kept.sum()) == int((mags >= t_mid).sum()) and np.any(np.abs(out) == np.float32(t_mid))


@pytest.mark.parametrize("act", ACTS)
def test_activation_kernel(act):
    rng = np.random.default_rng(4)
    g = np.concatenate([np.linspace(-30, 30, 241), rng.standard_normal(300) * 3,
                        [0.0, -0.0, 1e-30, -1e-30, 88.0, -88.0, -100.0, 100.0]]).astype(np.float32)
    g = g[: (g.size // 7) * 7].reshape(7, -1)        # [S, N], odd sizes
    out = np.full(g.shape, np.nan, np.float32)
    K.activation(g, K.ACT_CODES[act], out)
    ref = act_ref(act, g)
    assert_within(f"activation {act}", out, ref, act_err(ref, g))
    # a kernel computing another activation would be far outside the bound (gelu vs its tanh
    # approximation, the closest pair, differ by up to 4.7e-4, ~100x the bound)
    for other in ACTS:
        if other != act:
            assert np.any(np.abs(act_ref(other, g) - ref) > 20 * act_err(ref, g)), other


def test_gate_threshold_is_inclusive():
    """|act(g)| == t is kept (only |act(g)| < t is dropped), in all three kernels. relu makes
    act(g) = g exactly, and with D = 1, x = 1 and integer-valued weights the gate dot product
    g = w_gate * 1 is exact too, so t can be set to one neuron's exact gate value."""
    N, S = 41, 3
    rng = np.random.default_rng(21)
    relu = K.ACT_CODES["relu"]
    w = np.zeros((N, 3, 1), np.float32)
    w[:, 0, 0] = rng.permutation(np.arange(-20, 21))[:N]      # gate values -20..20, each once
    w[:, 1, 0] = rng.choice([-3.0, -1.0, 2.0, 5.0], N)        # up: non-zero
    w[:, 2, 0] = 1.0
    x = np.ones(1, np.float32)
    g = w[:, 0, 0]
    for t in (1.0, 7.0, 20.0):
        want = g >= t                                           # relu(g) >= t, t > 0
        nt = int(want.sum())
        above = np.nextafter(np.float32(t), np.float32(np.inf))
        out, h, kept = ffn_glu(w, x, np.zeros(1, np.float32), t, "relu", 2, GATE)
        _, _, kept_above = ffn_glu(w, x, np.zeros(1, np.float32), above, "relu", 2, GATE)
        np.testing.assert_array_equal(h != 0.0, want)
        assert kept == nt and kept_above == nt - 1
        _, hb, kb = ffn_glu_batch(w, np.ones((S, 1), np.float32), np.zeros((S, 1), np.float32), t, "relu", 2, GATE)
        np.testing.assert_array_equal(hb != 0.0, np.broadcast_to(want, (S, N)))
        assert kb == S * nt
        gg = np.tile(g, (S, 1))
        kept_s = np.zeros(S, np.int64)
        K.glu_threshold(gg, np.tile(w[:, 1, 0], (S, 1)), np.float32(t), relu, kept_s, GATE)
        np.testing.assert_array_equal(gg != 0.0, np.broadcast_to(want, (S, N)))
        np.testing.assert_array_equal(kept_s, nt)
        gg = np.tile(g, (S, 1))
        K.glu_threshold(gg, np.tile(w[:, 1, 0], (S, 1)), above, relu, kept_s, GATE)
        np.testing.assert_array_equal(kept_s, nt - 1)
        print(f"t={t}: kept {nt} (the neuron with gate exactly t among them), just above t: {kept_above}")

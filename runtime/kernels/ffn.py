"""The thresholded FFN over neuron-major rows (decode and short prefill: ffn_glu, ffn_glu_batch),
the same threshold rule for the BLAS prefill (glu_threshold) and TEAL's input mask (mask_small).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange
from numba.extending import overload

from .activations import _act
from .ir import _f16, _q8
from .rows import _axpy_w, _dot_w

# What the threshold applies to. paper (arXiv 2412.12178): the neuron output |h|, h = act(gate.x)*(up.x);
# gate (CATS): |act(gate.x)|, so a zeroed neuron's up row is not read either; input (TEAL): the
# FFN input |x_k| -- the model masks x itself and calls the kernels with the paper rule at t = 0.
MODE_CODES = {"paper": 0, "gate": 1, "input": 2}


@njit(inline="always", fastmath=True)
def _dot_rows(wi, r, x):
    """sum_k wi[r, k] x_k for float32 rows (int8 and float16 rows take the vector IR)."""
    a = np.float32(0.0)
    for k in range(x.shape[0]):
        a += wi[r, k] * x[k]
    return a


def _dot(wi, ws, i, r, X, s):
    """Row r of neuron i's block wi [R, ·] dotted with token s's input X[s] [D], scaled: the float32
    value of gate.x (r = 0) or up.x (r = 1). ws: the FFN's
    scales ([N, R] int8 rows, [N, R, G] groups, [0, R] float)."""


@overload(_dot)
def _dot_impl(wi, ws, i, r, X, s):
    if _q8(wi):
        return lambda wi, ws, i, r, X, s: _dot_w(wi[r], X[s]) * ws[i, r]
    if _f16(wi):
        return lambda wi, ws, i, r, X, s: _dot_w(wi[r], X[s])

    return lambda wi, ws, i, r, X, s: _dot_rows(wi, r, X[s])      # float32: no scales


def _dot2(wi, ws, i, X, s):
    """(gate.x, up.x) of neuron i for token s, scaled (arguments as _dot)."""


@njit(inline="always", fastmath=True)
def _dot2_rows(wi, x):
    # One pass for both dot products: two independent accumulator chains over the same x loads.
    g = np.float32(0.0)
    u = np.float32(0.0)
    for k in range(x.shape[0]):
        g += wi[0, k] * x[k]
        u += wi[1, k] * x[k]
    return g, u


@overload(_dot2)
def _dot2_impl(wi, ws, i, X, s):
    # the intrinsics called directly, not through _dot: an overload call per row costs 4-10 % of a
    # dense int4 / int8 FFN layer (same-run A/B)
    if _q8(wi):
        return lambda wi, ws, i, X, s: (_dot_w(wi[0], X[s]) * ws[i, 0], _dot_w(wi[1], X[s]) * ws[i, 1])
    if _f16(wi):
        return lambda wi, ws, i, X, s: (_dot_w(wi[0], X[s]), _dot_w(wi[1], X[s]))
    return lambda wi, ws, i, X, s: _dot2_rows(wi, X[s])        # float32: one fused pass, no scales


@njit(inline="always", fastmath=True)
def _neuron_h(wi, ws, b, i, X, s, act, thr, mode):
    """(h, keep) for neuron i with rows wi [R, D], scales ws ([N, R] int8 rows, [N, R, G] groups,
    [0, R] float), input biases b [N, R-1] (or [0, ·]) and token s's input x = X[s]:
    h = act(gate.x) * (up.x) (R = 3) or act(fc1.x) (R = 2), and whether it survives the
    threshold. Decode and small-batch prefill both call this, so for the same input they compute
    the same h and zero the same neurons. In gate mode a neuron whose |act(gate.x)| is below t
    never reads its up row (h is reported as 0)."""
    gated = wi.shape[0] == 3
    if mode == 1 or not gated:
        g = _dot(wi, ws, i, 0, X, s)
        if b.shape[0] > 0:
            g += b[i, 0]
        a = _act(act, g)
        if not gated:
            return a, a != 0.0 and abs(a) >= thr
        if not abs(a) >= thr:
            return np.float32(0.0), False
        u = _dot(wi, ws, i, 1, X, s)
        if b.shape[0] > 0:
            u += b[i, 1]
        h = a * u
        return h, h != 0.0
    g, u = _dot2(wi, ws, i, X, s)
    if b.shape[0] > 0:
        g += b[i, 0]
        u += b[i, 1]
    h = _act(act, g) * u
    return h, h != 0.0 and abs(h) >= thr


def _add_down(acc, s, wi, ws, i, h):
    """acc[s] += h * neuron i's down column wi[R-1] [D]; an int8 column's scale is folded into h,
    float16 and float32 columns take h as is."""


@njit(inline="always", fastmath=True)
def _add_down_rows(acc, s, wi, h):
    """acc[s] += h * the float32 down column wi[R-1]."""
    R = wi.shape[0]
    for k in range(acc.shape[1]):
        acc[s, k] += h * wi[R - 1, k]


@overload(_add_down)
def _add_down_impl(acc, s, wi, ws, i, h):
    if _q8(wi):
        return lambda acc, s, wi, ws, i, h: _axpy_w(acc[s], h * ws[i, wi.shape[0] - 1], wi[wi.shape[0] - 1])
    if _f16(wi):
        return lambda acc, s, wi, ws, i, h: _axpy_w(acc[s], h, wi[wi.shape[0] - 1])

    def f(acc, s, wi, ws, i, h):
        _add_down_rows(acc, s, wi, h)
    return f


_BLOCK = 16


@njit(inline="always")
def _kept(h, thr, mode, gated):
    """Whether a neuron with output h survives, as _neuron_h decided it: in gate mode a gated FFN's
    dropped neurons already report h = 0; otherwise (paper rule, and plain MLPs, whose h is the
    activation itself in every mode) |h| >= thr. h == 0 never reads its down column."""
    return h != 0.0 and ((mode == 1 and gated) or abs(h) >= thr)


@njit(inline="always")
def _sum_partials(partial, base, out, s):
    """out[s] = base[s] + the per-thread partial sums partial[:, s] (C of them, in order)."""
    for k in range(out.shape[1]):
        v = base[s, k]
        for c in range(partial.shape[0]):
            v += partial[c, s, k]
        out[s, k] = v


@njit(fastmath=True, cache=True)
def ffn_glu(w, ws, b, x, base, thr, act, out, h_out, partial, kept, mode=0):
    """Thresholded FFN for one token: out = base + FFN_t(x).

    w:       [N, R, D] float32 (or uint16 float16 bits, or int8 rows)
             neuron-major weights (mmap'd)
    ws:      [N, R] float32 row scales of int8 weights,
             or shape [0, R]
    b:       [N, R-1] float32 input biases, or shape [0, R-1]
    x:       [D] float32 FFN input (post-attention norm)
    thr:     float32 threshold t: neurons with |h| < t are zeroed and their down column not read
    act:     activation code (ACT_CODES)
    base:    [D] float32 residual stream entering the FFN (may be the same array as out)
    out:     [D] float32; out = base + sum_{|h_i|>=t} h_i * w[i, R-1]
    h_out:   [N] float32, every neuron's h = act(gate.x) * (up.x) before thresholding
    partial: [C, D] float32 per-chunk accumulators (C = thread chunks), scratch
    kept:    [C] int64 scratch; returns the number of neurons kept
    """
    # One token is the S = 1 case of ffn_glu_batch: one code path for decode and short prefill.
    D = x.shape[0]
    return ffn_glu_batch(w, ws, b, x.reshape((1, D)), base.reshape((1, D)), thr, act, out.reshape((1, D)),
                         h_out.reshape((1, h_out.shape[0])), partial.reshape((partial.shape[0], 1, D)), kept, mode)


@njit(parallel=True, fastmath=True, cache=True)
def ffn_glu_batch(w, ws, b, X, base, thr, act, out, h_out, partial, kept, mode=0):
    """ffn_glu for S tokens at once (prompt prefill): each neuron's rows are read once and
    applied to every token, so a short prompt costs about one token's weight traffic.

    w [N, R, D], ws [N, R] or [0, R], b [N, R-1] or [0, R-1];
    X, base, out [S, D] (out may alias base); h_out [S, N];
    partial [C, >=S, D], kept [C] scratch. Returns neurons kept,
    summed over tokens.
    """
    N = w.shape[0]
    S = X.shape[0]
    C = partial.shape[0]
    for c in prange(C):
        lo = c * N // C
        hi = (c + 1) * N // C
        acc = partial[c]
        acc[:S] = 0.0
        n = 0
        # Blocks of _BLOCK neurons, two passes: first every h of the block, then the down columns of
        # those kept. One neuron at a time, each down column waited for its own h (two dot products,
        # a horizontal sum, the activation) before it could start; in blocks, the out-of-order core
        # overlaps independent dot products and then streams the columns.
        for i0 in range(lo, hi, _BLOCK):
            i1 = min(i0 + _BLOCK, hi)
            for i in range(i0, i1):
                wi = w[i]  # [R, D]
                for s in range(S):
                    h_out[s, i] = _neuron_h(wi, ws, b, i, X, s, act, thr, mode)[0]
            for i in range(i0, i1):
                wi = w[i]
                for s in range(S):
                    h = h_out[s, i]
                    if _kept(h, thr, mode, w.shape[1] == 3):
                        n += 1
                        _add_down(acc, s, wi, ws, i, h)
        kept[c] = n
    for s in prange(S):
        _sum_partials(partial, base, out, s)
    total = 0
    for c in range(C):
        total += kept[c]
    return total



@njit(parallel=True, fastmath=True, cache=True)
def glu_threshold(g, u, thr, act, kept, mode=0):
    """Prefill: g <- act(g) * u, then zero what the threshold rule drops, in place;
    kept[s] = neurons kept for token s. g, u: [S, N] float32 (gate and up projections of S
    tokens, from BLAS, biases added; u = 1 for plain MLPs); kept: [S] int64."""
    S, N = g.shape
    for s in prange(S):
        n = 0
        for i in range(N):
            a = _act(act, g[s, i])
            h = a * u[s, i]
            if h != 0.0 and ((abs(a) >= thr) if mode == 1 else (abs(h) >= thr)):
                n += 1
            else:
                h = np.float32(0.0)
            g[s, i] = h
        kept[s] = n


@njit(parallel=True, fastmath=True, cache=True)
def mask_small(x, thr, out, kept):
    """TEAL-style input sparsity: out = x where |x| >= thr else 0; x, out [S, D];
    kept[s] = entries kept in row s."""
    S, D = x.shape
    for s in prange(S):
        n = 0
        for k in range(D):
            v = x[s, k]
            keep = abs(v) >= thr
            out[s, k] = v if keep else np.float32(0.0)
            n += keep
        kept[s] = n


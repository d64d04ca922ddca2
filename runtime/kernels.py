"""Numba kernels. Plain arrays and scalars in, results written into caller-owned buffers.

Conventions: x is the FFN input of one token [D]; the FFN weights are neuron-major
w [N, 3, D] (row 0 = gate, row 1 = up, row 2 = the neuron's column of down), so one neuron's
three vectors are contiguous (3·D·4 bytes = 6.9 KB for SmolLM2) and a skipped neuron costs no
read at all. float16 weights arrive as their uint16 bit patterns (Numba has no CPU float16)
and are widened to float32 per neuron, accumulation is always float32.

fastmath: lets LLVM reorder the dot-product sums into SIMD lanes; the order differs from
NumPy's, which is why tests compare with a tolerance rather than bitwise.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange, types
from numba.extending import overload

# activation codes (ModelConfig.activation)
ACT_CODES = {"silu": 0, "gelu_tanh": 1, "gelu": 2, "relu": 3}


@njit(inline="always", fastmath=True)
def _act(code, g):
    if code == 0:
        return g / (np.float32(1.0) + math.exp(-g))
    if code == 1:
        return np.float32(0.5) * g * (np.float32(1.0) + math.tanh(
            np.float32(0.7978845608028654) * (g + np.float32(0.044715) * g * g * g)))
    if code == 2:
        return np.float32(0.5) * g * (np.float32(1.0) + math.erf(g * np.float32(0.7071067811865476)))
    return max(g, np.float32(0.0))


@njit(inline="always")
def _widen_f16(src, dst):
    """float16 bit patterns (uint16, any shape) -> float32 of the same shape. Branch-free so it vectorises:
    shift exponent+mantissa into float32 position and rescale by 2^112 (this also maps fp16
    subnormals onto float32 normals exactly); inf/NaN do not occur in weights."""
    s = src.ravel()
    d = dst.ravel()
    bits = d.view(np.uint32)
    for k in range(s.shape[0]):
        h = np.uint32(s[k])
        bits[k] = ((h & np.uint32(0x8000)) << np.uint32(16)) | ((h & np.uint32(0x7FFF)) << np.uint32(13))
    for k in range(s.shape[0]):
        d[k] *= np.float32(5.192296858534828e33)  # 2**112


def _rows(w, i, scratch):
    """w[i] as float32: a view for float32 weights, widened into scratch for float16 bits."""


@overload(_rows, inline="always")
def _rows_impl(w, i, scratch):
    if isinstance(w.dtype, types.Integer):
        def widen(w, i, scratch):
            _widen_f16(w[i], scratch)
            return scratch
        return widen
    return lambda w, i, scratch: w[i]


@njit(parallel=True, fastmath=True, cache=True)
def ffn_glu(w, x, base, thr, act, out, h_out, partial, rows, kept):
    """Thresholded gated FFN for one token: out = base + FFN_t(x).

    w:       [N, 3, D] float32 (or uint16 float16 bits) neuron-major weights (mmap'd, read-only)
    x:       [D] float32 FFN input (post-attention norm)
    thr:     float32 threshold t: neurons with |h| < t are zeroed and their down column not read
    act:     activation code (ACT_CODES)
    base:    [D] float32 residual stream entering the FFN (may be the same array as out)
    out:     [D] float32; out = base + sum_{|h_i|>=t} h_i * w[i, 2]
    h_out:   [N] float32, every neuron's h = act(gate.x) * (up.x) before thresholding
    partial: [C, D] float32 per-chunk accumulators (C = thread chunks), scratch
    rows:    [C, 3, D] float32 scratch for widened float16 rows (unused for float32)
    kept:    [C] int64 scratch; returns the number of neurons kept
    """
    N = w.shape[0]
    D = w.shape[2]
    C = partial.shape[0]
    for c in prange(C):
        lo = c * N // C
        hi = (c + 1) * N // C
        acc = partial[c]
        for k in range(D):
            acc[k] = 0.0
        n = 0
        for i in range(lo, hi):
            wi = _rows(w, i, rows[c])  # [3, D]
            g = np.float32(0.0)
            u = np.float32(0.0)
            for k in range(D):
                g += wi[0, k] * x[k]
                u += wi[1, k] * x[k]
            h = _act(act, g) * u
            h_out[i] = h
            if abs(h) >= thr:
                n += 1
                for k in range(D):
                    acc[k] += h * wi[2, k]
        kept[c] = n
    for k in prange(D):
        s = base[k]
        for c in range(C):
            s += partial[c, k]
        out[k] = s
    total = 0
    for c in range(C):
        total += kept[c]
    return total


@njit(parallel=True, fastmath=True, cache=True)
def matvec(w, x, y, rows):
    """y = w @ x for w [V, D] float32 (or uint16 float16 bits); y [V]. The lm_head.
    rows: [C, D] float32 scratch for widened float16 rows."""
    V = w.shape[0]
    D = w.shape[1]
    C = rows.shape[0]
    for c in prange(C):
        lo = c * V // C
        hi = (c + 1) * V // C
        for i in range(lo, hi):
            s = np.float32(0.0)
            wi = _rows(w, i, rows[c])  # [D]
            for k in range(D):
                s += wi[k] * x[k]
            y[i] = s


@njit(fastmath=True, cache=True)
def rms_norm(x, weight, eps, out):
    """out = x / sqrt(mean(x^2) + eps) * weight, per row; x, out [S, D], weight [D].
    Sum of squares in float64: one pass over D values, cheap, and keeps the norm exact enough
    that tokens stay identical to transformers' float32."""
    S, D = x.shape
    for s in range(S):
        ss = 0.0
        for k in range(D):
            ss += np.float64(x[s, k]) * x[s, k]
        inv = np.float32(1.0 / math.sqrt(ss / D + eps))
        for k in range(D):
            out[s, k] = x[s, k] * inv * weight[k]


@njit(cache=True)
def gather_rows(table, ids, scale, out):
    """out[s] = table[ids[s]] * scale; table [V, D] float32 or uint16 float16 bits; out [S, D]."""
    S = ids.shape[0]
    D = out.shape[1]
    for s in range(S):
        row = _rows(table, ids[s], out[s])  # [D]
        for k in range(D):
            out[s, k] = row[k] * scale


@njit(parallel=True, fastmath=True, cache=True)
def glu_threshold(g, u, thr, act, kept):
    """Prefill: g <- act(g) * u, then zero |h| < thr, in place; kept[s] = neurons kept for token s.
    g, u: [S, N] float32 (gate and up projections of S tokens, from BLAS); kept: [S] int64."""
    S, N = g.shape
    for s in prange(S):
        n = 0
        for i in range(N):
            h = _act(act, g[s, i]) * u[s, i]
            if abs(h) >= thr:
                n += 1
            else:
                h = np.float32(0.0)
            g[s, i] = h
        kept[s] = n

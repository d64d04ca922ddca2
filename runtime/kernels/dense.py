"""Dense projections of a few tokens: the attention projections and the lm_head (memory bound, so
every weight row is read once and applied to all tokens)."""

from __future__ import annotations

import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from .ir import _q8
from .rows import _dot_w


@njit(inline="always")
def _emit(Y, bias, base, s, i, v):
    if bias.shape[0] > 0:
        v += bias[i]
    if base.shape[0] > 0:
        v += base[s, i]
    Y[s, i] = v


@njit(inline="always", fastmath=True)
def _rows4_plain(w, X, bias, base, Y, b0, b1):
    """Rows 4*b0 .. 4*b1 (clipped to O) of Y = w X (+ bias) (+ base) for float32 rows (the other
    dtypes take _rows4's vector-IR paths)."""
    O, D = w.shape
    S = X.shape[0]
    for b in range(b0, b1):
        i = 4 * b
        if i + 4 <= O:
            for s in range(S):
                # Blocks of 4 rows: four independent accumulator chains share each load of X[s, k]
                # (one chain per row is latency bound on one core: 10.0 vs 8.8 ms for SmolLM2's
                # projections on 1 thread).
                a0 = np.float32(0.0)
                a1 = np.float32(0.0)
                a2 = np.float32(0.0)
                a3 = np.float32(0.0)
                for k in range(D):
                    xk = X[s, k]
                    a0 += w[i, k] * xk
                    a1 += w[i + 1, k] * xk
                    a2 += w[i + 2, k] * xk
                    a3 += w[i + 3, k] * xk
                _emit(Y, bias, base, s, i, a0)
                _emit(Y, bias, base, s, i + 1, a1)
                _emit(Y, bias, base, s, i + 2, a2)
                _emit(Y, bias, base, s, i + 3, a3)
        else:
            for j in range(i, O):
                for s in range(S):
                    a = np.float32(0.0)
                    for k in range(D):
                        a += w[j, k] * X[s, k]
                    _emit(Y, bias, base, s, j, a)


def _rows4(w, ws, X, bias, base, Y, b0, b1):
    """Rows 4*b0 .. 4*b1 (clipped to O) of Y = w X (+ bias) (+ base), w [O, ·] of any dtype."""


def _row_dot(w, ws, j, X, s):
    """Row j of a projection w [O, ·] dotted with token s's input X[s] [D], scaled (ws: [O] per row
    for int8 rows)."""


@overload(_row_dot)
def _row_dot_impl(w, ws, j, X, s):
    if _q8(w):
        return lambda w, ws, j, X, s: _dot_w(w[j], X[s]) * ws[j]
    return lambda w, ws, j, X, s: _dot_w(w[j], X[s])                # float16 bits


@overload(_rows4, inline="always")
def _rows4_impl(w, ws, X, bias, base, Y, b0, b1):
    if isinstance(w.dtype, types.Float):
        def f32(w, ws, X, bias, base, Y, b0, b1):
            _rows4_plain(w, X, bias, base, Y, b0, b1)
        return f32

    def f(w, ws, X, bias, base, Y, b0, b1):     # one row at a time: the IR dot shares nothing
        for j in range(4 * b0, min(4 * b1, w.shape[0])):
            for s in range(X.shape[0]):
                _emit(Y, bias, base, s, j, _row_dot(w, ws, j, X, s))
    return f


@njit(parallel=True, fastmath=True, cache=True)
def linear(w, ws, X, bias, base, Y, chunks):
    """Y[s] = w @ X[s] (+ bias) (+ base[s]) for a few tokens: the attention projections and the
    lm_head of float16 / float32 packages (and int8 rows that are not whole groups; int4 / int8
    weights in groups are tiled: tiles.py), memory bound, so every weight row is read once and
    applied to all S tokens.

    w:     [O, D] float32 (or uint16 float16 bits, or int8), nn.Linear's [out, in] layout (mmap'd)
    ws:    [O] float32 row scales of int8 weights, or shape [0]
    X:     [S, D] float32
    bias:  [O] float32, or shape [0] for none
    base:  [S, O] float32 added to the result (the residual stream), or shape [0, O] for none;
           may be the same array as Y
    Y:     [S, O] float32
    chunks: contiguous row ranges, one per thread
    """
    nb = (w.shape[0] + 3) // 4
    for c in prange(chunks):
        _rows4(w, ws, X, bias, base, Y, c * nb // chunks, (c + 1) * nb // chunks)


@njit(fastmath=True, cache=True)
def matvec(w, ws, x, y, chunks):
    """y = w @ x for w [V, D] float32 (or uint16 float16 bits, int8 with row scales ws [V]); y [V]."""
    D = x.shape[0]
    V = y.shape[0]
    linear(w, ws, x.reshape((1, D)), np.empty(0, np.float32), np.empty((0, V), np.float32),
           y.reshape((1, V)), chunks)


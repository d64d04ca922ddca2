"""Norms, the embedding gather and the negative log-likelihood of a block of logits."""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange
from numba.extending import overload

from .ir import _ld1


@njit(fastmath=True, cache=True, error_model="numpy")   # NaN weights give NaN, not ZeroDivisionError
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


@njit(fastmath=True, cache=True, error_model="numpy")
def layer_norm(x, weight, bias, eps, out):
    """out = (x - mean) / sqrt(var + eps) * weight + bias, per row; x, out [S, D] (may alias),
    weight [D], bias [D] or [0]. Mean and (biased) variance in float64 over two passes, as exact as torch's
    float32 LayerNorm needs for identical tokens."""
    S, D = x.shape
    for s in range(S):
        m = 0.0
        for k in range(D):
            m += x[s, k]
        m /= D
        v = 0.0
        for k in range(D):
            d = x[s, k] - m
            v += d * d
        inv = 1.0 / math.sqrt(v / D + eps)
        for k in range(D):
            v = np.float32((x[s, k] - m) * inv) * weight[k]
            out[s, k] = v + bias[k] if bias.shape[0] > 0 else v


@njit(fastmath=True, cache=True, error_model="numpy")
def head_rms_norm(qkv, wq, wk, n_heads, n_kv_heads, head_dim, eps):
    """Gemma-3's q/k norms, in place on the packed projection qkv [S, (H+2Hkv)·hd]: each query
    head's hd values are RMS-normed and scaled by wq [hd], each key head's by wk [hd]; v is left
    alone. Before GroupQueryAttention, which applies the rotary embedding after them, as
    transformers does."""
    S = qkv.shape[0]
    for s in range(S):
        for h in range(n_heads + n_kv_heads):
            w = wq if h < n_heads else wk
            o = h * head_dim
            ss = 0.0
            for k in range(head_dim):
                ss += np.float64(qkv[s, o + k]) * qkv[s, o + k]
            inv = np.float32(1.0 / math.sqrt(ss / head_dim + eps))
            for k in range(head_dim):
                qkv[s, o + k] = qkv[s, o + k] * inv * w[k]


def _gather_row(table, ts, t, scale, out):
    """out [D] = table[t] * scale, dequantized."""


@overload(_gather_row, inline="always")
def _gather_row_impl(table, ts, t, scale, out):
    def f(table, ts, t, scale, out):
        row = table[t]  # [D]
        sc = scale * ts[t] if ts.shape[0] > 0 else scale
        for k in range(out.shape[0]):
            out[k] = _ld1(row, k) * sc
    return f


@njit(cache=True)
def gather_rows(table, ts, ids, scale, out):
    """out[s] = table[ids[s]] * scale; table [V, D] float32, uint16 float16 bits or int8 with row
    scales ts [V] (shape [0] otherwise; tiled tables: tiles.gather_tiles);
    out [S, D]."""
    for s in range(ids.shape[0]):
        _gather_row(table, ts, ids[s], scale, out[s])



@njit(parallel=True, fastmath=True, cache=True)
def nll_rows(logits, targets, out):
    """out[s] = logsumexp(logits[s]) - logits[s, targets[s]]; logits [S, V] float32, targets [S].
    exp in float32 after subtracting the row max (every term <= 1), the sum in float64."""
    S, V = logits.shape
    for s in prange(S):
        m = logits[s, 0]
        for v in range(V):
            m = max(m, logits[s, v])
        acc = 0.0
        for v in range(V):
            acc += math.exp(logits[s, v] - m)
        out[s] = math.log(acc) + m - logits[s, targets[s]]


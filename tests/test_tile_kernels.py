"""The tile kernels (runtime/kernels/tiles.py, ffn_tiles.py) against NumPy references that do the same
arithmetic: the input rounded to int8 per group of 32 (quant.round_activations), integer sums per
group; the FFN's down columns scaled by float h. Odd shapes: row counts that are not whole tiles,
several tokens, biases, both widths.

Tolerances: every product of integers is exact in both; what differs is the order of float32
additions (G group terms per output; the per-thread partial sums) and fused multiply-adds
(fastmath), so the bound is a few float32 ulps of the largest partial sum: 2e-6 relative to the
output's magnitude, times the number of terms."""

from __future__ import annotations

import numpy as np
import pytest

from edgesparse import tiles as T
from edgesparse.quant import quantize_int4, quantize_int8_groups, round_activations
from edgesparse.runtime.kernels.ffn_tiles import ffn_tiles
from edgesparse.runtime.kernels.tiles import gather_tiles, linear_tiles

ACT_SILU, ACT_RELU = 0, 3


def _encode(w: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """w [..., D] -> (integer values, float16 scales) of quant.py's encodings."""
    stored, scale = quantize_int4(w) if bits == 4 else quantize_int8_groups(w)
    if bits == 8:
        return stored.astype(np.int32), scale
    G = stored.shape[-1] // 16
    b = stored.reshape(*stored.shape[:-1], G, 16)
    q = np.concatenate([b & 15, b >> 4], axis=-1).reshape(*stored.shape[:-1], G * 32).astype(np.int32) - 8
    return q, scale


def _view(a: np.ndarray, bits: int) -> np.ndarray:
    return a.view(np.uint8 if bits == 4 else np.int8)


def _xbuf(S: int, D: int):
    return np.zeros((S, D), np.int8), np.zeros((S, D // 4), np.float32), np.zeros((S, D // 4), np.int32)


def _dots(q: np.ndarray, d: np.ndarray, X: np.ndarray) -> np.ndarray:
    """[S, O]: each row of q [O, D] (scales d [O, G]) dotted with X [S, D] rounded to int8 per group,
    group by group in float32 as the kernel forms it."""
    S, D = X.shape
    G = D // 32
    Xg = X.reshape(S, G, 32)
    dx = (np.abs(Xg).max(-1) / np.float32(127.0)).astype(np.float32)                 # [S, G]
    r = np.float32(1.0) / np.where(dx > 0, dx, np.float32(1.0))                           # quant.round_activations
    qx = np.where(dx[..., None] > 0, np.rint(Xg * r[..., None]), 0).astype(np.int64)
    isum = np.einsum("ogk,sgk->sog", q.reshape(-1, G, 32).astype(np.int64), qx)       # [S, O, G] exact
    return (isum.astype(np.float32) * (d.astype(np.float32)[None] * dx[:, None, :])).sum(-1, dtype=np.float32)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("O,D,S", [(16, 32, 1), (37, 64, 1), (50, 96, 3), (960, 576, 2)])
def test_linear_tiles_vs_numpy(bits, O, D, S):
    rng = np.random.default_rng(O + D + S + bits)
    q, d = _encode(rng.standard_normal((O, D)).astype(np.float32) * 0.1, bits)
    t = _view(T.to_tiles(q, d, bits), bits)
    X = rng.standard_normal((S, D)).astype(np.float32)
    bias = rng.standard_normal(O).astype(np.float32)
    base = rng.standard_normal((S, O)).astype(np.float32)
    for chunks in (1, 3):
        Y = np.full((S, O), np.nan, np.float32)
        linear_tiles(t, X, bias, base, Y, chunks, _xbuf(S, D), np.zeros((chunks, 16), np.float32))
        ref = _dots(q, d, X) + bias + base
        diff = np.abs(Y - ref).max()
        print(f"int{bits} [{O}, {D}] S={S} chunks={chunks}: max|diff| {diff:.3g}, max|ref| {np.abs(ref).max():.3g}")
        assert diff <= 2e-6 * (D // 32) * np.abs(ref).max()
    Y = np.zeros((S, O), np.float32)          # no bias, no base
    linear_tiles(t, X, np.zeros(0, np.float32), np.zeros((0, O), np.float32), Y, 2, _xbuf(S, D),
                 np.zeros((2, 16), np.float32))
    assert np.abs(Y - _dots(q, d, X)).max() <= 2e-6 * (D // 32) * np.abs(Y).max()


@pytest.mark.parametrize("bits", [4, 8])
def test_gather_tiles_is_the_decoded_row(bits):
    rng = np.random.default_rng(bits)
    V, E = 45, 96
    q, d = _encode(rng.standard_normal((V, E)).astype(np.float32), bits)
    t = _view(T.to_tiles(q, d, bits), bits)
    ids = np.array([0, 17, 44, 3], np.int64)
    out = np.zeros((4, E), np.float32)
    gather_tiles(t, ids, np.float32(1.5), out)
    want = T.dequantize_tiles(t.view(np.uint8), V, bits)[ids] * np.float32(1.5)
    assert np.array_equal(out, want)          # one product per value, as NumPy's


def _ffn_reference(q, d, b, X, thr, act, mode):
    """(out [S, D], h [S, N], kept): the FFN the kernel computes, in NumPy."""
    N, R, D = q.shape
    G = D // 32
    gated = R == 3
    g = _dots(q[:, 0], d[:, 0], X) + (b[:, 0] if b.size else 0)
    a = g / (1 + np.exp(-g)) if act == ACT_SILU else np.maximum(g, 0)
    a = a.astype(np.float32)
    if gated:
        u = _dots(q[:, 1], d[:, 1], X) + (b[:, 1] if b.size else 0)
        h = (a * u).astype(np.float32)
        keep = (h != 0) & ((np.abs(a) >= thr) if mode == 1 else (np.abs(h) >= thr))
        if mode == 1:
            h = np.where(keep, h, np.float32(0))
    else:
        h = a
        keep = (h != 0) & (np.abs(h) >= thr)
    wd = (q[:, R - 1].reshape(N, G, 32) * d[:, R - 1].astype(np.float32)[..., None]).reshape(N, D)   # [N, D]
    out = (np.where(keep, h, 0).astype(np.float64) @ wd).astype(np.float32)
    return out, h, int(keep.sum())


def _run_ffn(q, d, b, X, base, thr, act, mode, bits, C):
    N, R, D = q.shape
    S = X.shape[0]
    Gp = -(-(D // 32) // 16) * 16
    blocks = _view(T.to_ffn_blocks(q, d, bits), bits)
    t, cols = T.ffn_views(blocks, R, D, bits)
    out = np.zeros((S, D), np.float32)
    h = np.full((S, N), np.nan, np.float32)
    sc = (np.zeros((C, 32), np.float32), np.zeros((C, S, 16), np.int64), np.zeros((C, S, 16, Gp), np.float32))
    k = ffn_tiles(t, cols, N, b, X, base, np.float32(thr), act, out, h, np.zeros((C, S, D), np.float32),
                  np.zeros(C, np.int64), mode, _xbuf(S, D), sc)
    return out, h, k


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("N,R,D,S", [(16, 3, 32, 1), (37, 3, 64, 1), (50, 3, 96, 3), (21, 2, 64, 2), (1536, 3, 576, 1)])
@pytest.mark.parametrize("level", [0.0, 0.5, 1.0])     # dense, about half kept, none kept
def test_ffn_tiles_vs_numpy(bits, N, R, D, S, level):
    rng = np.random.default_rng(N * R + D + S + bits)
    q, d = _encode(rng.standard_normal((N, R, D)).astype(np.float32) * 0.1, bits)
    X = rng.standard_normal((S, D)).astype(np.float32)
    b = rng.standard_normal((N, R - 1)).astype(np.float32) * 0.1 if N % 2 else np.zeros((0, R - 1), np.float32)
    base = rng.standard_normal((S, D)).astype(np.float32)
    act = ACT_SILU if R == 3 else ACT_RELU
    _, h0, _ = _ffn_reference(q, d, b, X, 0.0, act, 0)
    # thresholds between two neurons' |h| (never on one: the last float32 bit would decide it)
    a = np.sort(np.abs(h0).ravel())
    i = int(level * (a.size - 1))
    thr = np.float32(0.0 if level == 0 else a[-1] * 1.01 if level == 1 else (a[i] + a[i + 1]) / 2)
    ref, href, kref = _ffn_reference(q, d, b, X, thr, act, 0)
    for C in (1, 3):
        out, h, k = _run_ffn(q, d, b, X, base, thr, act, 0, bits, C)
        dh, do = np.abs(h - href).max(), np.abs(out - base - ref).max()
        print(f"int{bits} N={N} R={R} D={D} S={S} t=q{level} C={C}: kept {k}/{kref}, max|dh| {dh:.3g}, "
              f"max|dout| {do:.3g}, max|out| {np.abs(ref).max():.3g}")
        assert k == kref
        assert dh <= 2e-6 * (D // 32) * np.abs(href).max()
        assert do <= 2e-6 * (D // 32 + N) * max(np.abs(ref).max(), 1e-30)


@pytest.mark.parametrize("bits", [4, 8])
def test_ffn_tiles_gate_mode(bits):
    """Gate (CATS) mode: |act(gate.x)| decides; a dropped neuron reports h = 0."""
    rng = np.random.default_rng(7)
    N, D = 40, 64
    q, d = _encode(rng.standard_normal((N, 3, D)).astype(np.float32) * 0.1, bits)
    X = rng.standard_normal((1, D)).astype(np.float32)
    b = np.zeros((0, 2), np.float32)
    g = _dots(q[:, 0], d[:, 0], X)
    thr = np.float32(np.median(np.abs(g / (1 + np.exp(-g)))))
    ref, href, kref = _ffn_reference(q, d, b, X, thr, ACT_SILU, 1)
    out, h, k = _run_ffn(q, d, b, X, np.zeros((1, D), np.float32), thr, ACT_SILU, 1, bits, 2)
    assert k == kref and ((h == 0) == (href == 0)).all()
    assert np.abs(out - ref).max() <= 1e-5 * np.abs(ref).max()


def test_round_activations_is_what_the_tiles_multiply():
    """The BLAS paths round the input with quant.round_activations: the same values as _dots'."""
    rng = np.random.default_rng(5)
    X = rng.standard_normal((2, 64)).astype(np.float32)
    q, d = _encode(rng.standard_normal((16, 64)).astype(np.float32), 4)
    w = (q.reshape(16, 2, 32) * d.astype(np.float32)[..., None]).reshape(16, 64)
    assert np.allclose(round_activations(X) @ w.T, _dots(q, d, X), rtol=1e-5, atol=1e-5)

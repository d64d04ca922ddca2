"""Tiles: int4 / int8 weights interleaved 16 rows at a time, as llama.cpp repacks Q4_0 and Q8_0
(ggml-cpu/repack.cpp, block_q4_0x8 / block_q8_0x4). NumPy only: the exporter writes these bytes,
the tests and the BLAS paths read them back; the Numba kernels (runtime/kernels/tiles.py) read the
same bytes without widening.

Why. A row-at-a-time dot product of a grouped row (one float16 scale per 32 values) spends most of
its instructions on the scales: every group needs its own int->float conversion, scale multiply and
a horizontal sum at the end of the row. With 16 rows interleaved, one AVX-512 VNNI vpdpbusd
multiplies 4 input values with 4 weights of each of the 16 rows (64 byte pairs, 16 int32 lanes:
lane i = row i), the input quad is broadcast from memory, and a group's scales are one vector of 16:
the 16 outputs are 16 lanes, no horizontal sum. Measured on SmolLM2-135M's FFN gate and up rows
(30 layers x 1536 x 576, int4, one thread, this project's Zen 4 machine): 47 us per layer tiled,
122-176 us row by row (docs/FORMAT.md#tiles has the table).

A tile is 16 rows x 32 values (one group) of a matrix [O, D]:

    q4x16  288 bytes: 256 bytes of nibbles, then the 16 rows' float16 scales (row order)
           byte 64 p + 4 i + j  (p = 0..3, i = row 0..15, j = 0..3):
               low nibble  = q[i, 4p + j] + 8          (values 0..15 for q in -8..7)
               high nibble = q[i, 16 + 4p + j] + 8
    q8x16  544 bytes: 512 bytes, then the 16 float16 scales
           byte 64 p + 4 i + j  (p = 0..7):  q[i, 4p + j] + 128   (uint8; q in -127..127)

so the 64 bytes at 64 p are one vpdpbusd operand (unsigned bytes: the + 8 / + 128 offset is taken
back once per group as offset * sum(qx) of the int8-rounded input, see runtime/kernels/tiles.py),
and w[i, k] = q[i, k] * scale[i, k // 32] exactly as in Q4_0 / Q8_0 (edgesparse/quant.py's
encodings, repacked losslessly). A matrix [O, D] (D a multiple of 32) is stored [ceil(O/16), D/32,
tile] uint8, tiles of a row block in group order; O is padded to a multiple of 16 with zero rows
(scale 0). A tensor [N, *mid, D] tiles 16 consecutive indices of its first axis: stored
[ceil(N/16), *mid, D/32, tile] (the FFN's gate and up rows of 16 neurons: [N/16, 2, G, tile]).

Columns ("q4c", "q8c"): a matrix [N, D] stored one row after another, each row's values followed
by its scales: int4 [D/2 nibble bytes (Q4_0 packing: byte j of group g holds value 32g + j in its
low nibble, 32g + 16 + j in its high one)][D/32 float16 scales]; int8 [D bytes][D/32 scales]. The
FFN's down projection is stored so, one neuron's column per row: a neuron the threshold drops is
one contiguous run of bytes that is never read.
"""

from __future__ import annotations

import numpy as np

GROUP = 32          # values per scale
ROWS = 16           # rows per tile
TILE_BYTES = {4: 288, 8: 544}
_OFFSET = {4: 8, 8: 128}


def padded(n: int) -> int:
    """n rows padded up to whole tiles."""
    return -(-n // ROWS) * ROWS


def to_tiles(q: np.ndarray, d: np.ndarray, bits: int) -> np.ndarray:
    """q [N, *mid, D] integer values (int4: -8..7, int8: -127..127), d [N, *mid, D/32] float16 scales
    -> tiles [ceil(N/16), *mid, D/32, TILE_BYTES[bits]] uint8."""
    q = np.asarray(q)
    N, mid, D = q.shape[0], q.shape[1:-1], q.shape[-1]
    if D % GROUP:
        raise ValueError(f"tiles need rows whose length is a multiple of {GROUP}, got {D}")
    G, Np = D // GROUP, padded(N)
    u = np.zeros((Np, *mid, D), np.uint8)
    u[:N] = (q.astype(np.int32) + _OFFSET[bits]).astype(np.uint8)
    u[N:] = _OFFSET[bits]                                                   # zero rows: q = 0
    sc = np.zeros((Np, *mid, G), np.float16)
    sc[:N] = np.asarray(d, np.float16)
    m = len(mid)
    # [B, 16, *mid, G, 32] -> [B, *mid, G, 16, 32]: row block, then the tile's own axes
    u = np.moveaxis(u.reshape(Np // ROWS, ROWS, *mid, G, GROUP), 1, 2 + m)
    if bits == 4:
        lo = u[..., :16].reshape(*u.shape[:-2], ROWS, 4, 4)                 # [..., i, p, j]
        hi = u[..., 16:].reshape(*u.shape[:-2], ROWS, 4, 4)
        body = np.swapaxes(lo | (hi << 4), -3, -2)                          # [..., p, i, j]
    else:
        body = np.swapaxes(u.reshape(*u.shape[:-2], ROWS, 8, 4), -3, -2)    # [..., p, i, j]
    body = body.reshape(*u.shape[:-2], -1)                                   # [B, *mid, G, 256 | 512]
    scales = np.moveaxis(sc.reshape(Np // ROWS, ROWS, *mid, G), 1, -1)      # [B, *mid, G, 16]
    scales = np.ascontiguousarray(scales).view(np.uint8)                     # [B, *mid, G, 32]
    return np.ascontiguousarray(np.concatenate([body, scales], axis=-1))


def from_tiles(t: np.ndarray, n: int, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """The inverse of to_tiles: tiles [B, *mid, G, tile] -> (q [n, *mid, 32 G] int8/int32 values,
    d [n, *mid, G] float16), the first n rows (padding dropped)."""
    t = np.asarray(t, np.uint8)
    B, mid, G = t.shape[0], t.shape[1:-2], t.shape[-2]
    m = len(mid)
    nb = 256 if bits == 4 else 512
    body = t[..., :nb].reshape(*t.shape[:-1], nb // 64, ROWS, 4)            # [..., p, i, j]
    body = np.swapaxes(body, -3, -2)                                         # [..., i, p, j]
    if bits == 4:
        lo = (body & 15).reshape(*body.shape[:-2], 16)
        hi = (body >> 4).reshape(*body.shape[:-2], 16)
        u = np.concatenate([lo, hi], axis=-1)                                # [B, *mid, G, 16, 32]
    else:
        u = body.reshape(*body.shape[:-2], 32)
    q = u.astype(np.int32) - _OFFSET[bits]
    q = np.moveaxis(q, 2 + m, 1).reshape(B * ROWS, *mid, G * GROUP)[:n]     # [n, *mid, D]
    sc = np.ascontiguousarray(t[..., nb:]).view(np.float16)                  # [B, *mid, G, 16]
    d = np.moveaxis(sc, -1, 1).reshape(B * ROWS, *mid, G)[:n]
    return q.astype(np.int8), np.ascontiguousarray(d)


def dequantize_tiles(t: np.ndarray, n: int, bits: int) -> np.ndarray:
    """tiles -> float32 [n, *mid, D]: what the kernels multiply with."""
    q, d = from_tiles(t, n, bits)
    G = d.shape[-1]
    w = q.astype(np.float32).reshape(*q.shape[:-1], G, GROUP) * d.astype(np.float32)[..., None]
    return w.reshape(q.shape)


def to_columns(q: np.ndarray, d: np.ndarray, bits: int) -> np.ndarray:
    """q [N, D] integer values, d [N, D/32] float16 -> [N, D/2 + 2 D/32] (int4) or [N, D + 2 D/32]
    (int8) uint8: each row's values (Q4_0 nibble packing for int4; int8 as its bytes), then its scales."""
    q = np.asarray(q)
    N, D = q.shape
    if D % GROUP:
        raise ValueError(f"columns need a length that is a multiple of {GROUP}, got {D}")
    if bits == 4:
        u = (q.astype(np.int32) + 8).astype(np.uint8).reshape(N, D // GROUP, 2, 16)
        body = (u[:, :, 0] | (u[:, :, 1] << 4)).reshape(N, D // 2)
    else:
        body = q.astype(np.int8).view(np.uint8)
    sc = np.ascontiguousarray(np.asarray(d, np.float16)).view(np.uint8).reshape(N, 2 * (D // GROUP))
    return np.ascontiguousarray(np.concatenate([body, sc], axis=1))


def from_columns(c: np.ndarray, D: int, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """The inverse of to_columns: [N, bytes] -> (q [N, D] int8, d [N, D/32] float16)."""
    c = np.asarray(c, np.uint8)
    N, G = c.shape[0], D // GROUP
    nb = D // 2 if bits == 4 else D
    if bits == 4:
        b = c[:, :nb].reshape(N, G, 16)
        q = np.concatenate([b & 15, b >> 4], axis=-1).reshape(N, D).astype(np.int32) - 8
    else:
        q = c[:, :nb].view(np.int8)
    d = np.ascontiguousarray(c[:, nb:nb + 2 * G]).view(np.float16)
    return q.astype(np.int8), d


def dequantize_columns(c: np.ndarray, D: int, bits: int) -> np.ndarray:
    """columns -> float32 [N, D]."""
    q, d = from_columns(c, D, bits)
    return (q.astype(np.float32).reshape(q.shape[0], -1, GROUP) * d.astype(np.float32)[..., None]).reshape(q.shape)


def column_bytes(D: int, bits: int) -> int:
    """Bytes of one column of D values."""
    return (D // 2 if bits == 4 else D) + 2 * (D // GROUP)


# -- the FFN in neuron blocks ------------------------------------------------------------------------
# A layer's FFN [N, R, D] (R = 3: gate, up, down column; R = 2: fc1, fc2 column) in blocks of 16
# neurons, each block one contiguous run of bytes:
#     [(R-1) x D/32 tiles: the block's gate rows, then its up rows][16 down columns, to_columns]
# so a decode step streams the file front to back, and a neuron's down column is its own
# contiguous run (the threshold drops whole columns). N is padded to whole blocks with zero
# neurons (h = 0: never kept).


def ffn_block_bytes(R: int, D: int, bits: int) -> int:
    """Bytes of one block of 16 neurons."""
    return (R - 1) * (D // GROUP) * TILE_BYTES[bits] + ROWS * column_bytes(D, bits)


def to_ffn_blocks(q: np.ndarray, d: np.ndarray, bits: int) -> np.ndarray:
    """q [N, R, D] integer values, d [N, R, D/32] float16 -> blocks [ceil(N/16), ffn_block_bytes] uint8."""
    N, R, D = q.shape
    NB = padded(N) // ROWS
    tiles = to_tiles(q[:, :R - 1], d[:, :R - 1], bits).reshape(NB, -1)       # [NB, (R-1) G T]
    cols = np.zeros((NB * ROWS, column_bytes(D, bits)), np.uint8)
    cols[:] = to_columns(np.zeros((1, D), np.int32), np.zeros((1, D // GROUP), np.float16), bits)
    cols[:N] = to_columns(q[:, R - 1], d[:, R - 1], bits)
    return np.ascontiguousarray(np.concatenate([tiles, cols.reshape(NB, -1)], axis=1))


def ffn_views(blocks: np.ndarray, R: int, D: int, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Strided views of blocks [NB, ffn_block_bytes]: the tiles [NB, R-1, G, tile] and the down
    columns [NB, 16, column_bytes] (the kernels take both, with their strides)."""
    NB, G, T = blocks.shape[0], D // GROUP, TILE_BYTES[bits]
    nt = (R - 1) * G * T
    return blocks[:, :nt].reshape(NB, R - 1, G, T), blocks[:, nt:].reshape(NB, ROWS, column_bytes(D, bits))


def from_ffn_blocks(blocks: np.ndarray, n: int, R: int, D: int, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """The inverse of to_ffn_blocks: (q [n, R, D] int8, d [n, R, D/32] float16)."""
    t, c = ffn_views(np.asarray(blocks).view(np.uint8), R, D, bits)
    qt, dt = from_tiles(t, n, bits)                                          # [n, R-1, D], [n, R-1, G]
    qc, dc = from_columns(c.reshape(-1, c.shape[-1])[:n], D, bits)          # [n, D], [n, G]
    return (np.concatenate([qt, qc[:, None]], axis=1), np.concatenate([dt, dc[:, None]], axis=1))


def dequantize_ffn_blocks(blocks: np.ndarray, n: int, R: int, D: int, bits: int) -> np.ndarray:
    """blocks -> float32 [n, R, D]."""
    q, d = from_ffn_blocks(blocks, n, R, D, bits)
    G = D // GROUP
    return (q.astype(np.float32).reshape(n, R, G, GROUP) * d.astype(np.float32)[..., None]).reshape(n, R, D)


def tiled_shape(shape: tuple[int, ...], bits: int) -> tuple[int, ...]:
    """The stored shape of a tiled tensor of logical shape [N, *mid, D]."""
    return (padded(shape[0]) // ROWS, *shape[1:-1], shape[-1] // GROUP, TILE_BYTES[bits])


def ffn_shape(shape: tuple[int, ...], bits: int) -> tuple[int, ...]:
    """The stored shape of an FFN in blocks, logical shape [N, R, D]."""
    N, R, D = shape
    return (padded(N) // ROWS, ffn_block_bytes(R, D, bits))

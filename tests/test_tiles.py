"""edgesparse/tiles.py: 16-row tiles and per-row columns are lossless repackings of the Q4_0 / Q8_0
encodings (edgesparse/quant.py); what they decode to is exactly what the row-major encodings decode to."""

from __future__ import annotations

import numpy as np
import pytest

from edgesparse import tiles as T
from edgesparse.quant import dequantize, quantize_int4, quantize_int8_groups


def _values(packed: np.ndarray, bits: int) -> np.ndarray:
    """The integer values of quant.py's storage: int4 nibbles - 8, or the int8 bytes."""
    if bits == 8:
        return packed.astype(np.int32)
    G = packed.shape[-1] // 16
    b = packed.reshape(*packed.shape[:-1], G, 16)
    return (np.concatenate([b & 15, b >> 4], axis=-1).reshape(*packed.shape[:-1], G * 32).astype(np.int32) - 8)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("shape", [(16, 32), (37, 64), (5, 3, 96), (100, 2, 576)])   # odd row counts pad
def test_tiles_round_trip_and_decode_as_row_major(bits, shape):
    rng = np.random.default_rng(sum(shape) + bits)
    w = rng.standard_normal(shape).astype(np.float32)
    stored, scale = quantize_int4(w) if bits == 4 else quantize_int8_groups(w)
    q = _values(stored, bits)
    t = T.to_tiles(q, scale, bits)
    assert t.shape == (T.padded(shape[0]) // 16, *shape[1:-1], shape[-1] // 32, T.TILE_BYTES[bits])
    q2, d2 = T.from_tiles(t, shape[0], bits)
    assert np.array_equal(q2, q) and np.array_equal(d2, scale)
    got, want = T.dequantize_tiles(t, shape[0], bits), dequantize(stored, scale)
    print(f"int{bits} {shape}: tiles {t.shape}, max|tiles - row-major| {np.abs(got - want).max()}")
    assert np.array_equal(got, want)          # a repacking: bit for bit the same values


@pytest.mark.parametrize("bits", [4, 8])
def test_tile_byte_layout(bits):
    """The layout docstring, byte by byte: one tile of known values."""
    q = (np.arange(16 * 32).reshape(16, 32) % (16 if bits == 4 else 255)) - (8 if bits == 4 else 127)
    d = np.arange(16, dtype=np.float16).reshape(16, 1)
    t = T.to_tiles(q, d, bits)[0, 0]
    off = 8 if bits == 4 else 128
    for p in range(4 if bits == 4 else 8):
        for i in (0, 7, 15):
            for j in range(4):
                b = int(t[64 * p + 4 * i + j])
                if bits == 4:
                    assert (b & 15, b >> 4) == (q[i, 4 * p + j] + off, q[i, 16 + 4 * p + j] + off)
                else:
                    assert b == q[i, 4 * p + j] + off
    nb = 256 if bits == 4 else 512
    assert np.array_equal(t[nb:].view(np.float16), d[:, 0])


def test_padding_rows_are_zero():
    q = np.ones((17, 32), np.int32)
    t = T.to_tiles(q, np.ones((17, 1), np.float16), 4)
    w = T.dequantize_tiles(t, 32, 4)             # all 32 stored rows, padding included
    assert (w[:17] == 1).all() and (w[17:] == 0).all()


@pytest.mark.parametrize("bits", [4, 8])
def test_columns_round_trip(bits):
    rng = np.random.default_rng(bits)
    w = rng.standard_normal((7, 96)).astype(np.float32)
    stored, scale = quantize_int4(w) if bits == 4 else quantize_int8_groups(w)
    c = T.to_columns(_values(stored, bits), scale, bits)
    assert c.shape == (7, T.column_bytes(96, bits))
    if bits == 4:
        assert np.array_equal(c[:, :48], stored)     # the values are Q4_0's own packing
    assert np.array_equal(T.dequantize_columns(c, 96, bits), dequantize(stored, scale))


def test_rows_must_be_whole_groups():
    with pytest.raises(ValueError, match="multiple of 32"):
        T.to_tiles(np.zeros((16, 40), np.int32), np.zeros((16, 1), np.float16), 4)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("N,R", [(16, 3), (37, 3), (20, 2)])
def test_ffn_blocks_round_trip(bits, N, R):
    """Neuron blocks hold each neuron's gate/up (fc1) rows in tiles and its down (fc2) column whole."""
    rng = np.random.default_rng(N + R + bits)
    D = 64
    w = rng.standard_normal((N, R, D)).astype(np.float32)
    stored, scale = quantize_int4(w) if bits == 4 else quantize_int8_groups(w)
    q = _values(stored, bits)
    b = T.to_ffn_blocks(q, scale, bits)
    assert b.shape == T.ffn_shape((N, R, D), bits)
    q2, d2 = T.from_ffn_blocks(b, N, R, D, bits)
    assert np.array_equal(q2, q) and np.array_equal(d2, scale)
    assert np.array_equal(T.dequantize_ffn_blocks(b, N, R, D, bits), dequantize(stored, scale))
    tiles, cols = T.ffn_views(b, R, D, bits)
    for n in (0, N - 1):        # neuron n's down column is one contiguous run in its block
        want = T.to_columns(q[n:n + 1, R - 1], scale[n:n + 1, R - 1], bits)[0]
        assert np.array_equal(cols[n // 16, n % 16], want)
    pad = T.dequantize_ffn_blocks(b, T.padded(N), R, D, bits)[N:]
    assert (pad == 0).all()      # padding neurons have zero weights

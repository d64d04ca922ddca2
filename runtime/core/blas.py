"""The BLAS paths (long prefill, eval windows, calibration): float32 copies of the weights and the
same arithmetic the kernels do, so that a token computes the same values whichever path it takes.
Tiled weights meet their input rounded to int8 per group of 32 (kernels/tiles.py); the down
columns take float h, as the kernels add them."""

from __future__ import annotations

import numpy as np

from edgesparse import tiles
from edgesparse.quant import dequantize, round_activations

from .weights import tiled


def widen(w: np.ndarray, ws: np.ndarray, rows: int) -> np.ndarray:
    """float32 copy [rows, D] of a matrix as the kernels take it: tiles decoded, float16 bits
    widened, int8 rows scaled."""
    bits = tiled(w, ws)
    if bits:
        return tiles.dequantize_tiles(w.view(np.uint8), rows, bits)
    return w if w.dtype == np.float32 else dequantize(w, ws)


def widen_ffn(lw, R: int, D: int) -> np.ndarray:
    """float32 copy [n, R, D] of a layer's FFN (rows or blocks of 16 neurons)."""
    if lw.ffn_bits:
        return tiles.dequantize_ffn_blocks(lw.ffn.view(np.uint8), lw.n, R, D, lw.ffn_bits)
    return widen(lw.ffn, lw.ffn_scale, lw.n)


def blas_input(X: np.ndarray, w: np.ndarray, ws: np.ndarray) -> np.ndarray:
    """X [S, D] as the kernels multiply it with w: rounded to int8 per group of 32 for tiles, as
    is otherwise."""
    return round_activations(X) if tiled(w, ws) else X


def decoded(pkg, name: str) -> np.ndarray:
    """The float32 values a package tensor stands for, in its logical shape ([O, D], [N, R, D], ...):
    tiles and FFN blocks decoded, int8 rows scaled, float16 widened."""
    from edgesparse.format import FFN_BLOCKS, TILED
    t = pkg.manifest.tensor(name)
    a = pkg.tensor(name)
    if t.dtype in TILED:
        return tiles.dequantize_tiles(a.view(np.uint8), t.shape[0], TILED[t.dtype]).reshape(t.shape)
    if t.dtype in FFN_BLOCKS:
        return tiles.dequantize_ffn_blocks(a.view(np.uint8), *t.shape, FFN_BLOCKS[t.dtype])
    if t.dtype == "int8":
        return dequantize(a, pkg.tensor(name + ".scale"))
    return np.asarray(a, np.float32)

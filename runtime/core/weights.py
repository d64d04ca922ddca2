"""Everything with weights, as the kernels take it: mmap'd (or RAM) views of the package's tensors,
float16 handed over as its bit patterns, int4 / int8 as tiles (edgesparse/tiles.py), absent
optional tensors as empty arrays."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgesparse import tiles
from edgesparse.format import FFN_BLOCKS

from .package import Package


def kernel_array(a: np.ndarray) -> np.ndarray:
    # Numba has no CPU float16: hand float16 weights over as their bit patterns.
    return a.view(np.uint16) if a.dtype == np.float16 else a


def scales(pkg: Package, name: str | None, ndim: int) -> np.ndarray:
    """The row scales of an int8 tensor whose rows are not whole groups ([rows...] float32), or an
    empty [0, ...] float32 array (ndim axes): float tensors, and tiles, which carry their own."""
    if name is not None and name + ".scale" in pkg.manifest.tensors:
        return kernel_array(pkg.tensor(name + ".scale"))
    return np.zeros((0,) * ndim, np.float32)


def tiled(w: np.ndarray, ws: np.ndarray) -> int:
    """4 or 8 for a tiled matrix [B, G, tile] (its bytes: uint8 for int4, int8 for int8), 0 for a
    matrix of rows (float32, float16 bits, or int8 rows, which always come with row scales ws)."""
    if w.dtype == np.uint8:
        return 4
    return 8 if w.dtype == np.int8 and ws.size == 0 else 0


@dataclass(frozen=True)
class LayerWeights:
    """One layer's tensors as the kernels take them (mmap'd views; float16 as uint16 bits).
    Absent optional tensors are empty arrays, which the kernels read as "none"."""
    attn_norm: np.ndarray       # [D] float32
    attn_norm_bias: np.ndarray  # [D] float32 (LayerNorm) or [0]
    qkv: np.ndarray             # [(H+2Hkv)·hd, D], or tiles [ceil(·/16), D/32, tile]
    qkv_scale: np.ndarray       # [(H+2Hkv)·hd] int8 row scales, or [0]
    qkv_bias: np.ndarray        # [(H+2Hkv)·hd] float32, or [0] for none
    o: np.ndarray               # [D, H·hd], or tiles
    o_scale: np.ndarray         # [D] or [0]
    o_bias: np.ndarray          # [D] float32, or [0]
    ffn_norm: np.ndarray        # [D] float32, or [0] (parallel block)
    ffn_norm_bias: np.ndarray   # [D] or [0]
    ffn: np.ndarray             # [N, R, D] neuron-major rows, or blocks of 16 neurons [ceil(N/16), bytes]
    ffn_scale: np.ndarray       # [N, R] int8 row scales, or [0, R]
    ffn_bias_in: np.ndarray     # [N, R-1] float32, or [0, R-1]
    ffn_bias_out: np.ndarray    # [D] float32, or [0]
    q_norm: np.ndarray          # [hd] or [0]
    k_norm: np.ndarray          # [hd] or [0]
    attn_out_norm: np.ndarray   # [D] or [0]
    ffn_out_norm: np.ndarray    # [D] or [0]
    n: int                      # neurons (config.ffn_dim, fewer in a pruned package)
    ffn_bits: int = 0           # 4 / 8 for blocks, 0 for rows
    ffn_tiles: np.ndarray | None = None   # blocks: [NB, R-1, G, tile] gate/up tiles (a strided view)
    ffn_cols: np.ndarray | None = None    # blocks: [NB, 16, column bytes] down columns (a strided view)
    pred_q: np.ndarray | None = None      # [N, R-1, D] int8 predictor (see sparsity/predictor.py)
    pred_scale: np.ndarray | None = None  # [N, R-1] float32

    @classmethod
    def load(cls, pkg: Package, entry) -> "LayerWeights":
        none = np.zeros(0, np.float32)
        t = lambda name: none if name is None else kernel_array(pkg.tensor(name))  # noqa: E731
        ffn = t(entry.ffn)
        te = pkg.manifest.tensor(entry.ffn)
        N, R, D = te.shape
        bias_in = np.zeros((0, R - 1), np.float32) if entry.ffn_bias_in is None else pkg.tensor(entry.ffn_bias_in)
        blocks = {}
        if te.dtype in FFN_BLOCKS:
            bits = FFN_BLOCKS[te.dtype]
            tv, cv = tiles.ffn_views(ffn, R, D, bits)
            blocks = {"ffn_bits": bits, "ffn_tiles": tv, "ffn_cols": cv}
        pred = {} if entry.pred_q is None else {"pred_q": pkg.tensor(entry.pred_q),
                                                "pred_scale": pkg.tensor(entry.pred_scale)}
        roles = ("attn_norm", "attn_norm_bias", "qkv", "qkv_bias", "o", "o_bias", "ffn_norm", "ffn_norm_bias",
                 "ffn_bias_out", "q_norm", "k_norm", "attn_out_norm", "ffn_out_norm")
        return cls(ffn=ffn, ffn_bias_in=bias_in, qkv_scale=scales(pkg, entry.qkv, 1), o_scale=scales(pkg, entry.o, 1),
                   ffn_scale=scales(pkg, entry.ffn, 2) if entry.ffn + ".scale" in pkg.manifest.tensors
                   else np.zeros((0, R), np.float32), n=N,
                   **{r: t(getattr(entry, r)) for r in roles}, **blocks, **pred)

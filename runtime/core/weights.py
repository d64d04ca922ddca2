"""Everything with weights, as the kernels take it: mmap'd (or RAM) views of the package's tensors,
float16 handed over as its bit patterns, absent optional tensors as empty arrays."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgesparse.quant import dequantize, round_activations

from .package import Package


def kernel_array(a: np.ndarray) -> np.ndarray:
    # Numba has no CPU float16: hand float16 weights (and int4 group scales) over as their bit patterns.
    return a.view(np.uint16) if a.dtype == np.float16 else a


def scales(pkg: Package, name: str | None, ndim: int) -> np.ndarray:
    """The scales of a quantized tensor (int8: [rows...] float32; int4: [rows..., D/32] float16
    bits), or an empty [0, ...] float32 array (ndim axes) for a float tensor."""
    if name is not None and name + ".scale" in pkg.manifest.tensors:
        return kernel_array(pkg.tensor(name + ".scale"))
    return np.zeros((0,) * ndim, np.float32)


def widen(w: np.ndarray, ws: np.ndarray) -> np.ndarray:
    """float32 copy of a kernel weight array for BLAS: float16 bits widened, int8 scaled per row,
    int4 unpacked and scaled per group."""
    return w if w.dtype == np.float32 else dequantize(w, ws)


def blas_input(X: np.ndarray, ws: np.ndarray) -> np.ndarray:
    """X [S, D] as the kernels multiply it with rows whose scales are ws: rounded to int8 per block
    for rows in groups of 32 (int4, Q8_0-style int8; float16 scale bits), as is otherwise
    (kernels/grouped.py). For the BLAS paths, so that long prefill and eval compute what
    decode does."""
    return round_activations(X) if ws.dtype == np.uint16 else X



@dataclass(frozen=True)
class LayerWeights:
    """One layer's tensors as the kernels take them (mmap'd views; float16 as uint16 bits).
    Absent optional tensors are empty arrays, which the kernels read as "none"."""
    attn_norm: np.ndarray       # [D] float32
    attn_norm_bias: np.ndarray  # [D] float32 (LayerNorm) or [0]
    qkv: np.ndarray             # [(H+2Hkv)·hd, D]
    qkv_scale: np.ndarray       # [(H+2Hkv)·hd] int8 row scales, [(H+2Hkv)·hd, D/32] int4 group scales, or [0]
    qkv_bias: np.ndarray        # [(H+2Hkv)·hd] float32, or [0] for none
    o: np.ndarray               # [D, H·hd]
    o_scale: np.ndarray         # [D] or [0]
    o_bias: np.ndarray          # [D] float32, or [0]
    ffn_norm: np.ndarray        # [D] float32, or [0] (parallel block)
    ffn_norm_bias: np.ndarray   # [D] or [0]
    ffn: np.ndarray             # [N, R, D] neuron-major ([N, R, D/2] uint8 for int4)
    ffn_scale: np.ndarray       # [N, R] int8 row scales, [N, R, D/32] int4 group scales, or [0, R]
    ffn_bias_in: np.ndarray     # [N, R-1] float32, or [0, R-1]
    ffn_bias_out: np.ndarray    # [D] float32, or [0]
    q_norm: np.ndarray          # [hd] or [0]
    k_norm: np.ndarray          # [hd] or [0]
    attn_out_norm: np.ndarray   # [D] or [0]
    ffn_out_norm: np.ndarray    # [D] or [0]
    pred_q: np.ndarray | None = None      # [N, R-1, D] int8 predictor (see sparsity/predictor.py)
    pred_scale: np.ndarray | None = None  # [N, R-1] float32

    @classmethod
    def load(cls, pkg: Package, entry) -> "LayerWeights":
        none = np.zeros(0, np.float32)
        t = lambda name: none if name is None else kernel_array(pkg.tensor(name))  # noqa: E731
        ffn = t(entry.ffn)
        bias_in = (np.zeros((0, ffn.shape[1] - 1), np.float32) if entry.ffn_bias_in is None
                   else pkg.tensor(entry.ffn_bias_in))
        pred = {} if entry.pred_q is None else {"pred_q": pkg.tensor(entry.pred_q),
                                                "pred_scale": pkg.tensor(entry.pred_scale)}
        roles = ("attn_norm", "attn_norm_bias", "qkv", "qkv_bias", "o", "o_bias", "ffn_norm", "ffn_norm_bias",
                 "ffn_bias_out", "q_norm", "k_norm", "attn_out_norm", "ffn_out_norm")
        return cls(ffn=ffn, ffn_bias_in=bias_in, qkv_scale=scales(pkg, entry.qkv, 1), o_scale=scales(pkg, entry.o, 1),
                   ffn_scale=scales(pkg, entry.ffn, 2) if entry.ffn + ".scale" in pkg.manifest.tensors
                   else np.zeros((0, ffn.shape[1]), np.float32),
                   **{r: t(getattr(entry, r)) for r in roles}, **pred)

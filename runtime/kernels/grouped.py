"""Grouped weights (int4 and int8 in groups of 32, stored as tiles: tiles.py) meet int8 activations:
the input rounded to int8 per block of 32 (quantize_activations), and whether this machine's code
may use AVX-512 VNNI for the integer dot products.

Rows in groups of 32 are multiplied with the input rounded to int8 per block of 32, as llama.cpp
multiplies Q4_0 / Q8_0 weights with Q8_0 activations:
    x_k ~ qx_k * dx_g,  dx_g = max|x in block g| / 127,  qx_k = rint(x_k * (1 / dx_g))  (int8)
    w.x ~ sum_g dw_g * dx_g * sum_{k in g} qw_k * qx_k       (the inner sum exact, in integers)
The point is the inner sum: with AVX-512 VNNI, vpdpbusd multiplies 64 byte pairs and adds them four
at a time into 16 int32 lanes in one instruction, where a float32 path spends about two dozen vector
instructions on the same 64 weights (unpack, widen, convert, multiply, scale per group). Rounding the
input costs ~1% relative error per projection output; on WikiText-2 llama.cpp's Q8_0 (weights and
activations rounded) is within 0.5% of float16 perplexity. The down projection (a sum of columns
scaled by h) keeps float h. Without VNNI (ARM, older x86, NUMBA_CPU_NAME set for portable builds)
the same integer products come from generic vector IR, so every machine computes the same values up
to the order of the float additions.

The prepared input of a step, built once per kernel call: xq [S, D] int8, xd8 [S, D/4] float32 =
dx_g repeated 8 times, xs8 [S, D/4] int32 = sum_{k in g} qx_k repeated 8 times (group g's at [s, 8g]).
"""

from __future__ import annotations

import platform

import numba
import numpy as np
from llvmlite import binding as llvm_binding
from numba import njit


def _host_vnni() -> bool:
    """Whether Numba's code may use AVX-512 VNNI: an x86 host that has it, unless NUMBA_CPU_NAME
    names another CPU (a portable cache) or NUMBA_CPU_FEATURES leaves it out."""
    need = ("avx512f", "avx512bw", "avx512vnni")
    if numba.config.CPU_NAME not in (None, "host") or platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    if numba.config.CPU_FEATURES is not None:
        on = {f.strip()[1:] for f in numba.config.CPU_FEATURES.split(",") if f.strip().startswith("+")}
        return all(k in on for k in need)
    f = llvm_binding.get_host_cpu_features()
    return all(f.get(k, False) for k in need)


_VNNI = _host_vnni()


@njit(cache=True, error_model="numpy")
def quantize_activations(X, xq, xd8, xs8):
    """X [S, D] float32 (D a multiple of 32) -> xq [S, >=D] int8, xd8 and xs8 [S, >=D/4] (see above).
    The same float32 operations as quant.round_activations: d = max / 127, r = 1 / d, q = rint(x r).
    A multiply by the reciprocal rather than a division, so that fast-math flags (which Numba
    passes down to this function when a fastmath kernel compiles it first) cannot change a rounding."""
    S, D = X.shape
    for s in range(S):
        for g in range(D // 32):
            m = np.float32(0.0)
            for k in range(32 * g, 32 * g + 32):
                m = max(m, abs(X[s, k]))
            d = m / np.float32(127.0)
            r = np.float32(1.0) / d if d > 0 else np.float32(0.0)
            tot = 0
            for k in range(32 * g, 32 * g + 32):
                q = np.int8(np.rint(X[s, k] * r))
                xq[s, k] = q
                tot += q
            for j in range(8 * g, 8 * g + 8):
                xd8[s, j] = d
                xs8[s, j] = tot

"""The FFN activations, by code (ModelConfig.activation -> ACT_CODES), for every kernel that applies
one, and the elementwise kernel that calibration and analysis use."""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

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


@njit(parallel=True, fastmath=True, cache=True)
def activation(g, act, out):
    """out = act(g) elementwise; g, out [S, N] (calibration statistics)."""
    S, N = g.shape
    for s in prange(S):
        for i in range(N):
            out[s, i] = _act(act, g[s, i])

"""The buffers a forward pass works in, allocated once per model (llama2.c's RunState): the
residual stream of up to max_batch tokens and the kernels' scratch. Nothing here outlives a step
except the KV cache, which attention.py owns."""

from __future__ import annotations

import numpy as np


def zeros64(shape: tuple, dtype=np.float32) -> np.ndarray:
    """float32 zeros starting on a 64-byte cache line. The kernels' threads write disjoint row
    ranges of these (per-thread partial sums, neuron outputs, logits); NumPy aligns small
    allocations to 16 bytes, so two threads' ranges could share the line at their boundary and
    every write there would bounce it between cores (the int8 FFN of 30 layers, 2 threads:
    5.87 ms with a partial buffer at 16 mod 64, 5.20 ms aligned, before the kernels went blockwise)."""
    n = int(np.prod(shape)) * np.dtype(dtype).itemsize
    raw = np.zeros(n + 64, np.uint8)
    off = -raw.ctypes.data % 64
    return raw[off:off + n].view(dtype).reshape(shape)


class RunState:
    """cfg: the ModelConfig; C: thread chunks; B: max tokens per step; small: max tokens per
    kernel (not BLAS) step."""

    def __init__(self, cfg, C: int, B: int, small: int):
        D, N, E = cfg.d_model, cfg.ffn_dim, cfg.embed_dim
        self.hidden = np.zeros((B, D), np.float32)       # the residual stream entering a layer
        self.residual = np.zeros((B, D), np.float32)     # hidden + attention
        self.ffn_in = np.zeros((B, D), np.float32)       # norm2(residual)
        self.xa = np.zeros((B, D), np.float32)           # norm1(hidden)
        self.t = np.zeros((B, D), np.float32)            # a branch's output before its out-norm; FFN base
        self.xe = np.zeros((B, E), np.float32)           # embedding rows / projected final state
        self.xn = np.zeros((1, D), np.float32)           # the last token's final norm
        # plain MLPs through BLAS: h = act(fc1 x + b) * 1, the gated formula with up = 1
        # [S, N_l] views of flat buffers: a pruned package's layers have N_l <= N neurons
        self.ones = np.ones(B * N, np.float32) if not cfg.gated else None
        self.g = zeros64((B * N,))                       # BLAS prefill: gate, then h
        self.u = np.zeros(B * N, np.float32)             # BLAS prefill: up
        self.nobase = np.zeros((0, 1), np.float32)       # "no residual" for K.linear
        self.none = np.zeros(0, np.float32)              # "no bias"
        self.partial = zeros64((C, D))                   # per-thread FFN sums, one token
        self.partial_s = zeros64((C, small, D))          # the same, a kernel prefill step
        self.kept = np.zeros(C, np.int64)                # per thread: neurons kept
        self.cand = np.zeros(C, np.int64)                # per thread: predict-mode candidates
        self.order = np.zeros((C, N), np.int32)          # predict mode: each thread's candidate list
        self.kept_s = np.zeros(B, np.int64)              # per token: neurons kept
        self.cand_s = np.zeros(B, np.int64)              # per token: candidates
        self.fmask = np.zeros((B, D), np.float32)        # TEAL: the masked FFN input
        self.wp = None      # predictor rows widened to float32 [N, R-1, D], BLAS prefill only (lazily)
        # a kernel step's inputs rounded to int8 for grouped weights: (xq, xd8, xs8), rows for the
        # <= small tokens that reach the kernels, wide enough for any projection's input (D, H·hd, E)
        W = max(D, cfg.n_heads * cfg.head_dim, E)
        self.xb = (np.zeros((small, W), np.int8), np.zeros((small, W // 4), np.float32),
                   np.zeros((small, W // 4), np.int32))
        # tiles (kernels/tiles.py, ffn_tiles.py): 16 outputs per thread; the FFN's per thread: gate|up
        # [32], the kept neurons [small, 16] and their h times scales [small, 16, Gp], Gp = D/32
        # rounded up to 16 (whole vectors). Rows start on cache lines.
        Gp = -(-(D // 32) // 16) * 16
        self.tile16 = zeros64((C, 16))
        self.ffn_sc = (zeros64((C, 32)), zeros64((C, small, 16), np.int64), zeros64((C, small, 16, Gp)))

    @staticmethod
    def rows(buf: np.ndarray, S: int, N: int) -> np.ndarray:
        """A contiguous [S, N] view of a flat buffer."""
        return buf[:S * N].reshape(S, N)

"""The forward pass: embeddings -> per layer (ORT attention, Numba FFN) -> norm -> lm_head.

    x = embed[token] * embed_scale                          # [S, D]
    for each layer l:
        r, f = attention_l(x)      (ONNX Runtime)           # r = x + attn(norm(x)), f = norm2(r)
        x = r + FFN_t(f)           (Numba, decode; BLAS, prefill)
    logits = lm_head(norm(x))                                # [V]

FFN_t is the thresholded FFN: h = act(gate.f) * (up.f); neurons with |h| < t_l are zeroed and
their down columns are not read. t_l = 0 is the dense model.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numba
import numpy as np

from edgesparse.errors import EdgesparseError

from . import kernels as K
from .attention import AttentionStack
from .package import Package

DEFAULT_CTX = 2048


def _as_kernel_array(a: np.ndarray) -> np.ndarray:
    # Numba has no CPU float16: hand float16 weights over as their bit patterns.
    return a.view(np.uint16) if a.dtype == np.float16 else a


def check_threads(threads: int | None) -> int:
    cores = os.cpu_count() or 1
    if threads is None:
        return min(cores, numba.config.NUMBA_NUM_THREADS)
    if not isinstance(threads, int) or threads < 1:
        raise EdgesparseError(f"--threads: expected a positive integer, got {threads!r}")
    if threads > numba.config.NUMBA_NUM_THREADS:
        raise EdgesparseError(f"--threads: {threads} is more than Numba's pool "
                              f"({numba.config.NUMBA_NUM_THREADS}; raise NUMBA_NUM_THREADS)")
    return threads


@dataclass
class StepStats:
    ffn_kept: list = field(default_factory=list)   # per decode step: neurons kept, summed over layers


class Model:
    """A loaded package ready to run. One sequence at a time (batch 1), as on a device."""

    def __init__(self, pkg: str | os.PathLike | Package, ctx: int | None = None, threads: int | None = None,
                 max_batch: int | None = None, verify: bool = False):
        self.pkg = pkg if isinstance(pkg, Package) else Package(pkg, verify=verify)
        cfg = self.cfg = self.pkg.config
        if not cfg.gated:
            raise EdgesparseError(f"{self.pkg.path}: plain (non-gated) MLPs are not supported by this runtime yet")
        self.threads = check_threads(threads)
        numba.set_num_threads(self.threads)
        self._blas_limit = _limit_blas(self.threads)
        self.ctx = min(ctx or DEFAULT_CTX, cfg.max_position)
        if self.ctx < 1:
            raise EdgesparseError(f"--ctx: expected a positive integer, got {ctx}")
        self.max_batch = min(max_batch or 512, self.ctx)
        self.attn = AttentionStack(self.pkg, self.ctx, self.max_batch, self.threads)
        self.act = K.ACT_CODES[cfg.activation]
        self.ffn = [_as_kernel_array(self.pkg.tensor(l.ffn)) for l in self.pkg.manifest.layers]  # [N, 3, D] each
        self.thresholds = np.array([l.threshold for l in self.pkg.manifest.layers], np.float32)  # [L]
        self.embed = _as_kernel_array(self.pkg.tensor("embed"))                                    # [V, D]
        self.head = self.embed if cfg.tie_embeddings else _as_kernel_array(self.pkg.tensor("lm_head"))
        self.final_norm = np.ascontiguousarray(self.pkg.tensor("final_norm.weight"))                # [D]
        D, N, C = cfg.d_model, cfg.ffn_dim, self.threads
        # Buffers, allocated once.
        self._partial = np.zeros((C, D), np.float32)
        self._rows = np.zeros((C, 3, D), np.float32)
        self._kept = np.zeros(C, np.int64)
        self.h = np.zeros((cfg.n_layers, N), np.float32)       # last decode step's neuron outputs per layer
        self._xn = np.zeros((1, D), np.float32)
        self.logits = np.zeros(cfg.vocab_size, np.float32)
        self._g = np.zeros((self.max_batch, N), np.float32)
        self._u = np.zeros((self.max_batch, N), np.float32)
        self._kept_s = np.zeros(self.max_batch, np.int64)
        self._tok = np.zeros(1, np.int64)
        self.pos = 0
        self.stats = StepStats()

    # -- state ---------------------------------------------------------------------------------------
    def reset(self) -> None:
        """Start a new sequence. The cache is not cleared: attention reads only the first `pos`
        positions, and those are rewritten before they are read."""
        self.pos = 0
        self.stats = StepStats()

    def warmup(self) -> None:
        """Run both paths once (prefill of 2 tokens, one decode step) so Numba's cached kernels
        are loaded and ORT has run each session before anything is timed."""
        self.reset()
        self.forward([0, 0])
        self.forward([0])
        self.reset()

    def set_thresholds(self, t) -> None:
        t = np.asarray(t, np.float32)
        if t.shape != self.thresholds.shape or np.isnan(t).any() or (t < 0).any():
            raise EdgesparseError(f"thresholds: expected {self.thresholds.shape[0]} values >= 0, got {t!r}")
        self.thresholds[:] = t

    # -- forward -------------------------------------------------------------------------------------
    def forward(self, tokens, all_logits: bool = False) -> np.ndarray:
        """Feed tokens (any count; long inputs go in chunks of max_batch) at the current position.
        Returns the last token's logits [V] (a view into a reused buffer), or [S, V] with all_logits."""
        tokens = np.asarray(tokens, np.int64).reshape(-1)
        if tokens.size == 0:
            raise EdgesparseError("empty input: at least one token is needed")
        if self.pos + tokens.size > self.ctx:
            raise EdgesparseError(f"context full: {self.pos} + {tokens.size} tokens exceed the context of "
                                  f"{self.ctx} (raise --ctx, up to the model's {self.cfg.max_position})")
        if tokens.min() < 0 or tokens.max() >= self.cfg.vocab_size:
            raise EdgesparseError(f"token ids must be in [0, {self.cfg.vocab_size})")
        outs = []
        for i in range(0, tokens.size, self.max_batch):
            chunk = tokens[i:i + self.max_batch]
            if chunk.size == 1 and not all_logits:
                self._decode_step(int(chunk[0]))
            else:
                outs.append(self._prefill(chunk, all_logits))
        if all_logits:
            return np.concatenate(outs) if len(outs) > 1 else outs[0]
        return self.logits

    def _decode_step(self, token: int) -> None:
        a, cfg = self.attn, self.cfg
        a.set_position(self.pos, 1)
        x = a.hidden[0, :1]             # [1, D]
        self._tok[0] = token
        K.gather_rows(self.embed, self._tok, np.float32(cfg.embed_scale), x)
        r, f = a.residual[0, 0], a.ffn_in[0, 0]   # [D]
        kept = 0
        for l in range(cfg.n_layers):
            a.run(l)
            kept += K.ffn_glu(self.ffn[l], f, r, self.thresholds[l], self.act, x[0], self.h[l],
                              self._partial, self._rows, self._kept)
        self.stats.ffn_kept.append(kept)
        K.rms_norm(x, self.final_norm, cfg.norm_eps, self._xn)
        K.matvec(self.head, self._xn[0], self.logits, self._rows[:, 0])
        self.pos += 1

    def _prefill(self, tokens: np.ndarray, all_logits: bool) -> np.ndarray | None:
        a, cfg = self.attn, self.cfg
        S = tokens.size
        a.set_position(self.pos, S)
        x = a.hidden[0, :S]             # [S, D]
        K.gather_rows(self.embed, tokens, np.float32(cfg.embed_scale), x)
        r, f = a.residual[0, :S], a.ffn_in[0, :S]
        g, u = self._g[:S], self._u[:S]  # [S, N]
        for l in range(cfg.n_layers):
            a.run(l)
            w = self.ffn[l]
            if w.dtype == np.uint16:     # float16 storage: widen this layer once for BLAS
                w = w.view(np.float16).astype(np.float32)
            # Batched tokens are compute-bound, and the union of active neurons over many tokens
            # is nearly all of them, so prefill runs dense BLAS on strided views of the
            # neuron-major file (lda = 3·D) and applies the same threshold rule as decode.
            np.matmul(f, w[:, 0, :].T, out=g)
            np.matmul(f, w[:, 1, :].T, out=u)
            K.glu_threshold(g, u, self.thresholds[l], self.act, self._kept_s[:S])
            np.matmul(g, w[:, 2, :], out=x)
            x += r
        self.pos += S
        xn = np.empty_like(x) if all_logits else self._xn
        K.rms_norm(x if all_logits else x[-1:], self.final_norm, cfg.norm_eps, xn)
        if all_logits:
            head = self.head.view(np.float16).astype(np.float32) if self.head.dtype == np.uint16 else self.head
            return xn @ head.T           # [S, V]
        K.matvec(self.head, xn[0], self.logits, self._rows[:, 0])
        return None


def _limit_blas(threads: int):
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # optional: without it BLAS uses its own default thread count
        return None
    return threadpool_limits(limits=threads, user_api="blas")

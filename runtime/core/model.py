"""The forward pass: embeddings -> per layer (attention, FFN) -> norm -> lm_head.

    x = embed[token] * embed_scale (@ proj_in) (+ pos_embed[position])      # [S, D]
    for each layer l (a "pre" block; config.BLOCKS has the parallel and post wiring):
        qkv = W_qkv norm1(x) (+ b)       (Numba; Gemma-3: per-head q/k norms)  # [S, (H+2Hkv)·hd]
        a   = GQA(qkv, KV cache)         (ONNX Runtime)      # [S, H·hd], rotary inside
        r   = x + W_o a (+ b)            (Numba)             # [S, D]
        x   = r + FFN_t(norm2(r))        (Numba; BLAS for long prefill)
    logits = lm_head(norm(x) (@ proj_out)) (+ b)             # [V]

FFN_t is the thresholded FFN: h = act(gate.f) * (up.f); neurons with |h| < t_l are zeroed and
their down columns are not read. t_l = 0 is the dense model. FFN modes (`--ffn`):
    dense      every neuron (t = 0)
    threshold  the paper's rule: gate and up rows of every neuron, down columns of survivors
    predict    the int8 predictor picks candidates (|h^| >= t_pred); only their gate and up rows
               are read, and the same threshold t decides which down columns are
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import numba
import numpy as np

from edgesparse.errors import EdgesparseError

from .. import kernels as K
from .attention import AttentionStack
from .package import Package
from .state import RunState, zeros64
from .threads import check_threads, limit_blas
from .blas import blas_input, widen, widen_ffn
from .weights import LayerWeights, kernel_array, scales, tiled

DEFAULT_CTX = 2048
FFN_MODES = ("dense", "threshold", "predict")
# Up to this many tokens a prefill step runs the Numba kernel (weight-bandwidth bound); above it,
# BLAS (compute bound: eval windows, long prompts).
SMALL_BATCH = 64


@dataclass
class StepStats:
    ffn_kept: list = field(default_factory=list)   # per decode step: neurons kept, summed over layers
    ffn_rows: list = field(default_factory=list)   # per decode step: FFN weight rows read (gate, up, down)


class Model:
    """A loaded package ready to run. One sequence at a time (batch 1), as on a device."""

    def __init__(self, pkg: str | os.PathLike | Package, ctx: int | None = None, threads: int | None = None,
                 max_batch: int | None = None, verify: bool = False, prefetch: bool = False, load: str = "mmap"):
        self.pkg = pkg if isinstance(pkg, Package) else Package(pkg, verify=verify, load=load)
        cfg = self.cfg = self.pkg.config
        self.threads = check_threads(threads)
        numba.set_num_threads(self.threads)
        # BLAS (long prefill only) runs on one thread: OpenBLAS workers spin after each call and
        # steal the second core from ORT's attention that runs next; measured on SmolLM2 at 2
        # threads, a 1024-token prefill takes 1.9-2.1 s with 1 BLAS thread and 2.5 s with 2.
        self._blas_limit = limit_blas(1)
        self.ctx = min(DEFAULT_CTX if ctx is None else ctx, cfg.max_position)
        if self.ctx < 1:
            raise EdgesparseError(f"--ctx: expected a positive integer, got {ctx}")
        self.max_batch = min(max_batch or 512, self.ctx)
        self._small = min(SMALL_BATCH, self.max_batch)     # steps up to this size use the Numba kernels
        self.attn = AttentionStack(self.pkg, self.ctx, self.max_batch, self.threads, self._small)
        self.act = K.ACT_CODES[cfg.activation]
        self.layers = [LayerWeights.load(self.pkg, l) for l in self.pkg.manifest.layers]
        # --prefetch: while layer l runs, the OS reads layer l+1's weights (cold page cache only;
        # devices/bench_prefetch.py measures whether it helps)
        self.prefetch = prefetch
        self._layer_tensors = [[n for n in e.tensor_names().values() if not n.endswith(("norm", "bias"))]
                               for e in self.pkg.manifest.layers]
        self.ffn = [lw.ffn for lw in self.layers]                                                  # [N, R, D] each
        self.thresholds = np.array([l.threshold for l in self.pkg.manifest.layers], np.float32)  # [L]
        self.has_predictor = all(lw.pred_q is not None for lw in self.layers)
        self.t_pred = np.array([l.pred_threshold or 0.0 for l in self.pkg.manifest.layers], np.float32)  # [L]
        self.ffn_mode = "threshold"
        # optional global tensors, used when the config says the model has them (the reader checks
        # exactly those shapes)
        opt = lambda name, want, shape=(0,): (kernel_array(self.pkg.tensor(name)) if want  # noqa: E731
                                              else np.zeros(shape, np.float32))
        self.embed = kernel_array(self.pkg.tensor("embed"))                                    # [V, E]
        self.embed_scale = scales(self.pkg, "embed", 1)                                          # [V] or [0]
        self.head = self.embed if cfg.tie_embeddings else kernel_array(self.pkg.tensor("lm_head"))  # [V, E]
        self.head_scale = self.embed_scale if cfg.tie_embeddings else scales(self.pkg, "lm_head", 1)
        self.head_bias = opt("lm_head.bias", cfg.head_bias)                                        # [V] or [0]
        self.final_norm = opt("final_norm.weight", cfg.final_norm)                                 # [D] or [0]
        self.final_norm_bias = opt("final_norm.bias", cfg.final_norm and cfg.norm == "layer")      # [D] or [0]
        self.pos_embed = opt("pos_embed", cfg.learned_positions, (0, cfg.d_model))                 # [P, D] or [0, D]
        proj = cfg.embed_dim != cfg.d_model
        # project_in/out (OPT-350m) are small and only ever used through BLAS: widened once here
        self.proj_in = widen(opt("embed_proj_in", proj, (0, 0)), scales(self.pkg, "embed_proj_in", 1), cfg.d_model)  # [D, E]
        self.proj_out = widen(opt("head_proj_out", proj, (0, 0)), scales(self.pkg, "head_proj_out", 1), cfg.embed_dim)  # [E, D]
        self.s = RunState(cfg, self.threads, self.max_batch, self._small)
        self.h = zeros64((cfg.n_layers, cfg.ffn_dim))      # last decode step's neuron outputs per layer
        self.logits = zeros64((cfg.vocab_size,))
        # [L, (kept, total, candidates)]: the thresholded quantity; candidates in predict mode
        self.counts = np.zeros((cfg.n_layers, 3), np.int64)
        self.observer = None     # calibration hook: observer(layer, ffn_in [S,D], gate [S,N], up [S,N])
        # analyze's per-layer cost: when an array [L], decode steps add each FFN kernel call's seconds
        self.ffn_seconds: np.ndarray | None = None
        self.method = self.pkg.manifest.sparsity.get("method", "none")
        if self.method not in K.MODE_CODES:
            self.method = "paper"   # "none"/"synthetic": thresholds (if any) apply to |h|
        self._tok = np.zeros(1, np.int64)
        self._history = np.zeros(self.ctx, np.int64)      # the sequence's tokens (LongRoPE recompute)
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

    def set_threads(self, threads: int) -> None:
        """Run the kernels on `threads` of the threads the model was made with (the buffers are per
        thread chunk and stay as they are: fewer threads take several chunks each)."""
        self.threads = max(1, min(int(threads), self.s.partial.shape[0]))
        numba.set_num_threads(self.threads)

    def set_thresholds(self, t, method: str | None = None) -> None:
        """Per-layer thresholds [L] (0 = dense) and, optionally, what they apply to
        (paper: |h|, gate: |act(gate.x)|, input: |x|; see kernels.MODE_CODES)."""
        t = np.asarray(t, np.float32)
        if t.shape != self.thresholds.shape or np.isnan(t).any() or (t < 0).any():
            raise EdgesparseError(f"thresholds: expected {self.thresholds.shape[0]} values >= 0, got {t!r}")
        if method is not None:
            if method not in K.MODE_CODES:
                raise EdgesparseError(f"sparsity method {method!r}: expected one of {sorted(K.MODE_CODES)}")
            self.method = method
        self.thresholds[:] = t

    def set_ffn_mode(self, mode: str, t_pred=None) -> None:
        """dense | threshold | predict (see the module docstring); t_pred [L] optionally replaces the
        package's candidate thresholds."""
        if mode not in FFN_MODES:
            raise EdgesparseError(f"--ffn: expected one of {', '.join(FFN_MODES)}, got {mode!r}")
        if mode == "predict":
            if not self.has_predictor:
                raise EdgesparseError(f"{self.pkg.path}: --ffn predict needs a predictor; run "
                                      f"`edgesparse calibrate PKG --text ... --predictor` first")
            if self.method not in ("paper", "none", "synthetic"):
                raise EdgesparseError(f"--ffn predict applies the paper rule; the package's method is {self.method!r}")
        if t_pred is not None:
            t_pred = np.asarray(t_pred, np.float32)
            if t_pred.shape != self.t_pred.shape or np.isnan(t_pred).any() or (t_pred < 0).any():
                raise EdgesparseError(f"predictor thresholds: expected {self.t_pred.shape[0]} values >= 0")
            self.t_pred[:] = t_pred
        self.ffn_mode = mode

    def configure(self, ffn: str = "threshold", thresholds=None, method: str | None = None, t_pred=None) -> None:
        """The FFN mode with, optionally, the thresholds [L] (and what they apply to) and the
        predictor's candidate thresholds [L] to use instead of the package's active ones: plain
        data, which the sparsity side reads from a calibration (sparsity/levels.py)."""
        if thresholds is not None:
            self.set_thresholds(thresholds, method)
        self.set_ffn_mode(ffn, t_pred)

    def reset_counts(self) -> None:
        self.counts[:] = 0

    # -- forward -------------------------------------------------------------------------------------
    def _check_tokens(self, tokens) -> np.ndarray:
        tokens = np.asarray(tokens, np.int64).reshape(-1)
        if tokens.size == 0:
            raise EdgesparseError("empty input: at least one token is needed")
        if self.pos + tokens.size > self.ctx:
            raise EdgesparseError(f"context full: {self.pos} + {tokens.size} tokens exceed the context of "
                                  f"{self.ctx} (raise --ctx, up to the model's {self.cfg.max_position})")
        if tokens.min() < 0 or tokens.max() >= self.cfg.vocab_size:
            raise EdgesparseError(f"token ids must be in [0, {self.cfg.vocab_size})")
        return tokens

    def forward(self, tokens, all_logits: bool = False) -> np.ndarray:
        """Feed tokens (any count; long inputs go in chunks of max_batch) at the current position.
        Returns the last token's logits [V] (a view into a reused buffer), or [S, V] with all_logits."""
        tokens = self._check_tokens(tokens)
        L = self.cfg.rope_long_after
        if L and 0 < self.pos <= L < self.pos + tokens.size:
            # LongRoPE: when a sequence first grows past original_max_position_embeddings,
            # transformers' Phi-3 drops its cache and recomputes every position with the long
            # factors (Phi3ForCausalLM.prepare_inputs_for_generation); so does this runtime.
            whole = np.concatenate([self._history[:self.pos], tokens])
            self.pos = 0
            out = self.forward(whole, all_logits)
            return out[-tokens.size:] if all_logits else out
        self.attn.use_long_rope(self.pos + tokens.size > L)
        self._history[self.pos:self.pos + tokens.size] = tokens
        outs = []
        for i in range(0, tokens.size, self.max_batch):
            chunk = tokens[i:i + self.max_batch]
            if chunk.size == 1 and not all_logits:
                self._decode_step(int(chunk[0]))
                continue
            x = self._prefill(chunk)                                   # [S, D]
            if all_logits:
                outs.append(self._head_all(x))
            else:
                self._head_one(x[-1:])
        if all_logits:
            return np.concatenate(outs) if len(outs) > 1 else outs[0]
        return self.logits

    def nll(self, tokens) -> np.ndarray:
        """Negative log-likelihood of tokens[1:] given their prefixes, from position 0 (the
        perplexity path). Logits are formed a block of rows at a time: [S, V] at once would be
        200 MB for a 1024-token window of a 49k vocabulary. Returns [S-1] float64."""
        self.reset()
        tokens = self._check_tokens(tokens)
        self.attn.use_long_rope(tokens.size > self.cfg.rope_long_after > 0)
        out = []
        for i in range(0, tokens.size, self.max_batch):
            x = self._prefill(tokens[i:i + self.max_batch])             # [S, D]
            nxt = tokens[i + 1:i + 1 + x.shape[0]]
            out.append(_nll_rows(self._head_all(x[:nxt.size]), nxt))
        return np.concatenate(out)

    def _final(self, x: np.ndarray, out: np.ndarray) -> np.ndarray:
        """Final norm (if any) and project_out (if any): x [S, D] -> [S, E] (out [S, D] scratch)."""
        if self.final_norm.size:
            self._norm(x, self.final_norm, self.final_norm_bias, out)
            x = out
        if self.proj_out.size:
            x = x @ self.proj_out.T
        return x

    def _head_one(self, x: np.ndarray) -> None:
        """logits = lm_head(final(x)) (+ b) for one row x [1, D], into self.logits (Numba)."""
        xf = np.ascontiguousarray(self._final(x, self.s.xn))       # [1, E]
        self._linear(self.head, self.head_scale, xf, self.head_bias, None, self.logits.reshape(1, -1))

    def _head_all(self, x: np.ndarray) -> np.ndarray:
        """Final norm + lm_head for every row of x [S, D] -> logits [S, V]."""
        xf = blas_input(self._final(x, np.empty_like(x)), self.head, self.head_scale)
        logits = xf @ widen(self.head, self.head_scale, self.cfg.vocab_size).T
        if self.head_bias.size:
            logits += self.head_bias
        return logits

    def _norm(self, x: np.ndarray, w: np.ndarray, b: np.ndarray, out: np.ndarray) -> None:
        if self.cfg.norm == "rms":
            K.rms_norm(x, w, self.cfg.norm_eps, out)
        else:
            K.layer_norm(x, w, b, self.cfg.norm_eps, out)

    def _embed(self, tokens: np.ndarray, x: np.ndarray) -> None:
        """x [S, D] = embed[tokens] * scale (@ proj_in) (+ pos_embed[pos .. pos+S-1])."""
        S = tokens.size
        xe = self.s.xe[:S] if self.proj_in.size else x           # [S, E]
        if tiled(self.embed, self.embed_scale):
            K.gather_tiles(self.embed, tokens, np.float32(self.cfg.embed_scale), xe)
        else:
            K.gather_rows(self.embed, self.embed_scale, tokens, np.float32(self.cfg.embed_scale), xe)
        if self.proj_in.size:
            np.matmul(xe, self.proj_in.T, out=x)
        if self.pos_embed.size:
            x += self.pos_embed[self.pos:self.pos + S]

    def _ffn_input(self, l: int, f: np.ndarray) -> tuple[np.ndarray, float, int]:
        """(input, threshold for h, kernel mode) for layer l. TEAL-style input sparsity masks the
        FFN input here and leaves the kernels the paper rule at t = 0."""
        mode = K.MODE_CODES[self.method]
        if self.ffn_mode == "dense":
            return f, np.float32(0.0), 0        # dense: every neuron, whatever the thresholds
        if self.thresholds[l] == 0.0:
            return f, self.thresholds[l], 0     # t = 0 is the dense model under every rule
        if mode != 2:
            return f, self.thresholds[l], mode
        m = self.s.fmask[: f.shape[0]]
        K.mask_small(f, self.thresholds[l], m, self.s.kept_s[: f.shape[0]])
        self.counts[l, 0] += int(self.s.kept_s[: f.shape[0]].sum())
        self.counts[l, 1] += f.size
        return m, np.float32(0.0), 0

    def _count(self, l: int, kept: int, tokens: int) -> None:
        if self.method != "input":
            self.counts[l, 0] += kept
            self.counts[l, 1] += tokens * self.cfg.ffn_dim

    def _linear(self, w: np.ndarray, ws: np.ndarray, X: np.ndarray, bias: np.ndarray, base: np.ndarray | None,
                Y: np.ndarray) -> None:
        """Y = X @ w.T (+ bias) (+ base); w [O, D] (mmap'd; int8 with row scales ws [O]; or tiles
        [ceil(O/16), D/32, tile]), X [S, D], Y [S, O]."""
        if X.shape[0] <= self._small:
            nobase = self.s.nobase if base is None else base
            if tiled(w, ws):
                K.linear_tiles(w, X, bias, nobase, Y, self.threads, self.s.xb, self.s.tile16)
            else:
                K.linear(w, ws, X, bias, nobase, Y, self.threads)
            return
        # long prefill: widen once for BLAS, and round the input as the kernels do
        np.matmul(blas_input(X, w, ws), widen(w, ws, Y.shape[1]).T, out=Y)
        if bias.size:
            Y += bias
        if base is not None:
            Y += base

    def _willneed(self, l: int) -> None:
        if self.prefetch and l < self.cfg.n_layers:
            skip = self.pkg.manifest.layers[l].ffn if self.ffn_mode == "predict" else None
            for name in self._layer_tensors[l]:
                if name != skip:    # predict mode reads only candidates' rows: never the whole file
                    self.pkg.willneed(name)

    def _attention(self, l: int, S: int) -> None:
        """hidden[:S] -> residual[:S] (the FFN's base: x + attention, down bias included) and
        ffn_in[:S] (the FFN's input), wired by config.block:
            pre       r = x + out1(attn(n1(x)));  f = n2(r)
            parallel  u = n1(x);  r = x + attn(u);  f = u
            post      r = n1(x + attn(x));  f = r"""
        a, lw, cfg = self.attn, self.layers[l], self.cfg
        x, r, f = self.s.hidden[:S], self.s.residual[:S], self.s.ffn_in[:S]   # [S, D]
        xa = x
        if cfg.block != "post":
            xa = self.s.xa[:S]
            self._norm(x, lw.attn_norm, lw.attn_norm_bias, xa)
        qkv = a.qkv[0, :S]                                           # [S, (H+2Hkv)·hd]
        self._linear(lw.qkv, lw.qkv_scale, xa, lw.qkv_bias, None, qkv)
        if lw.q_norm.size:
            K.head_rms_norm(qkv, lw.q_norm, lw.k_norm, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.norm_eps)
        a.run(l)                                                     # [S, H·hd] into a.attn
        if lw.attn_out_norm.size:
            t = self.s.t[:S]
            self._linear(lw.o, lw.o_scale, a.attn[0, :S], lw.o_bias, None, t)
            self._norm(t, lw.attn_out_norm, self.s.none, t)
            np.add(x, t, out=r)
        else:
            self._linear(lw.o, lw.o_scale, a.attn[0, :S], lw.o_bias, x, r)
        if cfg.block == "pre":
            self._norm(r, lw.ffn_norm, lw.ffn_norm_bias, f)
        elif cfg.block == "parallel":
            f[:] = xa
        else:
            self._norm(r, lw.attn_norm, lw.attn_norm_bias, r)
            f[:] = r

    def _ffn_base(self, l: int, S: int) -> np.ndarray:
        """What the FFN kernel adds its output to: the residual (+ down bias), or, when the FFN
        output is normed before the residual add (Gemma-3), the down bias alone."""
        lw = self.layers[l]
        if lw.ffn_out_norm.size:
            base = self.s.t[:S]
            base[:] = lw.ffn_bias_out if lw.ffn_bias_out.size else 0.0
            return base
        r = self.s.residual[:S]
        if lw.ffn_bias_out.size:
            r += lw.ffn_bias_out
        return r

    def _ffn_done(self, l: int, S: int) -> None:
        """hidden[:S] holds base + FFN(f); finish the block (Gemma-3's out-norm and residual add,
        or the post-norm n2)."""
        lw, x = self.layers[l], self.s.hidden[:S]
        if lw.ffn_out_norm.size:
            self._norm(x, lw.ffn_out_norm, self.s.none, x)
            x += self.s.residual[:S]
        elif self.cfg.block == "post":
            self._norm(x, lw.ffn_norm, lw.ffn_norm_bias, x)

    def _predict_mask(self, l: int, fi: np.ndarray, h: np.ndarray) -> None:
        """BLAS prefill in predict mode: zero the exact h [S, N] of non-candidates, in place, and
        recount the kept neurons per token into s.kept_s."""
        lw, S = self.layers[l], h.shape[0]
        if self.s.wp is None:
            self.s.wp = np.empty((self.cfg.ffn_dim, self.cfg.ffn_rows - 1, self.cfg.d_model), np.float32)
        Nl = lw.n
        gp, up = K.predicted_gate_up(lw.pred_q, lw.pred_scale, lw.ffn_bias_in, fi, self.s.wp[:Nl])   # [S, N_l]
        K.predict_mask(h, gp, self.s.rows(self.s.ones, S, Nl) if up is None else up, self.t_pred[l], self.act, self.s.cand_s[:S])
        self.s.kept_s[:S] = np.count_nonzero(h, axis=1)
        self.counts[l, 2] += int(self.s.cand_s[:S].sum())

    def _decode_step(self, token: int) -> None:
        cfg = self.cfg
        self.attn.set_position(self.pos, 1)
        x = self.s.hidden[:1]             # [1, D]
        self._tok[0] = token
        self._embed(self._tok, x)
        f = self.s.ffn_in[:1]             # [1, D]
        kept = rows = 0
        R = cfg.ffn_rows
        for l in range(cfg.n_layers):
            self._willneed(l + 1)
            self._attention(l, 1)
            base = self._ffn_base(l, 1)
            fi, t, mode = self._ffn_input(l, f)
            lw = self.layers[l]
            N = lw.n
            t0 = time.perf_counter() if self.ffn_seconds is not None else 0.0
            if lw.ffn_bits:
                k = K.ffn_tiles(lw.ffn_tiles, lw.ffn_cols, N, lw.ffn_bias_in, fi, base, t, self.act, x,
                                self.h[l:l + 1, :N], self.s.partial_s, self.s.kept, mode, self.s.xb, self.s.ffn_sc)
                # every block's gate and up tiles (padding neurons included), the kept down columns
                rows += (R - 1) * lw.ffn_tiles.shape[0] * 16 + k
            elif self.ffn_mode == "predict":
                k, c = K.ffn_predict(lw.ffn, lw.ffn_scale, lw.ffn_bias_in, lw.pred_q, lw.pred_scale, fi[0], base[0], self.t_pred[l],
                                     t, self.act, x[0], self.h[l, :N], self.s.partial, self.s.kept, self.s.cand, self.s.order)
                rows += (R - 1) * c + k
                self.counts[l, 2] += c
            else:
                k = K.ffn_glu(lw.ffn, lw.ffn_scale, lw.ffn_bias_in, fi[0], base[0], t, self.act, x[0], self.h[l, :N],
                              self.s.partial, self.s.kept, mode)
                # gate mode reads an up row only for neurons past the gate test (here: the kept ones)
                rows += (N + 2 * k) if (mode == 1 and R == 3) else ((R - 1) * N + k)
            if self.ffn_seconds is not None:
                self.ffn_seconds[l] += time.perf_counter() - t0
            self._ffn_done(l, 1)
            self._count(l, k, 1)
            kept += k
        self.stats.ffn_kept.append(kept)
        self.stats.ffn_rows.append(rows)
        self._head_one(x)
        self.pos += 1

    def _prefill(self, tokens: np.ndarray) -> np.ndarray:
        """Run S tokens through every layer; returns the final residual stream [S, D] (a view)."""
        cfg = self.cfg
        S = tokens.size
        self.attn.set_position(self.pos, S)
        x = self.s.hidden[:S]             # [S, D]
        self._embed(tokens, x)
        f = self.s.ffn_in[:S]
        R = cfg.ffn_rows
        for l in range(cfg.n_layers):
            self._willneed(l + 1)
            self._attention(l, S)
            base = self._ffn_base(l, S)
            lw = self.layers[l]
            w = lw.ffn
            N = lw.n
            g, u = self.s.rows(self.s.g, S, N), self.s.rows(self.s.u, S, N)   # [S, N_l]
            fi, t, mode = self._ffn_input(l, f)
            predict = self.ffn_mode == "predict"
            if S <= self._small and self.observer is None:
                # Few tokens: memory-bound like decode; the Numba kernel reads each row once.
                if lw.ffn_bits:
                    k = K.ffn_tiles(lw.ffn_tiles, lw.ffn_cols, N, lw.ffn_bias_in, fi, base, t, self.act, x, g,
                                    self.s.partial_s, self.s.kept, mode, self.s.xb, self.s.ffn_sc)
                elif predict:
                    k, c = K.ffn_predict_batch(w, lw.ffn_scale, lw.ffn_bias_in, lw.pred_q, lw.pred_scale, fi, base, self.t_pred[l],
                                               t, self.act, x, g, self.s.partial_s, self.s.kept, self.s.cand, self.s.order)
                    self.counts[l, 2] += c
                else:
                    k = K.ffn_glu_batch(w, lw.ffn_scale, lw.ffn_bias_in, fi, base, t, self.act, x, g, self.s.partial_s,
                                        self.s.kept, mode)
                self._ffn_done(l, S)
                self._count(l, k, S)
                continue
            # Batched tokens are compute-bound, and the union of active neurons over many tokens
            # is nearly all of them, so prefill runs dense BLAS on strided views of the
            # neuron-major rows (lda = R·D), widened once per call, and applies the same threshold
            # rule as decode.
            fr = blas_input(fi, w, lw.ffn_scale)      # as the kernels' gate and up take it
            w = widen_ffn(lw, R, cfg.d_model)
            np.matmul(fr, w[:, 0, :].T, out=g)
            if R == 3:
                np.matmul(fr, w[:, 1, :].T, out=u)
            else:
                u = self.s.rows(self.s.ones, S, N)
            if lw.ffn_bias_in.size:
                g += lw.ffn_bias_in[:, 0]
                if R == 3:
                    u += lw.ffn_bias_in[:, 1]
            if self.observer is not None:
                self.observer(l, f, g, u)   # calibration: pre-threshold FFN input, gate, up
            K.glu_threshold(g, u, t, self.act, self.s.kept_s[:S], mode)
            if predict:
                self._predict_mask(l, fi, g)
            self._count(l, int(self.s.kept_s[:S].sum()), S)
            np.matmul(g, w[:, R - 1, :], out=x)
            x += base
            self._ffn_done(l, S)
        self.pos += S
        return x


def _nll_rows(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """-log softmax(logits)[target] per row; logits [S, V] float32, targets [S] -> [S] float64."""
    out = np.empty(targets.size, np.float64)
    K.nll_rows(logits, np.ascontiguousarray(targets, np.int64), out)
    return out

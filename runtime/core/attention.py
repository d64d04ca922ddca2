"""The attention core of every layer, run by ONNX Runtime with a KV cache that never moves.

Each layer's graph is GroupQueryAttention alone (rotary, KV cache, softmax(QK)V; the norms and
projections around it are Numba, see export/onnx_layer.py). Buffers owned here and bound once
(IOBinding) to every layer's session:
  qkv   [1, S, (H+2Hkv)·hd]  input: the packed q|k|v projection of the layer's S new tokens
  attn  [1, S, H·hd]         output: attention over the cache and the new tokens
  k, v  [1, Hkv, T, hd] per layer, bound as both past_* and present_*: GroupQueryAttention sees
        the same pointer and writes only the new positions (no per-token cache copy)
Decoding a token is then `run_with_iobinding` per layer, nothing else.

Threads: a step of up to `small` tokens runs on the calling thread (intra_op_num_threads = 1).
For one token the core is a few hundred microseconds of work; a multi-threaded ORT run would
wake ORT's own pool between two of Numba's parallel regions on the same cores. Longer steps
(long prompts, eval windows) are compute bound in attention and get all threads.
Graphs are a few hundred bytes: each is read and checked against its sha256 in the manifest on
every load, and layers whose graphs are byte-identical share one session.
"""

from __future__ import annotations

import hashlib

import numpy as np
import onnxruntime as ort

from edgesparse.errors import PackageError


def session_options(threads: int) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # ORT's pool threads spin after each run by default; between two ORT calls Numba's threads
    # run the projections and the FFN on the same cores, and spinning ORT workers would steal them.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.log_severity_level = 3
    return so


class AttentionStack:
    def __init__(self, pkg, ctx: int, max_batch: int, threads: int, small: int):
        cfg = pkg.config
        self.ctx, self.small = ctx, small
        Hkv, hd = cfg.n_kv_heads, cfg.head_dim
        # Rotary tables, one (cos, sin) pair [T, rot/2] per distinct table (Gemma-3: local and
        # global). LongRoPE (rope_long_after > 0): the buffers hold the short or the long tables,
        # copied in when a step crosses the boundary, as transformers switches its inv_freq by the
        # sequence length (keys already cached keep the rotation they were stored with, there too).
        self.long_after = cfg.rope_long_after
        self._long = False
        self.rope: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._rope_src: dict[str, tuple] = {}
        for layer in pkg.manifest.layers:
            if layer.rope_cos is not None and layer.rope_cos not in self.rope:
                c, s_ = pkg.tensor(layer.rope_cos)[:ctx], pkg.tensor(layer.rope_sin)[:ctx]
                # copies: the package's tables are read-only maps, and LongRoPE rewrites these
                self.rope[layer.rope_cos] = (np.array(c, np.float32), np.array(s_, np.float32))
                if self.long_after:
                    self._rope_src[layer.rope_cos] = (c, s_, pkg.tensor(layer.rope_cos_long)[:ctx],
                                                      pkg.tensor(layer.rope_sin_long)[:ctx])
        self._layer_rope = [layer.rope_cos for layer in pkg.manifest.layers]
        # np.zeros maps fresh zero pages: the cache costs RAM only as positions get written.
        self.k = [np.zeros((1, Hkv, ctx, hd), np.float32) for _ in range(cfg.n_layers)]
        self.v = [np.zeros((1, Hkv, ctx, hd), np.float32) for _ in range(cfg.n_layers)]
        self.qkv = np.zeros((1, max_batch, (cfg.n_heads + 2 * Hkv) * hd), np.float32)
        self.attn = np.zeros((1, max_batch, cfg.n_heads * hd), np.float32)
        self.seqlens_k = np.zeros((1,), np.int32)
        self.total = np.zeros((), np.int32)
        # mode 0: steps of <= small tokens, 1 thread; mode 1: longer steps, all threads
        modes = (1, threads) if threads > 1 else (1,)
        sessions: dict[tuple[str, int], ort.InferenceSession] = {}
        self.paths = []
        self.bindings = [[] for _ in modes]        # [mode][layer] -> (session, io)
        for l, layer in enumerate(pkg.manifest.layers):
            path = pkg.file(layer.attention)
            self.paths.append(str(path))
            graph = path.read_bytes()
            sha = hashlib.sha256(graph).hexdigest()
            if sha != pkg.manifest.files[layer.attention].sha256:
                raise PackageError(f"{path}: sha256 mismatch: the file is corrupted or was changed after export")
            for m, th in enumerate(modes):
                sess = sessions.get((sha, th))
                if sess is None:
                    try:
                        sess = ort.InferenceSession(graph, sess_options=session_options(th),
                                                    providers=["CPUExecutionProvider"])
                    except Exception as e:  # ORT raises its own exception types for bad graphs
                        raise PackageError(f"{path}: ONNX Runtime cannot load it "
                                           f"({str(e).splitlines()[0][:200]})") from None
                    sessions[(sha, th)] = sess
                io = sess.io_binding()
                self._bind_static(io, l)
                self.bindings[m].append((sess, io))
        self.n_sessions = len(sessions)
        self._mode = 0
        self._bound = [0] * len(modes)
        self.bind_tokens(1)

    @staticmethod
    def _bind(io, name, arr, output=False):
        f = io.bind_output if output else io.bind_input
        f(name, "cpu", 0, arr.dtype, list(arr.shape), arr.ctypes.data)

    def _bind_static(self, io, l: int) -> None:
        self._bind(io, "past_key", self.k[l])
        self._bind(io, "past_value", self.v[l])
        self._bind(io, "present_key", self.k[l], output=True)
        self._bind(io, "present_value", self.v[l], output=True)
        self._bind(io, "seqlens_k", self.seqlens_k)
        self._bind(io, "total_seq_len", self.total)
        if self._layer_rope[l] is not None:
            cos, sin = self.rope[self._layer_rope[l]]
            self._bind(io, "cos_cache", cos)
            self._bind(io, "sin_cache", sin)

    def bind_tokens(self, s: int) -> None:
        """(Re)bind the per-token buffers for a step of s tokens. Views of the leading s rows of
        [1, max_batch, ·] buffers are contiguous, so no copy is involved."""
        if s > self.qkv.shape[1]:
            raise ValueError(f"{s} tokens in one step, buffers hold {self.qkv.shape[1]}")
        m = 0 if s <= self.small else len(self.bindings) - 1
        self._mode = m
        if self._bound[m] == s:
            return
        q, a = self.qkv[:, :s], self.attn[:, :s]
        for _, io in self.bindings[m]:
            self._bind(io, "qkv", q)
            self._bind(io, "attn", a, output=True)
        self._bound[m] = s

    def set_position(self, past: int, s: int) -> None:
        """Next run processes s tokens at positions past .. past+s-1."""
        self.bind_tokens(s)
        self.seqlens_k[0] = past + s - 1
        self.total[()] = past + s

    def use_long_rope(self, long: bool) -> None:
        """LongRoPE: bind the long (True) or short tables. The caller decides from the length the
        sequence will have after the whole call, as transformers decides from the longest position."""
        if self.long_after and long != self._long:
            self._long = long
            for name, (cs, ss, cl, sl) in self._rope_src.items():
                cos, sin = self.rope[name]
                cos[:] = cl if long else cs
                sin[:] = sl if long else ss

    def run(self, l: int) -> None:
        sess, io = self.bindings[self._mode][l]
        try:
            sess.run_with_iobinding(io)
        except Exception as e:  # e.g. a graph whose shapes do not match the manifest's config
            msg = " ".join(str(e).split())[:300]
            raise PackageError(f"{self.paths[l]}: ONNX Runtime cannot run it with this package's config "
                               f"and tensors ({msg})") from None

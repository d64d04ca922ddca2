"""The attention half of every layer, run by ONNX Runtime with a KV cache that never moves.

Each layer's session is bound once (IOBinding) to buffers owned here:
  hidden   [1, S, D]  input: the residual stream entering the layer
  residual [1, S, D]  output: hidden + attention
  ffn_in   [1, S, D]  output: the post-attention norm of residual, the FFN's input
  k, v     [1, Hkv, T, hd]  bound as both past_* and present_*: GroupQueryAttention sees the
                      same pointer and writes only the new positions (no per-token cache copy)
All layers share hidden/residual/ffn_in: layer l's FFN writes its result into `hidden`, which
is layer l+1's input. Decoding a token is then `run_with_iobinding` per layer, nothing else.
"""

from __future__ import annotations

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
    # run the FFN on the same cores, and spinning ORT workers would steal them.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.log_severity_level = 3
    return so


class AttentionStack:
    def __init__(self, pkg, ctx: int, max_batch: int, threads: int):
        cfg = pkg.config
        self.ctx = ctx
        D, Hkv, hd = cfg.d_model, cfg.n_kv_heads, cfg.head_dim
        self.cos = np.ascontiguousarray(pkg.tensor("rope.cos")[:ctx])   # [T, rot/2]
        self.sin = np.ascontiguousarray(pkg.tensor("rope.sin")[:ctx])
        # np.zeros maps fresh zero pages: the cache costs RAM only as positions get written.
        self.k = [np.zeros((1, Hkv, ctx, hd), np.float32) for _ in range(cfg.n_layers)]
        self.v = [np.zeros((1, Hkv, ctx, hd), np.float32) for _ in range(cfg.n_layers)]
        self.hidden = np.zeros((1, max_batch, D), np.float32)
        self.residual = np.zeros((1, max_batch, D), np.float32)
        self.ffn_in = np.zeros((1, max_batch, D), np.float32)
        self.seqlens_k = np.zeros((1,), np.int32)
        self.total = np.zeros((), np.int32)
        so = session_options(threads)
        self.sessions, self.bindings, self.paths = [], [], []
        for l, layer in enumerate(pkg.manifest.layers):
            path = str(pkg.file(layer.attention))
            self.paths.append(path)
            try:
                sess = ort.InferenceSession(path, sess_options=so, providers=["CPUExecutionProvider"])
            except Exception as e:  # ORT raises its own exception types for bad graphs
                raise PackageError(f"{path}: ONNX Runtime cannot load it ({str(e).splitlines()[0][:200]})") from None
            self.sessions.append(sess)
            io = sess.io_binding()
            self._bind_static(io, l)
            self.bindings.append(io)
        self._bound_s = 0
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
        self._bind(io, "cos_cache", self.cos)
        self._bind(io, "sin_cache", self.sin)

    def bind_tokens(self, s: int) -> None:
        """(Re)bind the per-token buffers for a step of s tokens. Views of the leading s rows of
        [1, max_batch, D] buffers are contiguous, so no copy is involved."""
        if s == self._bound_s:
            return
        if s > self.hidden.shape[1]:
            raise ValueError(f"{s} tokens in one step, buffers hold {self.hidden.shape[1]}")
        h, r, f = self.hidden[:, :s], self.residual[:, :s], self.ffn_in[:, :s]
        for io in self.bindings:
            self._bind(io, "hidden", h)
            self._bind(io, "residual", r, output=True)
            self._bind(io, "ffn_in", f, output=True)
        self._bound_s = s

    def set_position(self, past: int, s: int) -> None:
        """Next run processes s tokens at positions past .. past+s-1."""
        self.bind_tokens(s)
        self.seqlens_k[0] = past + s - 1
        self.total[()] = past + s

    def run(self, l: int) -> None:
        try:
            self.sessions[l].run_with_iobinding(self.bindings[l])
        except Exception as e:  # e.g. a graph whose shapes do not match the manifest's config
            msg = " ".join(str(e).split())[:300]
            raise PackageError(f"{self.paths[l]}: ONNX Runtime cannot run it with this package's config "
                               f"and tensors ({msg})") from None

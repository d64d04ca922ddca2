"""Build one layer's attention core (the part ONNX Runtime runs) with onnx.helper.

Why hand-built and not optimum/torch.onnx: the device needs a KV cache that is allocated once for
the whole context and written in place. ONNX Runtime's GroupQueryAttention (com.microsoft) does
exactly that when `past_key` and `present_key` are bound to the same buffer (its CPU kernel checks
`past_key_data == present_key_data` and then only writes the new positions), and it applies the
rotary embedding itself from cos/sin tables. A torch.onnx / optimum export produces the standard
`present = Concat(past, new)` pattern, which copies the whole cache every token. This is the route
onnxruntime-genai's model builder takes for the same reason.

What is in the graph and what is not (format v2 and later). A (pre-norm) layer is

    hidden [S,D] ─► norm(γ_in) ─► W_qkv (+b) ─► qkv [S,(H+2Hkv)·hd]             Numba
                                                 (─► per-head q/k norm, Gemma-3)
                                                      │
                  past_key/value [1,Hkv,T,hd] (shared with present_*),
                  seqlens_k [1] (= total-1), total_seq_len [], cos/sin [P,rot/2]
                                                      ▼
                          GroupQueryAttention(packed qkv, do_rotary, local_window)  ONNX Runtime
                                                      │ attn [S,H·hd]
                                                      ▼
    residual = hidden + W_o attn (+b) ─► norm(γ_post) ─► ffn_in                  Numba
    hidden'  = residual + FFN_t(ffn_in)                                          Numba (sparse)

(parallel and post-norm blocks rewire the same pieces; see edgesparse/config.py BLOCKS.)

Format v1 had the norms and both projections in the graph too. For one token ONNX Runtime's
MatMul read SmolLM2's 30 layers of q|k|v and o weights (106 MB) in 5.3 ms on 2 threads, a Numba
matvec in 4.3 ms, and every multi-threaded ORT run woke ORT's own pool between Numba's parallel
regions; with the projections in Numba the attention core needs no threads of its own for a
token, and decode went from 31.3 to 26.4 ms per token in the same run (devices/README.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper

from edgesparse.errors import EdgesparseError

MS = "com.microsoft"
OPSET = 17


@dataclass(frozen=True)
class AttentionSpec:
    d_model: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    scale: float            # softmax scale (1/sqrt(hd) for most models)
    local_window: int = -1  # sliding-window size in tokens, -1 = full causal attention
    rotary_dim: int = 0     # rotated dimensions of each head; 0: no rotary (learned positions, OPT)
    rotary_interleaved: bool = False


def build_attention_graph(spec: AttentionSpec, layer: int) -> onnx.ModelProto:
    """One layer's GroupQueryAttention as an ONNX model: qkv [1,S,(H+2Hkv)·hd] -> attn [1,S,H·hd].
    Weightless; layers differ only in their KV buffers, window and rotary tables. The rotary
    dimension is the cos/sin tables' width x 2: ORT rotates the first rotary_dim dimensions of each
    head and passes the rest through, which is partial rotary (Phi-2) as transformers does it."""
    H, Hkv, hd = spec.n_heads, spec.n_kv_heads, spec.head_dim
    if hd % 8:
        # ORT's CPU GroupQueryAttention kernel rejects other head sizes at run time.
        raise EdgesparseError(f"head_dim {hd}: ONNX Runtime's GroupQueryAttention needs a multiple of 8")
    if spec.rotary_dim % 16:
        # ... and rotates only multiples of 16 dimensions ("cos_cache dimension 1 must be <=
        # head_size / 2 and a multiple of 8"): Phi-2 rotates 32 of 80, every full-rotary model here
        # a head_dim that is a multiple of 16.
        raise EdgesparseError(f"rotary dimension {spec.rotary_dim}: ONNX Runtime's GroupQueryAttention "
                              "needs a multiple of 16")
    f32 = TensorProto.FLOAT
    rope = ["cos_cache", "sin_cache"] if spec.rotary_dim else []
    node = helper.make_node(
        "GroupQueryAttention",
        ["qkv", "", "", "past_key", "past_value", "seqlens_k", "total_seq_len"] + rope,
        ["attn", "present_key", "present_value"],
        domain=MS, num_heads=H, kv_num_heads=Hkv, scale=float(spec.scale), do_rotary=int(spec.rotary_dim > 0),
        rotary_interleaved=int(spec.rotary_interleaved), local_window_size=int(spec.local_window))
    S, T = "seq", "max_ctx"
    inputs = [
        helper.make_tensor_value_info("qkv", f32, [1, S, (H + 2 * Hkv) * hd]),
        helper.make_tensor_value_info("past_key", f32, [1, Hkv, T, hd]),
        helper.make_tensor_value_info("past_value", f32, [1, Hkv, T, hd]),
        helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, [1]),
        helper.make_tensor_value_info("total_seq_len", TensorProto.INT32, []),
    ] + [helper.make_tensor_value_info(n, f32, ["max_pos", "rot_half"]) for n in rope]
    outputs = [
        helper.make_tensor_value_info("attn", f32, [1, S, H * hd]),
        helper.make_tensor_value_info("present_key", f32, [1, Hkv, T, hd]),
        helper.make_tensor_value_info("present_value", f32, [1, Hkv, T, hd]),
    ]
    graph = helper.make_graph([node], f"edgesparse_attention_{layer:03d}", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS, 1)],
                              producer_name="edgesparse")
    model.ir_version = 8
    return model

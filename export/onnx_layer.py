"""Build one layer's attention core (the part ONNX Runtime runs) with onnx.helper.

Why hand-built and not optimum/torch.onnx: the device needs a KV cache that is allocated once for
the whole context and written in place. ONNX Runtime's GroupQueryAttention (com.microsoft) does
exactly that when `past_key` and `present_key` are bound to the same buffer (its CPU kernel checks
`past_key_data == present_key_data` and then only writes the new positions), and it applies the
rotary embedding itself from cos/sin tables. A torch.onnx / optimum export produces the standard
`present = Concat(past, new)` pattern, which copies the whole cache every token. This is the route
onnxruntime-genai's model builder takes for the same reason.

What is in the graph and what is not (format v2). A layer is

    hidden [S,D] ─► RMSNorm(γ_in) ─► W_qkv (+b) ─► qkv [S,(H+2Hkv)·hd]          Numba
                                                      │
                  past_key/value [1,Hkv,T,hd] (shared with present_*),
                  seqlens_k [1] (= total-1), total_seq_len [], cos/sin [P,rot/2]
                                                      ▼
                          GroupQueryAttention(packed qkv, do_rotary, local_window)  ONNX Runtime
                                                      │ attn [S,H·hd]
                                                      ▼
    residual = hidden + W_o attn (+b) ─► RMSNorm(γ_post) ─► ffn_in               Numba
    hidden'  = residual + FFN_t(ffn_in)                                          Numba (sparse)

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
    norm: str               # "rms" | "layer"
    norm_eps: float
    scale: float            # softmax scale (1/sqrt(hd) for most models)
    local_window: int = -1  # sliding-window size in tokens, -1 = full causal attention
    rotary_interleaved: bool = False


@dataclass
class AttentionWeights:
    # Linear weights in nn.Linear's layout [out, in]: each output is one contiguous row, which is
    # what the decode matvec streams through.
    in_norm: np.ndarray             # [D]
    post_norm: np.ndarray           # [D]
    w_qkv: np.ndarray               # [(H+2Hkv)·hd, D]  q rows, then k rows, then v rows
    w_o: np.ndarray                 # [D, H·hd]
    in_norm_bias: np.ndarray | None = None   # [D] (LayerNorm models)
    post_norm_bias: np.ndarray | None = None  # [D]
    b_qkv: np.ndarray | None = None  # [(H+2Hkv)·hd] (Qwen2)
    b_o: np.ndarray | None = None    # [D]


def build_attention_graph(spec: AttentionSpec, layer: int) -> onnx.ModelProto:
    """One layer's GroupQueryAttention as an ONNX model: qkv [1,S,(H+2Hkv)·hd] -> attn [1,S,H·hd].
    Weightless; layers differ only in their KV buffers and (Mistral, Qwen2) their window."""
    H, Hkv, hd = spec.n_heads, spec.n_kv_heads, spec.head_dim
    if hd % 8:
        # ORT's CPU GroupQueryAttention kernel rejects other head sizes at run time.
        raise EdgesparseError(f"head_dim {hd}: ONNX Runtime's GroupQueryAttention needs a multiple of 8")
    f32 = TensorProto.FLOAT
    node = helper.make_node(
        "GroupQueryAttention",
        ["qkv", "", "", "past_key", "past_value", "seqlens_k", "total_seq_len", "cos_cache", "sin_cache"],
        ["attn", "present_key", "present_value"],
        domain=MS, num_heads=H, kv_num_heads=Hkv, scale=float(spec.scale), do_rotary=1,
        rotary_interleaved=int(spec.rotary_interleaved), local_window_size=int(spec.local_window))
    S, T = "seq", "max_ctx"
    inputs = [
        helper.make_tensor_value_info("qkv", f32, [1, S, (H + 2 * Hkv) * hd]),
        helper.make_tensor_value_info("past_key", f32, [1, Hkv, T, hd]),
        helper.make_tensor_value_info("past_value", f32, [1, Hkv, T, hd]),
        helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, [1]),
        helper.make_tensor_value_info("total_seq_len", TensorProto.INT32, []),
        helper.make_tensor_value_info("cos_cache", f32, ["max_pos", "rot_half"]),
        helper.make_tensor_value_info("sin_cache", f32, ["max_pos", "rot_half"]),
    ]
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

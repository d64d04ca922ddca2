"""Build one layer's attention graph (everything but the FFN) with onnx.helper.

Why hand-built and not optimum/torch.onnx: the device needs a KV cache that is allocated once for
the whole context and written in place. ONNX Runtime's GroupQueryAttention (com.microsoft) does
exactly that when `past_key` and `present_key` are bound to the same buffer (its CPU kernel checks
`past_key_data == present_key_data` and then only writes the new positions), and it applies the
rotary embedding itself from cos/sin tables. A torch.onnx / optimum export produces the standard
`present = Concat(past, new)` pattern, which copies the whole cache every token. This is the route
onnxruntime-genai's model builder takes for the same reason; the graph is small enough to draw:

    hidden [1,S,D] ──┬─► RMSNorm(γ_in) ─► MatMul(W_qkv) [+b_qkv] ─► qkv [1,S,(H+2Hkv)·hd]
                     │                                               │
                     │   past_key/value [1,Hkv,T,hd] (shared with present_*),
                     │   seqlens_k [1] (= total-1), total_seq_len [], cos/sin [P,rot/2]
                     │                                               ▼
                     │                        GroupQueryAttention(packed qkv, do_rotary)
                     │                                               │ attn [1,S,H·hd]
                     │                                               ▼
                     │                                   MatMul(W_o) [+b_o] ─► o [1,S,D]
                     └──────────► SkipSimplifiedLayerNorm(o, skip=hidden, γ_post) ─► ffn_in [1,S,D]
                                                                                 └► residual [1,S,D] = hidden + o

The FFN itself (the part edgesparse makes sparse) is not in the graph: the runtime computes
residual + FFN(ffn_in) from the mmap'd neuron-major rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

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
    # Linear weights are stored [in, out] (x @ W), i.e. the transpose of torch's nn.Linear.weight.
    in_norm: np.ndarray             # [D]
    post_norm: np.ndarray           # [D]
    w_qkv: np.ndarray               # [D, (H+2Hkv)·hd]
    w_o: np.ndarray                 # [H·hd, D]
    in_norm_bias: np.ndarray | None = None   # [D] (LayerNorm models)
    post_norm_bias: np.ndarray | None = None  # [D]
    b_qkv: np.ndarray | None = None  # [(H+2Hkv)·hd] (Qwen2)
    b_o: np.ndarray | None = None    # [D]


def _init(name: str, a: np.ndarray, dtype) -> TensorProto:
    return numpy_helper.from_array(np.ascontiguousarray(a, dtype=dtype), name)


def build_attention_graph(spec: AttentionSpec, w: AttentionWeights, layer: int,
                          weight_dtype=np.float32) -> onnx.ModelProto:
    """One layer's attention subgraph as an ONNX model (float32 activations)."""
    D, H, Hkv, hd = spec.d_model, spec.n_heads, spec.n_kv_heads, spec.head_dim
    if hd % 8:
        # ORT's CPU GroupQueryAttention kernel rejects other head sizes at run time.
        raise EdgesparseError(f"head_dim {hd}: ONNX Runtime's GroupQueryAttention needs a multiple of 8")
    qkv_dim = (H + 2 * Hkv) * hd
    assert w.w_qkv.shape == (D, qkv_dim), (w.w_qkv.shape, (D, qkv_dim))
    assert w.w_o.shape == (H * hd, D), w.w_o.shape
    f32 = TensorProto.FLOAT
    nodes, inits = [], []

    def weight(name: str, a: np.ndarray) -> str:
        # float16 storage halves the file; ORT folds the Cast into a float32 initializer at load
        # (the CPU MatMul kernels are float32), so it saves disk, not RAM.
        if weight_dtype == np.float16:
            inits.append(_init(name + "_f16", a, np.float16))
            nodes.append(helper.make_node("Cast", [name + "_f16"], [name], to=f32))
        else:
            inits.append(_init(name, a, np.float32))
        return name

    def norm(x: str, gamma: str, beta: str | None, out: str) -> None:
        if spec.norm == "rms":
            nodes.append(helper.make_node("SimplifiedLayerNormalization", [x, gamma], [out],
                                          axis=-1, epsilon=spec.norm_eps, stash_type=1))
        else:
            nodes.append(helper.make_node("LayerNormalization", [x, gamma, beta], [out],
                                          axis=-1, epsilon=spec.norm_eps))

    def linear(x: str, wname: str, bname: str | None, out: str) -> None:
        if bname is None:
            nodes.append(helper.make_node("MatMul", [x, wname], [out]))
        else:
            nodes.append(helper.make_node("MatMul", [x, wname], [out + "_nobias"]))
            nodes.append(helper.make_node("Add", [out + "_nobias", bname], [out]))

    g_in = weight("in_norm.weight", w.in_norm)
    b_in = weight("in_norm.bias", w.in_norm_bias) if w.in_norm_bias is not None else None
    g_post = weight("post_norm.weight", w.post_norm)
    b_post = weight("post_norm.bias", w.post_norm_bias) if w.post_norm_bias is not None else None
    wqkv = weight("qkv.weight", w.w_qkv)
    bqkv = weight("qkv.bias", w.b_qkv) if w.b_qkv is not None else None
    wo = weight("o.weight", w.w_o)
    bo = weight("o.bias", w.b_o) if w.b_o is not None else None

    norm("hidden", g_in, b_in, "xn")
    linear("xn", wqkv, bqkv, "qkv")
    nodes.append(helper.make_node(
        "GroupQueryAttention",
        ["qkv", "", "", "past_key", "past_value", "seqlens_k", "total_seq_len", "cos_cache", "sin_cache"],
        ["attn", "present_key", "present_value"],
        domain=MS, num_heads=H, kv_num_heads=Hkv, scale=float(spec.scale), do_rotary=1,
        rotary_interleaved=int(spec.rotary_interleaved), local_window_size=int(spec.local_window)))
    linear("attn", wo, bo, "o")
    # residual = hidden + o ; ffn_in = norm(residual), as one fused contrib op: ORT does not fuse
    # Add + norm by itself here because the sum is also a graph output.
    if spec.norm == "rms":
        nodes.append(helper.make_node("SkipSimplifiedLayerNormalization", ["o", "hidden", g_post],
                                      ["ffn_in", "", "", "residual"], domain=MS, epsilon=spec.norm_eps))
    else:
        nodes.append(helper.make_node("SkipLayerNormalization", ["o", "hidden", g_post, b_post],
                                      ["ffn_in", "", "", "residual"], domain=MS, epsilon=spec.norm_eps))

    S, T = "seq", "max_ctx"
    inputs = [
        helper.make_tensor_value_info("hidden", f32, [1, S, D]),
        helper.make_tensor_value_info("past_key", f32, [1, Hkv, T, hd]),
        helper.make_tensor_value_info("past_value", f32, [1, Hkv, T, hd]),
        helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, [1]),
        helper.make_tensor_value_info("total_seq_len", TensorProto.INT32, []),
        helper.make_tensor_value_info("cos_cache", f32, ["max_pos", "rot_half"]),
        helper.make_tensor_value_info("sin_cache", f32, ["max_pos", "rot_half"]),
    ]
    outputs = [
        helper.make_tensor_value_info("residual", f32, [1, S, D]),
        helper.make_tensor_value_info("ffn_in", f32, [1, S, D]),
        helper.make_tensor_value_info("present_key", f32, [1, Hkv, T, hd]),
        helper.make_tensor_value_info("present_value", f32, [1, Hkv, T, hd]),
    ]
    graph = helper.make_graph(nodes, f"edgesparse_attention_{layer:03d}", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS, 1)],
                              producer_name="edgesparse")
    model.ir_version = 8
    return model

"""Architecture registry: one small declarative class per model family.

Each class names where a Hugging Face model keeps its pieces and the few numbers and wiring
choices that differ between families. The extraction code is shared: it maps the HF modules onto
edgesparse's one naming scheme (HF's q/k/v/o and gate/up/down), once, at the export boundary.

    family    block     norm          FFN                      positions              extras
    llama     pre       RMS           SwiGLU gate/up/down      rotary (llama3 scaling)
    mistral   pre       RMS           SwiGLU                   rotary                 sliding window
    qwen2     pre       RMS           SwiGLU                   rotary                 q/k/v bias, untied head
    phi       parallel  LayerNorm+b   GELU fc1/fc2 + biases    partial rotary         q/k/v/o + head bias
    phi3      pre       RMS           SwiGLU, fused gate_up    rotary (LongRoPE)      fused qkv
    opt       pre/post  LayerNorm+b   ReLU fc1/fc2 + biases    learned (offset 2)     project_in/out
    gemma3    pre       RMS (1 + w)   GeGLU                    rotary, local/global   q/k norms, sandwich norms,
                                                                                      embed * sqrt(D)

Plain MLPs (fc1/fc2) are stored in the gate's place: neuron i's record is (fc1 row, fc2 column),
h = act(fc1.x + b); the runtime treats them as a gated FFN with up = 1.
"""

from __future__ import annotations

import copy
import math
from typing import ClassVar

import numpy as np

from edgesparse.errors import EdgesparseError

from .onnx_layer import AttentionSpec

REGISTRY: dict[str, type["Arch"]] = {}


def register(cls: type["Arch"]) -> type["Arch"]:
    for mt in cls.model_types:
        REGISTRY[mt] = cls
    return cls


def lookup(model_type: str) -> "Arch":
    try:
        return REGISTRY[model_type]()
    except KeyError:
        raise EdgesparseError(
            f"unsupported architecture {model_type!r}; supported: {', '.join(sorted(REGISTRY))}") from None


def _np(t) -> np.ndarray:
    return t.detach().to("cpu").float().numpy()


def _get(module, dotted: str | None):
    if dotted is None:
        return None
    for part in dotted.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


class Arch:
    name: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]]
    norm: ClassVar[str] = "rms"            # "rms" | "layer" (LayerNorm with bias)
    norm_offset: ClassVar[float] = 0.0     # Gemma's RMSNorm scales by (1 + w): stored as 1 + w
    block: ClassVar[str] = "pre"           # config.BLOCKS
    gated: ClassVar[bool] = True
    # HF module paths (None = the family has no such module)
    layers: ClassVar[str] = "model.layers"
    embed: ClassVar[str] = "model.embed_tokens"
    pos_embed: ClassVar[str | None] = None
    pos_offset: ClassVar[int] = 0          # OPT's learned positions start at row 2
    proj_in: ClassVar[str | None] = None
    proj_out: ClassVar[str | None] = None
    final_norm: ClassVar[str | None] = "model.norm"
    lm_head: ClassVar[str] = "lm_head"
    in_norm: ClassVar[str] = "input_layernorm"
    ffn_norm: ClassVar[str | None] = "post_attention_layernorm"
    attn_out_norm: ClassVar[str | None] = None
    ffn_out_norm: ClassVar[str | None] = None
    q: ClassVar[str] = "self_attn.q_proj"
    k: ClassVar[str] = "self_attn.k_proj"
    v: ClassVar[str] = "self_attn.v_proj"
    qkv: ClassVar[str | None] = None       # fused [q; k; v] projection (Phi-3)
    q_norm: ClassVar[str | None] = None
    k_norm: ClassVar[str | None] = None
    o: ClassVar[str] = "self_attn.o_proj"
    gate: ClassVar[str] = "mlp.gate_proj"
    up: ClassVar[str] = "mlp.up_proj"
    gate_up: ClassVar[str | None] = None   # fused [gate; up] (Phi-3)
    down: ClassVar[str] = "mlp.down_proj"
    fc1: ClassVar[str] = "mlp.fc1"         # plain MLPs (gated = False)
    fc2: ClassVar[str] = "mlp.fc2"
    act_key: ClassVar[str] = "hidden_act"
    # HF activation name -> edgesparse activation
    activations: ClassVar[dict[str, str]] = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh",
                                             "gelu_new": "gelu_tanh", "gelu": "gelu", "relu": "relu"}

    # -- numbers ---------------------------------------------------------------------------------
    def check(self, c) -> None:
        """Refuse configurations this family's class does not map (clear error, before loading weights)."""

    def n_kv_heads(self, c) -> int:
        return getattr(c, "num_key_value_heads", None) or c.num_attention_heads

    def ffn_dim(self, c) -> int:
        return c.intermediate_size

    def embed_dim(self, c) -> int:
        return c.hidden_size

    def head_dim(self, c) -> int:
        return getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads

    def rotary_dim(self, c) -> int:
        return int(self.head_dim(c) * getattr(c, "partial_rotary_factor", 1.0))

    def norm_eps(self, c) -> float:
        return float(c.rms_norm_eps)

    def activation(self, c) -> str:
        act = getattr(c, self.act_key)
        if act not in self.activations:
            raise EdgesparseError(f"{self.name}: activation {act!r} is not supported "
                                  f"(expected one of {sorted(self.activations)})")
        return self.activations[act]

    def block_for(self, c) -> str:
        return self.block

    def local_window(self, c, layer: int) -> int:
        return -1

    def attention_scale(self, c) -> float:
        return self.head_dim(c) ** -0.5

    def embed_scale(self, c) -> float:
        return 1.0

    def rope_config(self, c, layer: int):
        """(table name, the config transformers' rope init function gets) for this layer."""
        return "rope", c

    def rope_long_after(self, c) -> int:
        return 0

    def attention_spec(self, c, layer: int) -> AttentionSpec:
        hd = self.head_dim(c)
        return AttentionSpec(d_model=c.hidden_size, n_heads=c.num_attention_heads,
                             n_kv_heads=self.n_kv_heads(c), head_dim=hd, scale=self.attention_scale(c),
                             local_window=self.local_window(c, layer), rotary_dim=self.rotary_dim(c))

    # -- weights ---------------------------------------------------------------------------------
    def layer_modules(self, model):
        return list(_get(model, self.layers))

    def norm_weights(self, module) -> tuple[np.ndarray, np.ndarray | None]:
        """(weight [D], bias [D] or None) of a norm module, with Gemma's 1 + w folded in."""
        w = _np(module.weight) + np.float32(self.norm_offset)
        b = getattr(module, "bias", None)
        return w, (None if b is None else _np(b))

    def extract_layer(self, mod) -> dict[str, np.ndarray]:
        """role -> array for one layer, in edgesparse's roles (format.LAYER_TENSORS)."""
        g = lambda p: _get(mod, p)  # noqa: E731
        t: dict[str, np.ndarray] = {}
        t["attn_norm"], b = self.norm_weights(g(self.in_norm))
        if b is not None:
            t["attn_norm_bias"] = b
        if self.ffn_norm is not None:
            t["ffn_norm"], b = self.norm_weights(g(self.ffn_norm))
            if b is not None:
                t["ffn_norm_bias"] = b
        for role, path in (("attn_out_norm", self.attn_out_norm), ("ffn_out_norm", self.ffn_out_norm),
                           ("q_norm", self.q_norm), ("k_norm", self.k_norm)):
            if path is not None:
                t[role] = self.norm_weights(g(path))[0]
        # nn.Linear's [out, in] layout is kept: one output per contiguous row.
        if self.qkv is not None:
            lin = g(self.qkv)
            t["qkv"] = _np(lin.weight)
            if lin.bias is not None:
                t["qkv_bias"] = _np(lin.bias)
        else:
            q, k, v = g(self.q), g(self.k), g(self.v)
            t["qkv"] = np.concatenate([_np(q.weight), _np(k.weight), _np(v.weight)], axis=0)
            if q.bias is not None:
                t["qkv_bias"] = np.concatenate([_np(q.bias), _np(k.bias), _np(v.bias)])
        o = g(self.o)
        t["o"] = _np(o.weight)
        if o.bias is not None:
            t["o_bias"] = _np(o.bias)
        t.update(self.extract_ffn(mod))
        return t

    def input_modules(self, mod) -> dict[str, object]:
        """role -> the nn.Linear whose input multiplies that role's rows (imatrix.py): q (or the fused
        qkv) for qkv, o, and gate (or gate_up / fc1) for the FFN's input rows."""
        g = lambda p: _get(mod, p)  # noqa: E731
        ffn_in = g(self.fc1) if not self.gated else g(self.gate_up) if self.gate_up is not None else g(self.gate)
        return {"qkv": g(self.qkv) if self.qkv is not None else g(self.q), "o": g(self.o), "ffn": ffn_in}

    def extract_ffn(self, mod) -> dict[str, np.ndarray]:
        """Neuron-major FFN [N, R, D]: (gate row, up row, down column) per neuron, or (fc1 row, fc2
        column) for plain MLPs; biases as ffn_bias_in [N, R-1] and ffn_bias_out [D]."""
        g = lambda p: _get(mod, p)  # noqa: E731
        if not self.gated:
            fc1, fc2 = g(self.fc1), g(self.fc2)
            rows, bias_in = [_np(fc1.weight)], [fc1.bias]               # [N, D]
            down = fc2
        elif self.gate_up is not None:
            gu = g(self.gate_up)
            w = _np(gu.weight)                                           # [2N, D]: gate rows, then up rows
            n = w.shape[0] // 2
            rows = [w[:n], w[n:]]
            bias_in = [None if gu.bias is None else gu.bias[:n], None if gu.bias is None else gu.bias[n:]]
            down = g(self.down)
        else:
            gate, up = g(self.gate), g(self.up)
            rows, bias_in = [_np(gate.weight), _np(up.weight)], [gate.bias, up.bias]
            down = g(self.down)
        ffn = np.ascontiguousarray(np.stack(rows + [_np(down.weight).T], axis=1))   # [N, R, D]
        out = {"ffn": ffn}
        if any(b is not None for b in bias_in) or down.bias is not None:
            n = ffn.shape[0]
            out["ffn_bias_in"] = np.stack([np.zeros(n, np.float32) if b is None else _np(b) for b in bias_in], axis=1)
            out["ffn_bias_out"] = (np.zeros(ffn.shape[2], np.float32) if down.bias is None else _np(down.bias))
        return out

    def extract_globals(self, model) -> dict[str, np.ndarray]:
        """Embedding, positions, projections, final norm, lm_head (+ bias), by tensor name."""
        t = {"embed": _np(model.get_input_embeddings().weight)}            # [V, E]
        head = model.get_output_embeddings()
        if head.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr():
            t["lm_head"] = _np(head.weight)
        if getattr(head, "bias", None) is not None:
            t["lm_head.bias"] = _np(head.bias)
        if self.pos_embed is not None:
            t["pos_embed"] = _np(_get(model, self.pos_embed).weight)[self.pos_offset:]    # [P, D]
        for name, path in (("embed_proj_in", self.proj_in), ("head_proj_out", self.proj_out)):
            m = _get(model, path)
            if m is not None:
                t[name] = _np(m.weight)
        fn = _get(model, self.final_norm)
        if fn is not None:
            t["final_norm.weight"], b = self.norm_weights(fn)
            if b is not None:
                t["final_norm.bias"] = b
        return t


class _SlidingWindow:
    def local_window(self, c, layer: int) -> int:
        # transformers 4.57 masks keys with kv_idx <= q_idx - sliding_window, and ORT's
        # GroupQueryAttention with local_window_size = sliding_window gives the same logits: checked
        # against transformers with a window shorter than the sequence (tests/test_archs.py).
        sw = getattr(c, "sliding_window", None)
        return -1 if sw is None else int(sw)


@register
class Llama(Arch):
    name = "llama"
    model_types = ("llama",)


@register
class Mistral(_SlidingWindow, Arch):
    name = "mistral"
    model_types = ("mistral",)


@register
class Qwen2(Arch):
    name = "qwen2"
    model_types = ("qwen2",)

    def local_window(self, c, layer: int) -> int:
        # same window convention as Mistral; only layers from max_window_layers on use it
        if getattr(c, "use_sliding_window", False) and c.sliding_window and layer >= c.max_window_layers:
            return int(c.sliding_window)
        return -1


@register
class Phi(Arch):
    """Phi-2: attention and MLP in parallel from one LayerNorm, partial rotary, biases everywhere."""
    name = "phi"
    model_types = ("phi",)
    norm = "layer"
    block = "parallel"
    gated = False
    final_norm = "model.final_layernorm"
    ffn_norm = None
    o = "self_attn.dense"

    def check(self, c) -> None:
        if getattr(c, "qk_layernorm", False):
            raise EdgesparseError("phi: qk_layernorm=True (LayerNorm on q and k) is not supported")

    def norm_eps(self, c) -> float:
        return float(c.layer_norm_eps)


@register
class Phi3(_SlidingWindow, Arch):
    """Phi-3: fused qkv and gate_up projections; the 128k variants use LongRoPE."""
    name = "phi3"
    model_types = ("phi3",)
    qkv = "self_attn.qkv_proj"
    gate_up = "mlp.gate_up_proj"

    def rope_long_after(self, c) -> int:
        rs = getattr(c, "rope_scaling", None) or {}
        if rs.get("rope_type", rs.get("type")) != "longrope":
            return 0
        return int(getattr(c, "original_max_position_embeddings", None) or c.max_position_embeddings)


@register
class OPT(Arch):
    """OPT: ReLU fc1/fc2, learned positions (offset 2), LayerNorm before (most sizes) or after
    (350m) each block, and project_in/out when the embedding is narrower than the model."""
    name = "opt"
    model_types = ("opt",)
    norm = "layer"
    gated = False
    layers = "model.decoder.layers"
    embed = "model.decoder.embed_tokens"
    pos_embed = "model.decoder.embed_positions"
    pos_offset = 2
    proj_in = "model.decoder.project_in"
    proj_out = "model.decoder.project_out"
    final_norm = "model.decoder.final_layer_norm"
    in_norm = "self_attn_layer_norm"
    ffn_norm = "final_layer_norm"
    o = "self_attn.out_proj"
    fc1 = "fc1"
    fc2 = "fc2"
    act_key = "activation_function"

    def block_for(self, c) -> str:
        return "pre" if c.do_layer_norm_before else "post"

    def check(self, c) -> None:
        if not getattr(c, "layer_norm_elementwise_affine", True):
            raise EdgesparseError("opt: layer_norm_elementwise_affine=False is not supported")

    def n_kv_heads(self, c) -> int:
        return c.num_attention_heads     # plain multi-head attention

    def ffn_dim(self, c) -> int:
        return c.ffn_dim

    def embed_dim(self, c) -> int:
        return c.word_embed_proj_dim

    def rotary_dim(self, c) -> int:
        return 0

    def norm_eps(self, c) -> float:
        return 1e-5    # nn.LayerNorm's default; OPT does not set it


@register
class Gemma3(Arch):
    """Gemma-3 (text): GeGLU, RMSNorm(1 + w), q/k norms, norms before and after both branches,
    local sliding-window layers (their own rope base) alternating with global ones, embed * sqrt(D)."""
    name = "gemma3"
    model_types = ("gemma3_text",)
    norm_offset = 1.0
    attn_out_norm = "post_attention_layernorm"
    ffn_norm = "pre_feedforward_layernorm"
    ffn_out_norm = "post_feedforward_layernorm"
    q_norm = "self_attn.q_norm"
    k_norm = "self_attn.k_norm"
    act_key = "hidden_activation"

    def check(self, c) -> None:
        for k in ("attn_logit_softcapping", "final_logit_softcapping"):
            if getattr(c, k, None) is not None:
                raise EdgesparseError(f"gemma3: {k}={getattr(c, k)} is not supported")

    def _sliding(self, c, layer: int) -> bool:
        return c.layer_types[layer] == "sliding_attention"

    def local_window(self, c, layer: int) -> int:
        return int(c.sliding_window) if self._sliding(c, layer) else -1

    def attention_scale(self, c) -> float:
        return c.query_pre_attn_scalar ** -0.5

    def embed_scale(self, c) -> float:
        # Gemma3TextScaledWordEmbedding multiplies by sqrt(hidden_size) cast to the weights' dtype
        return float(np.float32(math.sqrt(c.hidden_size)))

    def rope_config(self, c, layer: int):
        if not self._sliding(c, layer):
            return "rope", c
        # transformers builds the local layers' rotary from a copy of the config with the local base
        # and no scaling (Gemma3TextModel.__init__); so do we.
        local = copy.deepcopy(c)
        local.rope_theta = c.rope_local_base_freq
        local.rope_scaling = {"rope_type": "default"}
        return "rope.local", local

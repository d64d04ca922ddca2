"""Architecture registry: one small declarative class per model family.

Each class names where a Hugging Face model keeps its pieces (HF's own gate/up/down, q/k/v/o
names) and the few numbers that differ between families. `extract_layer` is shared: it maps
the HF modules onto edgesparse's one naming scheme, once, at the export boundary.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from edgesparse.errors import EdgesparseError

from .onnx_layer import AttentionSpec, AttentionWeights

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


def _get(module, dotted: str):
    for part in dotted.split("."):
        module = getattr(module, part)
    return module


class Arch:
    name: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]]
    norm: ClassVar[str] = "rms"
    # HF module paths
    layers: ClassVar[str] = "model.layers"
    embed: ClassVar[str] = "model.embed_tokens"
    final_norm: ClassVar[str] = "model.norm"
    lm_head: ClassVar[str] = "lm_head"
    in_norm: ClassVar[str] = "input_layernorm"
    post_norm: ClassVar[str] = "post_attention_layernorm"
    q: ClassVar[str] = "self_attn.q_proj"
    k: ClassVar[str] = "self_attn.k_proj"
    v: ClassVar[str] = "self_attn.v_proj"
    o: ClassVar[str] = "self_attn.o_proj"
    gate: ClassVar[str] = "mlp.gate_proj"
    up: ClassVar[str] = "mlp.up_proj"
    down: ClassVar[str] = "mlp.down_proj"
    # HF hidden_act -> edgesparse activation
    activations: ClassVar[dict[str, str]] = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh",
                                             "gelu": "gelu", "relu": "relu"}

    # -- numbers ---------------------------------------------------------------------------------
    def head_dim(self, c) -> int:
        return getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads

    def norm_eps(self, c) -> float:
        return float(c.rms_norm_eps)

    def activation(self, c) -> str:
        act = c.hidden_act
        if act not in self.activations:
            raise EdgesparseError(f"{self.name}: activation {act!r} is not supported "
                                  f"(expected one of {sorted(self.activations)})")
        return self.activations[act]

    def local_window(self, c, layer: int) -> int:
        return -1

    def attention_spec(self, c, layer: int) -> AttentionSpec:
        hd = self.head_dim(c)
        return AttentionSpec(d_model=c.hidden_size, n_heads=c.num_attention_heads,
                             n_kv_heads=c.num_key_value_heads, head_dim=hd, norm=self.norm,
                             norm_eps=self.norm_eps(c), scale=hd ** -0.5,
                             local_window=self.local_window(c, layer))

    # -- weights ---------------------------------------------------------------------------------
    def layer_modules(self, model):
        return list(_get(model, self.layers))

    def extract_attention(self, layer_module) -> AttentionWeights:
        g = lambda p: _get(layer_module, p)  # noqa: E731
        q, k, v, o = g(self.q), g(self.k), g(self.v), g(self.o)
        # nn.Linear's [out, in] layout is kept: one output per contiguous row.
        w_qkv = np.concatenate([_np(q.weight), _np(k.weight), _np(v.weight)], axis=0)
        b_qkv = None
        if q.bias is not None:
            b_qkv = np.concatenate([_np(q.bias), _np(k.bias), _np(v.bias)])
        return AttentionWeights(
            in_norm=_np(g(self.in_norm).weight), post_norm=_np(g(self.post_norm).weight),
            w_qkv=w_qkv, w_o=_np(o.weight), b_qkv=b_qkv,
            b_o=_np(o.bias) if o.bias is not None else None)

    def extract_ffn(self, layer_module) -> np.ndarray:
        """Neuron-major FFN: [n_neurons, 3, d_model] = (gate row, up row, down column) per neuron."""
        gate = _np(_get(layer_module, self.gate).weight)   # [N, D]
        up = _np(_get(layer_module, self.up).weight)       # [N, D]
        down = _np(_get(layer_module, self.down).weight)   # [D, N]
        return np.ascontiguousarray(np.stack([gate, up, down.T], axis=1))

    def extract_final_norm(self, model) -> np.ndarray:
        return _np(_get(model, self.final_norm).weight)

    def embed_scale(self, c) -> float:
        return 1.0


@register
class Llama(Arch):
    name = "llama"
    model_types = ("llama",)


@register
class Mistral(Arch):
    name = "mistral"
    model_types = ("mistral",)

    def local_window(self, c, layer: int) -> int:
        # transformers (4.57, sdpa and eager alike) lets query i see keys i-sliding_window .. i,
        # and ORT's GroupQueryAttention keeps local_window_size + 1 keys, so the numbers are equal.
        # Checked against transformers with a window shorter than the sequence (tests/test_archs.py).
        sw = getattr(c, "sliding_window", None)
        return -1 if sw is None else int(sw)


@register
class Qwen2(Arch):
    name = "qwen2"
    model_types = ("qwen2",)

    def local_window(self, c, layer: int) -> int:
        # same window convention as Mistral; only layers from max_window_layers on use it
        if getattr(c, "use_sliding_window", False) and c.sliding_window and layer >= c.max_window_layers:
            return int(c.sliding_window)
        return -1

"""Model configuration: a frozen dataclass read from the package manifest.

One naming scheme inside edgesparse (Hugging Face's: gate/up/down, q/k/v/o); exporters map each
architecture onto it once. Nothing here is guessed from a path or file name.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from .errors import PackageError

# FFN activations the kernels implement. "gated" FFNs compute h = act(gate.x) * (up.x);
# plain MLPs compute h = act(up.x + b) (fc1 is stored as "up", fc2 as "down").
ACTIVATIONS = ("silu", "gelu_tanh", "gelu", "relu")
NORMS = ("rms", "layer")
# How a layer wires attention and FFN around the residual stream x (norms n1 = attn_norm,
# n2 = ffn_norm; the optional "out" norms are Gemma's sandwich norms on each branch's output):
#   pre       r = x + out1(attn(n1(x)));  x' = r + out2(FFN(n2(r)))      Llama, Qwen2, Gemma-3, OPT pre-LN
#   parallel  u = n1(x);  x' = x + attn(u) + FFN(u)                      Phi-2 (GPT-J style)
#   post      r = n1(x + attn(x));  x' = n2(r + FFN(r))                  OPT-350m (post-LN)
BLOCKS = ("pre", "parallel", "post")


@dataclass(frozen=True)
class ModelConfig:
    arch: str                 # registry name of the exporter's architecture class, e.g. "llama"
    d_model: int              # residual stream width
    n_layers: int
    n_heads: int              # query heads
    n_kv_heads: int           # key/value heads (GQA when < n_heads)
    head_dim: int
    ffn_dim: int              # FFN neurons per layer
    vocab_size: int
    max_position: int         # longest context the rotary tables / position embeddings cover
    norm: str                 # "rms" | "layer": every norm of the model (LayerNorm: weight and bias)
    norm_eps: float
    activation: str           # one of ACTIVATIONS
    gated: bool               # SwiGLU/GeGLU h = act(gate.x)*(up.x) vs plain MLP h = act(fc1.x + b)
    ffn_bias: bool            # FFN input biases per neuron and an output bias [D] (OPT, Phi-2)
    tie_embeddings: bool      # lm_head shares the embedding matrix (stored once)
    embed_scale: float        # Gemma multiplies embeddings by sqrt(d_model); 1.0 elsewhere
    block: str                # one of BLOCKS
    rotary_dim: int           # dimensions of each head that get the rotary embedding; 0 = none
    rope_long_after: int      # LongRoPE: past this many positions the "long" tables apply; 0 = one table
    learned_positions: bool   # OPT: x += pos_embed[position]
    embed_dim: int            # width of embed / lm_head rows; != d_model means project_in/out (OPT-350m)
    final_norm: bool          # a norm before the lm_head (OPT post-LN has none)
    head_bias: bool           # the lm_head has a bias (Phi-2)
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]

    def __post_init__(self) -> None:
        for name in ("d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim",
                     "vocab_size", "max_position", "embed_dim"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise PackageError(f"config.{name}: expected a positive integer, got {v!r}")
        if self.n_heads % self.n_kv_heads:
            raise PackageError(f"config: n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        for t in ((self.bos_token_id,) if self.bos_token_id is not None else ()) + tuple(self.eos_token_ids):
            if not 0 <= t < self.vocab_size:
                raise PackageError(f"config: token id {t} (bos_token_id/eos_token_ids) is not in [0, {self.vocab_size})"[:300])
        if self.norm not in NORMS:
            raise PackageError(f"config.norm: expected one of {NORMS}, got {self.norm!r}")
        if self.activation not in ACTIVATIONS:
            raise PackageError(f"config.activation: expected one of {ACTIVATIONS}, got {self.activation!r}")
        if self.block not in BLOCKS:
            raise PackageError(f"config.block: expected one of {BLOCKS}, got {self.block!r}")
        for name in ("rotary_dim", "rope_long_after"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise PackageError(f"config.{name}: expected an integer >= 0, got {v!r}")
        if self.rotary_dim % 2 or self.rotary_dim > self.head_dim:
            raise PackageError(f"config.rotary_dim: expected an even number <= head_dim={self.head_dim}, "
                               f"got {self.rotary_dim}")
        if self.rotary_dim == 0 and not self.learned_positions:
            raise PackageError("config: a model needs positions: rotary_dim > 0 or learned_positions")
        if self.rope_long_after and not self.rotary_dim:
            raise PackageError("config.rope_long_after: set without a rotary embedding (rotary_dim = 0)")
        if not (isinstance(self.norm_eps, float) and 0.0 < self.norm_eps < 1.0):
            raise PackageError(f"config.norm_eps: expected a float in (0, 1), got {self.norm_eps!r}")

    def to_json(self) -> dict:
        d = asdict(self)
        d["eos_token_ids"] = list(self.eos_token_ids)
        return d

    @classmethod
    def from_json(cls, d: object) -> "ModelConfig":
        if not isinstance(d, dict):
            raise PackageError(f"manifest 'config': expected an object, got {type(d).__name__}")
        names = {f.name for f in fields(cls)}
        missing = sorted(names - d.keys())
        if missing:
            raise PackageError(f"manifest 'config': missing keys {missing}")
        unknown = sorted(d.keys() - names)
        if unknown:
            raise PackageError(f"manifest 'config': unknown keys {unknown}")
        kw = dict(d)
        types = {"arch": str, "norm": str, "activation": str, "gated": bool, "ffn_bias": bool,
                 "tie_embeddings": bool, "block": str, "learned_positions": bool, "final_norm": bool,
                 "head_bias": bool}
        for k, t in types.items():
            if not isinstance(kw[k], t):
                raise PackageError(f"manifest config.{k}: expected {t.__name__}, got {kw[k]!r}")
        for k in ("norm_eps", "embed_scale"):
            if (isinstance(kw[k], bool) or not isinstance(kw[k], (int, float))
                    or (isinstance(kw[k], int) and abs(kw[k]) > 2**1023)):   # JSON ints are unbounded
                raise PackageError(f"manifest config.{k}: expected a number, got {kw[k]!r}"[:300])
            kw[k] = float(kw[k])
        if kw["bos_token_id"] is not None and not isinstance(kw["bos_token_id"], int):
            raise PackageError(f"manifest config.bos_token_id: expected an integer or null, got {kw['bos_token_id']!r}")
        eos = kw["eos_token_ids"]
        if not isinstance(eos, list) or not all(isinstance(e, int) and not isinstance(e, bool) for e in eos):
            raise PackageError(f"manifest config.eos_token_ids: expected a list of integers, got {eos!r}")
        kw["eos_token_ids"] = tuple(eos)
        return cls(**kw)

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    @property
    def ffn_rows(self) -> int:
        """Vectors per neuron in the neuron-major FFN file: gate, up, down (gated) or fc1, fc2."""
        return 3 if self.gated else 2

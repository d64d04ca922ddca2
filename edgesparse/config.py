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
    norm: str                 # "rms" | "layer" (the final norm; layer norms live in the ONNX graphs)
    norm_eps: float
    activation: str           # one of ACTIVATIONS
    gated: bool               # SwiGLU/GeGLU (gate, up, down) vs plain MLP (up=fc1, down=fc2)
    ffn_bias: bool            # up/down (and gate) biases present
    tie_embeddings: bool      # lm_head shares the embedding matrix (stored once)
    embed_scale: float        # Gemma multiplies embeddings by sqrt(d_model); 1.0 elsewhere
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]

    def __post_init__(self) -> None:
        for name in ("d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim",
                     "vocab_size", "max_position"):
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
                 "tie_embeddings": bool}
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

"""Export a Hugging Face causal LM to an edgesparse package (workstation side)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from edgesparse import __version__
from edgesparse.config import ModelConfig
from edgesparse.errors import EdgesparseError
from edgesparse.format import LayerEntry, Manifest

from . import archs, source
from .onnx_layer import build_attention_graph
from .writer import PackageWriter

STORAGE_DTYPES = ("float32", "float16")


def rope_tables(cfg, head_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin tables [max_position, rotary_dim/2] for GroupQueryAttention.

    transformers' own rope init functions give inv_freq and the attention scaling for every rope
    type (default, linear, llama3, yarn, longrope, ...), so scaled variants need no code here.
    """
    import torch
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    rs = getattr(cfg, "rope_scaling", None) or {}
    rope_type = rs.get("rope_type", rs.get("type", "default"))
    if rope_type == "dynamic":
        raise EdgesparseError("rope_scaling 'dynamic' changes with sequence length; not supported")
    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise EdgesparseError(f"rope_scaling type {rope_type!r} is not supported")
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](cfg, torch.device("cpu"))
    pos = torch.arange(cfg.max_position_embeddings, dtype=torch.int64).float()
    freqs = torch.outer(pos, inv_freq.float())          # [P, rot/2]
    return ((freqs.cos() * scaling).numpy().astype(np.float32),
            (freqs.sin() * scaling).numpy().astype(np.float32))


def model_config(arch: archs.Arch, cfg, tok) -> ModelConfig:
    eos = cfg.eos_token_id
    eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    if tok.eos_token_id is not None and tok.eos_token_id not in eos:
        eos.append(tok.eos_token_id)
    return ModelConfig(
        arch=arch.name, d_model=cfg.hidden_size, n_layers=cfg.num_hidden_layers,
        n_heads=cfg.num_attention_heads, n_kv_heads=cfg.num_key_value_heads, head_dim=arch.head_dim(cfg),
        ffn_dim=cfg.intermediate_size, vocab_size=cfg.vocab_size, max_position=cfg.max_position_embeddings,
        norm=arch.norm, norm_eps=arch.norm_eps(cfg), activation=arch.activation(cfg), gated=True,
        ffn_bias=False, tie_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
        embed_scale=arch.embed_scale(cfg), bos_token_id=tok.bos_token_id, eos_token_ids=tuple(eos))


def export(model: str | None, out: Path, dtype: str = "float32", force: bool = False,
           progress: bool = True) -> Path:
    from tqdm.auto import tqdm
    if dtype not in STORAGE_DTYPES:
        raise EdgesparseError(f"--dtype: expected one of {STORAGE_DTYPES}, got {dtype!r}")
    out = Path(out)
    if out.exists() and not force:
        raise EdgesparseError(f"{out}: already exists; pass --force to replace it")
    src = source.resolve(model)
    cfg = source.load_config(src)
    arch = archs.lookup(cfg.model_type)          # before loading weights: fail fast
    tok = source.load_tokenizer(src)
    hf = source.load_model(src, cfg)
    mc = model_config(arch, cfg, tok)

    with PackageWriter(out, force) as w:
        layers = []
        mods = arch.layer_modules(hf)
        for l, mod in enumerate(tqdm(mods, desc="export layers", unit="layer", disable=not progress,
                                     file=sys.stderr)):
            aw = arch.extract_attention(mod)
            if aw.in_norm_bias is not None or aw.post_norm_bias is not None:
                raise EdgesparseError(f"{arch.name}: LayerNorm with bias is not supported by this exporter yet")
            graph = build_attention_graph(arch.attention_spec(cfg, l), l)
            w.blob(f"attn/{l:03d}.onnx", graph.SerializeToString(), "onnx")
            p = f"layers.{l}."
            # Norms and biases stay float32 (tiny, and the norm scales every activation).
            tensors = [(p + "attn_norm", aw.in_norm, "float32"), (p + "qkv", aw.w_qkv, dtype),
                       (p + "o", aw.w_o, dtype), (p + "ffn_norm", aw.post_norm, "float32")]
            biases = {}
            for role, b in (("qkv_bias", aw.b_qkv), ("o_bias", aw.b_o)):
                if b is not None:
                    tensors.append((p + role, b, "float32"))
                    biases[role] = p + role
            w.raw(f"attn/{l:03d}.bin", tensors)
            w.raw(f"ffn/{l:03d}.bin", [(p + "ffn", arch.extract_ffn(mod), dtype)])
            layers.append(LayerEntry(attention=f"attn/{l:03d}.onnx", ffn=p + "ffn", threshold=0.0,
                                     attn_norm=p + "attn_norm", qkv=p + "qkv", o=p + "o",
                                     ffn_norm=p + "ffn_norm", **biases))
        embed = hf.get_input_embeddings().weight.detach().float().numpy()     # [V, D]
        w.raw("embed.bin", [("embed", embed, dtype)])
        if not mc.tie_embeddings:
            head = hf.get_output_embeddings().weight.detach().float().numpy()  # [V, D]
            w.raw("head.bin", [("lm_head", head, dtype)])
        # The final norm and rotary tables are tiny and precision-sensitive: always float32.
        w.raw("norm.bin", [("final_norm.weight", arch.extract_final_norm(hf), "float32")])
        cos, sin = rope_tables(cfg, mc.head_dim)
        w.raw("rope.bin", [("rope.cos", cos, "float32"), ("rope.sin", sin, "float32")])
        w.blob("tokenizer.json", tok.backend_tokenizer.to_str().encode("utf-8"), "tokenizer")
        manifest = Manifest(
            config=mc, source=src.describe(),
            exporter={"name": "edgesparse", "version": __version__, "dtype": dtype},
            files=w.files, tensors=w.tensors, layers=tuple(layers),
            sparsity={"method": "none"}, chat_template=getattr(tok, "chat_template", None))
        return w.finish(manifest)

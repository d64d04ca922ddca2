"""Export a Hugging Face causal LM to an edgesparse package (workstation side)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from edgesparse import __version__
from edgesparse.config import ModelConfig
from edgesparse.errors import EdgesparseError
from edgesparse.format import FLOAT32_ROLES, LayerEntry, Manifest
from edgesparse import tiles
from edgesparse.quant import GROUP, int4_values, quantize_int4, quantize_int8_groups, quantize_rows

from . import archs, source
from .onnx_layer import build_attention_graph
from .outdir import check_output
from .quiet import hushed
from .writer import PackageWriter

STORAGE_DTYPES = ("float32", "float16", "int8", "int4")


def rope_tables(cfg, seq_len: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin tables [max_position, rotary_dim/2] for GroupQueryAttention.

    transformers' own rope init functions give inv_freq and the attention scaling for every rope
    type (default, linear, llama3, yarn, longrope, ...), so scaled variants need no code here.
    seq_len: LongRoPE picks its short or long factors by the sequence length (long past
    original_max_position_embeddings), as transformers' longrope_frequency_update does.
    """
    import torch
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    rs = getattr(cfg, "rope_scaling", None) or {}
    rope_type = rs.get("rope_type", rs.get("type", "default"))
    if rope_type == "dynamic":
        raise EdgesparseError("rope_scaling 'dynamic' changes with sequence length; not supported")
    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise EdgesparseError(f"rope_scaling type {rope_type!r} is not supported")
    fn = ROPE_INIT_FUNCTIONS[rope_type]
    inv_freq, scaling = fn(cfg, torch.device("cpu")) if seq_len is None else fn(cfg, torch.device("cpu"), seq_len)
    pos = torch.arange(cfg.max_position_embeddings, dtype=torch.int64).float()
    freqs = torch.outer(pos, inv_freq.float())          # [P, rot/2]
    return ((freqs.cos() * scaling).numpy().astype(np.float32),
            (freqs.sin() * scaling).numpy().astype(np.float32))


def model_config(arch: archs.Arch, cfg, tok: source.SourceTokenizer, hf, g: dict) -> ModelConfig:
    """g: arch.extract_globals(hf), which says which optional global tensors the model has."""
    # A GGUF's end-of-generation ids are llama.cpp's, complete; an HF model's config may name EOS
    # ids its tokenizer does not (Llama-3's config lists <|eot_id|> and <|eom_id|> too).
    eos = cfg.eos_token_id
    eos = [] if eos is None or tok.from_gguf else ([eos] if isinstance(eos, int) else list(eos))
    eos += [i for i in tok.eos_token_ids if i not in eos]
    ffn0 = arch.extract_ffn(arch.layer_modules(hf)[0])
    return ModelConfig(
        arch=arch.name, d_model=cfg.hidden_size, n_layers=cfg.num_hidden_layers,
        n_heads=cfg.num_attention_heads, n_kv_heads=arch.n_kv_heads(cfg), head_dim=arch.head_dim(cfg),
        ffn_dim=arch.ffn_dim(cfg), vocab_size=cfg.vocab_size, max_position=cfg.max_position_embeddings,
        norm=arch.norm, norm_eps=arch.norm_eps(cfg), activation=arch.activation(cfg), gated=arch.gated,
        ffn_bias="ffn_bias_in" in ffn0, tie_embeddings="lm_head" not in g,
        embed_scale=arch.embed_scale(cfg), bos_token_id=tok.bos_token_id, eos_token_ids=tuple(eos),
        block=arch.block_for(cfg), rotary_dim=arch.rotary_dim(cfg), rope_long_after=arch.rope_long_after(cfg),
        learned_positions="pos_embed" in g, embed_dim=arch.embed_dim(cfg), final_norm="final_norm.weight" in g,
        head_bias="lm_head.bias" in g)


def _stored(name: str, a: np.ndarray, dtype: str, importance: dict | None = None,
            role: str | None = None) -> list[tuple]:
    """One tensor as written: float32 / float16 as is; int4 and int8 in groups of 32 (edgesparse/
    quant.py's Q4_0 / Q8_0 encodings) repacked into 16-row tiles, an FFN (role "ffn") into blocks
    of 16 neurons (edgesparse/tiles.py); int8 rows that are not whole groups as (values, name.scale)
    with one float32 scale per row. importance: imatrix.py's, used by int4 when it has name."""
    if dtype not in ("int8", "int4"):
        return [(name, a, dtype)]
    if a.shape[-1] % GROUP:
        if dtype == "int4":
            raise EdgesparseError(f"--dtype int4: tensor {name!r} has rows of {a.shape[-1]} values; int4 stores "
                                  f"groups of {GROUP}, so rows must be a multiple of {GROUP} (use int8)")
        q, s = quantize_rows(a)
        return [(name, q, "int8"), (name + ".scale", s, "float32")]
    imp = (importance or {}).get(name)
    if dtype == "int4":
        packed, s = quantize_int4(a, imp)
        q, bits = int4_values(packed), 4
    else:
        (q, s), bits = quantize_int8_groups(a), 8
    if role == "ffn":
        return [(name, tiles.to_ffn_blocks(q, s, bits), f"q{bits}ffn", a.shape)]
    if a.ndim != 2:
        raise EdgesparseError(f"--dtype {dtype}: tensor {name!r} of shape {list(a.shape)} is not a matrix")
    return [(name, tiles.to_tiles(q, s, bits), f"q{bits}x16", a.shape)]


# Tensors the kernels read as float32 whatever --dtype says: norms, biases, rotary tables,
# positions (tiny, and every activation passes through them).
_KEEP_FLOAT32 = set(FLOAT32_ROLES) | {"final_norm.weight", "final_norm.bias", "lm_head.bias", "pos_embed"}


# The embedding and lm_head are read in every token (the lm_head whole) and their rounding errors
# reach every logit: int4 packages keep them int8 unless told otherwise, as llama.cpp's Q4_0 keeps
# its output matrix at Q8_0. SmolLM2, WikiText-2 16 x 1024, measured with plain Q4_0 scales: int4
# everywhere 32.47, int4 with an int8 embedding/lm_head 29.46 (float32 22.75; llama.cpp Q4_0
# 28.68); with quant.py's scale search and the int8 head, 28.53 (28.60 with the int8-rounded
# activations the kernels now multiply with).
_HEAD_DEFAULT = {"int4": "int8"}


def export(model: str | None, out: Path, dtype: str = "float32", force: bool = False,
           progress: bool = True, head_dtype: str | None = None, calibrate: str | None = None) -> Path:
    """Export MODEL into the package directory `out`. dtype: storage of every weight matrix;
    head_dtype: of the embedding and lm_head (default: dtype, int8 for int4); calibrate: text
    (file, 'wikitext2', hub dataset id) whose activations weigh int4 rounding errors (imatrix.py).
    progress False (`-q`) also silences transformers for the duration (quiet.py)."""
    if dtype not in STORAGE_DTYPES:
        raise EdgesparseError(f"--dtype: expected one of {STORAGE_DTYPES}, got {dtype!r}")
    head_dtype = head_dtype or _HEAD_DEFAULT.get(dtype, dtype)
    if head_dtype not in STORAGE_DTYPES:
        raise EdgesparseError(f"--head-dtype: expected one of {STORAGE_DTYPES}, got {head_dtype!r}")
    out = Path(out)
    check_output(out, force)            # before the model loads: a bad -o fails in the first second
    with hushed(not progress):
        return _export(model, out, dtype, force, progress, head_dtype, calibrate)


def _export(model: str | None, out: Path, dtype: str, force: bool, progress: bool, head_dtype: str,
            calibrate: str | None) -> Path:
    from tqdm.auto import tqdm
    src = source.resolve(model)
    # a GGUF's tokenizer comes from its metadata alone: an unsupported one is refused before anything loads
    gguf_tok = source.load_tokenizer(src) if src.gguf_file is not None else None
    cfg = source.load_config(src)
    arch = archs.lookup(cfg.model_type)          # before loading weights: fail fast
    arch.check(cfg)
    tok = gguf_tok or source.load_tokenizer(src)
    hf = source.load_model(src, cfg)
    g = arch.extract_globals(hf)
    mc = model_config(arch, cfg, tok, hf, g)
    st = lambda role: ("float32" if role in _KEEP_FLOAT32 else  # noqa: E731
                       head_dtype if role in ("embed", "lm_head") else dtype)
    importance, imp_desc = None, None
    if calibrate and "int4" in (dtype, head_dtype):
        from .imatrix import input_importance
        importance, imp_desc = input_importance(hf, arch, tok, calibrate, progress)
    stored = lambda name, a, role: _stored(name, a, st(role), importance, role)  # noqa: E731

    with PackageWriter(out, force) as w:
        layers = []
        ropes: set[str] = set()     # rotary tables written so far (Gemma-3 has a local and a global one)
        rope_tensors = []
        mods = arch.layer_modules(hf)
        for l, mod in enumerate(tqdm(mods, desc="export layers", unit="layer", disable=not progress,
                                     file=sys.stderr)):
            graph = build_attention_graph(arch.attention_spec(cfg, l), l)
            w.blob(f"attn/{l:03d}.onnx", graph.SerializeToString(), "onnx")
            p = f"layers.{l}."
            t = arch.extract_layer(mod)
            ffn_roles = ("ffn", "ffn_bias_in", "ffn_bias_out")
            w.raw(f"attn/{l:03d}.bin", [x for r, a in t.items() if r not in ffn_roles for x in stored(p + r, a, r)])
            w.raw(f"ffn/{l:03d}.bin", [x for r in ffn_roles if r in t for x in stored(p + r, t[r], r)])
            names = {r: p + r for r in t}
            if mc.rotary_dim:
                table, rcfg = arch.rope_config(cfg, l)
                if table not in ropes:
                    cos, sin = rope_tables(rcfg)
                    rope_tensors += [(table + ".cos", cos, "float32"), (table + ".sin", sin, "float32")]
                    if mc.rope_long_after:
                        cos, sin = rope_tables(rcfg, seq_len=mc.rope_long_after + 1)
                        rope_tensors += [(table + ".long.cos", cos, "float32"), (table + ".long.sin", sin, "float32")]
                    ropes.add(table)
                names.update(rope_cos=table + ".cos", rope_sin=table + ".sin")
                if mc.rope_long_after:
                    names.update(rope_cos_long=table + ".long.cos", rope_sin_long=table + ".long.sin")
            layers.append(LayerEntry(attention=f"attn/{l:03d}.onnx", threshold=0.0, **names))
        w.raw("embed.bin", [x for n in ("embed", "pos_embed", "embed_proj_in") if n in g for x in stored(n, g[n], n)])
        head = [n for n in ("lm_head", "lm_head.bias", "head_proj_out") if n in g]
        if head:
            w.raw("head.bin", [x for n in head for x in stored(n, g[n], n)])
        norm = [n for n in ("final_norm.weight", "final_norm.bias") if n in g]
        if norm:
            w.raw("norm.bin", [(n, g[n], "float32") for n in norm])
        if rope_tensors:
            w.raw("rope.bin", rope_tensors)
        w.blob("tokenizer.json", tok.tokenizer.to_str().encode("utf-8"), "tokenizer")
        manifest = Manifest(
            config=mc, source=src.describe(),
            exporter={"name": "edgesparse", "version": __version__, "dtype": dtype, "head_dtype": head_dtype,
                      **({"int4_importance": imp_desc} if imp_desc else {})},
            files=w.files, tensors=w.tensors, layers=tuple(layers),
            sparsity={"method": "none"}, chat_template=tok.chat_template)
        return w.finish(manifest)

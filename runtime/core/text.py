"""Tokenizer and chat template on the device: `tokenizers` + a sandboxed Jinja template."""

from __future__ import annotations

from edgesparse.errors import EdgesparseError


class TextCodec:
    def __init__(self, pkg):
        from tokenizers import Tokenizer
        path = pkg.file("tokenizer.json")
        try:
            self.tok = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON
            raise EdgesparseError(f"{path}: not a valid tokenizers file ({str(e)[:200]})") from None
        self.template = pkg.manifest.chat_template
        cfg = pkg.config
        self.bos = self.tok.id_to_token(cfg.bos_token_id) if cfg.bos_token_id is not None else ""
        self.eos = self.tok.id_to_token(cfg.eos_token_ids[0]) if cfg.eos_token_ids else ""

    def encode(self, text: str, special: bool = True) -> list[int]:
        return self.tok.encode(text, add_special_tokens=special).ids

    def decode(self, ids) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)

    def chat_prompt(self, user: str) -> list[int]:
        """Token ids of a one-turn chat, rendered like transformers' apply_chat_template
        (sandboxed Jinja, trim_blocks + lstrip_blocks, generation prompt appended)."""
        if not self.template:
            raise EdgesparseError("--chat: this package has no chat template")
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        try:
            text = env.from_string(self.template).render(
                messages=[{"role": "user", "content": user}], add_generation_prompt=True,
                bos_token=self.bos, eos_token=self.eos)
        except TemplateError as e:   # syntax errors, and the sandbox refusing unsafe access
            msg = " ".join(str(e).split())[:200]
            raise EdgesparseError(f"manifest chat_template: {type(e).__name__}: {msg}") from None
        # The template writes the special tokens itself, as apply_chat_template does.
        return self.encode(text, special=False)


class StreamDecoder:
    """Turns a growing list of ids into newly printable text. Decoding the whole suffix each time
    handles tokens that only form a character together; a trailing U+FFFD means an incomplete
    UTF-8 sequence, held back until the next token completes it."""

    def __init__(self, codec: TextCodec):
        self.codec, self.ids, self.printed = codec, [], 0

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.codec.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        new, self.printed = text[self.printed:], len(text)
        return new

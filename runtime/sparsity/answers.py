"""The dense model's own greedy answers to chat instructions: the reference every configuration
is teacher-forced on (chat_eval.py) and the transcripts chat calibration observes (calibrate.py).

Generating them is the slow part (one decode step per token, ~100 instructions x 32 tokens), so
they are computed once per package and cached as JSON under the cache directory, keyed by what
they depend on: the dense model's files (weights, graphs, tokenizer; not the manifest, which
calibrate rewrites, nor the predictor), the chat template, the instructions and the length.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from edgesparse.errors import EdgesparseError
from edgesparse.progress import Progress

from ..core.generate import generate
from ..core.sampling import Sampler
from .chatdata import InstructionSet
from .levels import kept

CACHE_ENV = "EDGESPARSE_CACHE"          # the same cache root as export's joined GGUFs
VERSION = 1                             # bump when what an answer means changes


@dataclass(frozen=True)
class Answer:
    id: str
    prompt: tuple[int, ...]     # the rendered one-turn chat prompt's ids
    answer: tuple[int, ...]     # the dense greedy answer, at most `tokens` ids, EOS included if reached


def default_cache() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "edgesparse") / "answers"


def model_key(pkg) -> str:
    """sha256 over what the dense model's output depends on."""
    m = pkg.manifest
    pred = {m.tensors[n].file for l in m.layers for n in (l.pred_q, l.pred_scale) if n}
    h = hashlib.sha256()
    for path in sorted(m.files):
        if path not in pred:
            h.update(f"{path} {m.files[path].sha256}\n".encode())
    h.update((m.chat_template or "").encode())
    return h.hexdigest()


def dense_answers(model, codec, items: InstructionSet, tokens: int, cache: Path | None = None,
                  progress: bool = True) -> list[Answer]:
    """The dense model's greedy answers of up to `tokens` ids to every instruction of `items`,
    from `cache` (a directory; None: no cache) when there, else generated and stored."""
    if tokens < 1:
        raise EdgesparseError(f"--answer-tokens {tokens}: expected a positive number")
    key = hashlib.sha256(f"v{VERSION} {model_key(model.pkg)} {items.sha256} {tokens}".encode()).hexdigest()[:24]
    path = None if cache is None else Path(cache) / f"{key}.json"
    if path is not None and path.is_file():
        try:
            doc = json.loads(path.read_text())
            return [Answer(d["id"], tuple(d["prompt"]), tuple(d["answer"])) for d in doc["answers"]]
        except (OSError, ValueError, KeyError, TypeError):
            pass                                  # a damaged cache entry: generate it again
    prompts = [codec.chat_prompt(i.text) for i in items.items]
    longest = max(len(p) for p in prompts) + tokens
    if longest > model.ctx:
        raise EdgesparseError(f"{items.name}: a prompt and its answer need {longest} tokens, more than the "
                              f"context of {model.ctx} (raise --ctx)")
    out = []
    bar = Progress(len(prompts), f"dense answers ({items.name})", progress)
    with kept(model):
        model.configure("dense")
        for item, p in zip(items.items, prompts):
            ids, _ = generate(model, p, tokens, Sampler(0.0))
            out.append(Answer(item.id, tuple(p), tuple(ids)))
            bar.update()
    if path is not None:
        _store(path, {"package": str(model.pkg.path), "instructions": items.name, "tokens": tokens,
                      "answers": [{"id": a.id, "prompt": list(a.prompt), "answer": list(a.answer),
                                   "text": codec.decode(a.answer)} for a in out]})
    return out


def _store(path: Path, doc: dict) -> None:
    """Write atomically; a cache that cannot be written is not an error (the answers are in hand)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(doc) + "\n")
        os.replace(tmp, path)
    except OSError:
        pass


def transcripts(answers: list[Answer], whole: bool = False) -> list[tuple[list[int], int]]:
    """Chat transcripts for calibration: (prompt + answer ids, first position to observe): the
    answer's positions (the tokens a sparse decode runs on), or every position with whole=True."""
    return [(list(a.prompt) + list(a.answer), 0 if whole else len(a.prompt)) for a in answers]

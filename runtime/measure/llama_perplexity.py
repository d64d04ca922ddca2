"""eval --against llama.cpp: llama.cpp's own llama-perplexity, and the exact token windows it scores,
so that edgesparse can score the same ones.

What llama-perplexity does by default (tools/perplexity/perplexity.cpp, `perplexity()`), given
`-f FILE -c CTX --chunks N`:

  - tokenizes the file's text itself, minus one trailing newline (common's -f handler), with the
    vocabulary's BOS in front when the model adds one, special tokens not parsed;
  - cuts the tokens into non-overlapping chunks of CTX from the start, and replaces the first token
    of every chunk by BOS when the model adds one;
  - scores only the second half of each chunk: positions CTX/2 .. CTX-2 predict tokens
    CTX/2+1 .. CTX-1 (CTX - CTX/2 - 1 predictions per chunk), every chunk from an empty cache;
  - refuses a text of fewer than 2 x CTX tokens.

edgesparse's own eval scores all CTX-1 positions of windows of the package tokenizer's ids (no BOS),
so its main figures are not comparable with llama-perplexity's. For the comparison, `windows`
rebuilds llama-perplexity's chunks from llama.cpp's own tokenization (llama-tokenize with the
flags that match), and the runtime scores the same positions of the same tokens
(sparsity/evaluate.py `dense_perplexity(..., first=CTX // 2)`).
"""

from __future__ import annotations

import math
import re
import subprocess
from pathlib import Path

import numpy as np

from edgesparse.errors import EdgesparseError


def perplexity_text(text: str) -> str:
    """The string llama-perplexity tokenizes from a file holding `text`: -f drops one trailing newline."""
    return text[:-1] if text.endswith("\n") else text


def tokenize(exe: str, gguf: str, text: str) -> list[int]:
    """llama.cpp's tokens of `text` as llama-perplexity makes them (common_tokenize with
    add_special=true, parse_special=false, no escape processing): BOS first if the model adds it."""
    cmd = [str(exe), "-m", str(gguf), "--stdin", "--ids", "--no-escape", "--no-parse-special", "--log-disable"]
    p = subprocess.run(cmd, input=text.encode("utf-8"), capture_output=True)
    line = next((ln for ln in p.stdout.decode().splitlines() if ln.startswith("[")), None)
    if p.returncode or line is None:
        last = (p.stderr.decode(errors="replace").strip().splitlines() or ["no output"])[-1]
        raise EdgesparseError(f"llama-tokenize failed on {gguf} (exit {p.returncode}): {last}")
    return [int(x) for x in line.strip("[] \n").split(",") if x.strip()]


def bos_token(exe: str, gguf: str) -> int | None:
    """The BOS id llama.cpp puts in front of every chunk, or None when the model adds none: the
    tokens of the empty string are [BOS] or []."""
    ids = tokenize(exe, gguf, "")
    return ids[0] if ids else None


def windows(ids: list[int], bos: int | None, ctx: int, count: int | None) -> np.ndarray:
    """llama-perplexity's chunks [n, ctx] of its token stream, BOS in the first slot of each when
    the model adds one; n = min(count, len(ids) // ctx)."""
    if len(ids) < 2 * ctx:
        raise EdgesparseError(f"--against llama.cpp: the text is {len(ids)} llama.cpp tokens; llama-perplexity "
                              f"needs at least 2 x --ctx = {2 * ctx}")
    n = len(ids) // ctx if count is None else min(count, len(ids) // ctx)
    w = np.asarray(ids[: n * ctx], np.int64).reshape(n, ctx).copy()
    if bos is not None:
        w[:, 0] = bos
    return w


def run(exe: str, gguf: str, text_file: str, ctx: int, chunks: int, threads: int) -> dict:
    """llama-perplexity's result on the first `chunks` chunks of CTX tokens: perplexity from its mean
    NLL (printed with 6 decimals by --ppl-output-type 1), the per-chunk running values, its own
    final estimate and uncertainty, and the command."""
    cmd = [str(exe), "-m", str(gguf), "-f", str(text_file), "-c", str(ctx), "--chunks", str(chunks),
           "-t", str(threads), "--ppl-output-type", "1"]
    p = subprocess.run(cmd, capture_output=True, text=True)
    # one line per chunk: start token, running perplexity, running mean NLL, its standard error
    rows = [m.groups() for m in re.finditer(r"^\s*(\d+)\s+([\d.]+)\s+([\d.]+)\s+(\S+)\s*$", p.stdout, re.M)]
    final = re.search(r"Final estimate: PPL = ([\d.]+) \+/- ([\d.]+)", p.stderr)
    if p.returncode or len(rows) != chunks or final is None:
        last = (p.stderr.strip().splitlines() or ["no output"])[-1]
        raise EdgesparseError(f"llama-perplexity failed on {Path(gguf).name} (exit {p.returncode}, "
                              f"{len(rows)} of {chunks} chunks): {last}")
    nll = float(rows[-1][2])
    return {"perplexity": math.exp(nll), "mean_nll": nll, "running_perplexity": [float(r[1]) for r in rows],
            "final_estimate": float(final[1]), "final_uncertainty": float(final[2]), "command": cmd}


def first_difference(ours: list[int], theirs: list[int]) -> int | None:
    """Where the package tokenizer's ids first differ from llama.cpp's (BOS stripped), over the
    shorter of the two; None when they agree."""
    n = min(len(ours), len(theirs))
    a, b = np.asarray(ours[:n]), np.asarray(theirs[:n])
    diff = np.flatnonzero(a != b)
    return int(diff[0]) if diff.size else None

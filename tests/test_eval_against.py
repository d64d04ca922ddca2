"""eval --against llama.cpp: llama.cpp's own llama-perplexity, and edgesparse scoring exactly the
tokens and positions it scores (runtime/measure/llama_perplexity.py). The real checks need the tools
(devices/llama.cpp/build: skipped without them, a failure in CI) and, for the model, SmolLM2."""

from __future__ import annotations

import json
import re
import subprocess

import numpy as np
import pytest

from edgesparse.cli import main
from edgesparse.errors import EdgesparseError
from edgesparse.runtime.measure import llama_perplexity as lp

# Plain text that llama.cpp tokenizes differently under each wrong flag: escapes processed (`\n`
# written as two characters), special tokens parsed (<|im_start|>), the trailing newline kept.
TRICKY = "A line with an escape \\n\\n\\n and <|im_start|> a special token,\r\n  tabs\tand  spaces.\n"


def test_windows_are_llama_perplexity_chunks():
    ids = list(range(1000, 1350))
    w = lp.windows(ids, None, 100, None)
    assert w.shape == (3, 100) and w[1, 0] == 1100 and w[2, 99] == 1299           # whole chunks from the start
    assert lp.windows(ids, None, 100, 2).shape == (2, 100)
    assert lp.windows(ids, None, 100, 9).shape == (3, 100)
    wb = lp.windows(ids, 1, 100, None)                                             # BOS replaces each first token
    assert (wb[:, 0] == 1).all() and (wb[:, 1:] == w[:, 1:]).all()
    with pytest.raises(EdgesparseError, match="the text is 350 llama.cpp tokens; llama-perplexity needs at least "
                       r"2 x --ctx = 400"):
        lp.windows(ids, None, 200, None)
    assert lp.perplexity_text("a\n\n") == "a\n" and lp.perplexity_text("a") == "a"
    assert lp.first_difference([1, 2, 3], [1, 2, 3, 4]) is None and lp.first_difference([1, 5, 3], [1, 2, 3]) == 1


def test_tokens_are_the_ones_llama_perplexity_reads(llama_cpp_bin, smol_gguf, tmp_path):
    """llama-perplexity's own count of the tokens in a file (it names it when the text is shorter
    than two chunks) equals the count of what lp.tokenize returns for that file's text; each wrong
    flag (escapes, special tokens, the trailing newline) would change it."""
    f = tmp_path / "t.txt"
    f.write_text(TRICKY, newline="")
    p = subprocess.run([str(llama_cpp_bin / "llama-perplexity"), "-m", str(smol_gguf), "-f", str(f), "-c", "64"],
                       capture_output=True, text=True, timeout=600)
    theirs = int(re.search(r"tokenizes to only (\d+) tokens", p.stderr)[1])
    ours = lp.tokenize(llama_cpp_bin / "llama-tokenize", smol_gguf, lp.perplexity_text(TRICKY))
    kept = lp.tokenize(llama_cpp_bin / "llama-tokenize", smol_gguf, TRICKY)
    print(f"llama-perplexity reads {theirs} tokens; lp.tokenize {len(ours)} (trailing newline kept: {len(kept)})")
    assert len(ours) == theirs and len(kept) != theirs
    assert lp.bos_token(llama_cpp_bin / "llama-tokenize", smol_gguf) is None       # SmolLM2 adds no BOS


@pytest.mark.slow
def test_eval_against_llama_perplexity(smollm2_pkg, smol_gguf_as, llama_cpp_bin, tmp_path, capsys):
    """SmolLM2 on 2 chunks of 128 WikiText-2 test tokens: the package (the embedded Q4_1 dequantized
    to float32) against llama.cpp on the same Q4_1 weights requantized to F32 by llama-quantize
    (exact: both engines multiply the same float32 weights). What remains is arithmetic: llama.cpp
    stores the KV cache in float16 and sums in other orders. Measured 1e-5 apart; the tolerance,
    1e-3 relative (a mean NLL 0.001 nats apart), is 100 times that, and tight enough to catch
    scoring one position too many or too few per chunk, or the wrong chunk (checked below)."""
    from edgesparse.runtime.core.model import Model
    from edgesparse.runtime.sparsity.evaluate import dense_perplexity
    from edgesparse.runtime.sparsity.textdata import wikitext
    gguf = smol_gguf_as("F32")
    out = tmp_path / "e"
    rc = main(["eval", str(smollm2_pkg), "--text", "wikitext2", "--ctx", "128", "--windows", "2", "--sparsity", "0",
               "--against", "llama.cpp", "--gguf", str(gguf), "-o", str(out), "-q"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    ag = json.loads((out / "eval.json").read_text())["against"]
    print({k: v for k, v in ag.items() if k != "command"})
    assert (ag["chunks"], ag["first_scored"], ag["predictions"], ag["bos"]) == (2, 64, 2 * 63, None)
    assert ag["gguf_type"] == "F32" and ag["package_dtype"] == "float32"
    # what we read from llama-perplexity is what it printed itself (its final estimate: 4 decimals)
    assert ag["final_estimate"] == pytest.approx(ag["perplexity"], abs=6e-5)
    assert ag["tokenizer_first_difference"] is None       # the main table scored llama.cpp's tokens too
    rel = ag["edgesparse_perplexity"] / ag["perplexity"] - 1
    print(f"llama.cpp F32 {ag['perplexity']:.6f}, edgesparse float32 {ag['edgesparse_perplexity']:.6f} on the same "
          f"tokens and positions: {rel:+.2e}")
    assert abs(rel) < 1e-3
    md = (out / "eval.md").read_text()
    assert "positions 64..126 predicting the second half of each chunk (126 predictions in all)" in md
    assert f"| llama.cpp, llama-perplexity | {gguf.name} (F32) | {ag['perplexity']:.4f} |" in md
    # the tolerance discriminates: the wrong positions or the wrong chunk are further apart than it
    m = Model(smollm2_pkg, ctx=128, max_batch=128)
    ids = lp.tokenize(llama_cpp_bin / "llama-tokenize", gguf, lp.perplexity_text(wikitext("test")))
    chunks = lp.windows(ids, None, 128, 3)
    assert dense_perplexity(m, chunks[:2], 64) == pytest.approx(ag["edgesparse_perplexity"], rel=1e-9)
    for what, p in (("positions from 63", dense_perplexity(m, chunks[:2], 63)),
                    ("positions from 65", dense_perplexity(m, chunks[:2], 65)),
                    ("all positions", dense_perplexity(m, chunks[:2], 0)),
                    ("chunks 2 and 3", dense_perplexity(m, chunks[1:], 64))):
        print(f"{what}: {p:.4f} ({p / ag['perplexity'] - 1:+.2e})")
        assert abs(p / ag["perplexity"] - 1) > 3e-3
    # chunk by chunk: llama-perplexity's running value after the first chunk is ours on it alone
    first = dense_perplexity(m, chunks[:1], 64)
    assert first == pytest.approx(ag["running_perplexity"][0], rel=1e-3, abs=6e-5)
    assert np.isfinite(first)

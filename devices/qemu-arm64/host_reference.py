"""Host side of devices/qemu-arm64/check: export the tiny random Llama and record transformers'
outputs for it.

    python devices/qemu-arm64/host_reference.py OUT_DIR

Writes OUT_DIR/tiny.esp (float32), OUT_DIR/tiny16.esp (float16 weights), OUT_DIR/reference.npz
and OUT_DIR/run_expected.txt. The model is the test suite's `tiny_llama_dir` (tests/conftest.py:
same TINY sizes, seed 0, untied lm_head, WordLevel tokenizer w0..w210), built with conftest's own
helpers so that the two cannot drift apart. Needs torch and transformers (the [export] extra);
device_check.py, which reads the result on the emulated board, needs neither.
"""

from __future__ import annotations

import copy
import importlib.util
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
PROMPT = "w5 w6 w7 w8 w9"      # WordLevel + whitespace pre-tokenizer: token ids 5..9, no BOS added
N_NEW = 20


def _conftest():
    sys.dont_write_bytecode = True     # leave no __pycache__ in the checkout
    spec = importlib.util.spec_from_file_location("edgesparse_tests_conftest", ROOT / "tests" / "conftest.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)       # also sets HF_HUB_OFFLINE: nothing here may reach the hub
    return mod


def main(out: Path) -> None:
    import torch
    from tokenizers import Tokenizer
    from transformers import LlamaForCausalLM

    ct = _conftest()
    out.mkdir(parents=True, exist_ok=True)
    hf_dir = ct._make_tiny(out / "hf", seed=0, tie_word_embeddings=False)
    ct._export(hf_dir, out / "tiny.esp")
    ct._export(hf_dir, out / "tiny16.esp", dtype="float16")

    torch.set_grad_enabled(False)
    hf = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    hf16 = copy.deepcopy(hf)
    for p in hf16.parameters():      # as tests/test_tiny_llama.py: round the weights, not inv_freq
        p.data = p.data.half().float()

    def logits(model, ids):
        return model(torch.tensor(np.asarray(ids))[None]).logits[0].double().numpy()

    # Same token sequences as tests/test_tiny_llama.py: 24 tokens take the Numba prefill kernel
    # (<= SMALL_BATCH), 100 tokens the BLAS + glu_threshold path.
    ids = np.random.default_rng(1234).integers(0, 211, 24)
    long_ids = np.random.default_rng(99).integers(0, 211, 100)

    tok = Tokenizer.from_file(str(out / "tiny.esp" / "tokenizer.json"))
    prompt_ids = tok.encode(PROMPT).ids
    greedy = ct._hf_greedy(hf, prompt_ids, N_NEW)
    eos = hf.generation_config.eos_token_id
    # how far the greedy path is from a tie: a margin far above the logit tolerance means the
    # emulated run must pick the same tokens
    path = logits(hf, prompt_ids + greedy[:-1])[len(prompt_ids) - 1:]
    top2 = np.sort(path, axis=1)[:, -2:]
    margin = float((top2[:, 1] - top2[:, 0]).min())

    np.savez(out / "reference.npz", ids=ids, long_ids=long_ids,
             logits=logits(hf, ids), long_logits=logits(hf, long_ids), logits_f16w=logits(hf16, ids),
             prompt_ids=np.array(prompt_ids), greedy=np.array(greedy), greedy_margin=margin)
    # what `edgesparse run -p PROMPT -n N_NEW` prints: the generated tokens without EOS, then "\n"
    text = tok.decode([g for g in greedy if g != eos], skip_special_tokens=True)
    (out / "run_expected.txt").write_text(text + "\n")
    (out / "run_prompt.txt").write_text(PROMPT)
    print(f"exported tiny.esp, tiny16.esp; greedy {len(greedy)} tokens, min top-1/top-2 margin {margin:.3g}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(Path(sys.argv[1]))

"""Registered architectures besides Llama, on tiny random-initialised configs built from
transformers' own config classes (no download), checked against transformers itself.

Mistral: sliding-window attention. The window (8) is shorter than the test sequence (40), so a
wrong mapping of HF's `sliding_window` onto ORT's `local_window_size` (off by one, or ignored)
changes the logits of every position past the window.
Qwen2: q/k/v biases (packed into one qkv bias) and an untied lm_head. transformers initialises
biases to zero, so the fixture makes them random: a dropped or misplaced bias must show.
"""

from __future__ import annotations

import numpy as np
import pytest

# float32 against float32 with different summation orders (ORT's GQA/MLAS vs torch): the tiny
# Llama shows ~3e-7; 2e-5 leaves room for the bias adds and masking without hiding a bug
# (a wrong window or a missing bias moves logits by 1e-2 and more).
ATOL = 2e-5

ARCHS = {
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=8)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(use_sliding_window=False, tie_word_embeddings=False)),
}


def _random_biases(model) -> None:
    import torch
    g = torch.Generator().manual_seed(7)
    for name, p in model.named_parameters():
        if name.endswith(".bias"):
            p.data = torch.randn(p.shape, generator=g) * 0.5


@pytest.fixture(scope="module", params=sorted(ARCHS))
def arch(request, tiny_model_factory, tmp_path_factory):
    import torch
    from edgesparse.export import export
    cfg_cls, model_cls, over = ARCHS[request.param]
    d = tiny_model_factory(cfg_cls, model_cls, seed=3, init=_random_biases, **over)
    import transformers
    torch.set_grad_enabled(False)
    hf = getattr(transformers, model_cls).from_pretrained(d, dtype=torch.float32).eval()
    pkg = export(str(d), tmp_path_factory.mktemp(request.param) / "m.esp", progress=False)
    return request.param, hf, pkg


def test_prefill_logits_match_transformers(arch):
    import torch
    from edgesparse.runtime.model import Model
    name, hf, pkg = arch
    ids = np.random.default_rng(0).integers(3, 211, 40)
    ref = hf(torch.tensor(ids[None])).logits[0].numpy()
    out = Model(pkg, ctx=64).forward(ids, all_logits=True)
    d = np.abs(out - ref).max()
    print(f"{name}: prefill max |dlogit| {d:.2e}")
    assert d < ATOL


def test_decode_logits_and_greedy_tokens_match_transformers(arch):
    import torch
    from edgesparse.runtime.model import Model
    name, hf, pkg = arch
    prompt = np.random.default_rng(1).integers(3, 211, 6)
    x = torch.tensor(prompt[None])
    gen = hf.generate(x, max_new_tokens=30, min_new_tokens=30, do_sample=False,
                      attention_mask=torch.ones_like(x), output_logits=True, return_dict_in_generate=True,
                      pad_token_id=0)
    ref_tokens = gen.sequences[0, prompt.size:].tolist()
    ref_logits = torch.stack(gen.logits)[:, 0].numpy()
    m = Model(pkg, ctx=64)
    logits, toks, lg = m.forward(prompt), [], []
    for _ in range(30):
        lg.append(logits.copy())
        toks.append(int(logits.argmax()))
        logits = m.forward([toks[-1]])
    d = np.abs(np.array(lg) - ref_logits).max()
    print(f"{name}: 30 decode steps (positions 6..35, past the window for mistral) max |dlogit| {d:.2e}")
    assert toks == ref_tokens
    assert d < ATOL


def test_window_matters_for_mistral(tiny_model_factory, tmp_path):
    """Guard: the same Mistral weights without a window give different logits past position 8, so
    the comparison above really exercises the sliding window."""
    import torch
    import transformers
    cfg_cls, model_cls, over = ARCHS["mistral"]
    d = tiny_model_factory(cfg_cls, model_cls, seed=3, **over)
    hf = transformers.MistralForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    ids = torch.tensor(np.random.default_rng(0).integers(3, 211, 40)[None])
    with torch.no_grad():
        windowed = hf(ids).logits[0, 20:].numpy()
        hf.config.sliding_window = None
        full = transformers.MistralForCausalLM.from_pretrained(d, dtype=torch.float32, sliding_window=None)(ids).logits[0, 20:].numpy()
    print("window vs no window, max |dlogit| past the window:", np.abs(windowed - full).max())
    assert np.abs(windowed - full).max() > 1e-3


def test_qwen2_biases_are_exercised(arch):
    """Guard: the Qwen2 fixture's q/k/v biases are non-zero and move the logits."""
    import torch
    name, hf, _ = arch
    if name != "qwen2":
        pytest.skip("qwen2 only")
    biases = [m.bias for m in hf.modules() if isinstance(m, torch.nn.Linear) and m.bias is not None]
    assert biases and all(b.abs().max() > 0.1 for b in biases)
    ids = torch.tensor(np.random.default_rng(0).integers(3, 211, 12)[None])
    with torch.no_grad():
        with_b = hf(ids).logits.numpy()
        saved = [b.data.clone() for b in biases]
        for b in biases:
            b.data.zero_()
        without = hf(ids).logits.numpy()
        for b, s in zip(biases, saved):
            b.data = s
    print("qwen2 with vs without biases, max |dlogit|:", np.abs(with_b - without).max())
    assert np.abs(with_b - without).max() > 1e-3


def test_unsupported_architecture_lists_the_supported_ones():
    from edgesparse.errors import EdgesparseError
    from edgesparse.export.archs import REGISTRY, lookup
    with pytest.raises(EdgesparseError) as e:
        lookup("gpt2")
    for name in REGISTRY:
        assert name in str(e.value)

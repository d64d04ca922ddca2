"""Every registered architecture family, on tiny random-initialised configs built from
transformers' own config classes (no download), checked against transformers itself.

What each config is chosen to exercise (a mistake there moves the logits by 1e-2 or more):
- llama3: Llama-3 rope scaling, original_max_position_embeddings 32 so some frequencies are scaled.
- mistral: sliding window 8, shorter than the 40-token sequence.
- qwen2: q/k/v biases (random: transformers initialises biases to zero), untied lm_head.
- phi: parallel attention + MLP from one LayerNorm, partial rotary (half of each head), GELU fc1/fc2,
  biases everywhere including the lm_head.
- phi3: fused qkv and gate_up, LongRoPE with original_max_position_embeddings 16: the 40-token
  prefill uses the long factors, and decode from position 6 crosses the switch.
- opt / opt_post: ReLU fc1/fc2 with biases, learned positions (offset 2); opt_post is the post-LN
  variant (OPT-350m) with project_in/out (word_embed_proj_dim 64 != hidden 96).
- gemma3: GeGLU, RMSNorm(1 + w), q/k norms, sandwich norms, local (window 8, own rope base) and
  global (linear-scaled rope) layers, embeddings scaled by sqrt(D), query_pre_attn_scalar != hd.
Norm weights are made random too: the defaults (ones, or zeros for Gemma's 1 + w) would hide a
swapped or missing norm.
"""

from __future__ import annotations

import numpy as np
import pytest

# float32 against float32 with different summation orders (ORT's GQA/MLAS vs torch): the tiny
# Llama shows ~3e-7; 2e-5 leaves room for the bias adds, LayerNorm and masking without hiding a
# bug (a wrong window, norm or bias moves logits by 1e-2 and more).
ATOL = 2e-5
HD = 16          # head_dim of the tiny configs (96 / 6)

_LONGROPE = {"type": "longrope", "short_factor": [1.0 + 0.1 * i for i in range(HD // 2)],
             "long_factor": [1.5 + 0.7 * i for i in range(HD // 2)]}
ARCHS = {
    "llama3": ("LlamaConfig", "LlamaForCausalLM", dict(
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 32}, tie_word_embeddings=False)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=8)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(use_sliding_window=False, tie_word_embeddings=False)),
    # head_dim 32: ORT's GroupQueryAttention rotates a multiple of 16 dimensions (Phi-2: 32 of 80)
    "phi": ("PhiConfig", "PhiForCausalLM", dict(partial_rotary_factor=0.5, hidden_act="gelu_new",
                                                 num_attention_heads=3, num_key_value_heads=1)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(rope_scaling=_LONGROPE, original_max_position_embeddings=16,
                                                    pad_token_id=0, eos_token_id=2, tie_word_embeddings=False)),
    "opt": ("OPTConfig", "OPTForCausalLM", dict(ffn_dim=136, do_layer_norm_before=True, word_embed_proj_dim=96)),
    "opt_post": ("OPTConfig", "OPTForCausalLM", dict(ffn_dim=136, do_layer_norm_before=False,
                                                     word_embed_proj_dim=64)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        head_dim=HD, sliding_window=8, query_pre_attn_scalar=24, rope_local_base_freq=100.0,
        rope_scaling={"rope_type": "linear", "factor": 2.0}, pad_token_id=0,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"])),
}
# the module whose input is the FFN's neuron outputs h (its forward-pre-hook sees h)
DOWN = {"phi": "mlp.fc2", "opt": "fc2", "opt_post": "fc2"}


@pytest.fixture(scope="module", params=list(ARCHS))
def arch(request, tiny_model_factory, tmp_path_factory, randomize):
    import torch
    import transformers
    from edgesparse.export import export
    cfg_cls, model_cls, over = ARCHS[request.param]
    d = tiny_model_factory(cfg_cls, model_cls, seed=3, init=randomize, **over)
    torch.set_grad_enabled(False)
    hf = getattr(transformers, model_cls).from_pretrained(d, dtype=torch.float32).eval()
    pkg = export(str(d), tmp_path_factory.mktemp(request.param) / "m.esp", progress=False)
    return request.param, hf, pkg


def _layers(name, hf):
    return hf.model.decoder.layers if name.startswith("opt") else hf.model.layers


def _down(name, layer):
    m = layer
    for part in DOWN.get(name, "mlp.down_proj").split("."):
        m = getattr(m, part)
    return m


def test_config_describes_the_family(arch):
    from edgesparse.runtime.core.package import Package
    name, hf, pkg = arch
    cfg = Package(pkg).config
    want = {"llama3": ("pre", "rms", True, False), "mistral": ("pre", "rms", True, False),
            "qwen2": ("pre", "rms", True, False), "phi": ("parallel", "layer", False, True),
            "phi3": ("pre", "rms", True, False), "opt": ("pre", "layer", False, True),
            "opt_post": ("post", "layer", False, True), "gemma3": ("pre", "rms", True, False)}[name]
    assert (cfg.block, cfg.norm, cfg.gated, cfg.ffn_bias) == want
    assert cfg.rotary_dim == {"phi": 16, "opt": 0, "opt_post": 0}.get(name, HD)
    assert cfg.learned_positions == name.startswith("opt")
    assert cfg.rope_long_after == (16 if name == "phi3" else 0)
    assert (cfg.embed_dim != cfg.d_model) == (name == "opt_post")
    assert cfg.head_bias == (name == "phi")


def test_prefill_logits_match_transformers(arch, prefill_diff):
    name, hf, pkg = arch
    for S in (40, 90):      # 40: the Numba FFN kernel; 90 > 64: the BLAS prefill path
        d = prefill_diff(hf, pkg, S)
        print(f"{name}: prefill of {S} tokens, max |dlogit| {d:.2e}")
        assert d < ATOL


def test_decode_logits_and_greedy_tokens_match_transformers(arch):
    import torch
    from edgesparse.runtime.core.model import Model
    name, hf, pkg = arch
    prompt = np.random.default_rng(1).integers(3, 211, 6)
    x = torch.tensor(prompt[None])
    gen = hf.generate(x, max_new_tokens=30, min_new_tokens=30, do_sample=False,
                      attention_mask=torch.ones_like(x), output_logits=True, return_dict_in_generate=True,
                      pad_token_id=0)
    ref_tokens = gen.sequences[0, prompt.size:].tolist()
    ref_logits = torch.stack(gen.logits)[:, 0].numpy()
    # min_new_tokens makes generate mask EOS before its argmax (the logits it returns are raw)
    eos = hf.generation_config.eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    m = Model(pkg, ctx=64)
    logits, toks, lg = m.forward(prompt), [], []
    for _ in range(30):
        lg.append(logits.copy())
        choose = logits.copy()
        choose[eos] = -np.inf
        toks.append(int(choose.argmax()))
        logits = m.forward([toks[-1]])
    d = np.abs(np.array(lg) - ref_logits).max()
    print(f"{name}: 30 decode steps (positions 6..35) max |dlogit| {d:.2e}")
    assert toks == ref_tokens
    assert d < ATOL


def _thresholds_with_margin(h: np.ndarray, q: float) -> float:
    """A threshold near the q-quantile of the nonzero |h| (ReLU's exact zeros are dropped anyway)
    that sits in the middle of a wide gap between observed values, so that float32
    summation-order noise (~1e-6) cannot flip a neuron."""
    v = np.sort(np.abs(h).ravel())
    z = int(np.count_nonzero(v == 0))
    i0 = z + int(q * (v.size - z))
    lo, hi = max(1, i0 - v.size // 10), min(v.size - 1, i0 + v.size // 10)
    gaps = v[lo:hi] - v[lo - 1:hi - 1]
    j = lo + int(np.argmax(gaps))
    return float((v[j] + v[j - 1]) / 2)


def test_thresholded_semantics_match_transformers(arch):
    """The paper's rule |h| < t -> 0, in transformers through a forward-pre-hook on the down
    projection (its input is h), against the runtime's thresholded FFN: prefill on both FFN
    paths and token-by-token decode."""
    import torch
    from edgesparse.runtime.core.model import Model
    name, hf, pkg = arch
    ids = np.random.default_rng(2).integers(3, 211, 90)
    L = len(_layers(name, hf))
    t = [None] * L

    def hook(l):
        def pre(mod, args):
            h = args[0]
            if t[l] is None:             # first pass: choose t_l on this layer's (already sparse) input
                t[l] = _thresholds_with_margin(h[0].numpy(), 0.4)
            return (torch.where(h.abs() < t[l], torch.zeros_like(h), h),)
        return pre
    handles = [_down(name, layer).register_forward_pre_hook(hook(l)) for l, layer in enumerate(_layers(name, hf))]
    try:
        hf(torch.tensor(ids[None]))
        ref = hf(torch.tensor(ids[None])).logits[0].numpy()
        dense = None
    finally:
        for h in handles:
            h.remove()
    dense = hf(torch.tensor(ids[None])).logits[0].numpy()
    # (random tiny models: the FFN is a small part of the output; 1e-3 is still 50x ATOL)
    assert np.abs(ref - dense).max() > 1e-3, "the thresholds must change the output"
    for S in (40, 90):
        m = Model(pkg, ctx=128)
        m.set_thresholds(t, "paper")
        out = m.forward(ids[:S], all_logits=True)
        d = np.abs(out - ref[:S]).max()
        print(f"{name}: thresholded prefill of {S} tokens, max |dlogit| {d:.2e}, t = {np.round(t, 4)}")
        assert d < ATOL
        sparsity = 1 - m.counts[:, 0].sum() / m.counts[:, 1].sum()
        assert 0.35 < sparsity < 0.95, sparsity
    m = Model(pkg, ctx=128)
    m.set_thresholds(t, "paper")
    out = [m.forward(ids[:6]).copy()] + [m.forward([i]).copy() for i in ids[6:40]]   # logits at 5..39
    # LongRoPE: the 90-token reference runs every position with the long factors; decode does so
    # from the switch on (position rope_long_after, where it recomputes the sequence)
    start = max(5, m.cfg.rope_long_after)
    d = np.abs(np.array(out)[start - 5:] - ref[start:40]).max()
    print(f"{name}: thresholded decode, max |dlogit| {d:.2e}")
    assert d < ATOL


def test_ffn_layout_is_neuron_major_with_biases(arch):
    """Package FFN [N, R, D] and biases against the HF modules, fused projections split right."""
    from edgesparse.runtime.core.package import Package
    name, hf, pkg = arch
    p = Package(pkg)
    layer = _layers(name, hf)[1]
    ffn = np.asarray(p.tensor("layers.1.ffn"))
    w = lambda m: m.weight.detach().numpy()  # noqa: E731
    if name in ("phi", "opt", "opt_post"):
        mlp = layer.mlp if name == "phi" else layer
        assert ffn.shape[1] == 2
        np.testing.assert_array_equal(ffn[:, 0], w(mlp.fc1))
        np.testing.assert_array_equal(ffn[:, 1], w(mlp.fc2).T)
        np.testing.assert_array_equal(p.tensor("layers.1.ffn_bias_in")[:, 0], mlp.fc1.bias.numpy())
        np.testing.assert_array_equal(p.tensor("layers.1.ffn_bias_out"), mlp.fc2.bias.numpy())
        return
    mlp = layer.mlp
    if name == "phi3":
        gu = w(mlp.gate_up_proj)
        gate, up = gu[:gu.shape[0] // 2], gu[gu.shape[0] // 2:]
        np.testing.assert_array_equal(p.tensor("layers.1.qkv"), w(layer.self_attn.qkv_proj))
    else:
        gate, up = w(mlp.gate_proj), w(mlp.up_proj)
    np.testing.assert_array_equal(ffn[:, 0], gate)
    np.testing.assert_array_equal(ffn[:, 1], up)
    np.testing.assert_array_equal(ffn[:, 2], w(mlp.down_proj).T)
    assert "layers.1.ffn_bias_in" not in p.manifest.tensors


def test_relu_zeros_are_skipped_exactly(arch):
    """OPT's ReLU: at t = 0 (dense) the runtime reads the down column only of neurons with h != 0,
    i.e. it keeps exactly the nonzero h that transformers computes, and the logits are unchanged."""
    import torch
    from edgesparse.runtime.core.model import Model
    name, hf, pkg = arch
    if not name.startswith("opt"):
        pytest.skip("ReLU families only")
    ids = np.random.default_rng(4).integers(3, 211, 40)
    nz = []
    handles = [_down(name, layer).register_forward_pre_hook(lambda mod, a: nz.append(int((a[0] != 0).sum())))
               for layer in _layers(name, hf)]
    try:
        hf(torch.tensor(ids[None]))
    finally:
        for h in handles:
            h.remove()
    m = Model(pkg, ctx=64)
    m.forward(ids, all_logits=True)
    kept = m.counts[:, 0].tolist()
    print(f"{name}: neurons kept per layer {kept} of {m.counts[0, 1]}, transformers' nonzero h {nz}")
    assert kept == nz
    assert max(kept) < m.counts[0, 1]     # natural sparsity: something was skipped


def test_window_matters_for_mistral(tiny_model_factory):
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
        full = transformers.MistralForCausalLM.from_pretrained(d, dtype=torch.float32, sliding_window=None)(ids).logits[0, 20:].numpy()
    print("window vs no window, max |dlogit| past the window:", np.abs(windowed - full).max())
    assert np.abs(windowed - full).max() > 1e-3


def test_longrope_switch_matters_for_phi3(arch):
    """Guard: positions past original_max_position_embeddings use other tables, so the phi3 case
    above really exercises the switch."""
    from edgesparse.runtime.core.package import Package
    name, _, pkg = arch
    if name != "phi3":
        pytest.skip("phi3 only")
    p = Package(pkg)
    d = np.abs(p.tensor("rope.cos") - p.tensor("rope.long.cos")).max()
    print("short vs long LongRoPE cos tables, max |d|:", d)
    assert d > 1e-2


def test_longrope_prompt_in_chunks_uses_the_long_tables_throughout(arch):
    """A 40-token prompt fed in chunks of 8 (max_batch) from position 0: transformers rotates every
    position with the long factors (the sequence is longer than 16), so must the early chunks."""
    import torch
    from edgesparse.runtime.core.model import Model
    name, hf, pkg = arch
    if name != "phi3":
        pytest.skip("phi3 only")
    ids = np.random.default_rng(6).integers(3, 211, 40)
    ref = hf(torch.tensor(ids[None])).logits[0].numpy()
    out = Model(pkg, ctx=64, max_batch=8).forward(ids, all_logits=True)
    d = np.abs(out - ref).max()
    print(f"phi3: 40 tokens in chunks of 8, max |dlogit| {d:.2e}")
    assert d < ATOL


def test_unsupported_architecture_lists_the_supported_ones():
    from edgesparse.errors import EdgesparseError
    from edgesparse.export.archs import REGISTRY, lookup
    with pytest.raises(EdgesparseError) as e:
        lookup("gpt2")
    for name in REGISTRY:
        assert name in str(e.value)
    assert {"llama", "mistral", "qwen2", "phi", "phi3", "opt", "gemma3_text"} <= set(REGISTRY)


def test_calibrate_eval_and_predict_work_for_every_family(arch, tmp_path, capsys):
    """The CLI's calibrate (with the int8 predictor) and eval on each family: the dense
    perplexity is transformers' on the same windows, the calibrated 50% is reached on the
    calibration text, and predict mode runs with its candidates counted."""
    import json
    import math
    import shutil

    import torch
    from edgesparse.cli import main
    from edgesparse.runtime.sparsity.textdata import token_windows
    name, hf, pkg = arch
    words = np.random.default_rng(5).integers(3, 211, 3000)
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"w{i}" for i in words) + "\n")
    dst = tmp_path / "pkg"
    shutil.copytree(pkg, dst)
    assert main(["calibrate", str(dst), "--text", str(text), "--tokens", "1024", "--predictor", "-q"]) == 0
    out = tmp_path / "eval"
    assert main(["eval", str(dst), "--text", str(text), "--ctx", "128", "--windows", "3", "--sparsity", "0,0.5",
                 "--methods", "paper,predict", "-o", str(out), "-q"]) == 0
    capsys.readouterr()
    rs = json.loads((out / "eval.json").read_text())["results"]
    assert [(r["method"], r["target"]) for r in rs] == [("dense", 0.0), ("paper", 0.5), ("predict", 0.5)]
    wins = token_windows(words.tolist(), 128, 3)
    nll = [torch.nn.functional.cross_entropy(hf(torch.tensor(w[None])).logits[0, :-1].double(),
                                             torch.tensor(w[1:]), reduction="none").numpy() for w in wins]
    ppl_hf = math.exp(np.concatenate(nll).mean())
    print(f"{name}: eval dense ppl {rs[0]['perplexity']:.5f} (transformers {ppl_hf:.5f}), "
          + ", ".join(f"{r['method']} 0.5: ppl {r['perplexity']:.4f} sparsity {r['achieved_sparsity_mean']:.3f} "
                      f"bytes skipped {r['ffn_bytes_skippable']:.3f}" for r in rs[1:]))
    assert abs(rs[0]["perplexity"] / ppl_hf - 1) <= 1e-4
    paper, predict = rs[1], rs[2]
    # ReLU families may be sparser than asked: their exact zeros are dropped at every level
    assert paper["achieved_sparsity_mean"] >= 0.47
    if not name.startswith("opt"):
        assert abs(paper["achieved_sparsity_mean"] - 0.5) <= 0.03
    assert 0 < predict["ffn_bytes_skippable"] < 1 and math.isfinite(predict["perplexity"])
    assert all(0 < c < 1 for c in predict["candidates_per_layer"])


# == tokenizer: from an HF directory, the model's own ==================================================
HF_TEXTS = ["w5 w6 w7", "w1 w200 w2", "", "w9  w10\nw11", "w0 w3 w210"]


def test_package_tokenizer_encodes_like_autotokenizer(arch):
    """From a Hugging Face directory the package keeps the model's own tokenizer: its encoding
    equals AutoTokenizer's, special tokens included."""
    from transformers import AutoTokenizer

    from edgesparse.runtime.core.package import Package
    from edgesparse.runtime.core.text import TextCodec
    name, hf, pkg = arch
    tok = AutoTokenizer.from_pretrained(hf.config._name_or_path)
    codec = TextCodec(Package(pkg))
    for text in HF_TEXTS:
        want = tok(text).input_ids
        print(f"{name} {text!r}: {want}")
        assert codec.encode(text) == want


def test_package_keeps_the_special_tokens_the_tokenizer_class_adds(tiny_model_factory, tmp_path):
    """LlamaTokenizerFast builds its BOS / EOS post-processor from tokenizer_config.json
    (add_bos_token, add_eos_token) when it loads, so a tokenizer.json without one still adds them
    through transformers; the package's tokenizer.json must carry it."""
    import json

    from transformers import AutoTokenizer, LlamaTokenizerFast

    from edgesparse.export import export
    from edgesparse.runtime.core.package import Package
    from edgesparse.runtime.core.text import TextCodec
    d = tiny_model_factory("LlamaConfig", "LlamaForCausalLM", seed=5)
    plain = AutoTokenizer.from_pretrained(d)
    LlamaTokenizerFast(tokenizer_object=plain.backend_tokenizer, bos_token="w1", eos_token="w2", unk_token="w0",
                       add_bos_token=True, add_eos_token=True).save_pretrained(d)
    spec = json.loads((d / "tokenizer.json").read_text())
    spec["post_processor"] = None
    (d / "tokenizer.json").write_text(json.dumps(spec))
    tok = AutoTokenizer.from_pretrained(d)
    assert type(tok).__name__ == "LlamaTokenizerFast" and tok("w5 w6").input_ids == [1, 5, 6, 2]
    codec = TextCodec(Package(export(str(d), tmp_path / "m.esp", progress=False)))
    for text in HF_TEXTS:
        assert codec.encode(text) == tok(text).input_ids, text

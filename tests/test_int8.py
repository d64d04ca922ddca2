"""int8 storage (`export --dtype int8`): symmetric, one float32 scale per row, dequantized on the
fly by the kernels, accumulation in float32.

The reference is transformers itself running the *quantized* model: the same HF model with each
stored weight replaced by q * scale (export's own quantize_rows). The runtime must then agree to
float32 summation-order noise, so any mistake in a scale (wrong row, missing, applied twice) shows.
Families: Llama (gated, untied head), OPT (plain MLP with biases, learned positions, LayerNorm)
and Gemma-3 (sandwich norms, q/k norms, tied embeddings read with their scale by gather and head).
"""

from __future__ import annotations

import numpy as np
import pytest

# Same reasoning as test_archs.ATOL: float32 against float32 in another summation order.
ATOL = 2e-5

CASES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=False)),
    "opt": ("OPTConfig", "OPTForCausalLM", dict(ffn_dim=136, do_layer_norm_before=True, word_embed_proj_dim=96)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        head_dim=16, sliding_window=8, query_pre_attn_scalar=24, pad_token_id=0,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"])),
}
# HF parameters stored as int8 (the rest stays float32: norms, biases, positions)
QUANTIZED = ("q_proj", "k_proj", "v_proj", "o_proj", "out_proj", "gate_proj", "up_proj", "down_proj",
             "fc1", "fc2", "embed_tokens", "lm_head")


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tiny_model_factory, tmp_path_factory, randomize):
    import torch
    import transformers
    from edgesparse.export import export
    from edgesparse.export.exporter import quantize_rows
    cfg_cls, model_cls, over = CASES[request.param]
    d = tiny_model_factory(cfg_cls, model_cls, seed=5, init=randomize, **over)
    torch.set_grad_enabled(False)
    hf = getattr(transformers, model_cls).from_pretrained(d, dtype=torch.float32).eval()
    # The quantized model as transformers sees it. Linear weights [out, in] and embeddings [V, D]
    # are quantized per row; HF's down_proj/fc2 [D, N] is stored transposed, per neuron column.
    for name, p in hf.named_parameters():
        if name.endswith(".weight") and any(k in name for k in QUANTIZED):
            w = p.detach().numpy()
            if "down_proj" in name or "fc2" in name:
                q, s = quantize_rows(w.T)
                p.data = torch.from_numpy((q.astype(np.float32) * s[:, None]).T.copy())
            else:
                q, s = quantize_rows(w)
                p.data = torch.from_numpy(q.astype(np.float32) * s[:, None])
    pkg = export(str(d), tmp_path_factory.mktemp(request.param + "8") / "m.esp", dtype="int8", progress=False)
    return request.param, hf, pkg


def test_int8_package_layout(case):
    from edgesparse.runtime.package import Package
    name, _, pkg = case
    p = Package(pkg)
    ffn, sc = p.tensor("layers.0.ffn"), p.tensor("layers.0.ffn.scale")
    assert ffn.dtype == np.int8 and sc.dtype == np.float32 and sc.shape == ffn.shape[:2]
    assert p.tensor("embed").dtype == np.int8 and p.tensor("embed.scale").shape == (p.config.vocab_size,)
    assert p.tensor("layers.0.attn_norm").dtype == np.float32            # norms stay float32
    assert np.abs(ffn).max() == 127                                       # the scale is max|w| / 127
    f32 = sum(t.nbytes for n, t in p.manifest.tensors.items() if t.dtype == "float32")
    i8 = sum(t.nbytes for t in p.manifest.tensors.values() if t.dtype == "int8")
    print(f"{name}: {i8} bytes int8, {f32} bytes float32 (norms, biases, scales, rope, positions)")


def test_int8_logits_match_the_quantized_model(case):
    import torch
    from edgesparse.runtime.model import Model
    name, hf, pkg = case
    for S in (40, 90):     # the Numba kernels (int8 loads) and the BLAS path (widened per layer)
        ids = np.random.default_rng(0).integers(3, 211, S)
        ref = hf(torch.tensor(ids[None])).logits[0].numpy()
        out = Model(pkg, ctx=128).forward(ids, all_logits=True)
        d = np.abs(out - ref).max()
        print(f"{name} int8: prefill of {S} tokens, max |dlogit| {d:.2e}")
        assert d < ATOL
    m = Model(pkg, ctx=128)
    ids = np.random.default_rng(1).integers(3, 211, 30)
    ref = hf(torch.tensor(ids[None])).logits[0].numpy()
    out = [m.forward(ids[:4]).copy()] + [m.forward([i]).copy() for i in ids[4:]]
    d = np.abs(np.array(out) - ref[3:]).max()
    print(f"{name} int8: decode max |dlogit| {d:.2e}")
    assert d < ATOL


def test_int8_thresholded_and_predict_modes_run(case, tmp_path):
    """Threshold and predict modes on int8 rows: the predictor is built from the dequantized rows,
    and at t = 0 / t_pred = 0 both modes are the dense int8 model."""
    import shutil
    from edgesparse.runtime import predictor
    from edgesparse.runtime.model import Model
    from edgesparse.runtime.package import Package
    name, _, pkg = case
    dst = tmp_path / "p"
    shutil.copytree(pkg, dst)
    p = Package(dst)
    pred = predictor.build(p)
    w = p.tensor("layers.0.ffn").astype(np.float32) * p.tensor("layers.0.ffn.scale")[..., None]
    np.testing.assert_array_equal(pred[0][0], predictor.quantize(w)[0])   # from the rows it stands for
    from edgesparse.format import write_manifest_atomic
    write_manifest_atomic(dst, predictor.install(dst, p.manifest, pred, [0.0] * p.config.n_layers))
    ids = np.random.default_rng(2).integers(3, 211, 12)
    dense = Model(dst, ctx=64)
    dense.set_ffn_mode("dense")
    want = [dense.forward(ids[:3]).copy()] + [dense.forward([i]).copy() for i in ids[3:]]
    m = Model(dst, ctx=64)
    m.set_ffn_mode("predict")
    got = [m.forward(ids[:3]).copy()] + [m.forward([i]).copy() for i in ids[3:]]
    d = np.abs(np.array(got) - np.array(want)).max()
    print(f"{name} int8: predict with t_pred = 0, t = 0 vs dense, max |dlogit| {d:.2e}")
    assert d < ATOL


@pytest.mark.parametrize("O,D,S", [(37, 29, 1), (130, 61, 5)])
def test_int8_kernels_vs_numpy(O, D, S):
    """linear, gather_rows and ffn_glu_batch on int8 rows against NumPy on the dequantized rows,
    odd shapes. Tolerance: D-term float32 dot products, |error| <= D * eps32 * sum|w_k x_k|,
    times 4 for the scale multiply and the chunked partial sums."""
    from edgesparse.export.exporter import quantize_rows
    from edgesparse.runtime import kernels as K
    eps = np.finfo(np.float32).eps
    rng = np.random.default_rng(O + D)
    q, s = quantize_rows(rng.standard_normal((O, D)).astype(np.float32))
    wd = q.astype(np.float64) * s[:, None]                           # [O, D] what the rows stand for
    X = rng.standard_normal((S, D)).astype(np.float32)
    bias = rng.standard_normal(O).astype(np.float32)
    Y = np.full((S, O), np.nan, np.float32)
    K.linear(q, s, X, bias, np.zeros((0, O), np.float32), Y, 2)
    ref = X.astype(np.float64) @ wd.T + bias
    tol = 4 * D * eps * (np.abs(X) @ np.abs(wd).T + np.abs(bias)) + 1e-30
    print(f"linear int8 [{O},{D}] x {S}: max |diff| {np.abs(Y - ref).max():.2e}")
    assert np.all(np.abs(Y - ref) <= tol)
    ids = rng.integers(0, O, 7)
    out = np.empty((7, D), np.float32)
    K.gather_rows(q, s, ids, np.float32(1.5), out)
    np.testing.assert_allclose(out, 1.5 * wd[ids], rtol=2 * eps, atol=0)
    # FFN: N = O neurons, gated, rows [N, 3, D] each with its own scale
    N = O
    q3, s3 = quantize_rows(rng.standard_normal((N, 3, D)).astype(np.float32) * 0.3)
    w3 = q3.astype(np.float64) * s3[..., None]
    base = rng.standard_normal((S, D)).astype(np.float32)
    h = np.full((S, N), np.nan, np.float32)
    out = np.full((S, D), np.nan, np.float32)
    K.ffn_glu_batch(q3, s3, np.zeros((0, 2), np.float32), X, base, np.float32(0.0), K.ACT_CODES["silu"], out, h,
                    np.full((2, S, D), np.nan, np.float32), np.zeros(2, np.int64))
    g, u = X.astype(np.float64) @ w3[:, 0].T, X.astype(np.float64) @ w3[:, 1].T
    h_ref = g / (1 + np.exp(-g)) * u
    out_ref = base + h_ref @ w3[:, 2]
    print(f"ffn_glu_batch int8 N={N} D={D} S={S}: max |dh| {np.abs(h - h_ref).max():.2e}, "
          f"max |dout| {np.abs(out - out_ref).max():.2e}")
    mag = (np.abs(X) @ np.abs(w3[:, 0]).T) * (np.abs(X) @ np.abs(w3[:, 1]).T)
    assert np.all(np.abs(h - h_ref) <= 8 * D * eps * mag + 1e-30)
    assert np.all(np.abs(out - out_ref) <= 8 * (N + D) * eps * (np.abs(base) + np.abs(h_ref) @ np.abs(w3[:, 2])) + 1e-30)

"""Quantized storage (`export --dtype int8|int4`): Q8_0- / Q4_0-style groups of 32 with a float16 scale
each (edgesparse/quant.py), repacked into 16-row tiles and FFN blocks of 16 neurons
(edgesparse/tiles.py); int8 rows that are not whole groups keep one float32 scale per row. The
kernels read them without widening; accumulation in float32.

The reference is transformers itself running the *quantized* model: the same HF model with each
stored weight replaced by what its stored form stands for (edgesparse.quant's own encoders and
decoder), and every projection whose rows are stored in groups of 32 fed its input rounded to int8
per block, as the kernels feed it (quant.round_activations; a forward pre-hook on the module; the
down projection takes float h). The runtime must then agree to float32 summation-order noise, so
any mistake in a scale (wrong row or group, missing, applied twice), in the nibble order or in the
activation rounding shows.
Families: Llama (gated, untied head), OPT (plain MLP with biases, learned positions, LayerNorm)
and Gemma-3 (sandwich norms, q/k norms, tied embeddings read with their scale by gather and head).
"""

from __future__ import annotations

import numpy as np
import pytest

# Same reasoning as test_archs.ATOL: float32 against float32 in another summation order.
ATOL = 2e-5
# ... except where an input lies within that noise of a rounding boundary of the int8 activations:
# the two sides then round it one step apart (one qx_k differs by 1, x by 1/127 of its block's
# largest value), and from that position on the two models are no longer bit-equal. Seen here:
# Gemma-3 int8 and int4, a q|k|v input at position 16 (3e-5 of a step from the boundary); the
# Llama int4 export with calibration text, position 0 of a 40-token prefill (logits moved 5e-3);
# the logits after it moved by up to 1e-2, every later position (a full-attention layer sees it).
# Where that happens is measured, not assumed: _reference runs transformers again with every
# rounded input nudged by NUDGE of its row's largest value (float32 noise is ~1e-7 of it), up and down; a
# position whose logits move then is one where a rounding boundary lies within noise.
# So: every position before the first departure agrees to ATOL (the arithmetic is the same, and
# any wrong scale, nibble order or rounding would show from position 0, as every position uses
# every weight), that departure comes after at least MIN_EXACT positions or at a position the
# nudged references found sensitive, no logit goes past FLIP_TOL, and every argmax agrees but where
# the reference's top two logits are closer than the logits moved.
FLIP_TOL = 5e-2
MIN_EXACT = 8


NUDGE = 1e-6


def _assert_close(got: np.ndarray, ref: np.ndarray, sensitive: int | None = None) -> float:
    """got, ref [S, V] logits: equal to float32 noise up to the rare activation-rounding step above;
    sensitive: the first position where a nudged reference departs (_reference), None: unknown."""
    diff = np.abs(got - ref)
    off = diff.max(axis=1) >= ATOL                          # [S] positions past float32 noise
    first = int(np.argmax(off)) if off.any() else len(off)
    allowed = min(MIN_EXACT, len(off), len(off) if sensitive is None else sensitive)
    assert diff.max() < FLIP_TOL, diff.max()
    assert first >= allowed, f"logits depart at position {first} (sensitive from {sensitive}): {diff.max(1)[:first + 1]}"
    # argmax agrees wherever the reference's top two are further apart than the logits moved
    top2 = np.sort(ref, axis=-1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 2 * diff.max(axis=1)  # [S]
    assert (got.argmax(-1) == ref.argmax(-1))[clear].all()
    return float(diff.max())


_nudge = [0.0]      # the relative nudge _round_input applies before rounding (0 but in _reference)


def _reference(hf, ids) -> tuple[np.ndarray, int]:
    """(logits [S, V] of transformers with int8-rounded inputs, the first position whose logits
    move by ATOL when every rounded input is nudged by NUDGE up or down; S if none)."""
    import torch
    x = torch.tensor(np.asarray(ids)[None])
    ref = hf(x).logits[0].numpy()
    sensitive = len(ids)
    try:
        for n in (NUDGE, -NUDGE):
            _nudge[0] = n
            moved = np.flatnonzero(np.abs(hf(x).logits[0].numpy() - ref).max(axis=1) >= ATOL)
            sensitive = min(sensitive, int(moved[0]) if moved.size else len(ids))
    finally:
        _nudge[0] = 0.0
    return ref, sensitive


CASES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=False)),
    "opt": ("OPTConfig", "OPTForCausalLM", dict(ffn_dim=136, do_layer_norm_before=True, word_embed_proj_dim=96)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        head_dim=16, sliding_window=8, query_pre_attn_scalar=24, pad_token_id=0,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"])),
}
# HF parameters stored quantized (the rest stays float32: norms, biases, positions)
QUANTIZED = ("q_proj", "k_proj", "v_proj", "o_proj", "out_proj", "gate_proj", "up_proj", "down_proj",
             "fc1", "fc2", "embed_tokens", "lm_head")
# ... and the modules whose input the kernels round to int8 when their rows are grouped (not the
# down projection: the kernels add its columns scaled by float h)
ROUNDED_INPUT = ("q_proj", "k_proj", "v_proj", "o_proj", "out_proj", "gate_proj", "up_proj", "fc1", "lm_head")


def _round_input(module, args):
    import torch
    from edgesparse.quant import round_activations
    x = args[0].numpy()
    if _nudge[0]:       # by a fraction of the row's largest value: float32 noise is absolute, ~its ulp
        x = x + np.float32(_nudge[0]) * np.abs(x).max(axis=-1, keepdims=True)
    return (torch.from_numpy(round_activations(x)),) + tuple(args[1:])


def _stands_for(w: np.ndarray, dtype: str) -> np.ndarray:
    """The float32 values export stores for rows w [..., D] at this dtype (export's own encoder)."""
    from edgesparse.quant import dequantize, quantize
    return dequantize(*quantize(w, dtype))


# (family, --dtype, --head-dtype): int4 packages keep the embedding and lm_head int8 by default
# (export._HEAD_DEFAULT); OPT exercises an int4 embedding and head too.
PARAMS = [(f, "int8", None) for f in CASES] + [("llama", "int4", None), ("opt", "int4", "int4"),
                                               ("gemma3", "int4", None)]


@pytest.fixture(scope="module", params=PARAMS, ids=lambda p: "-".join(x for x in p if x))
def case(request, tiny_model_factory, tmp_path_factory, randomize):
    import torch
    import transformers
    from edgesparse.export import export
    family, dtype, head_dtype = request.param
    head = head_dtype or ("int8" if dtype == "int4" else dtype)
    cfg_cls, model_cls, over = CASES[family]
    d = tiny_model_factory(cfg_cls, model_cls, seed=5, init=randomize, **over)
    torch.set_grad_enabled(False)
    hf = getattr(transformers, model_cls).from_pretrained(d, dtype=torch.float32).eval()
    # The quantized model as transformers sees it. Linear weights [out, in] and embeddings [V, D]
    # are quantized per row; HF's down_proj/fc2 [D, N] is stored transposed, per neuron column.
    for name, p in hf.named_parameters():
        if name.endswith(".weight") and any(k in name for k in QUANTIZED):
            w = p.detach().numpy()
            if "down_proj" in name or "fc2" in name:
                p.data = torch.from_numpy(_stands_for(w.T, dtype).T.copy())
            else:
                head_like = "embed_tokens" in name or "lm_head" in name
                p.data = torch.from_numpy(_stands_for(w, head if head_like else dtype))
    for name, mod in hf.named_modules():
        if name.split(".")[-1] in ROUNDED_INPUT and mod.in_features % 32 == 0:     # stored in groups of 32
            mod.register_forward_pre_hook(_round_input)
    pkg = export(str(d), tmp_path_factory.mktemp(family + dtype) / "m.esp", dtype=dtype, progress=False,
                 head_dtype=head_dtype)
    return f"{family} {dtype} (head {head})", hf, pkg


def test_quantized_package_layout(case):
    from edgesparse import tiles
    from edgesparse.runtime.core.package import Package
    name, _, pkg = case
    p = Package(pkg)
    ffn = p.tensor("layers.0.ffn")
    t = p.manifest.tensor("layers.0.ffn")
    N, R, D = t.shape
    assert p.tensor("layers.0.attn_norm").dtype == np.float32            # norms stay float32
    assert not [n for n in p.manifest.tensors if n.endswith(".scale")]   # tiles carry their scales
    bits = 8 if " int8 " in name else 4
    # the FFN in blocks of 16 neurons, every matrix in 16-row tiles (edgesparse/tiles.py)
    assert t.dtype == f"q{bits}ffn" and ffn.dtype == (np.int8 if bits == 8 else np.uint8)
    assert ffn.shape == (tiles.padded(N) // 16, tiles.ffn_block_bytes(R, D, bits))
    head_bits = 4 if "head int4" in name else 8
    e = p.manifest.tensor("embed")
    assert e.dtype == f"q{head_bits}x16" and p.tensor("embed").shape == tiles.tiled_shape(e.shape, head_bits)
    assert p.manifest.tensor("layers.0.qkv").dtype == f"q{bits}x16"
    q, d = tiles.from_ffn_blocks(ffn.view(np.uint8), N, R, D, bits)
    ext = np.abs(q.reshape(N, R, D // 32, 32)).max(axis=-1)
    # the extreme of a group: Q8_0's 127; Q4_0's search lands on -8 (or 7) in most groups
    assert (ext == 127).all() if bits == 8 else (ext >= 7).mean() > 0.9
    total = {dt: sum(t.nbytes for t in p.manifest.tensors.values() if t.dtype == dt)
             for dt in sorted({t.dtype for t in p.manifest.tensors.values()})}
    print(f"{name}: bytes by dtype {total}")


def test_quantized_logits_match_the_quantized_model(case):
    import torch
    from edgesparse.runtime.core.model import Model
    name, hf, pkg = case
    for S in (40, 90):     # the Numba kernels (quantized loads) and the BLAS path (widened per layer)
        ids = np.random.default_rng(0).integers(3, 211, S)
        ref, sensitive = _reference(hf, ids)
        d = _assert_close(Model(pkg, ctx=128).forward(ids, all_logits=True), ref, sensitive)
        print(f"{name}: prefill of {S} tokens, max |dlogit| {d:.2e}")
    m = Model(pkg, ctx=128)
    ids = np.random.default_rng(1).integers(3, 211, 30)
    ref, sensitive = _reference(hf, ids)
    out = np.array([m.forward(ids[:4]).copy()] + [m.forward([i]).copy() for i in ids[4:]])   # [27, V]
    off = np.flatnonzero((np.abs(out - ref[3:]) > ATOL).any(axis=1)) + 3
    d = _assert_close(out, ref[3:], max(sensitive - 3, 0))
    print(f"{name}: decode max |dlogit| {d:.2e}; positions beyond ATOL (a rounding step): {off.tolist()}")


def test_quantized_threshold_mode_and_no_predictor(case, tmp_path):
    """Threshold mode on tiled FFN blocks at t = 0 is the dense model; a predictor is refused with
    a message saying why (predict mode skips single neurons' gate and up rows, which tiles of 16
    neurons do not have)."""
    from edgesparse.errors import EdgesparseError
    from edgesparse.runtime.core.model import Model
    from edgesparse.runtime.core.package import Package
    from edgesparse.runtime.sparsity import predictor
    name, _, pkg = case
    with pytest.raises(EdgesparseError, match="16 neurons"):
        predictor.build(Package(pkg))
    ids = np.random.default_rng(2).integers(3, 211, 12)
    dense = Model(pkg, ctx=64)
    dense.set_ffn_mode("dense")
    want = [dense.forward(ids[:3]).copy()] + [dense.forward([i]).copy() for i in ids[3:]]
    m = Model(pkg, ctx=64)
    m.configure("threshold", [0.0] * m.cfg.n_layers)
    got = [m.forward(ids[:3]).copy()] + [m.forward([i]).copy() for i in ids[3:]]
    d = np.abs(np.array(got) - np.array(want)).max()
    print(f"{name}: threshold mode at t = 0 vs dense, max |dlogit| {d:.2e}")
    assert d == 0


@pytest.mark.parametrize("dtype,O,D,S", [("int8", 37, 29, 1), ("int8", 130, 61, 5), ("int8", 33, 40, 2)])
def test_quantized_kernels_vs_numpy(dtype, O, D, S):
    """linear, gather_rows and ffn_glu_batch on int8 rows with a scale per row (rows that are not
    whole groups of 32; grouped rows are tiled: tests/test_tile_kernels.py) against NumPy on the
    dequantized rows, odd row counts. Tolerance: D-term float32 dot products,
    |error| <= D * eps32 * sum|w_k x_k|, times 4 for the scale multiplies (per row or per group)
    and the chunked partial sums."""
    from edgesparse.quant import dequantize, quantize_rows
    from edgesparse.runtime import kernels as K
    enc = quantize_rows
    kern = lambda s: s.view(np.uint16) if s.dtype == np.float16 else s   # noqa: E731 (the runtime's view)
    eps = np.finfo(np.float32).eps
    rng = np.random.default_rng(O + D)
    q, s = enc(rng.standard_normal((O, D)).astype(np.float32))
    wd = dequantize(q, s).astype(np.float64)                         # [O, D] what the rows stand for
    X = rng.standard_normal((S, D)).astype(np.float32)
    bias = rng.standard_normal(O).astype(np.float32)
    Y = np.full((S, O), np.nan, np.float32)
    K.linear(q, kern(s), X, bias, np.zeros((0, O), np.float32), Y, 2)
    Xr = X                                                             # int8 rows meet float inputs
    ref = Xr.astype(np.float64) @ wd.T + bias
    tol = 4 * D * eps * (np.abs(Xr) @ np.abs(wd).T + np.abs(bias)) + 1e-30
    print(f"linear {dtype} [{O},{D}] x {S}: max |diff| {np.abs(Y - ref).max():.2e}")
    assert np.all(np.abs(Y - ref) <= tol)
    ids = rng.integers(0, O, 7)
    out = np.empty((7, D), np.float32)
    K.gather_rows(q, kern(s), ids, np.float32(1.5), out)
    np.testing.assert_allclose(out, 1.5 * wd[ids], rtol=2 * eps, atol=0)
    # FFN: N = O neurons, gated, rows [N, 3, D] each with its own scale(s)
    N = O
    q3, s3 = enc(rng.standard_normal((N, 3, D)).astype(np.float32) * 0.3)
    w3 = dequantize(q3, s3).astype(np.float64)
    base = rng.standard_normal((S, D)).astype(np.float32)
    h = np.full((S, N), np.nan, np.float32)
    out = np.full((S, D), np.nan, np.float32)
    K.ffn_glu_batch(q3, kern(s3), np.zeros((0, 2), np.float32), X, base, np.float32(0.0), K.ACT_CODES["silu"], out,
                    h, np.full((2, S, D), np.nan, np.float32), np.zeros(2, np.int64))
    g, u = Xr.astype(np.float64) @ w3[:, 0].T, Xr.astype(np.float64) @ w3[:, 1].T
    h_ref = g / (1 + np.exp(-g)) * u
    out_ref = base + h_ref @ w3[:, 2]
    print(f"ffn_glu_batch {dtype} N={N} D={D} S={S}: max |dh| {np.abs(h - h_ref).max():.2e}, "
          f"max |dout| {np.abs(out - out_ref).max():.2e}")
    mag = (np.abs(Xr) @ np.abs(w3[:, 0]).T) * (np.abs(Xr) @ np.abs(w3[:, 1]).T)
    assert np.all(np.abs(h - h_ref) <= 8 * D * eps * mag + 1e-30)
    assert np.all(np.abs(out - out_ref) <= 8 * (N + D) * eps * (np.abs(base) + np.abs(h_ref) @ np.abs(w3[:, 2])) + 1e-30)


def test_activation_rounding_kernel_matches_numpy():
    """The kernels' quantize_activations and quant.round_activations round the same way, bit for
    bit (both use the same float32 operations: d = max / 127, q = rint(x / d)), including an
    all-zero block and ties at .5 (rint: to even); xs8 holds each block's sum of q, 8 times."""
    from edgesparse.quant import round_activations
    from edgesparse.runtime import kernels as K
    rng = np.random.default_rng(11)
    X = rng.standard_normal((5, 96)).astype(np.float32) * np.float32(3)
    X[1, 32:64] = 0.0                                                  # a block of zeros: d = 0
    X[2, :32] = np.arange(32, dtype=np.float32) - 16.5                 # ties: -16.5 .. 14.5, d = 16.5/127
    xq, xd8, xs8 = np.zeros((6, 128), np.int8), np.zeros((6, 32), np.float32), np.zeros((6, 32), np.int32)
    K.quantize_activations(X, xq, xd8, xs8)
    got = (xq[:5, :96].reshape(5, 3, 32) * xd8[:5, :24:8][..., None]).reshape(5, 96)
    np.testing.assert_array_equal(got, round_activations(X))
    np.testing.assert_array_equal(xs8[:5, :24], np.repeat(xq[:5, :96].reshape(5, 3, 32).sum(-1), 8, axis=1))
    assert not xq[1, 32:64].any() and (xd8[1, 8:16] == 0).all()
    assert np.abs(xq[:5, :96]).max() == 127


@pytest.mark.skipif(not __import__("platform").machine().lower() in ("x86_64", "amd64"), reason="x86 only")
def test_tile_kernels_without_vnni(tmp_path):
    """The tile kernel tests again with NUMBA_CPU_NAME=haswell (AVX2 and F16C, no AVX-512): no VNNI,
    so the tiles take the portable IR (the path ARM boards run) and must meet the same NumPy
    references. (Not "generic": without F16C LLVM calls compiler-rt for half -> float, which
    Numba's JIT does not link.) Own Numba cache directory, so no cached VNNI code is picked up."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    env = dict(os.environ, NUMBA_CPU_NAME="haswell", NUMBA_CACHE_DIR=str(tmp_path / "numba"))
    tests = Path(__file__).with_name("test_tile_kernels.py")
    code = ("from edgesparse.runtime.kernels import grouped as K; assert not K._VNNI; import pytest, sys; "
            "sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', '--import-mode=importlib', "
            f"r'{tests}', '-k', 'not 1536 and not rounding_error']))")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=1800)
    print(r.stdout[-400:])
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]


def test_int4_encoding_round_trip():
    """The Q4_0 encoding on values it represents exactly: each group's extreme element is -8 d (or
    +8 d's mirror, stored as -8 with a negative d), the nibble order low-then-high halves of the
    group; decode(encode(w)) == w bit for bit, and encoding a row of the wrong length is refused."""
    from edgesparse.quant import dequantize_int4, quantize_int4
    rng = np.random.default_rng(3)
    d = np.float16(0.25)
    q = rng.integers(-8, 8, (5, 64)).astype(np.float32)
    q[:, 0], q[:, 32] = -8, -8                                        # both groups reach -8
    w = q * np.float32(d)
    packed, sc = quantize_int4(w)
    assert packed.shape == (5, 32) and sc.shape == (5, 2) and sc.dtype == np.float16
    np.testing.assert_array_equal(sc, np.full((5, 2), d))
    np.testing.assert_array_equal(dequantize_int4(packed, sc), w)
    np.testing.assert_array_equal(packed[:, :16] & 15, (q[:, :16] + 8).astype(np.uint8))     # element j
    np.testing.assert_array_equal(packed[:, :16] >> 4, (q[:, 16:32] + 8).astype(np.uint8))  # element 16 + j
    assert not dequantize_int4(*quantize_int4(np.zeros((2, 32), np.float32))).any()
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize_int4(np.ones((2, 40), np.float32))


def test_int4_scale_search_beats_plain_q4_0():
    """The exporter's int4 scales (quant.py: plain Q4_0's d = m / -8, replaced by a least-squares
    candidate when that is closer) never decode a group worse than plain Q4_0 does, and on
    Gaussian and heavy-tailed rows are closer overall; plain Q4_0 computed here from its definition."""
    from edgesparse.quant import dequantize_int4, quantize_int4
    rng = np.random.default_rng(5)
    for w in (rng.standard_normal((257, 96)).astype(np.float32),
              rng.standard_t(3, (257, 96)).astype(np.float32)):
        g = w.reshape(-1, 32)
        m = np.take_along_axis(g, np.abs(g).argmax(-1)[:, None], -1)[:, 0]
        d = (m / -8).astype(np.float16).astype(np.float32)
        plain = np.clip(np.rint(g / d[:, None]), -8, 7) * d[:, None]
        err_plain = ((g - plain) ** 2).sum(-1)
        err = ((g - dequantize_int4(*quantize_int4(w)).reshape(-1, 32)) ** 2).sum(-1)
        # float32 sums of 32 squares computed in two orders: equal errors may differ in the last bits
        assert np.all(err <= err_plain * (1 + 1e-5)), np.max(err - err_plain)
        print(f"squared error vs plain Q4_0: {err.sum() / err_plain.sum():.3f}")
        assert err.sum() < 0.95 * err_plain.sum()


@pytest.fixture(scope="module")
def int4_pkg(tiny_llama_dir, tmp_path_factory):
    from edgesparse.export import export
    return export(str(tiny_llama_dir), tmp_path_factory.mktemp("int4") / "m.esp", dtype="int4", progress=False)


@pytest.mark.parametrize("edit,msg", [
    (lambda t: t["layers.0.ffn"].update(dtype="q4x16"), r"tensor 'layers.0.ffn' must be .*q4ffn.*got q4x16"),
    (lambda t: t["layers.0.qkv"].update(dtype="q4ffn"), r"tensors\['layers.0.qkv'\]: a q4ffn tensor is an FFN"),
    (lambda t: t["layers.0.qkv"].update(shape=[t["layers.0.qkv"]["shape"][0], 40]),
     "rows are groups of 32 values; the last axis is 40"),
    (lambda t: t["layers.0.ffn"].update(shape=t["layers.0.ffn"]["shape"][:2]), r"is an FFN \[n_neurons, R, d_model\]"),
])
def test_int4_manifest_errors_name_the_tensor(int4_pkg, tmp_path, edit, msg):
    """A manifest whose int4 tensor does not match its role or encoding is refused with a message
    naming the tensor and what was expected."""
    import json
    import shutil
    from edgesparse.errors import PackageError
    from edgesparse.runtime.core.package import Package
    dst = tmp_path / "bad.esp"
    shutil.copytree(int4_pkg, dst)
    m = json.loads((dst / "manifest.json").read_text())
    edit(m["tensors"])
    (dst / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(PackageError, match=msg):
        Package(dst)


def test_int4_importance_lowers_the_output_error():
    """With an importance per input channel (imatrix.py: E[x_j^2] on calibration text) the int4
    search minimises sum_j imp_j * sqrt(sigma2 + w_j^2) * e_j^2 (llama.cpp's Q4_0 weighting). On rows
    whose inputs have very unequal scales, the output error E[(sum_j e_j x_j)^2] for such inputs is
    lower than with the unweighted search, and the weighted error never exceeds plain Q4_0's per
    group (the search starts from it). Reference: the output error computed directly in NumPy."""
    from edgesparse.quant import dequantize_int4, quantize_int4
    rng = np.random.default_rng(11)
    w = rng.standard_normal((199, 160)).astype(np.float32)                  # [rows, D], odd row count
    imp = np.exp(rng.standard_normal(160) * 1.5).astype(np.float32)        # [D] E[x^2], skewed
    x = rng.standard_normal((4000, 160)).astype(np.float32) * np.sqrt(imp)  # [T, D] inputs with those scales
    e_plain = w - dequantize_int4(*quantize_int4(w))
    e_imp = w - dequantize_int4(*quantize_int4(w, imp))
    out_plain, out_imp = ((x @ e_plain.T) ** 2).mean(), ((x @ e_imp.T) ** 2).mean()
    print(f"output mean square error: unweighted {out_plain:.4f}, weighted {out_imp:.4f} "
          f"({out_imp / out_plain:.3f}x)")
    assert out_imp < 0.9 * out_plain
    # the weighted objective per group, against plain Q4_0 (d = m / -8) from its definition
    g = w.reshape(-1, 32)
    wt = (np.broadcast_to(imp, w.shape) * np.sqrt((w * w).mean(-1, keepdims=True) + w * w)).reshape(-1, 32)
    m = np.take_along_axis(g, np.abs(g).argmax(-1)[:, None], -1)[:, 0]
    d = (m / -8).astype(np.float16).astype(np.float32)
    err_plain = (wt * (g - np.clip(np.rint(g / d[:, None]), -8, 7) * d[:, None]) ** 2).sum(-1)
    err = (wt * e_imp.reshape(-1, 32) ** 2).sum(-1)
    assert np.all(err <= err_plain * (1 + 1e-5)), np.max(err - err_plain)
    # neuron-major blocks [N, R, D] take a per-row importance [R, D]
    blocks = w[:198].reshape(66, 3, 160)
    imp_r = np.stack([imp, imp, np.ones(160, np.float32)])
    got = quantize_int4(blocks, imp_r)
    for r, ir in enumerate(imp_r):
        ref = quantize_int4(np.ascontiguousarray(blocks[:, r]), ir)
        np.testing.assert_array_equal(got[0][:, r], ref[0])
        np.testing.assert_array_equal(got[1][:, r], ref[1])


def test_int4_export_with_calibration_text(tiny_llama_dir, tmp_path):
    """export(..., calibrate=TEXT) weighs int4 rounding by TEXT's activations: the manifest says so,
    the stored groups differ from an export without it, and the runtime's logits match transformers
    loaded with the package's own (dequantized) weights and int8-rounded grouped inputs."""
    import torch
    import transformers
    from edgesparse.export import export
    from edgesparse.runtime.core.model import Model
    from edgesparse.runtime.core.package import Package
    rng = np.random.default_rng(3)
    text = tmp_path / "cal.txt"
    text.write_text(" ".join(f"w{i}" for i in rng.integers(3, 211, 3000)))
    plain = Package(export(str(tiny_llama_dir), tmp_path / "plain.esp", dtype="int4", progress=False))
    pkg = export(str(tiny_llama_dir), tmp_path / "imp.esp", dtype="int4", progress=False, calibrate=str(text))
    p = Package(pkg)
    assert "cal.txt" in p.manifest.exporter["int4_importance"]
    assert not np.array_equal(p.tensor("layers.0.ffn"), plain.tensor("layers.0.ffn"))
    assert "threshold" not in str(p.manifest.sparsity)      # export alone does not calibrate thresholds

    torch.set_grad_enabled(False)
    hf = transformers.LlamaForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    from edgesparse.runtime.core.blas import decoded
    t = lambda n: decoded(p, n)  # noqa: E731
    for l, layer in enumerate(hf.model.layers):
        a = layer.self_attn
        q, k, v = np.split(t(f"layers.{l}.qkv"), np.cumsum([a.q_proj.out_features, a.k_proj.out_features]))
        for mod, val in ((a.q_proj, q), (a.k_proj, k), (a.v_proj, v), (a.o_proj, t(f"layers.{l}.o"))):
            mod.weight.data = torch.from_numpy(np.ascontiguousarray(val))
        ffn = t(f"layers.{l}.ffn")                                         # [N, 3, D]
        mlp = layer.mlp
        for mod, val in ((mlp.gate_proj, ffn[:, 0]), (mlp.up_proj, ffn[:, 1]), (mlp.down_proj, ffn[:, 2].T)):
            mod.weight.data = torch.from_numpy(np.ascontiguousarray(val))
    hf.model.embed_tokens.weight.data = torch.from_numpy(t("embed"))
    hf.lm_head.weight.data = torch.from_numpy(t("lm_head"))
    for name, mod in hf.named_modules():
        if name.split(".")[-1] in ROUNDED_INPUT and mod.in_features % 32 == 0:
            mod.register_forward_pre_hook(_round_input)
    ids = rng.integers(3, 211, 40)
    ref, sensitive = _reference(hf, ids)
    d = _assert_close(Model(pkg, ctx=128).forward(ids, all_logits=True), ref, sensitive)
    print(f"int4 with importance: prefill of 40 tokens, max |dlogit| {d:.2e}")


@pytest.mark.parametrize("family", list(CASES))
def test_int4_importance_names_and_shapes_every_family(family, tiny_model_factory, tmp_path, randomize):
    """export/imatrix.py finds, in every family, the input of each int4 tensor (fused or separate
    q|k|v, o, gate/up or fc1, the head): one importance per tensor the exporter stores, [D_in] for
    projections and [R, D] for the neuron-major FFN (its down row all ones), each the mean square of
    that module's input (checked against the hidden size and, for layer 0's FFN, a direct capture);
    and an int4 export with calibration text runs."""
    import torch
    import transformers
    from edgesparse.export import archs, export, source
    from edgesparse.export.imatrix import input_importance
    cfg_cls, model_cls, over = CASES[family]
    d = tiny_model_factory(cfg_cls, model_cls, seed=2, init=randomize, **over)
    text = tmp_path / "cal.txt"
    text.write_text(" ".join(f"w{i}" for i in np.random.default_rng(4).integers(3, 211, 2000)))
    src = source.resolve(str(d))
    cfg = source.load_config(src)
    arch = archs.lookup(cfg.model_type)
    hf = getattr(transformers, model_cls).from_pretrained(d, dtype=torch.float32).eval()
    imp, desc = input_importance(hf, arch, source.load_tokenizer(src), str(text), progress=False)
    L = len(arch.layer_modules(hf))
    head = "embed" if cfg.tie_word_embeddings else "lm_head"
    assert set(imp) == {f"layers.{l}.{r}" for l in range(L) for r in ("qkv", "o", "ffn")} | {head}
    R = 3 if arch.gated else 2
    for name, v in imp.items():
        assert np.all(np.isfinite(v)) and np.all(v >= 0)
        if name.endswith(".ffn"):
            assert v.shape[0] == R and np.all(v[-1] == 1) and np.all(v[:-1] == v[0])
    # layer 0's FFN input, captured directly, over the same windows
    seen = []
    mod = arch.input_modules(arch.layer_modules(hf)[0])["ffn"]
    h = mod.register_forward_pre_hook(lambda m, a: seen.append(a[0].reshape(-1, a[0].shape[-1]).double()))
    input_importance(hf, arch, source.load_tokenizer(src), str(text), progress=False)
    h.remove()
    x = torch.cat(seen)
    np.testing.assert_allclose(imp["layers.0.ffn"][0], (x * x).mean(0).float().numpy(), rtol=1e-5)
    pkg = export(str(d), tmp_path / "m.esp", dtype="int4", head_dtype="int4", progress=False, calibrate=str(text))
    from edgesparse.runtime.core.model import Model
    out = Model(pkg, ctx=64).forward([5, 6, 7, 8])
    assert np.all(np.isfinite(out)) and "cal.txt" in desc

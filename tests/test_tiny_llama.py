"""The runtime on a tiny random Llama, against transformers and against a plain-NumPy Llama.

Prefill has two FFN paths: up to SMALL_BATCH tokens the Numba ffn_glu_batch kernel, beyond it
BLAS gate/up + glu_threshold; decode uses ffn_glu. The 24-token `ids` exercise the first, the
100-token `long_ids` the second, token-by-token feeding the third.

Tolerance on logits: LOGIT_TOL = 2e-5 absolute. The logits here are at most ~0.7 in magnitude;
the last step alone, the lm_head's float32 dot product of length D = 96, is bounded by
D * eps32 * sum|terms| ~ 96 * 1.2e-7 * 1.5 ~ 1.7e-5 (worst case, any summation order), and the
layers before it contribute relative errors of a few eps32. Observed differences are ~3e-7.
Thresholding the FFNs at the median changes logits by ~2e-2, so a runtime that ignored the
thresholds (or applied them to the wrong neurons) is three orders of magnitude outside it.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import shutil

import numpy as np
import pytest
import torch

from edgesparse.errors import EdgesparseError
from edgesparse.format import read_manifest
from edgesparse.format_write import write_manifest_atomic
from edgesparse.runtime.core.generate import generate
from edgesparse.runtime.core.model import SMALL_BATCH, Model
from edgesparse.runtime.core.sampling import Sampler

LOGIT_TOL = 2e-5


class LlamaRef:
    """A whole Llama forward pass in float64 NumPy, written from the paper/HF semantics and fed
    the HF model's weights: embedding, RMSNorm, rotary (rotate-half), GQA causal attention,
    SwiGLU FFN with |h| < t zeroed, final norm, lm_head."""

    def __init__(self, hf):
        c = hf.config
        d = lambda t: t.detach().double().numpy()  # noqa: E731
        self.H, self.Hkv = c.num_attention_heads, c.num_key_value_heads
        self.hd = c.hidden_size // self.H
        self.eps = c.rms_norm_eps
        self.embed = d(hf.model.embed_tokens.weight)
        self.head = d(hf.lm_head.weight)
        self.norm = d(hf.model.norm.weight)
        self.layers = []
        for layer in hf.model.layers:
            a, m = layer.self_attn, layer.mlp
            self.layers.append(dict(
                w_in=d(layer.input_layernorm.weight), w_post=d(layer.post_attention_layernorm.weight),
                q=d(a.q_proj.weight), k=d(a.k_proj.weight), v=d(a.v_proj.weight), o=d(a.o_proj.weight),
                gate=d(m.gate_proj.weight), up=d(m.up_proj.weight), down=d(m.down_proj.weight)))
        self.inv_freq = 1.0 / (c.rope_theta ** (np.arange(0, self.hd, 2) / self.hd))

    def rms(self, x, w):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + self.eps) * w

    def rope(self, x, pos):                         # x [S, heads, hd]
        f = np.outer(pos, self.inv_freq)
        f = np.concatenate([f, f], -1)[:, None, :]
        half = x.shape[-1] // 2
        rot = np.concatenate([-x[..., half:], x[..., :half]], -1)
        return x * np.cos(f) + rot * np.sin(f)

    def forward(self, ids, thresholds=None):
        """-> (logits [S, V], per-layer h [S, N] before thresholding, per-layer thresholds).
        thresholds: None (dense), a list, or choose(layer, |h| [S, N]) -> t."""
        ids = np.asarray(ids)
        S, H, Hkv, hd = len(ids), self.H, self.Hkv, self.hd
        pos = np.arange(S)
        causal = np.triu(np.full((S, S), -np.inf), 1)
        x = self.embed[ids]
        hs, ts = [], []
        for l, P in enumerate(self.layers):
            xn = self.rms(x, P["w_in"])
            q = self.rope((xn @ P["q"].T).reshape(S, H, hd), pos)
            k = self.rope((xn @ P["k"].T).reshape(S, Hkv, hd), pos)
            v = (xn @ P["v"].T).reshape(S, Hkv, hd)
            att = np.empty((S, H, hd))
            for h in range(H):
                kv = h // (H // Hkv)                 # query heads share kv heads in groups
                s = q[:, h] @ k[:, kv].T / math.sqrt(hd) + causal
                p = np.exp(s - s.max(-1, keepdims=True))
                att[:, h] = (p / p.sum(-1, keepdims=True)) @ v[:, kv]
            x = x + att.reshape(S, H * hd) @ P["o"].T
            f = self.rms(x, P["w_post"])
            g, u = f @ P["gate"].T, f @ P["up"].T
            hh = g / (1.0 + np.exp(-g)) * u
            if thresholds is None:
                t = 0.0
            elif callable(thresholds):
                t = thresholds(l, np.abs(hh))
            else:
                t = float(thresholds[l])
            hs.append(hh)
            ts.append(t)
            x = x + np.where(np.abs(hh) >= t, hh, 0.0) @ P["down"].T
        return self.rms(x, self.norm) @ self.head.T, hs, ts


class GapChooser:
    """Per-layer synthetic threshold near the median |h|: the midpoint of the widest gap between
    consecutive sorted |h| values in the 40th..60th percentile window, so no neuron sits within
    rounding of t. Threshold values are float32-representable (the runtime stores float32)."""

    def __init__(self):
        self.margins = []    # half-gap per layer: how far the nearest |h| is from t

    def __call__(self, layer, absh):
        s = np.sort(absh.ravel())
        lo, hi = int(0.4 * s.size), int(0.6 * s.size)
        i = lo + int(np.argmax(np.diff(s[lo:hi + 1])))
        t = float(np.float32((s[i] + s[i + 1]) / 2))
        self.margins.append(float(min(t - s[i], s[i + 1] - t)))
        return t


def hf_logits(hf, ids) -> np.ndarray:
    return hf(torch.tensor(np.asarray(ids))[None]).logits[0].double().numpy()


def assert_logits(what, got, ref, tol=LOGIT_TOL):
    diff = float(np.abs(np.asarray(got, np.float64) - ref).max())
    print(f"{what}: max|logit diff| {diff:.3g} (tol {tol:g})")
    assert got.shape == ref.shape
    assert diff <= tol, f"{what}: max|logit diff| {diff} > {tol}"


def decode_logits(rt: Model, ids, n_prefill: int) -> np.ndarray:
    """Prefill ids[:n_prefill], then feed the rest one token at a time; the logits after each."""
    rt.reset()
    out = [rt.forward(ids[:n_prefill]).copy()]
    for t in ids[n_prefill:]:
        out.append(rt.forward([int(t)]).copy())
    return np.array(out)                            # rows for positions n_prefill-1 .. S-1


@pytest.fixture(scope="module")
def ref(tiny_hf):
    return LlamaRef(tiny_hf)


@pytest.fixture(scope="module")
def ids():
    return np.random.default_rng(1234).integers(0, 211, 24)


@pytest.fixture(scope="module")
def long_ids():
    """Longer than SMALL_BATCH: prefill takes the BLAS + glu_threshold path instead of ffn_glu_batch."""
    ids = np.random.default_rng(99).integers(0, 211, 100)
    assert len(ids) > SMALL_BATCH
    return ids


@pytest.fixture
def rt(tiny_llama_pkg):
    return Model(tiny_llama_pkg, ctx=128)


# -- dense: against transformers -----------------------------------------------------------------
def test_numpy_reference_matches_transformers(ref, tiny_hf, ids):
    lr, _, _ = ref.forward(ids)
    assert_logits("numpy reference vs HF", lr, hf_logits(tiny_hf, ids))


@pytest.mark.parametrize("which", ["short", "long"])
def test_prefill_all_logits_match_transformers(rt, tiny_hf, ids, long_ids, which):
    x = ids if which == "short" else long_ids
    out = rt.forward(x, all_logits=True)
    assert out.dtype == np.float32
    assert_logits(f"{which} prefill ({len(x)} tokens) vs HF", out, hf_logits(tiny_hf, x))
    assert rt.pos == len(x)
    rt.reset()
    assert_logits(f"{which} prefill, last logits", rt.forward(x), hf_logits(tiny_hf, x)[-1])


def test_decode_steps_match_transformers(rt, tiny_hf, ids, tiny_llama_pkg):
    ref = hf_logits(tiny_hf, ids)
    got = decode_logits(rt, ids, 7)
    assert_logits("prefill 7 + decode 17 vs HF", got, ref[6:])
    cfg = rt.cfg
    # dense: every decode step keeps every neuron of every layer
    assert rt.stats.ffn_kept == [cfg.ffn_dim * cfg.n_layers] * (len(ids) - 7)


def test_greedy_generation_matches_transformers(tiny_llama_pkg, tiny_hf, hf_greedy):
    prompt = [5, 6, 7, 8, 9]
    n = 20
    hf_seq = hf_greedy(tiny_hf, prompt, n)
    rt = Model(tiny_llama_pkg, ctx=64)
    out, stats = generate(rt, prompt, n, Sampler(0.0))
    # margin between the best and second-best HF logit along the path: how far from a tie
    lg = hf_logits(tiny_hf, prompt + hf_seq[:-1])[len(prompt) - 1:]
    top2 = np.sort(lg, axis=1)[:, -2:]
    print("HF tokens", hf_seq, "\nruntime  ", out, "\nmin top-1/top-2 margin", float((top2[:, 1] - top2[:, 0]).min()))
    assert out == hf_seq
    assert stats.generated_tokens == len(out) and stats.prompt_tokens == len(prompt)
    assert stats.ffn_rows_read_fraction == 1.0      # dense: every row and column read


@pytest.mark.parametrize("S", [11, 9, 8])
def test_prompt_longer_than_max_batch(tiny_llama_pkg, tiny_hf, ids, S):
    """max_batch=4: S=11 is 4+4+3, S=9 ends in a 1-token chunk (decode kernel), S=8 is 4+4."""
    rt = Model(tiny_llama_pkg, ctx=64, max_batch=4)
    assert rt.max_batch == 4
    ref = hf_logits(tiny_hf, ids)
    assert_logits(f"all_logits S={S} in chunks of 4", rt.forward(ids[:S], all_logits=True), ref[:S])
    rt.reset()
    assert_logits(f"last logits S={S} in chunks of 4", rt.forward(ids[:S]), ref[S - 1])
    # and decoding continues correctly from a chunked prefill
    for p in range(S, S + 3):
        assert_logits(f"decode at {p}", rt.forward([int(ids[p])]), ref[p])


def test_long_prompt_in_blas_and_small_chunks(tiny_llama_pkg, tiny_hf):
    """170 tokens with max_batch=80: two BLAS-path chunks (80 > SMALL_BATCH) and one of 10."""
    rt = Model(tiny_llama_pkg, ctx=256, max_batch=80)
    assert 80 > SMALL_BATCH
    x = np.random.default_rng(7).integers(0, 211, 170)
    assert_logits("170 tokens in chunks of 80", rt.forward(x, all_logits=True), hf_logits(tiny_hf, x))


# -- thresholds: against the NumPy reference ---------------------------------------------------
@pytest.fixture(scope="module")
def thresholded(ref, ids):
    chooser = GapChooser()
    lt, hs, ts = ref.forward(ids, chooser)
    return lt, hs, ts, chooser.margins


@pytest.fixture(scope="module")
def thresholded_long(ref, long_ids):
    chooser = GapChooser()
    lt, hs, ts = ref.forward(long_ids, chooser)
    return lt, hs, ts, chooser.margins


def test_reference_thresholds_change_the_output(ref, ids, thresholded):
    """Guards the tests below: at these thresholds a runtime ignoring them would fail."""
    lt, hs, ts, margins = thresholded
    ld, _, _ = ref.forward(ids)
    change = float(np.abs(lt - ld).max())
    frac = [float((np.abs(h) >= t).mean()) for h, t in zip(hs, ts)]
    print("thresholds", ts, "margins", margins, "kept fractions", frac, "logit change", change)
    assert change > 100 * LOGIT_TOL
    assert all(0.3 < f < 0.7 for f in frac)


def test_thresholded_prefill_matches_reference(rt, ids, thresholded):
    """Short prompt: the ffn_glu_batch path."""
    lt, _, ts, _ = thresholded
    rt.set_thresholds(ts)
    assert_logits("thresholded prefill vs numpy", rt.forward(ids, all_logits=True), lt)


def test_thresholded_long_prefill_matches_reference(rt, ref, long_ids, thresholded_long):
    """Long prompt: the BLAS + glu_threshold path."""
    lt, _, ts, margins = thresholded_long
    ld, _, _ = ref.forward(long_ids)
    print("margins", margins, "logit change from thresholds", float(np.abs(lt - ld).max()))
    assert np.abs(lt - ld).max() > 100 * LOGIT_TOL
    rt.set_thresholds(ts)
    assert_logits("thresholded long prefill vs numpy", rt.forward(long_ids, all_logits=True), lt)


def test_thresholded_decode_matches_reference(rt, ids, thresholded):
    lt, hs, ts, margins = thresholded
    n0 = 5
    rt.set_thresholds(ts)
    rt.reset()
    rt.forward(ids[:n0])
    h_err = 0.0
    for p in range(n0, len(ids)):
        logits = rt.forward([int(ids[p])])
        assert_logits(f"thresholded decode at {p}", logits, lt[p])
        want_kept = 0
        for l, t in enumerate(ts):
            h_err = max(h_err, float(np.abs(rt.h[l] - hs[l][p]).max()))
            # the runtime's own h decides; it must decide like the reference
            np.testing.assert_array_equal(np.abs(rt.h[l]) >= np.float32(t), np.abs(hs[l][p]) >= t)
            want_kept += int((np.abs(hs[l][p]) >= t).sum())
        assert rt.stats.ffn_kept[-1] == want_kept
    print(f"max|h diff| {h_err:.3g}, smallest distance of any |h| from its threshold {min(margins):.3g}")
    # the exact-set comparison above is meaningful only if no |h| sits within rounding of t
    assert min(margins) > 10 * h_err


def test_generate_stats_count_rows_read(tiny_llama_pkg, ref, ids, thresholded):
    """ffn_rows_read_fraction = (gate + up rows of all neurons + down columns of kept neurons) / all."""
    _, _, ts, _ = thresholded
    rt = Model(tiny_llama_pkg, ctx=64)
    rt.set_thresholds(ts)
    out, stats = generate(rt, list(ids[:6]), 8, Sampler(0.0))
    seq = list(ids[:6]) + out
    _, hs, _ = ref.forward(seq[:-1], ts)
    # decode steps feed out[0..] at positions 6.. (the last chosen token is never fed)
    kept = [sum(int((np.abs(h[p]) >= t).sum()) for h, t in zip(hs, ts)) for p in range(6, len(seq) - 1)]
    cfg = rt.cfg
    L, N = cfg.n_layers, cfg.ffn_dim
    assert rt.stats.ffn_kept == kept
    want = (2 * N * L + np.mean(kept)) / (3 * N * L)
    print("rows read fraction", stats.ffn_rows_read_fraction, "expected", want)
    assert stats.ffn_rows_total == 3 * N * L
    assert stats.ffn_rows_read_fraction == pytest.approx(want, rel=1e-12)
    assert 2 / 3 < stats.ffn_rows_read_fraction < 1


def test_infinite_thresholds_remove_the_ffn(rt, ref, ids):
    L = rt.cfg.n_layers
    lr, _, _ = ref.forward(ids, [math.inf] * L)
    rt.set_thresholds([math.inf] * L)
    assert_logits("t=inf prefill vs numpy without FFN", rt.forward(ids, all_logits=True), lr)
    assert_logits("t=inf decode vs numpy without FFN", decode_logits(rt, ids, 20), lr[19:])
    assert rt.stats.ffn_kept == [0] * 4


def test_thresholds_from_the_manifest(tiny_llama_pkg, tmp_path, ref, ids, thresholded):
    """Thresholds written into manifest.json (one of them +inf, stored as `Infinity`) are loaded."""
    _, _, ts, _ = thresholded
    ts = [ts[0], math.inf, ts[2]]
    pkg = tmp_path / "pkg"
    shutil.copytree(tiny_llama_pkg, pkg)
    m = read_manifest(pkg)
    layers = tuple(dataclasses.replace(l, threshold=t) for l, t in zip(m.layers, ts))
    write_manifest_atomic(pkg, dataclasses.replace(m, layers=layers, sparsity={"method": "synthetic"}))
    assert "Infinity" in (pkg / "manifest.json").read_text()
    rt = Model(pkg, ctx=64)
    np.testing.assert_array_equal(rt.thresholds, np.array(ts, np.float32))
    lr, _, _ = ref.forward(ids, ts)
    assert_logits("manifest thresholds vs numpy", rt.forward(ids, all_logits=True), lr)


@pytest.mark.parametrize("bad", [[0.1, float("nan"), 0.1], [0.1, -0.5, 0.1], [0.1, 0.1], [[0.1, 0.1, 0.1]]])
def test_set_thresholds_rejects_bad_values(rt, bad):
    before = rt.thresholds.copy()
    with pytest.raises(EdgesparseError, match="thresholds"):
        rt.set_thresholds(bad)
    np.testing.assert_array_equal(rt.thresholds, before)


# -- other packages ----------------------------------------------------------------------------
def test_tied_embeddings_package(tiny_tied_pkg, tiny_tied_dir, ids):
    from transformers import LlamaForCausalLM
    hf = LlamaForCausalLM.from_pretrained(tiny_tied_dir, dtype=torch.float32).eval()
    assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    m = read_manifest(tiny_tied_pkg)
    assert m.config.tie_embeddings
    assert "lm_head" not in m.tensors and not (tiny_tied_pkg / "head.bin").exists()
    rt = Model(tiny_tied_pkg, ctx=64)
    ref = hf_logits(hf, ids)
    assert_logits("tied prefill vs HF", rt.forward(ids, all_logits=True), ref)
    assert_logits("tied decode vs HF", decode_logits(rt, ids, 10), ref[9:])


def test_float16_package(tiny_llama_pkg_f16, tiny_hf, ids):
    """float16 storage: compare with the HF model whose weights are rounded to float16 the same
    way (activations stay float32 on both sides, so the same tolerance applies). Covers the
    float16 paths of gather_rows, ffn_glu, matvec (decode lm_head) and the widened prefill."""
    hf16 = copy.deepcopy(tiny_hf)
    for p in hf16.parameters():        # parameters only: .half() would also round rotary inv_freq
        p.data = p.data.half().float()
    assert read_manifest(tiny_llama_pkg_f16).tensors["embed"].dtype == "float16"
    rt = Model(tiny_llama_pkg_f16, ctx=64)
    ref = hf_logits(hf16, ids)
    assert_logits("float16 prefill vs HF(float16 weights)", rt.forward(ids, all_logits=True), ref)
    assert_logits("float16 decode vs HF(float16 weights)", decode_logits(rt, ids, 10), ref[9:])
    # and it is a different model from the float32 one by more than the tolerance
    assert np.abs(ref - hf_logits(tiny_hf, ids)).max() > 10 * LOGIT_TOL


# -- state and limits --------------------------------------------------------------------------
def test_reset_reuses_the_cache_without_clearing_it(tiny_llama_pkg, tiny_hf, ids):
    rt = Model(tiny_llama_pkg, ctx=64)
    rt.forward(np.arange(40) % 211)                  # fill 40 cache positions with other tokens
    rt.reset()
    assert rt.pos == 0
    short = ids[:10]
    assert_logits("after reset vs HF", decode_logits(rt, short, 4), hf_logits(tiny_hf, short)[3:])


def test_context_limit_and_bad_tokens(tiny_llama_pkg):
    rt = Model(tiny_llama_pkg, ctx=16)
    assert rt.ctx == 16
    rt.forward(np.arange(15))
    rt.forward([3])                                  # position 15: the last one
    with pytest.raises(EdgesparseError, match="context full"):
        rt.forward([3])
    rt.reset()
    for bad in ([211], [-1], [5, 300]):
        with pytest.raises(EdgesparseError, match=r"\[0, 211\)"):
            rt.forward(bad)
    with pytest.raises(EdgesparseError, match="empty"):
        rt.forward([])
    assert Model(tiny_llama_pkg, ctx=10_000).ctx == 256   # capped at the model's max_position
    with pytest.raises(EdgesparseError, match="--ctx"):
        Model(tiny_llama_pkg, ctx=0)

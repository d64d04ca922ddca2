"""The vocabulary-sparse lm_head (`run --head sparse`): its kernels against NumPy on odd shapes, the
draft written at export equal to the one derived at load, and the sparse head's greedy token equal
to the full head's (a tiny random model; SmolLM2 int8 under `slow`). No timing."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from edgesparse import tiles
from edgesparse.headdraft import HeadDraft, draft_tiles, q4_0
from edgesparse.quant import quantize_int8_groups, round_activations
from edgesparse.runtime import kernels as K
from edgesparse.runtime.core.head import set_head
from edgesparse.runtime.core.model import Model
from edgesparse.runtime.core.state import zeros64

EPS32 = float(np.finfo(np.float32).eps)


def _int8_tiles(rng, V: int, D: int):
    w = rng.standard_normal((V, D)).astype(np.float32)
    q, d = quantize_int8_groups(w)
    t = tiles.to_tiles(q, d, 8).view(np.int8)                      # [ceil(V/16), D/32, 544]
    return t, tiles.dequantize_tiles(t.view(np.uint8), V, 8)       # [V, D] the values it stands for


def _xb(D: int):
    return (np.zeros((1, D), np.int8), np.zeros((1, D // 4), np.float32), np.zeros((1, D // 4), np.int32))


@pytest.mark.parametrize("V,D,chunks", [(1000, 96, 1), (1000, 96, 3), (37, 32, 2), (16, 64, 1)])
def test_tile_blocks_matches_numpy(V, D, chunks):
    rng = np.random.default_rng(V + D)
    t, W = _int8_tiles(rng, V, D)
    x = rng.standard_normal((1, D)).astype(np.float32)
    bias = rng.standard_normal(V).astype(np.float32) if V % 2 == 0 else np.zeros(0, np.float32)
    xb = _xb(D)
    K.quantize_activations(x, *xb)
    B = t.shape[0]
    sel = np.array(sorted({B - 1, 0, B // 2, B // 3}), np.int64)     # the short last block included
    y = np.full(V, -np.inf, np.float32)
    K.tile_blocks(t, sel, 0, sel.size, xb, bias, y, chunks, zeros64((chunks, 16)))
    ref = (round_activations(x).astype(np.float64) @ W.T.astype(np.float64))[0]   # [V]
    if bias.size:
        ref += bias
    rows = np.concatenate([np.arange(16 * b, min(16 * b + 16, V)) for b in sel])
    diff = np.abs(y[rows] - ref[rows]).max()
    bound = 2 * D * EPS32 * (np.abs(round_activations(x)) @ np.abs(W).T).max() + 1e-6
    print(f"tile_blocks V={V} D={D} chunks={chunks}: max |diff| {diff:.3g} (bound {bound:.3g})")
    assert diff <= bound
    assert np.isneginf(np.delete(y, rows)).all()
    # the full head's kernel gives the same values bitwise (the greedy token's agreement rests on it)
    Y = np.zeros((1, V), np.float32)
    K.linear_tiles(t, x, bias, np.zeros((0, V), np.float32), Y, chunks, xb, zeros64((chunks, 16)))
    assert np.array_equal(Y[0, rows], y[rows])


@pytest.mark.parametrize("V", [1000, 37, 16])
def test_selection_kernels_match_numpy(V):
    rng = np.random.default_rng(V)
    a = rng.standard_normal(V).astype(np.float32)                  # [V] draft scores
    B = -(-V // 16)
    bmax = np.zeros(B, np.float32)
    K.block_max(a, bmax)
    ref = np.array([a[16 * b:16 * b + 16].max() for b in range(B)])
    assert np.array_equal(bmax, ref)
    k = min(5, B)
    sel, topv, mark = np.zeros(B + 2, np.int64), np.zeros(k, np.float32), np.zeros(B, np.uint8)
    n = K.top_blocks(bmax, k, sel, topv, mark)
    assert n == k and set(sel[:n]) == set(np.argsort(-bmax)[:k]) and mark.sum() == k
    cut = np.float32(np.quantile(bmax, 0.3))
    m = K.extend_blocks(bmax, cut, sel, n, mark)
    want = set(np.argsort(-bmax)[:k]) | set(np.flatnonzero(bmax >= cut))
    assert m == len(want) and set(sel[:m]) == want and mark.sum() == m
    assert K.extend_blocks(bmax, np.float32(-np.inf), sel[:m], m, mark) == m + 1 or m == B   # does not fit
    y = a + rng.standard_normal(V).astype(np.float32) * 0.1
    lstar, sigma = K.candidate_stats(y, a, sel, m)
    rows = np.concatenate([np.arange(16 * b, min(16 * b + 16, V)) for b in sel[:m]])
    print(f"candidate_stats V={V}: l* {lstar:.4f}, sigma diff {abs(sigma - np.sqrt(np.mean((y[rows] - a[rows]) ** 2))):.2g}")
    assert lstar == y[rows].max() and sigma == pytest.approx(np.sqrt(np.mean((y[rows] - a[rows]).astype(np.float64) ** 2)))
    s, big = K.outside_mass(a, mark, 1.5, 1 / 0.7)
    out = np.setdiff1d(np.arange(V), rows)
    e = np.exp((a[out].astype(np.float64) - 1.5) / 0.7)
    assert s == pytest.approx(e.sum()) and big == pytest.approx(e.max() if e.size else 0.0)
    K.clear_marks(sel, m, mark)
    assert mark.sum() == 0


def test_draft_is_plain_q4_0():
    rng = np.random.default_rng(0)
    t, W = _int8_tiles(rng, 100, 64)
    d = draft_tiles(t, 100, 8, chunk=32)                           # chunked as for a large head
    q, s = q4_0(W)
    assert np.array_equal(d, tiles.to_tiles(q, s, 4))
    Wd = tiles.dequantize_tiles(d, 100, 4)
    print(f"draft error rms {np.sqrt(np.mean((Wd - W) ** 2)):.3f} of weights rms {np.sqrt(np.mean(W ** 2)):.3f}")
    assert np.abs(Wd - W).max() <= np.abs(W).reshape(100, 2, 32).max(-1).max() / 8 + 1e-6


@pytest.fixture(scope="module")
def wide_vocab_int8(tiny_model_factory, tmp_path_factory):
    """A tiny random Llama with a vocabulary of 1999 (125 blocks, the last short), exported int8."""
    from edgesparse.export import export
    src = tiny_model_factory("LlamaConfig", "LlamaForCausalLM", seed=3, vocab_size=1999, tie_word_embeddings=False)
    return export(str(src), tmp_path_factory.mktemp("wide_pkg") / "wide8.esp", dtype="int8", progress=False)


def _teacher_forced(model: Model, ids, temperature=0.0, top_p=1.0):
    """Per step: (full head's argmax, full logits, and the sparse head's argmax and logits, or None
    where it falls back to the full head)."""
    sh = model.sparse_head
    sh.set_sampling(temperature, top_p)
    sh.adaptive = False              # every step's own answer, not the probing policy's
    y = np.zeros(model.cfg.vocab_size, np.float32)
    model.reset()
    out = []
    for tok in ids:
        model.sparse_head = None
        model.forward([tok])
        model.sparse_head = sh
        xf = np.ascontiguousarray(model._final(model.s.hidden[:1], model.s.xn))
        got = sh.run(xf, y, model.s.xb, model.threads)
        out.append((int(np.argmax(model.logits)), int(np.argmax(y)) if got else None, model.logits.copy(),
                    y.copy() if got else None))
    return out


def test_sparse_head_greedy_equals_full_tiny(wide_vocab_int8):
    m = Model(wide_vocab_int8, ctx=128, threads=2)
    assert m.pkg.manifest.head_draft == HeadDraft()                 # written at export
    assert set_head(m, "sparse") == 0.0
    derived = draft_tiles(m.head, m.cfg.vocab_size, 8)
    assert np.array_equal(derived, m.sparse_head.draft)             # what a device would derive at load
    ids = np.random.default_rng(0).integers(3, 1999, 100)
    steps = _teacher_forced(m, ids)
    used = [s for s in steps if s[1] is not None]
    print(f"tiny int8, V=1999: {len(used)} of {len(steps)} steps sparse, "
          f"{sum(a == b for a, b, *_ in used)} agree")
    assert len(used) >= 90 and all(a == b for a, b, *_ in used)
    for _, _, full, sparse in used:                                  # candidates' logits bitwise equal
        ok = np.isfinite(sparse)
        assert np.array_equal(full[ok], sparse[ok])
    # generation through the CLI path: the same tokens as the full head
    from edgesparse.runtime.core.generate import generate
    from edgesparse.runtime.core.sampling import Sampler
    toks_sparse, st = generate(m, [5, 9, 11], 24, Sampler())
    assert st.head.startswith("sparse") and st.head_mb_per_token < st.head_full_mb
    set_head(m, "full")
    toks_full, st = generate(m, [5, 9, 11], 24, Sampler())
    assert toks_sparse == toks_full and st.head == "full"


def test_sparse_sampling_certificate(wide_vocab_int8):
    """A certified top-p step has exactly the full head's nucleus; with top-p = 1 the left-out mass
    is below OUTSIDE_MASS."""
    from edgesparse.runtime.core.head import OUTSIDE_MASS
    m = Model(wide_vocab_int8, ctx=128, threads=1)
    set_head(m, "sparse")
    ids = np.random.default_rng(1).integers(3, 1999, 60)
    # the random model's logits spread by 0.2: temperatures that make its draws peaked enough to certify
    for T, p in ((0.02, 0.9), (0.005, 1.0)):
        n_cert = 0
        for _, _, full, sparse in _teacher_forced(m, ids, T, p):
            if sparse is None:          # not certified: the full head answers
                continue
            n_cert += 1
            pf = np.exp((full.astype(np.float64) - full.max()) / T)
            pf /= pf.sum()
            if p < 1:
                order = np.argsort(-pf)
                nucleus = set(order[:int(np.searchsorted(np.cumsum(pf[order]), p)) + 1])
                assert nucleus <= set(np.flatnonzero(np.isfinite(sparse)))
            else:
                assert pf[~np.isfinite(sparse)].sum() <= OUTSIDE_MASS
        print(f"T={T} top_p={p}: {n_cert} of {len(ids)} steps certified")
        assert n_cert >= 5
    # where nothing certifies, the draft is read on the probing steps only (a fallback reads both)
    from edgesparse.runtime.core.generate import generate
    from edgesparse.runtime.core.head import PROBE
    from edgesparse.runtime.core.sampling import Sampler
    m.sparse_head.adaptive = True
    set_head(m, "sparse", 1.0, 0.9)
    _, st = generate(m, [5, 9, 11], 41, Sampler(1.0, 0.9, seed=0))
    full = m.head.nbytes
    hb = np.array(m.stats.head_bytes)
    print(f"T=1 top_p=0.9: {st.head}; draft read on {(hb > full).sum()} of {hb.size} steps")
    assert (hb >= full).all() and (hb > full).sum() <= hb.size // PROBE + 8


def test_sparse_head_refuses_float_head(tiny_llama_pkg):
    from edgesparse.errors import EdgesparseError
    m = Model(tiny_llama_pkg, ctx=32, threads=1)
    with pytest.raises(EdgesparseError, match="--head sparse"):
        set_head(m, "sparse")


def test_manifest_head_draft_round_trip(wide_vocab_int8, tmp_path):
    import json
    import shutil
    from edgesparse.errors import PackageError
    from edgesparse.format import read_manifest
    from edgesparse.format_write import dump_manifest
    m = read_manifest(wide_vocab_int8)
    assert json.loads(dump_manifest(m))["head_draft"] == HeadDraft().to_json()
    pkg = tmp_path / "p.esp"
    shutil.copytree(wide_vocab_int8, pkg)
    doc = json.loads((pkg / "manifest.json").read_text())
    for bad in ({"top_blocks": 0}, {"margin": -1}, {"tensor": "embed"}, {"nope": 1}):
        (pkg / "manifest.json").write_text(json.dumps({**doc, "head_draft": {**doc["head_draft"], **bad}}))
        with pytest.raises(PackageError, match="head_draft"):
            read_manifest(pkg)
    (pkg / "manifest.json").write_text(json.dumps({k: v for k, v in doc.items() if k != "head_draft"}))
    assert read_manifest(pkg).head_draft is None


@pytest.mark.slow
def test_sparse_head_greedy_equals_full_smollm2(tmp_path_factory):
    """SmolLM2-135M exported int8 (its head int8 tiles, the draft written): teacher-forced WikiText-2
    test text, the sparse head's greedy token equals the full head's on every step it answers."""
    from edgesparse.export import export
    from edgesparse.runtime.core.text import TextCodec
    from edgesparse.runtime.sparsity.textdata import wikitext
    pkg = export(None, tmp_path_factory.mktemp("smol8") / "smol8.esp", dtype="int8", progress=False)
    m = Model(pkg, ctx=512, threads=2)
    set_head(m, "sparse")
    ids = TextCodec(m.pkg).encode(wikitext("test"))[:300]
    steps = _teacher_forced(m, ids)
    used = [s for s in steps if s[1] is not None]
    agree = sum(a == b for a, b, *_ in used)
    print(f"SmolLM2 int8: {len(used)} of {len(steps)} steps sparse, {agree} agree")
    assert len(used) >= 0.9 * len(steps) and agree == len(used)


def test_spec_dataclass_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        HeadDraft().margin = 1.0                                    # type: ignore[misc]

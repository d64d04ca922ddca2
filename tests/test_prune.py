"""Pruning (`edgesparse prune`): neurons almost never active at the calibrated thresholds are
dropped from a copy of the package.

Checked against a reference built independently: the activity rates recomputed with NumPy from
transformers' own FFN values, and the pruned package's logits against the original package with
those neurons' h forced to zero (a forward-pre-hook on transformers' down projection), exactly
what dropping them must mean.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest


@pytest.fixture(scope="module")
def calibrated(tiny_llama_pkg, tmp_path_factory):
    from edgesparse.cli import main
    d = tmp_path_factory.mktemp("prune")
    words = np.random.default_rng(11).integers(3, 211, 3000)
    text = d / "text.txt"
    text.write_text(" ".join(f"w{i}" for i in words) + "\n")
    pkg = d / "cal.esp"
    shutil.copytree(tiny_llama_pkg, pkg)
    assert main(["calibrate", str(pkg), "--text", str(text), "--tokens", "1024", "--predictor", "-q"]) == 0
    return pkg, text, words


def test_prune_drops_rarely_active_neurons(calibrated, tiny_hf, tmp_path, capsys):
    import torch
    from edgesparse.cli import main
    from edgesparse.runtime.sparsity.levels import configure, thresholds_for
    from edgesparse.runtime.core.model import Model
    from edgesparse.runtime.core.package import Package
    pkg, text, words = calibrated
    src = Package(pkg)
    t = thresholds_for(src.manifest.sparsity, "paper", 0.5)
    # reference activity: |h| >= t on the same 1024 tokens (4 windows of 256 from position 0)
    hs = []
    hooks = [layer.mlp.down_proj.register_forward_pre_hook(lambda m, a: hs.append(a[0][0].detach().numpy().copy()))
             for layer in tiny_hf.model.layers]
    try:
        for w in words[:1024].reshape(4, 256):
            tiny_hf(torch.tensor(w[None]))
    finally:
        for hk in hooks:
            hk.remove()
    L = src.config.n_layers
    hl = [np.concatenate([hs[i] for i in range(l, len(hs), L)]) for l in range(L)]
    rates = [(np.abs(h) >= t[l]).mean(axis=0) for l, h in enumerate(hl)]
    # Random tiny weights have no "dead" neurons, so the test prunes about a third of them: a
    # max_rate in the middle of a gap of the sorted rates (rates are multiples of 1/1024; a token
    # whose |h| sits within rounding of t may count differently in the runtime and in torch).
    r = np.unique(np.concatenate(rates))
    i = int(np.argmax(np.diff(r)[len(r) // 5:len(r) // 2])) + len(r) // 5
    max_rate = float((r[i] + r[i + 1]) / 2)
    keep = [np.flatnonzero(rl >= max_rate) for rl in rates]
    n_kept = [int(k.size) for k in keep]
    out = tmp_path / "pruned.esp"
    assert main(["prune", str(pkg), "-o", str(out), "--text", str(text), "--tokens", "1024",
                 "--max-rate", repr(max_rate), "--level", "0.5"]) == 0
    print(capsys.readouterr().err)
    p = Package(out)
    man = json.loads((out / "manifest.json").read_text())
    print("kept per layer", n_kept, "manifest says", man["sparsity"]["pruned"])
    assert man["sparsity"]["pruned"]["neurons_per_layer"] == n_kept
    assert 0.5 < sum(n_kept) / (L * src.config.ffn_dim) < 0.9
    for l, k in enumerate(keep):
        np.testing.assert_array_equal(p.tensor(f"layers.{l}.ffn"), src.tensor(f"layers.{l}.ffn")[k])
        np.testing.assert_array_equal(p.tensor(f"layers.{l}.pred_q"), src.tensor(f"layers.{l}.pred_q")[k])
    assert p.tensor("layers.0.ffn").shape[0] == n_kept[0]
    # pruned dense model == transformers with the pruned neurons' h zeroed
    mask = [torch.zeros(src.config.ffn_dim, dtype=torch.bool) for _ in range(L)]
    for l, k in enumerate(keep):
        mask[l][torch.from_numpy(k)] = True
    hooks = [layer.mlp.down_proj.register_forward_pre_hook(lambda m, a, l=l: (a[0] * mask[l],))
             for l, layer in enumerate(tiny_hf.model.layers)]
    ids = np.random.default_rng(3).integers(3, 211, 90)
    try:
        ref = tiny_hf(torch.tensor(ids[None])).logits[0].numpy()
    finally:
        for hk in hooks:
            hk.remove()
    for S in (40, 90):
        m = Model(out, ctx=128)
        m.set_ffn_mode("dense")
        d = np.abs(m.forward(ids[:S], all_logits=True) - ref[:S]).max()
        print(f"pruned dense prefill of {S} tokens vs transformers with the same neurons zeroed: {d:.2e}")
        assert d < 2e-5
        kept_frac = m.counts[:, 0].sum() / m.counts[:, 1].sum()
        assert kept_frac <= sum(n_kept) / (L * src.config.ffn_dim) + 1e-12   # pruned neurons count as skipped
    m = Model(out, ctx=128)
    m.set_ffn_mode("dense")
    dec = [m.forward(ids[:5]).copy()] + [m.forward([i]).copy() for i in ids[5:30]]
    d = np.abs(np.array(dec) - ref[4:30]).max()
    print(f"pruned dense decode: {d:.2e}")
    assert d < 2e-5
    # the other modes run on the pruned package (per-layer neuron counts)
    m.reset()
    configure(m, "predict", 0.5)
    m.forward(ids[:70])
    m.forward([1])
    assert np.isfinite(m.logits).all()


def test_prune_refuses_bad_arguments(calibrated, tmp_path, capsys):
    from edgesparse.cli import main
    pkg, text, _ = calibrated
    assert main(["prune", str(pkg), "-o", str(tmp_path / "x"), "--text", str(text), "--max-rate", "1.5"]) != 0
    assert "--max-rate" in capsys.readouterr().err
    assert main(["prune", str(pkg), "-o", str(pkg), "--text", str(text), "--tokens", "256"]) != 0
    assert "already exists" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".*partial"))

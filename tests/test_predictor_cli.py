"""The predictor through the CLI (`calibrate --predictor`, `run --ffn predict`, `eval --methods
predict`), its manifest entries, and `edgesparse analyze` with its per-layer cost."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from edgesparse.errors import EdgesparseError
from edgesparse.format import read_manifest
from edgesparse.runtime.sparsity import predictor as P
from edgesparse.runtime.sparsity.levels import configure
from edgesparse.runtime.core.model import Model
from edgesparse.runtime.core.package import Package
from edgesparse.runtime.sparsity.textdata import token_windows
from helpers.predictor_ref import (CAL_TOKENS, PROMPT, TINY_WINDOW, act_ref, cli_error, exact_dequant, pred_dirs,
                                   pred_pkg, pred_rows, run_ok, text_file, tree_digest)


# == 4. the CLI ======================================================================================
def test_cli_calibrate_predictor_writes_the_predictor(pred_pkg, tiny_llama_pkg, text_file, capsys):
    m, base = read_manifest(pred_pkg), read_manifest(tiny_llama_pkg)
    cfg = m.config
    N, D, L = cfg.ffn_dim, cfg.d_model, cfg.n_layers
    cal = m.sparsity["calibration"]
    assert set(cal["thresholds"]) == {"paper", "gate", "input", "predicted"}
    assert cal["tokens"] == CAL_TOKENS and cal["window"] == TINY_WINDOW
    i50 = cal["levels"].index(0.5)
    assert [l.pred_threshold for l in m.layers] == cal["thresholds"]["predicted"][i50]
    assert all(l.pred_threshold > 0 for l in m.layers)
    for row in zip(*cal["thresholds"]["predicted"]):         # per layer, over the levels
        assert row[0] == 0.0 and all(a < b for a, b in zip(row, row[1:]))
    # one new directory with one file per layer, every other file untouched
    dirs = pred_dirs(pred_pkg)
    assert len(dirs) == 1 and re.fullmatch(r"pred-[0-9a-f]{8}", dirs[0]), dirs
    new = sorted(set(m.files) - set(base.files))
    assert new == [f"{dirs[0]}/{i:03d}.bin" for i in range(L)]
    assert set(base.files) <= set(m.files)
    before, after = tree_digest(tiny_llama_pkg), tree_digest(pred_pkg)
    assert {k for k in before if after.get(k) != before[k]} == {"manifest.json"}
    for i, l in enumerate(m.layers):
        q, s = m.tensors[l.pred_q], m.tensors[l.pred_scale]
        assert (q.dtype, q.shape, s.dtype, s.shape) == ("int8", (N, 2, D), "float32", (N, 2))
        assert q.file == s.file == f"{dirs[0]}/{i:03d}.bin"
    # the stored predictor is quantize() of the stored FFN rows
    pkg = Package(pred_pkg)
    for l, (pq, ps) in zip(m.layers, P.load(pkg)):
        want_q, want_s = P.quantize(pkg.tensor(l.ffn))
        np.testing.assert_array_equal(pq, want_q)
        np.testing.assert_array_equal(ps, want_s)
    out, _ = run_ok(capsys, "verify", pred_pkg)
    assert "ok" in out and f"{len(m.files)} files" in out

    # t_pred are percentiles of |h^| on the calibration windows (dense model), like the paper's
    # thresholds of |h|: within the histogram's 0.5 points (tests/test_calibration.py)
    rt = Model(pred_pkg, ctx=TINY_WINDOW)
    rt.set_thresholds([0.0] * L)
    wq = pred_rows(rt.pkg)
    fs = {l: [] for l in range(L)}
    rt.observer = lambda l, f, g, u: fs[l].append(f.astype(np.float64))
    ids = [int(w[1:]) for w in text_file.read_text().split()]
    for w in token_windows(ids, TINY_WINDOW, CAL_TOKENS // TINY_WINDOW):
        rt.reset()
        rt.forward(w)
    worst = 0.0
    for l in range(L):
        f = np.concatenate(fs[l])
        assert f.shape[0] == CAL_TOKENS
        hp = np.abs(act_ref("silu", f @ wq[l][:, 0].T) * (f @ wq[l][:, 1].T))
        for i, q in enumerate(cal["levels"]):
            if q > 0:
                frac = float((hp < cal["thresholds"]["predicted"][i][l]).mean())
                worst = max(worst, abs(frac - q))
    print(f"max |fraction of |h^| below t_pred - level| = {worst:.2e}")
    assert worst <= 0.005


def test_calibrate_tabulates_the_given_predictor(tiny_llama_pkg):
    """calibrate(..., predictor=...) tabulates |h^| of the predictor it is given: with int rows
    quantized from unrelated random weights, |h^| has nothing to do with |h| (an accurate int8
    predictor would hide a table of |h| instead), and the stored levels must be its percentiles."""
    from edgesparse.runtime.sparsity.calibrate import calibrate
    rt = Model(tiny_llama_pkg, ctx=128, max_batch=128)
    L, N, D = rt.cfg.n_layers, rt.cfg.ffn_dim, rt.cfg.d_model
    rng = np.random.default_rng(77)
    pred = [P.quantize((rng.standard_normal((N, 3, D)) / math.sqrt(D)).astype(np.float32)) for _ in range(L)]
    ids = list(rng.integers(3, 211, 512))
    table = calibrate(rt, ids, tokens=512, window=128, progress=False, predictor=pred)
    assert set(table["thresholds"]) == {"paper", "gate", "input", "predicted"}
    assert set(table["histograms"]) == set(table["thresholds"])
    wq = [exact_dequant(pq, ps) for pq, ps in pred]
    fs = {l: [] for l in range(L)}
    rt.observer = lambda l, f, g, u: fs[l].append(f.astype(np.float64))
    for w in token_windows(ids, 128, 4):
        rt.reset()
        rt.forward(w)
    rt.observer = None
    worst, apart = 0.0, 0.0
    for l in range(L):
        f = np.concatenate(fs[l])
        hp = np.abs(act_ref("silu", f @ wq[l][:, 0].T) * (f @ wq[l][:, 1].T))
        for i, q in enumerate(table["levels"]):
            t = table["thresholds"]["predicted"][i][l]
            if q == 0:
                assert t == 0.0
                continue
            worst = max(worst, abs(float((hp < t).mean()) - q))
            apart = max(apart, abs(math.log10(t / table["thresholds"]["paper"][i][l])))
    print(f"max |fraction of |h^| below t_pred - level| {worst:.2e}; the tables differ by up to "
          f"{apart:.2f} decades")
    assert worst <= 0.005
    assert apart > 0.1              # guard: a table of |h| would fail the first check


def test_cli_run_predict(pred_pkg, tmp_path, capsys):
    """`run --ffn predict --stats`: the rows-read line, against the other two modes."""
    fr, text = {}, {}
    for ffn in ("dense", "threshold", "predict"):
        js = tmp_path / f"{ffn}.json"
        text[ffn], err = run_ok(capsys, "run", pred_pkg, *PROMPT, "-n", 12, "--ffn", ffn, "--stats",
                                "--stats-json", js)
        line = [x for x in err.splitlines() if x.startswith("FFN rows read per token")]
        assert len(line) == 1, err
        pct = float(re.search(r"\(([0-9.]+)%\)", line[0]).group(1))
        fr[ffn] = json.loads(js.read_text())["ffn_rows_read_fraction"]
        assert pct == pytest.approx(100 * fr[ffn], abs=0.05)
    # dense reads everything; the paper rule at 50% reads all gate/up rows and half the downs,
    # predict reads gate/up rows of about half the neurons and the downs of the survivors
    assert fr["dense"] == 1.0
    assert 0.75 < fr["threshold"] < 0.92
    assert 0.2 < fr["predict"] < 0.6 and fr["predict"] < fr["threshold"]
    # at level 0 predict is the dense model: the same greedy text
    zero, _ = run_ok(capsys, "run", pred_pkg, *PROMPT, "-n", 12, "--ffn", "predict", "--sparsity", 0)
    assert zero == text["dense"] and len(zero.split()) == 12
    print("rows read fractions", fr)       # last: run_ok reads (and checks) captured stdout


def test_cli_eval_predict(pred_pkg, text_file, tmp_path, capsys):
    out = tmp_path / "out"
    run_ok(capsys, "eval", pred_pkg, "--text", text_file, "--ctx", 128, "--methods", "paper,predict",
           "--sparsity", "0,0.5", "--windows", 1, "-o", out, "-q")
    res = json.loads((out / "eval.json").read_text())
    rs = res["results"]
    assert [(r["method"], r["target"]) for r in rs] == [("dense", 0.0), ("paper", 0.5), ("predict", 0.5)]
    dense, paper, pred = rs
    assert all(math.isfinite(r["perplexity"]) and r["perplexity"] > 1 for r in rs)
    assert pred["perplexity"] != dense["perplexity"] and pred["perplexity"] != paper["perplexity"]
    assert pred["ffn_bytes_skippable"] > 0
    cand, read = np.array(pred["candidates_per_layer"]), np.array(pred["rows_read_per_layer"])
    ach = np.array(pred["achieved_sparsity_per_layer"])
    assert np.all((0 < cand) & (cand < 1))
    # rows read = (gate + up of candidates + down of survivors) / 3N
    np.testing.assert_allclose(read, (2 * cand + 1 - ach) / 3, rtol=0, atol=1e-12)
    assert pred["ffn_bytes_skippable"] == pytest.approx(1 - read.mean(), abs=1e-12)
    assert np.all(ach >= 1 - cand - 1e-12)        # a non-candidate is never kept
    assert dense["ffn_bytes_skippable"] == 0 and dense["achieved_sparsity_mean"] == 0
    # without --methods: every calibrated method, the predictor's included
    out2 = tmp_path / "out2"
    run_ok(capsys, "eval", pred_pkg, "--text", text_file, "--ctx", 128, "--sparsity", "0.5", "--windows", 1,
           "-o", out2, "-q")
    rs2 = json.loads((out2 / "eval.json").read_text())["results"]
    assert [r["method"] for r in rs2] == ["paper", "gate", "input", "predict"]     # the active one first
    assert rs2[3]["perplexity"] == pytest.approx(pred["perplexity"], rel=1e-12)
    print(json.dumps(pred, indent=1))


def test_cli_recalibrate_keeps_the_predictor(pred_pkg, text_file, tmp_path, capsys):
    pkg = tmp_path / "pkg"
    shutil.copytree(pred_pkg, pkg)
    (d,) = pred_dirs(pkg)
    before = {k: v for k, v in tree_digest(pkg).items() if k.startswith(d)}
    m0 = read_manifest(pkg)
    # leftovers of a crashed calibration: an unlisted predictor and a half-written one
    (pkg / "pred-deadbeef").mkdir()
    (pkg / "pred-deadbeef" / "000.bin").write_bytes(b"x")
    (pkg / ".pred-0badf00d.partial").mkdir()
    run_ok(capsys, "calibrate", pkg, "--text", text_file, "--tokens", CAL_TOKENS, "--target", "0.3", "-q")
    m = read_manifest(pkg)
    assert pred_dirs(pkg) == [d]
    assert {k: v for k, v in tree_digest(pkg).items() if k.startswith(d)} == before
    assert [(l.pred_q, l.pred_scale) for l in m.layers] == [(l.pred_q, l.pred_scale) for l in m0.layers]
    cal = m.sparsity["calibration"]
    assert "predicted" in cal["thresholds"] and m.sparsity["level"] == 0.3
    assert [l.pred_threshold for l in m.layers] == cal["thresholds"]["predicted"][cal["levels"].index(0.3)]
    assert cal["thresholds"]["predicted"] == m0.sparsity["calibration"]["thresholds"]["predicted"]  # same text
    run_ok(capsys, "verify", pkg)
    # --predictor again on a package that has one: re-tabulated, not rebuilt
    run_ok(capsys, "calibrate", pkg, "--text", text_file, "--tokens", CAL_TOKENS, "--predictor", "--target", "0",
           "-q")
    assert pred_dirs(pkg) == [d]
    assert [l.pred_threshold for l in read_manifest(pkg).layers] == [0.0, 0.0, 0.0]
    # another active method: predict applies the paper rule, so it needs a level to take it from
    run_ok(capsys, "calibrate", pkg, "--text", text_file, "--tokens", CAL_TOKENS, "--method", "gate", "-q")
    assert pred_dirs(pkg) == [d]
    cli_error(capsys, ["run", pkg, *PROMPT, "--ffn", "predict"], "--ffn predict", "'gate'")
    run_ok(capsys, "run", pkg, *PROMPT, "-n", 4, "--ffn", "predict", "--sparsity", 0.5)
    run_ok(capsys, "verify", pkg)


def test_cli_predict_without_a_predictor(tiny_llama_pkg, text_file, tmp_path, capsys):
    cli_error(capsys, ["run", tiny_llama_pkg, *PROMPT, "--ffn", "predict"], tiny_llama_pkg, "needs a predictor",
              "--predictor")
    cli_error(capsys, ["eval", tiny_llama_pkg, "--text", text_file, "--ctx", 128, "--methods", "paper,predict",
                       "--sparsity", "0", "-o", tmp_path / "o", "-q"], "predict", "predictor")
    assert not (tmp_path / "o").exists()
    cli_error(capsys, ["eval", tiny_llama_pkg, "--text", text_file, "--ctx", 128, "--methods", "predicted",
                       "--sparsity", "0", "-o", tmp_path / "o", "-q"], "'predicted'")
    cli_error(capsys, ["bench", tiny_llama_pkg, "--ffn", "threshold,bogus", "-o", tmp_path / "b", "-q"],
              "--ffn", "bogus")
    assert not (tmp_path / "b").exists()


def test_cli_predict_with_a_partial_predictor(pred_pkg, tmp_path, capsys):
    """A manifest may give the predictor to some layers only (all three keys or none per layer);
    predict mode needs every layer's."""
    pkg = tmp_path / "pkg"
    shutil.copytree(pred_pkg, pkg)
    edit_manifest(pkg, lambda d: [d["layers"][2].pop(k) for k in ("pred_q", "pred_scale", "pred_threshold")])
    run_ok(capsys, "run", pkg, *PROMPT, "-n", 2)
    cli_error(capsys, ["run", pkg, *PROMPT, "--ffn", "predict"], "needs a predictor")


def test_export_calibrate_still_works(tiny_llama_dir, text_file, tmp_path, capsys):
    """`export --calibrate TEXT` runs the calibration with the defaults (no predictor)."""
    out = tmp_path / "pkg"
    run_ok(capsys, "export", tiny_llama_dir, "-o", out, "--calibrate", text_file, "-q")
    m = read_manifest(out)
    assert m.sparsity["method"] == "paper" and all(l.pred_q is None for l in m.layers)
    assert pred_dirs(out) == []


# == 5. the manifest =================================================================================
def edit_manifest(pkg: Path, fn) -> Path:
    m = pkg / "manifest.json"
    doc = json.loads(m.read_text())
    fn(doc)
    m.write_text(json.dumps(doc))
    return m


def _named(fn, name: str):
    fn.__name__ = name[:60]              # the pytest id
    return fn


def _set(layer: int, key: str, value):
    return _named(lambda d: d["layers"][layer].update({key: value}), f"layers[{layer}].{key}={value!r}")


def _pop(layer: int, key: str):
    return _named(lambda d: d["layers"][layer].pop(key), f"layers[{layer}].{key} missing")


def _tensor(name: str, **kw):
    return _named(lambda d: d["tensors"][name].update(kw), f"{name} {kw}")


@pytest.mark.parametrize("edit,needles", [
    (_pop(1, "pred_threshold"), ["layers[1]", "pred_threshold"]),
    (_set(1, "pred_threshold", None), ["layers[1]", "pred_threshold"]),
    (_pop(1, "pred_scale"), ["layers[1]", "pred_scale"]),
    (_pop(0, "pred_q"), ["layers[0]", "pred_q"]),
    (_set(1, "pred_threshold", -0.5), ["layers[1]", "pred_threshold", "-0.5"]),
    (_set(1, "pred_threshold", True), ["layers[1]", "pred_threshold"]),
    (_set(1, "pred_threshold", "0.1"), ["layers[1]", "pred_threshold"]),
    (_set(2, "pred_threshold", 10 ** 400), ["layers[2]", "pred_threshold"]),
    (_set(1, "pred_q", "layers.1.nope"), ["layers[1]", "layers.1.nope"]),
    (_tensor("layers.1.pred_q", dtype="float32", file="ffn/001.bin", offset=0), ["layers.1.pred_q", "int8"]),
    (_tensor("layers.1.pred_q", shape=[136, 2, 24]), ["layers.1.pred_q", "[136, 2, 24]"]),
    (_tensor("layers.1.pred_scale", dtype="int32"), ["layers.1.pred_scale", "float32"]),
    (_tensor("layers.1.pred_scale", file="ffn/001.bin", offset=0, shape=[136, 2, 1, 3]),
     ["layers.1.pred_scale", "[136, 2, 1, 3]"]),
    # not [N, 2]; the enlarged tensors are moved into a file large enough for them, so that their
    # shape is what is wrong
    (_tensor("layers.1.pred_scale", file="ffn/001.bin", offset=0, shape=[136, 2, 5]),
     ["layers.1.pred_scale", "[136, 2, 5]"]),
    (_tensor("layers.1.pred_scale", file="ffn/001.bin", offset=0, shape=[136, 1, 3]),
     ["layers.1.pred_scale", "[136, 1, 3]"]),
    (_set(1, "pred_q", "layers.1.ffn"), ["layers.1.ffn"]),
])
def test_manifest_predictor_entries_checked(pred_pkg, tmp_path, capsys, edit, needles):
    pkg = tmp_path / "pkg"
    shutil.copytree(pred_pkg, pkg)
    m = edit_manifest(pkg, edit)
    cli_error(capsys, ["run", pkg, *PROMPT], m, *needles)
    cli_error(capsys, ["verify", pkg], m, *needles)


def test_manifest_pred_threshold_round_trips(pred_pkg, tmp_path):
    """Integer pred_thresholds load as floats; the writer emits the three keys only for layers
    that have a predictor, and what it writes reads back the same."""
    from edgesparse.format_write import dump_manifest
    pkg = tmp_path / "pkg"
    shutil.copytree(pred_pkg, pkg)
    edit_manifest(pkg, lambda d: (d["layers"][0].update(pred_threshold=0), d["layers"][1].update(pred_threshold=2),
                                  [d["layers"][2].pop(k) for k in ("pred_q", "pred_scale", "pred_threshold")]))
    m = read_manifest(pkg)
    assert [l.pred_threshold for l in m.layers] == [0.0, 2.0, None]
    assert all(type(l.pred_threshold) is float for l in m.layers[:2])
    rt = Model(pkg, ctx=16)
    assert rt.t_pred.tolist() == [0.0, 2.0, 0.0] and not rt.has_predictor
    doc = json.loads(dump_manifest(m))
    assert [sorted(k for k in l if k.startswith("pred")) for l in doc["layers"]] == \
        [["pred_q", "pred_scale", "pred_threshold"]] * 2 + [[]]
    assert doc["layers"][0]["pred_threshold"] == 0.0 and doc["layers"][1]["pred_threshold"] == 2.0
    (pkg / "manifest.json").write_bytes(dump_manifest(m))
    assert read_manifest(pkg) == m


# == 6. edgesparse analyze ===========================================================================
def test_study_on_constructed_patterns():
    """The predictability study on active sets built to have known answers: layer 0 keeps one
    pattern per window (consecutive tokens and the previous-token predictor are perfect), layer 1
    is independent coin flips (consecutive overlap = chance), and the predictor sets equal the
    active sets (recall = precision = 1)."""
    from edgesparse.runtime.sparsity import analyze
    rng = np.random.default_rng(5)
    L, W, n, N = 2, 128, 4, 40     # windows longer than analyze.PROMPT, so the prompt set is studied
    T = W * n
    A = np.zeros((L, T, N), bool)
    for w in range(n):
        A[0, w * W:(w + 1) * W] = rng.random(N) < 0.5
    A[1] = rng.random((T, N)) < 0.5
    sig = rng.standard_normal((T // analyze.CHUNK, 8))
    res = analyze.study(A, A.copy(), sig, W)
    l0, l1 = res["per_layer"]
    print("layer 0", {k: l0[k] for k in ("consecutive_jaccard", "random_pair_jaccard")},
          "layer 1", {k: l1[k] for k in ("consecutive_jaccard", "random_pair_jaccard")})
    assert l0["consecutive_jaccard"] == 1.0
    assert l0["previous_token"] == {"recall": 1.0, "precision": 1.0,
                                    "predicted_fraction": pytest.approx(A[0][np.arange(T) % W > 0].mean())}
    # two independent halves: Jaccard of two p = 1/2 sets is 1/3 on average (T-1 pairs of 40 bits)
    assert abs(l1["consecutive_jaccard"] - 1 / 3) < 0.03 and abs(l1["random_pair_jaccard"] - 1 / 3) < 0.03
    for row in (l0, l1):
        assert row["int8_predictor"]["recall"] == 1.0 and row["int8_predictor"]["precision"] == 1.0
        for name in ("previous_token", "static", "prompt_set"):
            assert 0.0 <= row[name]["recall"] <= 1.0 and 0.0 <= row[name]["precision"] <= 1.0
    assert "previous_layer" in l1 and "previous_layer" not in l0
    assert res["mean"]["int8_predictor"] == {"recall": 1.0, "precision": 1.0}


def test_analyze_cli(pred_pkg, text_file, tmp_path, capsys):
    """`edgesparse analyze` on the tiny package with its int8 predictor: JSON with every study per
    layer, and the predictor recalls nearly all of the active set (it ranks like h itself)."""
    out = tmp_path / "an"
    stdout, _ = run_ok(capsys, "analyze", pred_pkg, "--text", text_file, "--tokens", 512, "-o", out, "-q")
    res = json.loads((out / "analyze.json").read_text())
    assert res["layers"] == 3 and res["tokens"] == 512 and len(res["per_layer"]) == 3
    rec = [r["int8_predictor"]["recall"] for r in res["per_layer"]]
    print("int8 predictor recall per layer", rec, "| active fraction", res["active_fraction"])
    assert min(rec) > 0.9
    assert all(abs(f - 0.5) < 0.1 for f in res["active_fraction"])   # 'active' = the calibrated 50% rule
    assert "int8_predictor: recall / precision" in stdout and (out / "analyze.md").exists()
    # the per-layer cost (a package with a predictor): in the JSON, the table and its plot
    cost = res["cost"]
    assert len(cost["per_layer"]) == 3 and cost["level"] == 0.5 and cost["load"] == "mmap"
    assert "| predictor MB | predictor ms |" in stdout and "FFN bytes per token" in stdout
    assert cost["head"] == "full" and "lm_head bytes per token" in stdout and "(--head full)" in stdout
    assert (out / "analyze_cost.png").read_bytes()[:4] == b"\x89PNG"
    cli_error(capsys, ["analyze", pred_pkg, "--text", text_file, "--tokens", 100], "--tokens 100")
    cli_error(capsys, ["analyze", pred_pkg, "--text", text_file, "--load", "disk"], "--load", "disk")
    cli_error(capsys, ["analyze", pred_pkg, "--text", text_file, "--head", "sparse"], "int8")   # a float head


def test_layer_cost_against_a_plain_decode(pred_pkg, text_file):
    """layer_cost.measure: per layer, candidates, survivors and rows read per token equal the counts
    of a separate predict-mode decode of the same tokens (rows = 2 per candidate + 1 per survivor);
    the predictor-only run (candidate thresholds at +inf) has no candidate, so it reads no FFN row;
    the predictor's bytes are its two tensors' sizes as the manifest declares them; the model's
    thresholds, mode and candidate thresholds are as before."""
    from edgesparse.runtime.sparsity import layer_cost
    from edgesparse.runtime.core.text import TextCodec
    model = Model(pred_pkg, threads=2, ctx=128)
    configure(model, "threshold", 0.3)
    before = model.thresholds.copy(), model.method, model.ffn_mode, model.t_pred.copy()
    ids = np.array(TextCodec(model.pkg).encode(text_file.read_text(), special=False)[:60])
    prompt, steps = 8, 20
    cost = layer_cost.measure(model, ids, 0.5, prompt=prompt, steps=steps, rounds=2, progress=False)
    assert (model.thresholds == before[0]).all() and model.method == before[1] and model.ffn_mode == before[2]
    assert (model.t_pred == before[3]).all() and model.ffn_seconds is None

    ref = Model(pred_pkg, threads=2, ctx=128)
    configure(ref, "predict", 0.5)
    ref.forward(ids[:prompt])
    ref.reset_counts()
    for t in ids[prompt:prompt + steps]:
        ref.forward([int(t)])
    kept, total, cand = (ref.counts[:, i].astype(np.float64) for i in range(3))
    m = read_manifest(pred_pkg)
    tensor_bytes = lambda name: int(np.prod(m.tensors[name].shape)) * np.dtype(m.tensors[name].dtype).itemsize  # noqa: E731
    for l, row in enumerate(cost["per_layer"]):
        print(f"layer {l}: candidates {row['candidates']:.3f} survivors {row['survivors']:.3f} rows read "
              f"{row['rows_read_fraction']:.3f}; ms predictor {row['predictor_ms']:.4f} predict {row['predict_ms']:.4f} "
              f"dense {row['dense_ms']:.4f}")
        assert row["candidates"] == cand[l] / total[l] and row["survivors"] == kept[l] / total[l]
        assert row["rows_read_per_token"] == (2 * cand[l] + kept[l]) / steps
        assert 0.2 < row["candidates"] < 0.8 and row["survivors"] <= row["candidates"]
        assert row["predictor_candidates"] == 0
        lw = m.layers[l]
        assert row["predictor_bytes"] == tensor_bytes(lw.pred_q) + tensor_bytes(lw.pred_scale)
        assert row["ffn_bytes"] == tensor_bytes(lw.ffn)
        for k in ("predictor_ms", "predict_ms", "dense_ms"):
            assert math.isfinite(row[k]) and row[k] > 0
    # the full head: every decode step reads the whole lm_head tensor (and its scales, if any)
    head = "embed" if model.cfg.tie_embeddings else "lm_head"      # float32: no scales
    print("head bytes per token", cost["total"]["head_bytes_per_token"], "of", cost["total"]["head_full_bytes"])
    assert cost["head"] == "full"
    assert cost["total"]["head_bytes_per_token"] == cost["total"]["head_full_bytes"] == tensor_bytes(head)
    with pytest.raises(EdgesparseError, match="69 tokens of text needed"):
        layer_cost.measure(model, ids[:30], 0.5, prompt=5, steps=64, progress=False)

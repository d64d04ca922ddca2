"""eval's KL divergence and chat evaluation, calibrate's chat transcripts and quality budget, and
run's --prefill, through the CLI on the tiny random models (references: test_quality.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgesparse.format import read_manifest
from edgesparse.runtime.core.model import Model
from edgesparse.runtime.sparsity import divergence
from edgesparse.runtime.sparsity.calibrate import LEVELS
from edgesparse.runtime.sparsity.levels import Setting
from edgesparse.runtime.sparsity.textdata import token_windows
from helpers.calibration_ref import (CAL_TOKENS, calibrate_copy, calibrated_pkg, cli_error, run_ok,  # noqa: F401
                                     text_file, text_ids)
from helpers.predictor_ref import pred_pkg  # noqa: F401
from helpers.quality_ref import chat_pkg, with_template  # noqa: F401


@pytest.fixture(scope="module")
def eval_out(chat_pkg, text_file, tiny_llama_pkg_f16, tmp_path_factory):
    out = tmp_path_factory.mktemp("qeval") / "out"
    cache = tmp_path_factory.mktemp("answers")
    from edgesparse.cli import main
    assert main(["eval", str(chat_pkg), "--text", str(text_file), "--ctx", "128", "--windows", "2",
                 "--sparsity", "0,0.5", "--methods", "paper", "--chat", "6", "--answer-tokens", "10", "--prefill", "dense,sparse",
                 "--yardstick", str(tiny_llama_pkg_f16), "--cache", str(cache), "-o", str(out), "-q"]) == 0
    return out


def test_eval_reports_kld_and_chat(eval_out, chat_pkg, text_file):
    res = json.loads((eval_out / "eval.json").read_text())
    k, c = res["kld"], res["chat"]
    names = [r["name"] for r in k["results"]]
    assert names[:2] == ["dense", "paper 0.5"] and names[2].startswith("float16 dense")
    assert [r["name"] for r in c["results"]][:3] == ["dense", "paper 0.5, dense prefill", "paper 0.5, sparse prefill"]
    assert c["results"][3]["method"] == "yardstick" and c["results"][3]["dtype"] == "float16"
    assert c["instructions"] == 6 == len(c["answers"]) and c["answer_tokens"] == 10
    # the text KLD is the library's on the perplexity's own windows, and its dense perplexity eval's
    m = Model(chat_pkg, ctx=128, max_batch=128)
    wins = token_windows(text_ids(text_file), 128, 2)
    ref = divergence.text_kld(m, wins, [Setting("threshold", "paper", 0.5)], progress=False)["results"]
    for got, want in zip(k["results"], ref):
        assert got["kld_mean"] == pytest.approx(want["kld_mean"], rel=1e-12, abs=1e-15)
        assert got["same_top1"] == want["same_top1"]
    assert k["results"][0]["perplexity"] == pytest.approx(res["results"][0]["perplexity"], rel=1e-5)
    yard = k["results"][2]
    print(f"float16 yardstick: text KLD {yard['kld_mean']:.2e}, paper 0.5 {k['results'][1]['kld_mean']:.4f}")
    assert 0 < yard["kld_mean"] < k["results"][1]["kld_mean"]          # float16 rounding: tiny, not zero
    md = (eval_out / "eval.md").read_text()
    assert "| configuration | sparsity (answers) | KLD mean | p90 | p99 | same top-1 |" in md
    assert "| configuration | perplexity | KLD mean | median | p99 | max | same top-1 |" in md
    png = (eval_out / "quality_vs_sparsity.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_eval_runs_the_active_method_first(tiny_llama_pkg, text_file, tmp_path, capsys):
    pkg = calibrate_copy(tiny_llama_pkg, tmp_path / "pkg", text_file, "--method", "gate", "--target", "0.5")
    out = tmp_path / "out"
    run_ok(capsys, "eval", pkg, "--text", text_file, "--ctx", 128, "--windows", 1, "--sparsity", "0,0.5",
           "-o", out, "-q")
    rs = json.loads((out / "eval.json").read_text())
    assert [(r["method"], r["target"]) for r in rs["results"]] == [("dense", 0.0), ("gate", 0.5), ("paper", 0.5),
                                                                   ("input", 0.5)]
    assert [r["name"] for r in rs["kld"]["results"]] == ["dense", "gate 0.5", "paper 0.5", "input 0.5"]


def test_eval_ffn_predict_and_the_old_spelling(pred_pkg, text_file, tmp_path, capsys):
    new, old = tmp_path / "new", tmp_path / "old"
    _, err = run_ok(capsys, "eval", pred_pkg, "--text", text_file, "--ctx", 128, "--windows", 1, "--sparsity", "0.5",
                    "--ffn", "threshold,predict", "--methods", "paper", "-o", new, "-q")
    assert "deprecated" not in err
    _, err = run_ok(capsys, "eval", pred_pkg, "--text", text_file, "--ctx", 128, "--windows", 1, "--sparsity", "0.5",
                    "--methods", "paper,predict", "-o", old, "-q")
    assert "--methods predict is deprecated" in err and "--ffn predict" in err
    a, b = (json.loads((d / "eval.json").read_text()) for d in (new, old))
    assert [r["method"] for r in a["results"]] == [r["method"] for r in b["results"]] == ["paper", "predict"]
    assert [r["perplexity"] for r in a["results"]] == [r["perplexity"] for r in b["results"]]
    assert [r["name"] for r in a["kld"]["results"]] == ["dense", "paper 0.5", "predict 0.5"]
    # predict alone
    run_ok(capsys, "eval", pred_pkg, "--text", text_file, "--ctx", 128, "--windows", 1, "--sparsity", "0.5",
           "--ffn", "predict", "-o", tmp_path / "p", "-q")
    assert [r["method"] for r in json.loads((tmp_path / "p" / "eval.json").read_text())["results"]] == ["predict"]


@pytest.mark.parametrize("args,needles", [
    (["--ffn", "sparse"], ["--ffn", "'sparse'"]),
    (["--ffn", "predict"], ["--ffn predict", "predictor"]),
    (["--methods", "bogus"], ["--methods", "'bogus'"]),
    (["--prefill", "half"], ["--prefill half"]),
    (["--chat", "-1"], ["--chat", "-1"]),
    (["--chat", "3"], ["--chat 3", "no chat template"]),
    (["--answer-tokens", "0"], ["--answer-tokens"]),
])
def test_eval_bad_quality_options(calibrated_pkg, text_file, tmp_path, capsys, args, needles):
    cli_error(capsys, ["eval", calibrated_pkg, "--text", text_file, "--ctx", 128, "--windows", 1, "--sparsity", "0.5",
                       "-o", tmp_path / "o", "-q", *args], *needles)


def test_eval_yardstick_must_be_the_same_model(chat_pkg, tiny_tied_pkg, text_file, tmp_path, capsys):
    cli_error(capsys, ["eval", chat_pkg, "--text", text_file, "--ctx", 128, "--windows", 1, "--sparsity", "0",
                       "--chat", 0, "--yardstick", tiny_tied_pkg, "-o", tmp_path / "o", "-q"],
              "--yardstick", "another model", "config or tokenizer")


# == calibrate: chat transcripts and the budget ==================================================
@pytest.fixture(scope="module")
def chat_uncalibrated(tiny_llama_pkg, tmp_path_factory):
    return with_template(tiny_llama_pkg, tmp_path_factory.mktemp("chatu") / "pkg")


def _calibrate(capsys, src, dst, text_file, cache, *args):
    import shutil
    shutil.copytree(src, dst)
    _, err = run_ok(capsys, "calibrate", dst, "--text", text_file, "--tokens", CAL_TOKENS, "--chat", 12,
                    "--chat-tokens", 16, "--cache", cache, "-q", *args)
    return read_manifest(dst), err


def test_calibrate_adds_the_chat_answers(chat_uncalibrated, text_file, tmp_path, capsys):
    m, err = _calibrate(capsys, chat_uncalibrated, tmp_path / "pkg", text_file, tmp_path / "c", "--target", "0.5")
    cal, N = m.sparsity["calibration"], m.config.ffn_dim
    chat = cal["chat"]
    assert chat["transcripts"] == 12 and chat["answer_tokens"] == 16 and "fit" in chat["instructions"]
    assert 12 <= cal["chat_tokens"] <= 12 * 16 and cal["tokens"] == CAL_TOKENS
    h = cal["histograms"]["paper"]
    total = np.sum(h["counts"], axis=1) + np.array(h["zeros"]) + np.array(h["overflow"])
    np.testing.assert_array_equal(total, (CAL_TOKENS + cal["chat_tokens"]) * N)   # text and answer tokens, once
    text_only, _ = _calibrate(capsys, chat_uncalibrated, tmp_path / "t", text_file, tmp_path / "c", "--target", "0.5",
                              "--chat", 0)
    assert "chat" not in text_only.sparsity["calibration"]
    assert text_only.sparsity["calibration"]["thresholds"]["paper"] != cal["thresholds"]["paper"]
    assert m.sparsity["level"] == 0.5 and "budget" not in m.sparsity and m.sparsity["prefill"] == "dense"


def test_calibrate_budget_picks_the_highest_level_within(chat_uncalibrated, text_file, tmp_path, capsys):
    m, err = _calibrate(capsys, chat_uncalibrated, tmp_path / "all", text_file, tmp_path / "c", "--budget", "1e9")
    tried = m.sparsity["budget"]["tried"]
    curve = {r["level"]: r["kld_mean"] for r in tried}
    print(err, curve)
    assert list(curve) == [q for q in LEVELS if q > 0] and m.sparsity["level"] == 0.9
    # a budget between two measured levels: the highest level before the first one over it
    limit = (curve[0.4] + curve[0.5]) / 2
    want = 0.0
    for q in sorted(curve):
        if curve[q] > limit:
            break
        want = q
    assert 0 < want < 0.9
    m2, err2 = _calibrate(capsys, chat_uncalibrated, tmp_path / "mid", text_file, tmp_path / "c", "--budget",
                          repr(limit))
    b = m2.sparsity["budget"]
    assert m2.sparsity["level"] == want == b["chosen"] == max(r["level"] for r in b["tried"] if r["within"])
    assert {r["level"]: r["kld_mean"] for r in b["tried"]} == {q: curve[q] for q in curve if q <= b["tried"][-1]["level"]}
    assert not b["tried"][-1]["within"] and b["limit"] == limit
    i = LEVELS.index(want)
    assert [l.threshold for l in m2.layers] == m2.sparsity["calibration"]["thresholds"]["paper"][i]
    assert f"active level {want:.1f}: the highest level within the budget" in err2


def test_calibrate_without_a_chat_template(calibrated_pkg, tiny_llama_pkg, text_file, tmp_path, capsys):
    """No template: the text alone and the paper's 0.5; an explicit budget or --chat is an error."""
    assert read_manifest(calibrated_pkg).sparsity["level"] == 0.5
    import shutil
    shutil.copytree(tiny_llama_pkg, tmp_path / "p")
    cli_error(capsys, ["calibrate", tmp_path / "p", "--text", text_file, "--tokens", CAL_TOKENS, "--budget", "0.01",
                       "-q"], "--budget", "no chat template")
    cli_error(capsys, ["calibrate", tmp_path / "p", "--text", text_file, "--tokens", CAL_TOKENS, "--chat", 4,
                       "--target", "0.5", "-q"], "--chat 4", "no chat template")
    cli_error(capsys, ["calibrate", tmp_path / "p", "--text", text_file, "--budget", "3x", "-q"], "--budget")


def test_run_prefill_option(chat_pkg, capsys):
    outs = {p: run_ok(capsys, "run", chat_pkg, "-p", "w10 w20 w30 w40", "-n", 8, "--prefill", p)[0]
            for p in ("dense", "sparse")}
    default, _ = run_ok(capsys, "run", chat_pkg, "-p", "w10 w20 w30 w40", "-n", 8)
    dense, _ = run_ok(capsys, "run", chat_pkg, "-p", "w10 w20 w30 w40", "-n", 8, "--ffn", "dense")
    print(outs, default, dense)
    assert default == outs["dense"]                 # the package's policy: dense unless calibrate said otherwise
    assert outs["dense"].split()[0] == dense.split()[0]   # the first token comes from the dense prompt


def test_eval_chat_beyond_ctx_and_dense_alone(chat_pkg, text_file, tmp_path, capsys):
    """--ctx is the perplexity's window, not a limit on the chat prompts: a 16-token window still
    gets the chat evaluation; and the dense model alone has nothing to compare, so no KLD or chat
    sections (and no answers generated for them)."""
    cache = tmp_path / "c"
    run_ok(capsys, "eval", chat_pkg, "--text", text_file, "--ctx", 16, "--windows", 2, "--sparsity", "0,0.5",
           "--methods", "paper", "--chat", 3, "--answer-tokens", 12, "--cache", cache, "-o", tmp_path / "a", "-q")
    res = json.loads((tmp_path / "a" / "eval.json").read_text())
    longest = max(len(x["prompt"]) + len(x["answer"]) for f in cache.glob("*.json")
                  for x in json.loads(f.read_text())["answers"])
    assert longest > 16 and res["chat"]["instructions"] == 3 and res["kld"]["window_tokens"] == 16
    run_ok(capsys, "eval", chat_pkg, "--text", text_file, "--ctx", 16, "--windows", 2, "--sparsity", "0",
           "--cache", tmp_path / "c2", "-o", tmp_path / "b", "-q")
    res = json.loads((tmp_path / "b" / "eval.json").read_text())
    assert "kld" not in res and "chat" not in res and not (tmp_path / "c2").exists()

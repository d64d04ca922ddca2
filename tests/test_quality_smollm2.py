"""Quality on the real SmolLM2-135M-Instruct (slow): the chat evaluation's dense against itself,
the README's chat example under the default calibration, and the prefill policy on a real prompt."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from edgesparse.format import read_manifest
from edgesparse.runtime.core.generate import generate
from edgesparse.runtime.core.model import Model
from edgesparse.runtime.core.sampling import Sampler
from edgesparse.runtime.core.text import TextCodec
from edgesparse.runtime.sparsity import answers, chat_eval, chatdata
from edgesparse.runtime.sparsity.levels import Setting, configure
from helpers.calibration_ref import run_ok

pytestmark = pytest.mark.slow
EXAMPLE = "What is the capital of France?"


@pytest.fixture(scope="module")
def smol_default(smollm2_pkg, tmp_path_factory):
    """SmolLM2 calibrated with calibrate's defaults on fewer tokens and transcripts (the same
    code path; the full defaults take ~15 minutes)."""
    pkg = tmp_path_factory.mktemp("smolq") / "smol.esp"
    shutil.copytree(smollm2_pkg, pkg)
    from edgesparse.cli import main
    assert main(["calibrate", str(pkg), "--text", "wikitext2", "--tokens", "4096", "--chat", "48",
                 "--cache", str(tmp_path_factory.mktemp("answers")), "-q"]) == 0
    return pkg


def _answer(pkg, level, **kw) -> str:
    m = Model(pkg, ctx=256)
    if level is not None:
        configure(m, "threshold", level)
    codec = TextCodec(m.pkg)
    ids, _ = generate(m, codec.chat_prompt(EXAMPLE), 16, Sampler(0.0), **kw)
    return codec.decode(ids)


def test_readme_chat_example(smol_default, capsys):
    sp = read_manifest(smol_default).sparsity
    b = sp["budget"]
    print(json.dumps(b, indent=1))
    assert sp["prefill"] == "dense" and 0.3 <= sp["level"] <= 0.6
    assert sp["level"] == max(r["level"] for r in b["tried"] if r["within"])
    out, _ = run_ok(capsys, "run", smol_default, "-p", EXAMPLE, "--chat", "-n", 16)       # the default level
    print("default level:", out)
    assert "Paris" in out
    for level in (0.5, sp["level"]):
        got = _answer(smol_default, level, prefill="dense")
        print(f"{level}: {got!r}")
        assert "Paris" in got


def test_chat_dense_against_itself_and_the_policy(smol_default):
    m = Model(smol_default, ctx=512)
    codec = TextCodec(m.pkg)
    items = chatdata.subset(chatdata.shipped("eval"), None, 12)
    ans = answers.dense_answers(m, codec, items, 16, None, progress=False)
    res = chat_eval.chat_quality(m, ans, [Setting("threshold", "paper", 0.5, p) for p in ("dense", "sparse")],
                                 progress=False)
    dense, dp, sp = res["results"]
    print(chat_eval.table(res, "SmolLM2, 12 instructions"))
    assert dense["kld_mean"] == dense["kld_max"] == 0.0 and dense["same_top1"] == 1.0
    # the dense model's greedy tokens come back from its own teacher-forced logits
    assert dense["greedy_all"] == 1.0 and dense["first_token"] == 1.0
    assert dp["first_token"] == 1.0 and dp["kld_by_position"][0] == 0.0
    assert 0 < dp["kld_mean"] < sp["kld_mean"]
    assert abs(dp["achieved_sparsity"] - 0.5) < 0.1

"""Quality as users feel it (runtime/sparsity/divergence.py, chat_eval.py, answers.py, budget.py,
the prefill policy): KL divergence against a NumPy reference on the same logits, dense against
itself, the shipped chat sets, the dense answers' cache, the prefill policy's logits, and the
budgeted calibration's choice, on the tiny random models. The real SmolLM2: test_quality_smollm2.py."""

from __future__ import annotations

import json
from importlib import resources

import numpy as np
import pytest

from edgesparse.cli import main
from edgesparse.errors import EdgesparseError
from edgesparse.format import read_manifest
from edgesparse.runtime.core.generate import generate
from edgesparse.runtime.core.model import Model
from edgesparse.runtime.core.text import TextCodec
from edgesparse.runtime.sparsity import answers, budget, chat_eval, chatdata, divergence
from edgesparse.runtime.sparsity.levels import DENSE, Setting, apply
from edgesparse.runtime.sparsity.textdata import token_windows
from helpers.calibration_ref import calibrated_pkg, cli_error, run_ok, text_file, text_ids  # noqa: F401
from helpers.quality_ref import TEMPLATE, chat_pkg, numpy_kld, with_template  # noqa: F401


# == KL divergence ===============================================================================
def test_kld_rows_against_numpy():
    rng = np.random.default_rng(0)
    p = rng.normal(0, 3, (150, 97)).astype(np.float32)          # more rows than one block of 64
    q = (p + rng.normal(0, 0.5, p.shape)).astype(np.float32)
    q[5] = p[5]                                                 # an identical row: KLD 0 exactly
    t = rng.integers(0, 97, 150)
    kld, same, nll = divergence.kld_rows(p, q, t)
    ref_kld, ref_same, ref_nll = numpy_kld(p, q, t)
    print(f"KLD mean {kld.mean():.5f}, max |diff| vs numpy {np.abs(kld - ref_kld).max():.2e}")
    np.testing.assert_allclose(kld, ref_kld, rtol=1e-12, atol=1e-15)
    np.testing.assert_array_equal(same, ref_same)
    np.testing.assert_allclose(nll, ref_nll, rtol=1e-12)
    assert kld[5] == 0.0 and same[5] and kld.min() >= 0.0 and 0 < same.mean() < 1


def test_summary_figures():
    kld = np.arange(101, dtype=np.float64) / 100
    s = divergence.summary(kld, kld < 0.5)
    assert s == {"positions": 101, "kld_mean": pytest.approx(0.5), "kld_median": 0.5, "kld_p90": pytest.approx(0.9),
                 "kld_p99": pytest.approx(0.99), "kld_max": 1.0, "same_top1": pytest.approx(50 / 101)}


def test_text_kld_equals_numpy_on_the_same_logits(calibrated_pkg, text_file):
    """The same windows and positions as the perplexity: every window from position 0, positions
    0..S-2; dense against itself is 0 with every top-1 the same."""
    m = Model(calibrated_pkg, ctx=128, max_batch=128)
    wins = token_windows(text_ids(text_file), 128, 3)
    s = Setting("threshold", "paper", 0.5)
    res = divergence.text_kld(m, wins, [s], progress=False)
    dense, sparse = res["results"]
    assert (dense["name"], sparse["name"]) == ("dense", "paper 0.5")
    assert res["positions"] == 3 * 127 == dense["positions"] == sparse["positions"]
    assert dense["kld_mean"] == dense["kld_max"] == 0.0 and dense["same_top1"] == 1.0
    ks, ss = [], []
    for w in wins:
        logits = []
        for setting in (DENSE, s):
            apply(m, setting, "decode")
            m.reset()
            logits.append(m.forward(w, all_logits=True)[:-1])
        k, same, _ = numpy_kld(*logits, w[1:])
        ks.append(k)
        ss.append(same)
    ref = divergence.summary(np.concatenate(ks), np.concatenate(ss))
    print(f"text KLD at 0.5: {sparse['kld_mean']:.6f} (numpy {ref['kld_mean']:.6f}), same top-1 {sparse['same_top1']:.3f}")
    assert ref["kld_mean"] > 0
    for key in ref:
        assert sparse[key] == pytest.approx(ref[key], rel=1e-12, abs=1e-15), key


# == chat sets and answers =======================================================================
def test_shipped_chat_sets():
    ev, cal = chatdata.shipped("eval"), chatdata.shipped("calibration")
    texts = [i.text for i in ev.items]
    print(len(texts), "eval instructions;", len(cal.items), "calibration")
    assert len(set(texts)) == len(texts) >= 100
    kinds = {i.kind for i in ev.items}
    assert {"fact", "arithmetic", "howto", "code", "summary", "translate", "list", "yesno", "creative", "explain",
            "multilingual", "refusal"} <= kinds
    assert not set(texts) & {i.text for i in cal.items}, "the calibration set overlaps the eval set"
    fit, check = chatdata.subset(cal, "fit"), chatdata.subset(cal, "check")
    assert len(fit.items) >= 100 and len(check.items) >= 32 and len(fit.items) + len(check.items) == len(cal.items)
    assert chatdata.subset(ev, None, 10).items == ev.items[:10]
    readme = (resources.files("edgesparse") / "data" / "chat" / "README.md").read_text()
    assert "Apache-2.0" in readme


def test_chat_sets_render_through_the_template(chat_pkg):
    codec = TextCodec(Model(chat_pkg, ctx=256).pkg)
    for i in chatdata.shipped("eval").items + chatdata.shipped("calibration").items:
        ids = codec.chat_prompt(i.text)
        # TEMPLATE: w1 w3 CONTENT w4 w5 (WordLevel: each English word is the unknown token w0)
        assert ids == codec.encode(f"w1 w3 {i.text} w4 w5", special=False)
        assert ids[:2] == [1, 3] and ids[-2:] == [4, 5] and ids[2:-2] == codec.encode(i.text, special=False)


@pytest.mark.parametrize("line,needle", [(b"{", "line 1: not JSON"), (b'{"id": "a"}', "non-empty \"instruction\""),
                                         (b'{"instruction": "x", "split": "train"}', "split 'train'"),
                                         (b'{"id": "a", "instruction": "x"}\n{"id": "a", "instruction": "y"}',
                                          "id 'a' appears twice"), (b"\n", "no instructions")])
def test_bad_instruction_files(line, needle):
    with pytest.raises(EdgesparseError, match=needle.replace("(", r"\(")):
        chatdata.parse(line, "f.jsonl")


def test_dense_answers_are_cached(chat_pkg, tmp_path):
    m = Model(chat_pkg, ctx=256)
    codec = TextCodec(m.pkg)
    items = chatdata.InstructionSet("t", tuple(chatdata.Instruction(f"i{k}", "", f"w{k} w{k + 7} w9") for k in range(10, 16)),
                                    "abc")
    got = answers.dense_answers(m, codec, items, 12, tmp_path, progress=False)
    assert m.ffn_mode == "threshold" and m.thresholds.max() > 0          # the package's level, given back
    dense = Model(chat_pkg, ctx=256)
    dense.configure("dense")
    for item, a in zip(items.items, got):       # the dense greedy answer, as generate makes it
        ref, _ = generate(dense, list(a.prompt), 12, _greedy())
        assert list(a.answer) == ref and a.prompt == tuple(codec.chat_prompt(item.text))
    entries = list(tmp_path.glob("*.json"))
    assert len(entries) == 1
    # the second call reads the entry: an answer edited in it comes back as edited
    doc = json.loads(entries[0].read_text())
    doc["answers"][0]["answer"] = [7, 7, 7]
    entries[0].write_text(json.dumps(doc))
    again = answers.dense_answers(m, codec, items, 12, tmp_path, progress=False)
    assert again[0].answer == (7, 7, 7) and again[1:] == got[1:]
    # another length is another entry, generated: greedy, so the same answers cut at 11
    short = answers.dense_answers(m, codec, items, 11, tmp_path, progress=False)
    assert len(list(tmp_path.glob("*.json"))) == 2
    assert [a.answer for a in short] == [a.answer[:11] for a in got]
    # a damaged entry is generated again, not an error
    entries[0].write_text("{not json")
    assert answers.dense_answers(m, codec, items, 12, tmp_path, progress=False) == got


def _greedy():
    from edgesparse.runtime.core.sampling import Sampler
    return Sampler(0.0)


# == chat quality ================================================================================
@pytest.fixture(scope="module")
def chat_answers(chat_pkg):
    m = Model(chat_pkg, ctx=256)
    items = chatdata.InstructionSet("t", tuple(chatdata.Instruction(f"i{k}", "k", " ".join(
        f"w{(k * 7 + j * 13) % 200 + 3}" for j in range(5 + k % 4))) for k in range(12)), "def")
    return answers.dense_answers(m, TextCodec(m.pkg), items, 20, None, progress=False)


def test_chat_quality_against_numpy(chat_pkg, chat_answers):
    m = Model(chat_pkg, ctx=256)
    settings = [Setting("threshold", "paper", 0.5, "sparse"), Setting("threshold", "paper", 0.5, "dense")]
    res = chat_eval.chat_quality(m, chat_answers, settings, progress=False)
    dense, sp, dp = res["results"]
    assert [r["name"] for r in res["results"]] == ["dense", "paper 0.5, sparse prefill", "paper 0.5, dense prefill"]
    assert res["positions"] == sum(len(a.answer) for a in chat_answers) == dense["positions"]
    assert dense["kld_mean"] == dense["kld_max"] == 0.0 and dense["same_top1"] == 1.0
    for r, s in ((sp, settings[0]), (dp, settings[1])):
        ks, ss, first, got = [], [], [], []
        for a in chat_answers:
            # reference: the prompt token by token's last logits, then each answer token alone
            p, q = _stepwise(m, a, DENSE), _stepwise(m, a, s)
            k, same, _ = numpy_kld(p, q)
            ks.append(k)
            ss.append(same)
            first.append(q[0].argmax() == a.answer[0])
            n = min(16, len(a.answer))
            got.append(next((i for i in range(n) if q[i].argmax() != a.answer[i]), n))
        ref = divergence.summary(np.concatenate(ks), np.concatenate(ss))
        print(f"{r['name']}: KLD {r['kld_mean']:.5f} (stepwise numpy {ref['kld_mean']:.5f}), first {r['first_token']}")
        assert r["kld_mean"] == pytest.approx(ref["kld_mean"], rel=1e-4)
        assert r["same_top1"] == pytest.approx(ref["same_top1"], abs=1.5 / ref["positions"])
        assert r["first_token"] == pytest.approx(np.mean(first), abs=1.5 / len(first))
        assert r["greedy_tokens"] > 0
    # a dense prompt: the first answer token's distribution is dense's exactly
    assert dp["kld_by_position"][0] == 0.0 and sp["kld_by_position"][0] > 0
    assert dp["first_token"] == 1.0


def _stepwise(m, a, s):
    """Logits [A, V] predicting the answer tokens, fed one decode step at a time (the decode path;
    chat_eval feeds the answer as one batch)."""
    m.reset()
    apply(m, s, "prompt")
    out = [m.forward(np.asarray(a.prompt)).copy()]
    apply(m, s, "decode")
    for t in a.answer[:-1]:
        out.append(m.forward([t]).copy())
    return np.stack(out)


def test_greedy_agreement_counts_the_generated_prefix(chat_pkg, chat_answers):
    """The greedy count from teacher-forced logits is what the configuration generates on its own."""
    m = Model(chat_pkg, ctx=256)
    s = Setting("threshold", "paper", 0.7, "sparse")
    total = 0
    for a in chat_answers:
        q = chat_eval.teacher_forced(m, a, s)
        _, got, n = chat_eval.agreement(q, a.answer)
        apply(m, s, "decode")
        own, _ = generate(m, list(a.prompt), n, _greedy())
        want = next((i for i in range(n) if own[i] != a.answer[i]), n)
        assert got == want, (a.id, got, want)
        total += got
    assert 0 < total < sum(min(16, len(a.answer)) for a in chat_answers)   # some diverge, not all at once


# == the prefill policy ==========================================================================
def test_dense_prefill_gives_the_dense_logits_for_the_prompt(calibrated_pkg):
    m = Model(calibrated_pkg, ctx=128)
    prompt = [1, 17, 45, 99, 120, 7, 33, 64, 150, 3]

    def logits_seen(prefill):
        seen = []
        def sampler(lg):
            seen.append(lg.copy())
            return int(np.argmax(lg))
        generate(m, prompt, 4, sampler, prefill=prefill)
        return seen
    m.configure("dense")
    m.reset()
    dense = m.forward(prompt).copy()                        # [V] the dense model at the prompt's end
    apply(m, Setting("threshold", "paper", 0.5), "decode")
    dp, sp = logits_seen("dense"), logits_seen("sparse")
    assert np.array_equal(dp[0], dense)                     # bit for bit
    assert not np.allclose(sp[0], dense, atol=1e-4)         # a sparse prompt moves it
    # and the prompt's cache is dense's: the next step is dense cache + one sparse step
    m.reset()
    m.configure("dense")
    m.forward(prompt)
    apply(m, Setting("threshold", "paper", 0.5), "decode")
    step = m.forward([int(np.argmax(dp[0]))])
    np.testing.assert_array_equal(dp[1], step)
    assert m.ffn_mode == "threshold"                                        # generate put the mode back
    with pytest.raises(EdgesparseError, match="--prefill"):
        generate(m, prompt, 2, _greedy(), prefill="half")


# == the quality budget ==========================================================================
CURVE = {0.1: 0.001, 0.2: 0.002, 0.3: 0.004, 0.4: 0.009, 0.5: 0.015, 0.6: 0.03, 0.7: 0.06, 0.8: 0.2, 0.9: 0.5}


@pytest.mark.parametrize("limit,want", [(0.01, 0.4), (0.015, 0.5), (1.0, 0.9), (0.0005, 0.0), (0.03, 0.6)])
def test_budget_picks_the_highest_level_within(limit, want):
    seen = []

    def measure(q):
        seen.append(q)
        return {"kld_mean": CURVE[q], "same_top1": 1 - CURVE[q]}
    level, tried = budget.choose([0.0, *CURVE], measure, limit)
    assert level == want
    assert [r["level"] for r in tried] == seen == sorted(seen) and 0.0 not in seen
    assert level == max([r["level"] for r in tried if r["within"]], default=0.0)
    # it stops at the first level over the budget: the next ones cost time and cannot be chosen
    assert seen[-1] == 0.9 or not tried[-1]["within"]
    lines = budget.report(tried, limit, budget.parse(str(limit)), level)
    print("\n".join(lines))
    assert lines[-1].startswith(f"active level {want:.1f}") and len(lines) == len(tried) + 1


def test_budget_stops_at_the_first_level_over():
    curve = {**CURVE, 0.5: 0.5}                  # worse at 0.5 than at 0.6: 0.6 is not tried
    level, tried = budget.choose(list(curve), lambda q: {"kld_mean": curve[q], "same_top1": 0.9}, 0.02)
    assert level == 0.4 and [r["level"] for r in tried] == [0.1, 0.2, 0.3, 0.4, 0.5]


@pytest.mark.parametrize("spec,value,relative", [("0.02", 0.02, False), ("3x", 3.0, True), (" 2.5X", 2.5, True)])
def test_budget_parse(spec, value, relative):
    b = budget.parse(spec)
    assert (b.value, b.relative) == (value, relative)
    assert b.limit(0.01) == pytest.approx(value * 0.01 if relative else value)


@pytest.mark.parametrize("spec", ["", "x", "-1", "0", "nan", "inf", "3xx", "abc"])
def test_budget_parse_rejects(spec):
    with pytest.raises(EdgesparseError, match="--budget"):
        budget.parse(spec)


def test_relative_budget_needs_a_yardstick():
    with pytest.raises(EdgesparseError, match="--yardstick"):
        budget.parse("3x").limit(None)


@pytest.mark.parametrize("dtype,want", [("q8ffn", "int8"), ("q4ffn", "int4"), ("float16", "float16"),
                                        ("float32", "float32")])
def test_yardstick_width_is_export_s_name(dtype, want):
    """Format v4 stores int8 / int4 FFNs as tiles: the yardstick row says int8 / int4, as export --dtype."""
    assert divergence.width(dtype) == want

"""Quality as users feel it, for eval and calibrate (cli/sparsity.py calls these): which
configurations eval runs and in what order, the KL divergence from the dense model on the text and
on the shipped chat set, yardstick packages, and calibrate's chat transcripts and quality budget."""

from __future__ import annotations

import argparse
import sys

from edgesparse.errors import EdgesparseError

# eval runs the package's active criterion first, then the rest in this order, then predict mode
ORDER = ("paper", "gate", "input")
# eval's model holds a chat prompt and its answer whatever --ctx (the perplexity's window) is
CHAT_CTX = 1024
FFN_EVAL = ("threshold", "predict")


def add_eval_options(ev) -> None:
    ev.add_argument("--ffn", default=None, metavar="threshold,predict",
                    help="comma-separated FFN modes, as in run and bench: threshold (each --methods criterion) "
                         "and predict (the predictor, paper rule) (default: threshold, and predict when the "
                         "package has a predictor)")
    ev.add_argument("--prefill", default=None, metavar="dense,sparse",
                    help="chat: what a prompt runs as, comma-separated: dense (generated tokens at the level) or "
                         "sparse (everything at the level) (default: the package's policy)")
    ev.add_argument("--chat", type=int, default=None, metavar="N",
                    help="chat evaluation on the first N instructions of the shipped set (default: all; 0: none)")
    ev.add_argument("--instructions", default="eval", metavar="FILE",
                    help="the chat instructions: the shipped set 'eval' or a JSONL file of the same shape")
    ev.add_argument("--answer-tokens", type=int, default=32, help="chat: length of the dense answers teacher-forced")
    ev.add_argument("--kld-windows", type=int, default=None, metavar="N",
                    help="KL divergence from dense on the first N perplexity windows (default: all of them; 0: none)")
    add_shared_options(ev)


def add_shared_options(p) -> None:
    p.add_argument("--yardstick", default=None, metavar="PKG[,PKG]",
                   help="packages of the same model at other widths (export --dtype int8, int4): their dense KLD "
                        "from this package's dense model, on the same text and answers, as the measure of what "
                        "a quantization costs")
    p.add_argument("--cache", default=None, metavar="DIR",
                   help="where the dense answers are kept, per package (default: $EDGESPARSE_CACHE/answers, "
                        "~/.cache/edgesparse/answers)")


def eval_plan(a: argparse.Namespace, model, targets: list[float]):
    """(methods for evaluate(): the criteria in order, then 'predict'; the Settings of the KLD and
    chat measurements; the prefill policies). Checks --methods, --ffn and --prefill."""
    from edgesparse.runtime.sparsity.levels import PREFILL_POLICIES, Setting, prefill_policy
    sp = model.pkg.manifest.sparsity
    calibrated = sp["calibration"]["thresholds"] if sp.get("calibration") else {"paper": None}
    asked = a.methods.split(",") if a.methods else None
    ffn = a.ffn.split(",") if a.ffn else None
    deprecated = bool(asked and "predict" in asked)
    if deprecated:
        asked = [m for m in asked if m != "predict"]
        ffn = sorted(set(ffn or (["threshold"] if asked else [])) | {"predict"}, key=FFN_EVAL.index)
    unknown = [m for m in asked or [] if m not in ORDER]
    if unknown:
        raise EdgesparseError(f"--methods: unknown {unknown}; expected paper, gate, input (predict is --ffn predict)")
    bad = [f for f in ffn or [] if f not in FFN_EVAL]
    if bad:
        raise EdgesparseError(f"--ffn: unknown {bad}; expected threshold, predict")
    if ffn is None:
        ffn = ["threshold"] + (["predict"] if model.has_predictor else [])
    if "predict" in ffn and not model.has_predictor:
        raise EdgesparseError(f"{a.package}: --ffn predict needs a predictor (calibrate --predictor)")
    active = sp.get("method") if sp.get("method") in ORDER else "paper"
    criteria = asked or [m for m in ORDER if m in calibrated]
    criteria = sorted(criteria, key=lambda m: (m != active, ORDER.index(m))) if "threshold" in ffn else []
    prefills = a.prefill.split(",") if a.prefill else [prefill_policy(sp)]
    if not prefills or any(p not in PREFILL_POLICIES for p in prefills):
        raise EdgesparseError(f"--prefill {a.prefill}: expected dense and/or sparse, comma-separated")
    if deprecated:          # said once every argument is known to be good: an error stays one line
        print("edgesparse: --methods predict is deprecated: predict is an FFN mode, as in run and bench; "
              "use --ffn predict", file=sys.stderr)
    levels = [q for q in targets if q > 0]
    settings = [Setting("threshold", m, q, p) for m in criteria for q in levels for p in prefills] + \
               ([Setting("predict", "paper", q, p) for q in levels for p in prefills] if "predict" in ffn else [])
    return criteria + (["predict"] if "predict" in ffn else []), settings, prefills


def open_yardsticks(a: argparse.Namespace, model, ctx: int) -> dict:
    """{name: Model} of --yardstick, each checked to be the same model."""
    from edgesparse.runtime.core.model import Model
    from edgesparse.runtime.sparsity.divergence import check_yardstick
    out = {}
    for name in (a.yardstick.split(",") if a.yardstick else []):
        m = Model(name, threads=model.threads, ctx=ctx, max_batch=ctx)
        check_yardstick(model, m, name)
        out[name] = m
    return out


def check_eval_options(a: argparse.Namespace) -> None:
    for opt, v in (("--chat", a.chat), ("--kld-windows", a.kld_windows)):
        if v is not None and v < 0:
            raise EdgesparseError(f"{opt}: expected a number >= 0, got {v}")
    if a.answer_tokens < 1:
        raise EdgesparseError(f"--answer-tokens: expected a positive number, got {a.answer_tokens}")


def eval_quality(a: argparse.Namespace, model, windows, settings: list, res: dict) -> list[str]:
    """eval's KLD on the text and the chat evaluation, into res["kld"] and res["chat"]; returns
    their markdown tables."""
    from pathlib import Path

    from edgesparse.runtime.core.text import TextCodec
    from edgesparse.runtime.sparsity import answers, chat_eval, chatdata, divergence

    yard = open_yardsticks(a, model, model.ctx)
    if not settings and not yard:
        return []               # dense alone: nothing to compare with dense
    md = []
    n = len(windows) if a.kld_windows is None else min(a.kld_windows, len(windows))
    if n:
        k = divergence.text_kld(model, windows[:n], settings, yard, progress=not a.quiet)
        k["text"] = res.get("text")
        res["kld"] = k
        md.append(divergence.table(k, f"KL divergence from the dense model on the text: the same {n} windows x "
                                      f"{k['window_tokens']} tokens and positions as the perplexity ({k['positions']} "
                                      "predictions), every position at the level."))
    if a.chat is None and not model.pkg.manifest.chat_template:
        if not a.quiet:
            print(f"edgesparse: {a.package} has no chat template: no chat evaluation", file=sys.stderr)
    elif a.chat != 0:
        codec = TextCodec(model.pkg)
        if not model.pkg.manifest.chat_template:
            raise EdgesparseError(f"--chat {a.chat}: {a.package} has no chat template")
        items = chatdata.subset(chatdata.load(a.instructions), None, a.chat)
        cache = Path(a.cache) if a.cache else answers.default_cache()
        ans = answers.dense_answers(model, codec, items, a.answer_tokens, cache, progress=not a.quiet)
        c = chat_eval.chat_quality(model, ans, settings, yard, {i.id: i.kind for i in items.items},
                                   progress=not a.quiet)
        c.update(set=items.name, answer_tokens=a.answer_tokens, cache=str(cache),
                 answers=[{"id": x.id, "text": codec.decode(x.answer), "tokens": len(x.answer)} for x in ans])
        res["chat"] = c
        md.append(chat_eval.table(c, f"Chat: {c['instructions']} instructions of {items.name}, the dense model's "
                                     f"greedy answers ({a.answer_tokens} tokens at most, {c['positions']} in all) "
                                     "teacher-forced; KLD from dense over the answer tokens."))
    return md


def add_calibrate_options(c) -> None:
    from edgesparse.runtime.sparsity import budget
    from edgesparse.runtime.sparsity.levels import DEFAULT_PREFILL, PREFILL_POLICIES
    c.add_argument("--chat", type=int, default=None, metavar="N",
                   help="also calibrate on chat: the dense model's own answers to the first N 'fit' instructions of "
                        "the shipped calibration set (never the eval set), their answer tokens added to the text's "
                        "(default: all; 0: the text alone, the paper's method)")
    c.add_argument("--chat-tokens", type=int, default=64, help="length of those answers")
    c.add_argument("--budget", default=None, metavar="KLD|Kx",
                   help="activate the highest level whose chat KLD from dense, on the calibration set's 'check' "
                        "instructions, is at most this: a KLD in nats, or K times the --yardstick's (e.g. 3x). "
                        f"Default {budget.DEFAULT}: about 3.5x int8's and a tenth of int4's on SmolLM2 (README, "
                        "Quality). --target instead forces a level; a model without a chat template gets the "
                        "paper's 0.5")
    c.add_argument("--prefill", default=DEFAULT_PREFILL, choices=PREFILL_POLICIES,
                   help="what a prompt runs as at the active level (recorded in the package; run --prefill)")
    add_shared_options(c)


def calibrate_defaults() -> dict:
    """The defaults of add_calibrate_options, for export --calibrate."""
    p = argparse.ArgumentParser()
    add_calibrate_options(p)
    return vars(p.parse_args([]))


def chat_transcripts(a: argparse.Namespace, model) -> tuple[list, dict]:
    """calibrate --chat: (transcripts for calibrate(), what they were for the manifest)."""
    from pathlib import Path

    from edgesparse.runtime.core.text import TextCodec
    from edgesparse.runtime.sparsity import answers, chatdata
    if a.chat is not None and a.chat < 0:
        raise EdgesparseError(f"--chat: expected a number >= 0, got {a.chat}")
    if a.chat == 0 or (a.chat is None and not model.pkg.manifest.chat_template):
        return [], {}           # the text alone: asked for, or a model without a chat template
    if not model.pkg.manifest.chat_template:
        raise EdgesparseError(f"--chat {a.chat}: {a.package} has no chat template to calibrate chat on")
    items = chatdata.subset(chatdata.shipped("calibration"), "fit", a.chat)
    cache = Path(a.cache) if a.cache else answers.default_cache()
    ans = answers.dense_answers(model, TextCodec(model.pkg), items, a.chat_tokens, cache, progress=not a.quiet)
    return answers.transcripts(ans), {"instructions": items.name, "transcripts": len(ans),
                                      "answer_tokens": a.chat_tokens, "observed": "answer tokens"}


def budget_level(a: argparse.Namespace, path, threads: int | None, method: str) -> tuple[float, dict]:
    """calibrate's level within --budget: the chat KLD of each level on the calibration set's
    'check' instructions, in the package just written (its calibration table). Prints why."""
    from pathlib import Path

    from edgesparse.runtime.core.model import Model
    from edgesparse.runtime.core.text import TextCodec
    from edgesparse.runtime.sparsity import answers, budget, chat_eval, chatdata
    from edgesparse.runtime.sparsity.levels import LEVELS, Setting

    b = budget.parse(a.budget or budget.DEFAULT)
    model = Model(path, threads=threads, ctx=1024, max_batch=512)
    items = chatdata.subset(chatdata.shipped("calibration"), "check")
    cache = Path(a.cache) if a.cache else answers.default_cache()
    ans = answers.dense_answers(model, TextCodec(model.pkg), items, chat_eval.GREEDY * 2, cache,
                                progress=not a.quiet)
    ref: dict = {}          # the dense logits, computed once for every level
    yard = open_yardsticks(a, model, model.ctx)
    ykld = None
    if yard:
        yr = chat_eval.chat_quality(model, ans, [], yard, progress=not a.quiet, reference=ref)["results"]
        ykld = yr[0]["kld_mean"]
    limit = b.limit(ykld)

    def measure(level: float) -> dict:
        s = Setting("threshold", method, level, a.prefill)
        r = chat_eval.chat_quality(model, ans, [s], progress=not a.quiet, reference=ref)["results"][0]
        return {k: r[k] for k in ("kld_mean", "kld_p99", "same_top1", "greedy_tokens")}

    level, tried = budget.choose(LEVELS, measure, limit)
    for line in budget.report(tried, limit, b, level):
        print(line, file=sys.stderr)
    info = {"budget": str(b), "limit": limit, "measured_on": items.name, "prefill": a.prefill, "tried": tried,
            "chosen": level}
    if yard:
        info["yardstick"] = {"package": next(iter(yard)), "kld_mean": ykld}
    return level, info

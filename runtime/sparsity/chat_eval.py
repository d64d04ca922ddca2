"""Chat-format quality: the way the product is used. Each instruction of a shipped set
(chatdata.py) is rendered with the model's chat template; the dense model's own greedy answer
(answers.py, cached) is teacher-forced through every configuration, and each answer token's
predicted distribution is compared with the dense model's at the same position:

    KLD        KL(P_dense || Q) per answer position: mean, median, p90, p99, max
    same top-1 the configuration's most likely token is dense's
    first      its first answer token is dense's (the prediction at the end of the prompt)
    greedy     how many of dense's first 16 answer tokens it reproduces when it generates on its
               own: its greedy tokens equal dense's up to the first position whose argmax differs
               (the inputs are the same until then), so the count is that position, read from the
               teacher-forced logits; "all 16" is the fraction of instructions with no difference

A configuration runs the prompt under its prefill policy (levels.Setting: dense or at its level)
and the answer at its level, as `edgesparse run` does. Yardsticks (the same model at another
width) run dense, and are compared with this package's dense model.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from edgesparse.progress import Progress

from .answers import Answer
from .divergence import _f, kld_rows, setting_fields, summary, yardstick_fields
from .levels import DENSE, Setting, apply, kept

GREEDY = 16


def teacher_forced(model, a: Answer, s: Setting, counts: np.ndarray | None = None) -> np.ndarray:
    """Logits [A, V] predicting each of the A answer tokens: the prompt under s's prefill policy,
    then all but the last answer token as generated tokens at s's level. counts [L, 2], if given,
    gets the answer tokens' (kept, total) neurons per layer added."""
    model.reset()
    apply(model, s, "prompt")
    first = model.forward(np.asarray(a.prompt)).copy()                  # [V]: predicts answer[0]
    if len(a.answer) == 1:
        return first[None]
    apply(model, s, "decode")
    before = model.counts[:, :2].copy()                                  # [L, (kept, total)]
    rest = model.forward(np.asarray(a.answer[:-1]), all_logits=True)    # [A-1, V]
    if counts is not None:
        counts += model.counts[:, :2] - before
    return np.concatenate([first[None], rest])


def agreement(q: np.ndarray, answer: tuple[int, ...], greedy: int = GREEDY) -> tuple[bool, int, int]:
    """(first token same, greedy tokens reproduced, tokens that could be) of logits q [A, V]
    against the dense answer."""
    top = q.argmax(axis=1)                                  # [A]
    n = min(greedy, len(answer))
    diff = np.flatnonzero(top[:n] != np.asarray(answer[:n]))
    return bool(top[0] == answer[0]), int(diff[0]) if diff.size else n, n


def chat_quality(model, answers: list[Answer], settings: list[Setting], yardsticks: dict | None = None,
                 kinds: dict | None = None, greedy: int = GREEDY, progress: bool = True,
                 reference: dict | None = None) -> dict:
    """Every setting (and yardstick model {name: Model}) against this model's dense answers.
    kinds: optional {instruction id: kind} for a per-kind KLD. Returns {"instructions",
    "positions", "results": [...]}, dense first, then the settings in order, yardsticks last.
    reference: a dict kept by the caller across calls, {answer id: dense logits [A, V]}: the
    dense run is then made once, the first time, and left out of the results."""
    yardsticks = yardsticks or {}
    first = [] if reference is not None else [DENSE]
    runs = [("setting", s) for s in first + [s for s in settings if not s.dense]] + \
           [("yardstick", n) for n in yardsticks]
    L = model.cfg.n_layers
    acc = [{"kld": [], "same": [], "first": [], "got": [], "could": [], "by_pos": defaultdict(list),
            "by_kind": defaultdict(list), "counts": np.zeros((L, 2), np.int64)} for _ in runs]
    bar = Progress(len(answers) * len(runs), "chat", progress)
    with kept(model):
        for a in answers:
            p = None
            if reference is not None:
                if a.id not in reference:
                    reference[a.id] = teacher_forced(model, a, DENSE)
                p = reference[a.id]
            for (kind, what), r in zip(runs, acc):
                if kind == "setting":
                    q = teacher_forced(model, a, what, r["counts"])
                else:
                    q = teacher_forced(yardsticks[what], a, DENSE)
                if p is None:
                    p = q                                   # the first run is the dense model
                kld, same, _ = kld_rows(p, q)               # [A] each
                first, got, could = agreement(q, a.answer, greedy)
                r["kld"].append(kld)
                r["same"].append(same)
                r["first"].append(first)
                r["got"].append(got)
                r["could"].append(could)
                for i, v in enumerate(kld):
                    r["by_pos"][i].append(v)
                r["by_kind"][(kinds or {}).get(a.id, "")].append(kld.mean())
                bar.update(note=getattr(what, "name", what))
    results = []
    for (kind, what), r in zip(runs, acc):
        got, could = np.array(r["got"]), np.array(r["could"])
        out = summary(np.concatenate(r["kld"]), np.concatenate(r["same"]))
        on, seen = r["counts"][:, 0], r["counts"][:, 1]                   # [L] kept, total
        out.update(achieved_sparsity=float(np.mean(1 - on / np.maximum(seen, 1))) if seen.any() else 0.0,
                   first_token=float(np.mean(r["first"])), greedy_all=float(np.mean(got == could)),
                   greedy_tokens=float(got.sum() / could.sum()),
                   kld_by_position=[float(np.mean(r["by_pos"][i])) for i in sorted(r["by_pos"])])
        if kinds:
            out["kld_by_kind"] = {k: float(np.mean(v)) for k, v in sorted(r["by_kind"].items())}
        out.update(setting_fields(what, text=False) if kind == "setting" else yardstick_fields(what, yardsticks[what]))
        results.append(out)
    return {"instructions": len(answers), "positions": int(sum(len(a.answer) for a in answers)),
            "greedy": greedy, "results": results}


def table(res: dict, title: str) -> str:
    g = res["greedy"]
    lines = [title, "", f"| configuration | sparsity (answers) | KLD mean | p90 | p99 | same top-1 | first token same | "
             f"all {g} greedy same | greedy tokens same |", "|---|---|---|---|---|---|---|---|---|"]
    for r in res["results"]:
        lines.append(f"| {r['name']} | {100 * r['achieved_sparsity']:.1f}% | {_f(r['kld_mean'])} | "
                     f"{_f(r['kld_p90'])} | {_f(r['kld_p99'])} | {100 * r['same_top1']:.1f}% | "
                     f"{100 * r['first_token']:.0f}% | {100 * r['greedy_all']:.0f}% | {100 * r['greedy_tokens']:.0f}% |")
    return "\n".join(lines)

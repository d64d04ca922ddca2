"""Perplexity vs sparsity, computed by the runtime itself (batched prefill path, the same
threshold semantics as decode) over non-overlapping windows of the evaluation text."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from edgesparse.progress import Progress

from .levels import thresholds_for


def perplexity(model, windows: np.ndarray, bar: Progress | None = None, first: int = 0) -> float:
    """exp(mean NLL) over the predicted tokens of every window [n, ctx]: positions first .. ctx-2
    predicting tokens first+1 .. ctx-1 (first = 0: all ctx-1 predictions, edgesparse's eval;
    first = ctx // 2: the second half, llama-perplexity's default)."""
    total, count = 0.0, 0
    for w in windows:
        nll = model.nll(w)[first:]
        total += float(nll.sum())
        count += nll.size
        if bar:
            bar.update(note=f"ppl so far {math.exp(total / count):.2f}")
    return math.exp(total / count)


def dense_perplexity(model, windows: np.ndarray, first: int = 0, bar: Progress | None = None) -> float:
    """perplexity() of the dense model (threshold 0 in every layer); the model's configuration is
    restored after."""
    saved = model.thresholds.copy(), model.method, model.ffn_mode
    try:
        model.set_thresholds([0.0] * model.cfg.n_layers)
        model.set_ffn_mode("threshold")
        return perplexity(model, windows, bar, first)
    finally:
        model.set_thresholds(saved[0], saved[1])
        model.ffn_mode = saved[2]


def evaluate(model, windows: np.ndarray, methods: list[str], levels: list[float], progress: bool = True) -> dict:
    """For each (method, level): perplexity, achieved sparsity per layer on this text, and the
    fraction of FFN weight bytes a perfect predictor would skip."""
    sp = model.pkg.manifest.sparsity
    saved = model.thresholds.copy(), model.method, model.ffn_mode, model.t_pred.copy()
    runs = [(m, q) for m in methods for q in levels if not (q == 0.0 and m != methods[0])]
    bar = Progress(len(runs) * len(windows), "eval", progress)
    results = []
    try:
        for method, level in runs:
            zero = [0.0] * model.cfg.n_layers
            if method == "predict":
                # the predictor's candidates at this level, then the paper rule at the same level
                model.set_thresholds(zero if level == 0.0 else thresholds_for(sp, "paper", level), "paper")
                model.set_ffn_mode("predict", zero if level == 0.0 else thresholds_for(sp, "predicted", level))
            else:
                model.set_thresholds(zero if level == 0.0 else thresholds_for(sp, method, level), method)
                model.set_ffn_mode("threshold")
            model.reset_counts()
            ppl = perplexity(model, windows, bar)
            kept, total = model.counts[:, 0].astype(np.float64), model.counts[:, 1].astype(np.float64)
            achieved = (1.0 - kept / np.maximum(total, 1)).tolist()
            mean = float(np.mean(achieved))
            # paper/gate zero whole neurons: gate, up and down rows all skippable. input zeroes
            # FFN input entries: their columns of gate and up (2/3 of the bytes); down stays dense.
            R = model.cfg.ffn_rows
            skip = mean if method != "input" else mean * (R - 1) / R
            extra = {}
            if method == "predict":
                # rows actually read: gate and up (fc1) of candidates, down of survivors
                cand = model.counts[:, 2].astype(np.float64)
                read = ((R - 1) * cand + kept) / (R * np.maximum(total, 1))
                skip = float(1.0 - read.mean())
                extra = {"candidates_per_layer": (cand / np.maximum(total, 1)).tolist(),
                         "rows_read_per_layer": read.tolist()}
            results.append({"method": method if level else "dense", "target": level, "perplexity": ppl,
                            "achieved_sparsity_mean": mean, "achieved_sparsity_per_layer": achieved,
                            "ffn_bytes_skippable": skip, **extra})
    finally:
        model.set_thresholds(saved[0], saved[1])
        model.ffn_mode = saved[2]
        model.t_pred[:] = saved[3]
    return {"windows": int(len(windows)), "window_tokens": int(windows.shape[1]),
            "predicted_tokens": int(len(windows) * (windows.shape[1] - 1)), "results": results}


def table(res: dict) -> str:
    n, ctx = res["windows"], res["window_tokens"]
    lines = [f"edgesparse's perplexity on {res.get('text', 'the text')}: {n} non-overlapping windows of {ctx} tokens "
             f"of the package tokenizer's ids from the start of the text, every window from an empty cache, all "
             f"{ctx - 1} positions of each scored ({res['predicted_tokens']} predictions in all); each row one "
             "method and calibrated level.", "",
             "| method | target | perplexity | vs dense | achieved sparsity | FFN bytes skippable |",
             "|---|---|---|---|---|---|"]
    dense = next((r["perplexity"] for r in res["results"] if r["target"] == 0.0), None)
    for r in res["results"]:
        rel = f"{100 * (r['perplexity'] / dense - 1):+.1f}%" if dense else "-"
        lines.append(f"| {r['method']} | {r['target']:.1f} | {r['perplexity']:.2f} | {rel} | "
                     f"{100 * r['achieved_sparsity_mean']:.1f}% | {100 * r['ffn_bytes_skippable']:.1f}% |")
    ag = res.get("against")
    if ag:
        lines += ["", *against_table(ag)]
    return "\n".join(lines)


def against_table(ag: dict) -> list[str]:
    """eval --against llama.cpp: both engines on llama-perplexity's windows and positions."""
    ctx, n = ag["ctx"], ag["chunks"]
    tok = ("the package tokenizer gives the same ids" if ag["tokenizer_first_difference"] is None else
           f"the package tokenizer's ids differ from token {ag['tokenizer_first_difference']} on, so the table "
           "above scored other tokens")
    rel = 100 * (ag["perplexity"] / ag["edgesparse_perplexity"] - 1)
    return [f"Against llama.cpp: llama-perplexity's windows and positions, scored by both engines: {n} chunks of "
            f"{ctx} tokens of llama.cpp's own tokenization of the text (BOS first in each chunk: "
            f"{'yes' if ag['bos'] is not None else 'no, the model adds none'}; {tok}), positions {ctx // 2}..{ctx - 2} "
            f"predicting the second half of each chunk ({ag['predictions']} predictions in all), each chunk from "
            "an empty cache, as `llama-perplexity -f TEXT -c CTX --chunks N` does by default. Not comparable with "
            "the table above, which scores all positions of its windows.",
            "",
            "| engine | weights | perplexity | vs edgesparse |", "|---|---|---|---|",
            f"| edgesparse, dense | this package ({ag['package_dtype']}) | {ag['edgesparse_perplexity']:.4f} | - |",
            f"| llama.cpp, llama-perplexity | {Path(ag['gguf']).name} ({ag['gguf_type']}) | {ag['perplexity']:.4f} "
            f"| {rel:+.2f}% |"]

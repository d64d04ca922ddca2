"""Perplexity vs sparsity, computed by the runtime itself (batched prefill path, the same
threshold semantics as decode) over non-overlapping windows of the evaluation text."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from edgesparse.progress import Progress

from .levels import thresholds_for


def perplexity(model, windows: np.ndarray, bar: Progress | None = None) -> float:
    """exp(mean NLL) over every predicted token of every window [n, ctx] (ctx-1 predictions each)."""
    total, count = 0.0, 0
    for w in windows:
        nll = model.nll(w)
        total += float(nll.sum())
        count += nll.size
        if bar:
            bar.update(note=f"ppl so far {math.exp(total / count):.2f}")
    return math.exp(total / count)


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
    lines = ["| method | target | perplexity | vs dense | achieved sparsity | FFN bytes skippable |",
             "|---|---|---|---|---|---|"]
    dense = next((r["perplexity"] for r in res["results"] if r["target"] == 0.0), None)
    for r in res["results"]:
        rel = f"{100 * (r['perplexity'] / dense - 1):+.1f}%" if dense else "-"
        lines.append(f"| {r['method']} | {r['target']:.1f} | {r['perplexity']:.2f} | {rel} | "
                     f"{100 * r['achieved_sparsity_mean']:.1f}% | {100 * r['ffn_bytes_skippable']:.1f}% |")
    ag = res.get("against")
    if ag:
        rel = f"{100 * (ag['perplexity'] / dense - 1):+.1f}%" if dense else "-"
        lines.append(f"| llama.cpp ({Path(ag['gguf']).name}) | 0.0 | {ag['perplexity']:.2f} | {rel} | - | - |")
    return "\n".join(lines)

"""What the FFN costs per layer in the decode kernels, with and without the predictor (`edgesparse
analyze`, packages that have one).

The same text tokens are fed one at a time (after a short prompt) in three runs, alternating for
`rounds` rounds, and each layer's FFN kernel call is timed (Model.ffn_seconds):
    predict     the predictor pass, the candidates' gate and up rows, the survivors' down rows
    predictor   the same kernel with every candidate threshold at +inf: the predictor pass alone
                (no neuron is a candidate, so not one row of the FFN file is read)
    dense       every neuron's three rows
The predict run's counts give candidates, survivors and rows read per token, and its lm_head bytes
per token (the whole head, or the sparse head's draft and candidate blocks: whichever head the model
has, see core/head.py set_head). Times are medians
over rounds on the machine as it is: a small model partly stays in a large L3 between tokens
(32 MB on this project's workstation: a 135M int4 model's 90 MB per token does not fit, its
hottest rows may).
"""

from __future__ import annotations

import numpy as np

from edgesparse.errors import EdgesparseError

from edgesparse.progress import Progress

from .levels import thresholds_for

RUNS = ("predict", "predictor", "dense")


def measure(model, ids: np.ndarray, level: float, prompt: int = 32, steps: int = 64, rounds: int = 3,
            progress: bool = True) -> dict:
    """Per-layer cost of `steps` decode steps fed from ids [>= prompt + steps] at a calibrated level.
    The model's thresholds, FFN mode and candidate thresholds are restored afterwards."""
    if not model.has_predictor:
        raise EdgesparseError(f"{model.pkg.path}: the per-layer cost needs a predictor (calibrate --predictor)")
    ids = np.asarray(ids, np.int64).reshape(-1)
    if ids.size < prompt + steps:
        raise EdgesparseError(f"layer cost: {prompt + steps} tokens of text needed, got {ids.size}")
    L, R = model.cfg.n_layers, model.cfg.ffn_rows
    sp = model.pkg.manifest.sparsity
    t = thresholds_for(sp, "paper", level)
    t_pred = {"predict": np.asarray(thresholds_for(sp, "predicted", level), np.float32),
              "predictor": np.full(L, np.inf, np.float32), "dense": None}
    saved = model.thresholds.copy(), model.method, model.ffn_mode, model.t_pred.copy()
    secs = {r: [] for r in RUNS}               # [rounds] of [L] seconds per token
    counts = {}
    bar = Progress(rounds * len(RUNS), "layer cost", progress)
    try:
        model.set_thresholds(t, "paper")
        for _ in range(rounds):
            for run in RUNS:
                model.set_ffn_mode("dense" if run == "dense" else "predict", t_pred[run])
                model.reset()
                model.forward(ids[:prompt])            # prefill: neither timed nor counted
                model.reset_counts()
                model.ffn_seconds = np.zeros(L)
                for tok in ids[prompt:prompt + steps]:
                    model.forward(tok[None])
                secs[run].append(model.ffn_seconds / steps)
                counts[run] = model.counts.copy()      # [L, (kept, total, candidates)], same every round
                if run == "predict":
                    head_bytes = float(np.mean(model.stats.head_bytes[-steps:]))
                model.ffn_seconds = None
                bar.update()
    finally:
        model.ffn_seconds = None
        model.set_thresholds(saved[0], saved[1])
        model.ffn_mode = saved[2]
        model.t_pred[:] = saved[3]
    ms = {r: np.median(np.array(secs[r]), axis=0) * 1e3 for r in RUNS}     # [L]
    kept, total, cand = (counts["predict"][:, i].astype(np.float64) for i in range(3))
    layers = []
    for l, lw in enumerate(model.layers):
        N = lw.n
        row_bytes = (lw.ffn.nbytes + lw.ffn_scale.nbytes) / (N * R)     # one gate, up or down row with its scales
        rows = ((R - 1) * cand[l] + kept[l]) / steps                     # rows read per token
        pred_bytes = lw.pred_q.nbytes + lw.pred_scale.nbytes
        layers.append({
            "layer": l, "neurons": N,
            "candidates": cand[l] / total[l], "survivors": kept[l] / total[l],
            "rows_read_per_token": rows, "rows_read_fraction": rows / (R * N),
            "predictor_candidates": int(counts["predictor"][l, 2]),
            "predictor_bytes": int(pred_bytes), "ffn_bytes": int(N * R * row_bytes),
            "predict_bytes_per_token": float(pred_bytes + rows * row_bytes),
            "predictor_ms": float(ms["predictor"][l]), "predict_ms": float(ms["predict"][l]),
            "dense_ms": float(ms["dense"][l])})
    tot = {k: float(sum(r[k] for r in layers)) for k in
           ("predictor_bytes", "ffn_bytes", "predict_bytes_per_token", "predictor_ms", "predict_ms", "dense_ms")}
    tot["rows_read_fraction"] = float(np.mean([r["rows_read_fraction"] for r in layers]))
    tot["head_bytes_per_token"] = head_bytes
    tot["head_full_bytes"] = float(model.head.nbytes + model.head_scale.nbytes)
    return {"level": level, "prompt": prompt, "steps": steps, "rounds": rounds, "threads": model.threads,
            "load": model.pkg.load, "head": "full" if model.sparse_head is None else "sparse",
            "per_layer": layers, "total": tot}


def table(cost: dict) -> str:
    lines = ["| layer | candidates | survivors | rows read | predictor MB | predictor ms | predict FFN ms "
             "| dense FFN ms |", "|---|---|---|---|---|---|---|---|"]
    for r in cost["per_layer"]:
        lines.append(f"| {r['layer']} | {100 * r['candidates']:.1f}% | {100 * r['survivors']:.1f}% | "
                     f"{100 * r['rows_read_fraction']:.1f}% | {r['predictor_bytes'] / 1e6:.2f} | "
                     f"{r['predictor_ms']:.3f} | {r['predict_ms']:.3f} | {r['dense_ms']:.3f} |")
    t = cost["total"]
    lines.append(f"| all | | | {100 * t['rows_read_fraction']:.1f}% | {t['predictor_bytes'] / 1e6:.1f} | "
                 f"{t['predictor_ms']:.2f} | {t['predict_ms']:.2f} | {t['dense_ms']:.2f} |")
    lines.append(f"\nFFN bytes per token: dense {t['ffn_bytes'] / 1e6:.1f} MB, predict "
                 f"{t['predict_bytes_per_token'] / 1e6:.1f} MB (predictor included); {cost['steps']} decode steps, "
                 f"median of {cost['rounds']} rounds, {cost['threads']} thread(s), --load {cost['load']}")
    lines.append(f"lm_head bytes per token: {t['head_bytes_per_token'] / 1e6:.1f} MB of {t['head_full_bytes'] / 1e6:.1f} MB "
                 f"(--head {cost['head']})")
    return "\n".join(lines)

"""Figures of result dicts: eval's (the paper's), analyze's and its per-layer cost, bench's and
positions'. They draw what the sparsity and measurement code computed, from plain dicts, so neither
imports the other for a figure. matplotlib is optional ([plots] extra): without it, no figures."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np


def _plt():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        return None


def save_per_layer(plt, fig, axes, title: str, path: Path) -> list[Path]:
    """Finish a row of per-layer panels (x = layer, grid, legend), save it and close it."""
    for ax in axes:
        ax.set_xlabel("layer")
        ax.grid(alpha=.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def eval_figures(res: dict, sparsity: dict, out: Path, title: str) -> list[Path]:
    plt = _plt()
    if plt is None:
        return []
    out.mkdir(parents=True, exist_ok=True)
    written = []
    rs = res["results"]
    dense = next((r for r in rs if r["target"] == 0.0), None)

    fig, ax = plt.subplots(figsize=(6, 4))
    for m in sorted({r["method"] for r in rs if r["method"] != "dense"}):
        pts = ([(0.0, dense["perplexity"])] if dense else []) + \
              [(r["achieved_sparsity_mean"], r["perplexity"]) for r in rs if r["method"] == m]
        ax.plot(*zip(*pts), marker="o", label=m)
    ax.set_xlabel("achieved FFN sparsity on the eval text")
    ax.set_ylabel("perplexity")
    ax.set_yscale("log")
    ax.grid(alpha=.3)
    ax.legend()
    ax.set_title(f"{title}: perplexity vs sparsity\n{res['windows']} windows x {res['window_tokens']} tokens",
                 fontsize=9)
    fig.tight_layout()
    written.append(out / "perplexity_vs_sparsity.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)

    methods = sorted({r["method"] for r in rs if r["method"] != "dense"})
    if methods:
        fig, axes = plt.subplots(1, len(methods), figsize=(5 * len(methods), 3.6), squeeze=False)
        for ax, m in zip(axes[0], methods):
            for r in rs:
                if r["method"] == m:
                    ax.plot(r["achieved_sparsity_per_layer"], label=f"target {r['target']:.1f}")
            ax.set_title(f"{m}: achieved sparsity per layer", fontsize=9)
            ax.set_xlabel("layer")
            ax.set_ylim(0, 1)
            ax.grid(alpha=.3)
        axes[0][-1].legend(fontsize=7, ncol=2)
        fig.tight_layout()
        written.append(out / "sparsity_per_layer.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)

    cal = sparsity.get("calibration")
    if cal:
        h = cal["histograms"]["paper"]
        counts = np.asarray(h["counts"], np.float64)
        edges = np.asarray(h["log10_edges"])
        L = counts.shape[0]
        cols = 6
        rows = math.ceil(L / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 1.6 * rows), sharex=True, squeeze=False)
        i50 = cal["levels"].index(0.5) if 0.5 in cal["levels"] else None
        for l in range(rows * cols):
            ax = axes[l // cols][l % cols]
            if l >= L:
                ax.axis("off")
                continue
            ax.stairs(counts[l] / max(counts[l].sum(), 1), edges, fill=True, alpha=.6)
            if i50 is not None:
                t = cal["thresholds"]["paper"][i50][l]
                if t > 0:
                    ax.axvline(math.log10(t), color="r", lw=.8)
            ax.set_title(f"layer {l}", fontsize=7)
            ax.tick_params(labelsize=6)
            ax.set_yticks([])
            ax.set_xlim(-5, 2)
        fig.suptitle("log10 |h| per layer on the calibration text (red: 50% threshold)", fontsize=9)
        fig.tight_layout()
        written.append(out / "activation_histograms.png")
        fig.savefig(written[-1], dpi=100)
        plt.close(fig)
    return written


def analyze_figures(res: dict, out, title: str) -> list:
    """analyze.png: recall and precision of each predictor, and pattern overlap, per layer."""
    plt = _plt()
    if plt is None:
        return []
    rows = res["per_layer"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for name in ("previous_token", "static", "prompt_set", "previous_layer", "int8_predictor"):
        pts = [(r["layer"], r[name]["recall"], r[name]["precision"]) for r in rows if name in r]
        if pts:
            ls, rc, pr = zip(*pts)
            axes[0].plot(ls, rc, marker=".", label=name)
            axes[1].plot(ls, pr, marker=".", label=name)
    axes[0].set_title("recall of the active set")
    axes[1].set_title("precision")
    ls = [r["layer"] for r in rows]
    for k, lab in (("consecutive_jaccard", "consecutive tokens"), ("random_pair_jaccard", "random token pairs"),
                   ("similar_chunk_jaccard", "similar chunks"), ("random_chunk_jaccard", "random chunks")):
        axes[2].plot(ls, [r[k] for r in rows], marker=".", label=lab)
    axes[2].set_title("pattern overlap (Jaccard)")
    for ax in axes:
        ax.set_ylim(0, 1)
    return save_per_layer(plt, fig, axes, f"{title}: which neurons fire, how predictable ({res['tokens']} tokens)",
                          out / "analyze.png")


def layer_cost_figure(cost: dict, out, title: str) -> list:
    """analyze_cost.png: the FFN kernel time per layer, predictor pass vs rows, and what predict reads."""
    plt = _plt()
    if plt is None:
        return []
    rows = cost["per_layer"]
    ls = np.array([r["layer"] for r in rows])
    pred = np.array([r["predictor_ms"] for r in rows])
    rest = np.maximum(np.array([r["predict_ms"] for r in rows]) - pred, 0.0)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    axes[0].bar(ls, pred, label="predictor pass")
    axes[0].bar(ls, rest, bottom=pred, label="candidates' rows (predict)")
    axes[0].plot(ls, [r["dense_ms"] for r in rows], "k.-", label="dense FFN")
    axes[0].set_ylabel("ms per token")
    axes[0].set_title("FFN kernel time per layer")
    axes[1].plot(ls, [100 * r["candidates"] for r in rows], marker=".", label="candidates")
    axes[1].plot(ls, [100 * r["survivors"] for r in rows], marker=".", label="survivors")
    axes[1].plot(ls, [100 * r["rows_read_fraction"] for r in rows], marker=".", label="rows read")
    axes[1].set_ylabel("% of the layer's neurons / rows")
    axes[1].set_ylim(0, 100)
    axes[1].set_title("what predict mode reads")
    return save_per_layer(plt, fig, axes, f"{title}: FFN per layer at {cost['level']:.0%}, {cost['threads']} thread(s)",
                          out / "analyze_cost.png")

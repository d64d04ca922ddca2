"""Figures for calibrate/eval (the paper's): matplotlib is optional ([plots] extra)."""

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

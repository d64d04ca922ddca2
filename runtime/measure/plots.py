"""Figures of result dicts: eval's (the paper's), analyze's and its per-layer cost, bench's and
positions'. They draw what the sparsity and measurement code computed, from plain dicts, so neither
imports the other for a figure. matplotlib is optional ([plots] extra): without it, no figures."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .bench_report import engine_label


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


# -- bench ---------------------------------------------------------------------------------------
def _ours(r: dict) -> bool:
    return r.get("engine", "edgesparse") == "edgesparse"


def _load(r: dict) -> str:
    return r.get("load") or "mmap"      # rows written before --load existed: mmap


def _bench_label(r: dict) -> str:
    if not _ours(r):
        return f"{engine_label(r)}, {r['threads']} threads" + (", no mmap" if _load(r) != "mmap" else "")
    return (f"{r['ffn']} {r['sparsity']:g}, {r['threads']} threads"
            + (f", budget {r['budget_mb']:g} MB" if r.get("budget_mb") else "")
            + (f", load {_load(r)}" if _load(r) != "mmap" else ""))


def bench_figure(res: dict):
    """bench.png's figure, or None without matplotlib. Over several sparsity levels: tok/s and peak
    RSS against sparsity. At one level (the default `--sparsity 0`, or a single configuration) that
    would be one dot per line, so instead: every configuration's per-token decode latencies over
    all rounds as a distribution, and its memory at the end of decoding."""
    plt = _plt()
    if plt is None:
        return None
    if len({r["sparsity"] for r in res["summary"] if _ours(r)}) > 1:
        return _bench_vs_sparsity(plt, res)
    return _bench_one_level(plt, res)


def bench_png(res: dict, path: Path) -> list[Path]:
    fig = bench_figure(res)
    if fig is None:
        return []
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return [path]


def _bench_one_level(plt, res: dict):
    """Left: the share of decode steps that took at most x ms (the empirical CDF over all rounds;
    p50 / p90 / p99 are where it crosses the dotted lines). Right: resident memory at the end of
    decoding, file-backed (the mapped weights) and anonymous, and the peak."""
    rows = res["summary"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [3, 2]})
    ax = axes[0]
    for i, r in enumerate(rows):
        lat = np.sort([x for run in r.get("runs", []) for x in run.get("latency_ms", [])])
        if lat.size:
            ax.plot(lat, np.arange(1, lat.size + 1) / lat.size, drawstyle="steps-post", color=f"C{i % 10}",
                    label=f"{_bench_label(r)}: {r['tok_s']:.1f} tok/s"
                    + (f", p50 {r['p50_ms']:.1f} ms" if r.get("p50_ms") is not None else ""))
    for q in (.5, .9, .99):
        ax.axhline(q, ls=":", color="k", lw=.7)
    ax.set_xscale("log")        # a stalled step (a busy machine) is 10-100x the typical one
    ax.set_xlabel("decode latency per token (ms, log scale)")
    ax.set_ylabel("share of tokens")
    ax.set_ylim(0, 1.01)
    ax.set_title(f"per-token decode latency over {res['rounds']} round(s) (dotted: p50, p90, p99)", fontsize=9)
    ax.grid(alpha=.3)
    ax.legend(fontsize=7)
    ax = axes[1]
    y = np.arange(len(rows))
    file = np.array([r.get("rss_file_mb") or 0.0 for r in rows])
    ax.barh(y, file, color="C0", label="file-backed (mapped weights)")
    ax.barh(y, [r.get("rss_anon_mb") or 0.0 for r in rows], left=file, color="C1", label="anonymous")
    ax.plot([r.get("peak_rss_mb") or np.nan for r in rows], y, "k|", ms=14, mew=2, label="peak RSS")
    ax.set_yticks(y, [_bench_label(r) for r in rows], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("MB")
    ax.set_title("resident memory at the end of decoding", fontsize=9)
    ax.grid(alpha=.3, axis="x")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3)
    return fig


def _bench_vs_sparsity(plt, res: dict):
    """tok/s and peak RSS against sparsity, a line per (mode, threads, budget, load); other engines
    as horizontal lines. With a budget, a third panel: the weights resident while decoding."""
    rows = res["summary"]
    ours = [r for r in rows if _ours(r)]
    modes = [f for f in dict.fromkeys(r["ffn"] for r in ours) if f != "dense"]
    budgets = list(dict.fromkeys(r.get("budget_mb") for r in ours))
    loads = list(dict.fromkeys(_load(r) for r in ours))
    fig, axes = plt.subplots(1, 3 if any(budgets) else 2, figsize=(15 if any(budgets) else 10, 3.8))
    for t in sorted({r["threads"] for r in ours}):
        for f in modes or ["dense"]:
            for b, ld in ((b, ld) for b in budgets for ld in loads):
                rs = [r for r in ours if r["threads"] == t and r["ffn"] in (f, "dense") and r.get("budget_mb") == b
                      and _load(r) == ld]
                if not rs:
                    continue
                lab = f"{f}, {t} threads" + (f", budget {b:g} MB" if b else "") + (f", load {ld}" if len(loads) > 1 else "")
                axes[0].plot([r["sparsity"] for r in rs], [r["tok_s"] for r in rs], marker="o", label=lab)
                axes[1].plot([r["sparsity"] for r in rs], [r["peak_rss_mb"] for r in rs], marker="o", label=lab)
                if len(axes) > 2:
                    axes[2].plot([r["sparsity"] for r in rs], [r["weights_resident_mb"] for r in rs], marker="o",
                                 label=lab)
    others = [r for r in rows if not _ours(r)]
    n0 = len(axes[0].lines)
    for i, r in enumerate(others):     # other engines: one level each, drawn across the sparsity axis
        ld = ", no mmap" if _load(r) != "mmap" else ""
        kw = dict(ls="--", lw=1, color=f"C{(n0 + i) % 10}", label=f"{engine_label(r)}, {r['threads']} threads{ld}")
        axes[0].axhline(r["tok_s"], **kw)
        if r.get("peak_rss_mb") is not None:
            axes[1].axhline(r["peak_rss_mb"], **kw)
    axes[0].set_title("decode tok/s (median)")
    axes[1].set_title("peak RSS (MB)")
    if len(axes) > 2:
        for b in filter(None, budgets):
            axes[2].axhline(b, ls=":", color="k", lw=1)
        axes[2].set_title("weights resident while decoding (MB; dotted: budget)")
    for ax in axes:
        ax.set_xlabel("target sparsity")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=.3)
        ax.legend(fontsize=7)
    return fig

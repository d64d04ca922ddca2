"""eval's quality figure: KL divergence from the dense model and top-1 agreement against the
sparsity level, one line per FFN mode / criterion and prefill policy, with the same model at other
widths (--yardstick: int8, int4) as horizontal lines: what a level costs, next to what a
quantization costs. Drawn from eval.json's "chat" and "kld" sections."""

from __future__ import annotations

from pathlib import Path

from .plots import _plt


def _lines(results: list[dict], key: str, text: bool) -> dict:
    """{label: [(level, value)]} of the sparse configurations, dense (level 0) at the start of each."""
    dense = next((r[key] for r in results if r["method"] == "dense"), None)
    out: dict = {}
    for r in results:
        if r["method"] in ("dense", "yardstick"):
            continue
        what = "predict" if r["ffn"] == "predict" else r["method"]
        label = what if text else f"{what}, {r['prefill']} prefill"
        out.setdefault(label, [] if dense is None else [(0.0, dense)]).append((r["target"], r[key]))
    return out


def quality_figure(res: dict, out: Path, title: str) -> list[Path]:
    """quality_vs_sparsity.png: chat KLD, chat same top-1 and text KLD vs the level."""
    plt = _plt()
    panels = [(res.get("chat"), "kld_mean", "chat: mean KLD from dense (nats)", False),
              (res.get("chat"), "same_top1", "chat: same top-1 as dense", False),
              (res.get("kld"), "kld_mean", "text: mean KLD from dense (nats)", True)]
    panels = [p for p in panels if p[0]]
    if plt is None or not panels:
        return []
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (sec, key, name, text) in zip(axes[0], panels):
        for i, (label, pts) in enumerate(_lines(sec["results"], key, text).items()):
            xs, ys = zip(*sorted(pts))
            ax.plot(xs, ys, marker="o", ms=3, color=colors[i % len(colors)], label=label,
                    ls="--" if "sparse prefill" in label else "-")
        for j, r in enumerate(r for r in sec["results"] if r["method"] == "yardstick"):
            ax.axhline(r[key], color="k", lw=1, ls=(":", "-.", "--")[j % 3], label=f"{r['dtype']} dense (yardstick)")
        if key.startswith("kld"):
            ax.set_yscale("symlog", linthresh=1e-3)
        else:
            ax.set_ylim(top=1.0)
        ax.set_xlabel("target sparsity (calibrated level)")
        ax.set_title(name, fontsize=9)
        ax.grid(alpha=.3)
        ax.legend(fontsize=7)
    chat = res.get("chat")
    sub = f"chat: {chat['instructions']} instructions x <= {chat['answer_tokens']} answer tokens" if chat else ""
    fig.suptitle(f"{title}: quality vs sparsity  {sub}", fontsize=10)
    fig.tight_layout()
    path = out / "quality_vs_sparsity.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]

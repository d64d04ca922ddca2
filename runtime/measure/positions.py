"""`bench --positions`: per-token decode latency against the position in the sequence.

The KV cache is written in place, so a decode step at position p costs the weights (constant) plus
attention over p keys (linear in p, small next to the weights for these models): the curve should
stay near flat. A runtime that copied or cleared the cache every token would add another O(p), and
would also slow down with the size of the cache buffer, whatever the position; so the first
position is also measured with a buffer sized for it alone (`buffer check`).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np

from edgesparse.errors import EdgesparseError


def parse(spec: str, steps: int, max_position: int) -> list[int]:
    """--positions "32,128,512" -> [32, 128, 512]; each plus `steps` decoded tokens must fit."""
    try:
        ps = [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise EdgesparseError(f"--positions: expected comma-separated integers, got {spec!r}") from None
    if not ps or min(ps) < 1:
        raise EdgesparseError(f"--positions: expected positive integers, got {spec!r}")
    if max(ps) + steps + 1 > max_position:
        raise EdgesparseError(f"--positions: {max(ps)} + {steps} decoded tokens (--gen-tokens) exceed the model's "
                              f"context of {max_position}; lower the largest position or --gen-tokens")
    return sorted(set(ps))


def measure(pkg: str, threads: int, ffn: str, positions: list[int], steps: int, round_no: int = 0,
            settings: dict | None = None) -> dict:
    """One process: for each position p (order rotated by round), prefill p pseudo-random tokens and
    time `steps` greedy decode steps; then the first position again in a KV buffer just big enough.
    settings: the thresholds of the configuration as Model.configure takes them."""
    from ..core.model import Model
    rng = np.random.default_rng(1234)
    big = Model(pkg, threads=threads, ctx=max(positions) + steps + 1)
    small = Model(big.pkg, threads=threads, ctx=positions[0] + steps + 1)
    for m in (big, small):
        m.configure(ffn, **(settings or {}))
        m.warmup()
    k = round_no % len(positions)
    cases = [(big, p) for p in positions[k:] + positions[:k]] + [(small, positions[0])]
    out: dict = {"positions": {}, "buffer": {}}
    for m, p in cases:
        m.reset()
        logits = m.forward(rng.integers(100, m.cfg.vocab_size - 1, p))
        lat = []
        for _ in range(steps):
            tok = int(logits.argmax())
            t = time.perf_counter()
            logits = m.forward([tok])
            lat.append((time.perf_counter() - t) * 1e3)
        if m is small:
            out["buffer"] = {"position": p, "ctx_small": small.ctx, "ctx_big": big.ctx, "lat_ms": lat}
        else:
            out["positions"][str(p)] = lat
    return out


def summarize(runs: list[dict]) -> dict:
    """Runs of one configuration (one per round) -> per position the median over rounds of each
    round's median and p90 latency, and the ratio to the first position."""
    med = lambda xs: statistics.median(xs)  # noqa: E731
    ps = sorted(int(p) for p in runs[0]["positions"])
    rows = []
    for p in ps:
        lats = [r["positions"][str(p)] for r in runs]
        rows.append({"position": p, "median_ms": med([med(x) for x in lats]),
                     "p90_ms": med([float(np.percentile(x, 90)) for x in lats])})
    for r in rows:
        r["vs_first"] = r["median_ms"] / rows[0]["median_ms"]
    b = runs[0]["buffer"]
    buffer = {"position": b["position"], "ctx_small": b["ctx_small"], "ctx_big": b["ctx_big"],
              "median_ms_small": med([med(r["buffer"]["lat_ms"]) for r in runs]),
              "median_ms_big": rows[0]["median_ms"]}
    return {"rows": rows, "buffer": buffer}


def table(res: dict) -> str:
    lines = ["| ffn | sparsity | threads | position | median ms/token | p90 ms | vs first |", "|" + "---|" * 7]
    notes = []
    for c in res["configs"]:
        for r in c["rows"]:
            lines.append(f"| {c['ffn']} | {c['sparsity']:.1f} | {c['threads']} | {r['position']} | "
                         f"{r['median_ms']:.2f} | {r['p90_ms']:.2f} | {r['vs_first']:.2f}x |")
        b = c["buffer"]
        notes.append(f"buffer check ({c['ffn']} {c['sparsity']:.1f}, {c['threads']} threads): position "
                     f"{b['position']} with a KV buffer of {b['ctx_small']} tokens {b['median_ms_small']:.2f} ms, "
                     f"of {b['ctx_big']} tokens {b['median_ms_big']:.2f} ms")
    return "\n".join(lines + [""] + notes)


def plot(res: dict, path: Path) -> bool:
    from .plots import _plt
    plt = _plt()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for c in res["configs"]:
        xs = [r["position"] for r in c["rows"]]
        ax.plot(xs, [r["median_ms"] for r in c["rows"]], marker="o",
                label=f"{c['ffn']} {c['sparsity']:.1f}, {c['threads']} threads")
        ax.fill_between(xs, [r["median_ms"] for r in c["rows"]], [r["p90_ms"] for r in c["rows"]], alpha=.15)
        b = c["buffer"]
        ax.scatter([b["position"]], [b["median_ms_small"]], marker="x", color=ax.lines[-1].get_color(),
                   label=f"  same, KV buffer of {b['ctx_small']} instead of {b['ctx_big']}")
    ax.set_xscale("log")
    ax.set_ylim(bottom=0)
    ax.set_xlabel("position (tokens already in the KV cache)")
    ax.set_ylabel("ms per decode step (median; shaded to p90)")
    ax.set_title(f"decode latency vs position, {res['steps']} steps per position, {res['rounds']} rounds", fontsize=9)
    ax.grid(alpha=.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True

"""`edgesparse bench`: decode latency, throughput and memory of one package, configurations
side by side. Every measurement is a fresh process (RSS is that configuration's alone), the
configurations alternate within each round, and medians over rounds are reported: shared
machines are noisy, and only comparisons made in one run mean much.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from .progress import Progress


def _rss_split_mb() -> dict:
    """Resident memory now, split as the kernel accounts it: file-backed (the mmap'd weights,
    reclaimable) vs anonymous (heaps, ORT's copies of the attention weights, the KV cache)."""
    out = {}
    try:
        for line in open("/proc/self/status"):
            k, _, v = line.partition(":")
            if k in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                out[k] = int(v.split()[0]) / 1024.0
    except OSError:
        pass
    return {"rss_mb": out.get("VmRSS"), "rss_anon_mb": out.get("RssAnon"), "rss_file_mb": out.get("RssFile"),
            "peak_rss_mb": out.get("VmHWM")}


def measure(pkg: str, threads: int, sparsity: float, n_prompt: int, n_gen: int, ffn: str = "threshold") -> dict:
    """One configuration, in this process: load, warm up, prefill a fixed prompt, decode n_gen
    greedy tokens (EOS ignored, so every configuration decodes the same count)."""
    from .model import Model
    t0 = time.perf_counter()
    m = Model(pkg, threads=threads, ctx=n_prompt + n_gen + 8)
    load_s = time.perf_counter() - t0
    after_load = _rss_split_mb()
    m.configure(ffn, sparsity)
    m.warmup()
    ids = np.random.default_rng(1234).integers(100, m.cfg.vocab_size - 1, n_prompt)
    t = time.perf_counter()
    logits = m.forward(ids)
    prefill = time.perf_counter() - t
    lat = []
    for _ in range(n_gen - 1):
        tok = int(logits.argmax())
        t = time.perf_counter()
        logits = m.forward([tok])
        lat.append(time.perf_counter() - t)
    lat = np.array(lat)
    return {"threads": threads, "sparsity": sparsity, "ffn": ffn, "load_s": load_s, "prefill_ms": prefill * 1e3,
            "tok_s": float(len(lat) / lat.sum()), "p50_ms": float(np.percentile(lat, 50) * 1e3),
            "p90_ms": float(np.percentile(lat, 90) * 1e3), "p99_ms": float(np.percentile(lat, 99) * 1e3),
            "bytes_per_token": bytes_per_token(m), "after_load": after_load, "end": _rss_split_mb()}


def bytes_per_token(m) -> float:
    """Weight bytes a decode step reads: the attention projections, the FFN rows the kernel touched
    (gate, up and down rows, counted per step), the predictor in predict mode, one embedding row,
    and the whole lm_head."""
    cfg = m.cfg
    f = m.ffn[0].dtype.itemsize
    attn = sum(lw.qkv.nbytes + lw.o.nbytes for lw in m.layers)
    rows = np.mean(m.stats.ffn_rows) if m.stats.ffn_rows else 0.0
    ffn = rows * cfg.d_model * f
    if m.ffn_mode == "predict":
        ffn += sum(lw.pred_q.nbytes + lw.pred_scale.nbytes for lw in m.layers)
    head = cfg.vocab_size * cfg.d_model * m.head.dtype.itemsize + cfg.d_model * m.embed.dtype.itemsize
    return float(attn + ffn + head)


def run_bench(pkg: str, threads: list[int], sparsities: list[float], n_prompt: int, n_gen: int, rounds: int,
              out: Path, progress: bool = True, ffns: tuple[str, ...] = ("threshold",)) -> dict:
    # level 0 is the dense model under every mode: measured once, as "dense"
    configs = [(t, s, "dense" if s == 0 else f) for s in sparsities for f in (ffns if s else ffns[:1]) for t in threads]
    runs: dict[str, list[dict]] = {}
    bar = Progress(rounds * len(configs), "bench", progress)
    for _ in range(rounds):
        for t, s, f in configs:
            cmd = [sys.executable, "-m", "edgesparse.runtime.bench", pkg, str(t), str(s), str(n_prompt), str(n_gen), f]
            r = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS=str(t)))
            if r.returncode:
                from edgesparse.errors import EdgesparseError
                raise EdgesparseError(f"bench worker failed for threads={t} sparsity={s} ffn={f}: "
                                      f"{(r.stderr.strip().splitlines() or ['?'])[-1]}")
            res = json.loads(r.stdout.strip().splitlines()[-1])
            runs.setdefault(f"{f}:{s}@{t}", []).append(res)
            bar.update(note=f"{f} {s} threads {t}: {res['tok_s']:.1f} tok/s")
    summary = []
    for t, s, f in configs:
        rs = runs[f"{f}:{s}@{t}"]
        med = lambda f: statistics.median(f(r) for r in rs)  # noqa: E731
        summary.append({"threads": t, "sparsity": s, "ffn": f, "tok_s": med(lambda r: r["tok_s"]),
                        "prefill_ms": med(lambda r: r["prefill_ms"]), "p50_ms": med(lambda r: r["p50_ms"]),
                        "p90_ms": med(lambda r: r["p90_ms"]), "p99_ms": med(lambda r: r["p99_ms"]),
                        "rss_after_load_mb": med(lambda r: r["after_load"]["rss_mb"]),
                        "peak_rss_mb": med(lambda r: r["end"]["peak_rss_mb"]),
                        "rss_file_mb": med(lambda r: r["end"]["rss_file_mb"]),
                        "rss_anon_mb": med(lambda r: r["end"]["rss_anon_mb"]),
                        "mb_read_per_token": med(lambda r: r["bytes_per_token"]) / 1e6, "runs": rs})
    res = {"package": pkg, "prompt_tokens": n_prompt, "gen_tokens": n_gen, "rounds": rounds,
           "date": time.strftime("%Y-%m-%d %H:%M"), "summary": summary}
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(res, indent=1) + "\n")
    (out / "bench.md").write_text(table(res) + "\n")
    _plot(res, out / "bench.png")
    return res


def table(res: dict) -> str:
    base = {r["threads"]: r["tok_s"] for r in res["summary"] if r["sparsity"] == 0}
    lines = ["| ffn | sparsity | threads | tok/s | vs dense | p50 ms | p90 ms | p99 ms | prefill ms | "
             "RSS load MB | peak RSS MB | file / anon MB | MB read/token |", "|" + "---|" * 13]
    for r in res["summary"]:
        b = base.get(r["threads"])
        lines.append(f"| {r.get('ffn', 'threshold')} | {r['sparsity']:.1f} | {r['threads']} | {r['tok_s']:.2f} | "
                     f"{(r['tok_s'] / b) if b else float('nan'):.2f}x | {r['p50_ms']:.1f} | {r['p90_ms']:.1f} | "
                     f"{r['p99_ms']:.1f} | {r['prefill_ms']:.0f} | {r['rss_after_load_mb']:.0f} | "
                     f"{r['peak_rss_mb']:.0f} | {r['rss_file_mb']:.0f} / {r['rss_anon_mb']:.0f} | "
                     f"{r['mb_read_per_token']:.0f} |")
    return "\n".join(lines)


def _plot(res: dict, path: Path) -> None:
    from .plots import _plt
    plt = _plt()
    if plt is None:
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    modes = [f for f in dict.fromkeys(r.get("ffn", "threshold") for r in res["summary"]) if f != "dense"]
    for t in sorted({r["threads"] for r in res["summary"]}):
        for f in modes or ["dense"]:
            rs = [r for r in res["summary"] if r["threads"] == t and r.get("ffn", "threshold") in (f, "dense")]
            lab = f"{f}, {t} threads"
            axes[0].plot([r["sparsity"] for r in rs], [r["tok_s"] for r in rs], marker="o", label=lab)
            axes[1].plot([r["sparsity"] for r in rs], [r["peak_rss_mb"] for r in rs], marker="o", label=lab)
    axes[0].set_title("decode tok/s (median)")
    axes[1].set_title("peak RSS (MB)")
    for ax in axes:
        ax.set_xlabel("target sparsity")
        ax.grid(alpha=.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    # worker: python -m edgesparse.runtime.bench PKG THREADS SPARSITY PROMPT GEN FFN
    p, t, s, n_p, n_g, f = sys.argv[1:7]
    print(json.dumps(measure(p, int(t), float(s), int(n_p), int(n_g), f)))

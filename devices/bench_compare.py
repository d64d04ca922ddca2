"""Decode speed and peak RSS, side by side in one run: edgesparse vs ONNX Runtime (optimum's
export, ORTModelForCausalLM with KV cache) vs transformers, on the same weights.

    python devices/bench_compare.py --work /tmp/esbench [--threads 1,2] [--rounds 3]

Each measurement is a fresh subprocess (so peak RSS is that engine's alone); engines and thread
counts alternate within every round, and medians over rounds are reported, because the machine is
shared and noisy. Output: JSON + a markdown table (+ PNG when matplotlib is there) in --work.
Needs the [export] extra (torch, transformers, optimum-onnx) on the workstation.

Note on caches: a 135M float32 model is ~540 MB; on a CPU with a large L3 (480 MB here) much of it
stays cached between tokens, so these figures flatter every engine relative to a Pi's DRAM.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ENGINES = ("edgesparse", "ort", "transformers")


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _prompt_ids(n: int, vocab: int) -> list[int]:
    # A fixed pseudo-random prompt: the same token ids for every engine.
    import numpy as np
    return np.random.default_rng(1234).integers(100, vocab - 1, n).tolist()


def worker_edgesparse(work: Path, threads: int, n_prompt: int, n_gen: int) -> dict:
    from edgesparse.runtime.model import Model
    m = Model(work / "smollm2.esp", threads=threads)
    m.warmup()
    ids = _prompt_ids(n_prompt, m.cfg.vocab_size)
    t0 = time.perf_counter()
    logits = m.forward(ids)
    t1 = time.perf_counter()
    for _ in range(n_gen - 1):          # greedy, EOS ignored: always n_gen tokens
        logits = m.forward([int(logits.argmax())])
    t2 = time.perf_counter()
    return {"prefill_ms": (t1 - t0) * 1e3, "tok_s": (n_gen - 1) / (t2 - t1)}


def _hf_generate_timing(model, ids, n_gen: int) -> dict:
    import torch
    x = torch.tensor([ids])
    kw = dict(do_sample=False, attention_mask=torch.ones_like(x), pad_token_id=0)
    model.generate(x, max_new_tokens=2, min_new_tokens=2, **kw)          # warm-up
    t0 = time.perf_counter()
    model.generate(x, max_new_tokens=1, min_new_tokens=1, **kw)
    t1 = time.perf_counter()
    model.generate(x, max_new_tokens=n_gen, min_new_tokens=n_gen, **kw)
    t2 = time.perf_counter()
    prefill = t1 - t0
    return {"prefill_ms": prefill * 1e3, "tok_s": (n_gen - 1) / ((t2 - t1) - prefill)}


def worker_transformers(work: Path, threads: int, n_prompt: int, n_gen: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM
    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(work / "hf", dtype=torch.float32).eval()
    with torch.no_grad():
        return _hf_generate_timing(model, _prompt_ids(n_prompt, model.config.vocab_size), n_gen)


def worker_ort(work: Path, threads: int, n_prompt: int, n_gen: int) -> dict:
    import onnxruntime as ort
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM
    torch.set_num_threads(threads)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    model = ORTModelForCausalLM.from_pretrained(work / "ort", use_cache=True, session_options=so,
                                                provider="CPUExecutionProvider")
    return _hf_generate_timing(model, _prompt_ids(n_prompt, model.config.vocab_size), n_gen)


WORKERS = {"edgesparse": worker_edgesparse, "ort": worker_ort, "transformers": worker_transformers}


def prepare(work: Path) -> None:
    """Export the default model three ways (once; reused across runs)."""
    work.mkdir(parents=True, exist_ok=True)
    from edgesparse.errors import PackageError
    from edgesparse.format import read_manifest
    try:
        read_manifest(work / "smollm2.esp")
    except PackageError:     # missing, or written by an older format version: (re-)export
        from edgesparse.export import export
        export(None, work / "smollm2.esp", force=True)
    if not (work / "hf").exists():
        from edgesparse.export import source
        src = source.resolve(None)
        cfg = source.load_config(src)
        model = source.load_model(src, cfg)
        model.save_pretrained(work / "hf")
        source.load_tokenizer(src).save_pretrained(work / "hf")
    if not (work / "ort").exists():
        from optimum.onnxruntime import ORTModelForCausalLM
        m = ORTModelForCausalLM.from_pretrained(work / "hf", export=True, use_cache=True)
        m.save_pretrained(work / "ort")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--threads", default="1,2")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--engines", default=",".join(ENGINES))
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--gen-tokens", type=int, default=128)
    p.add_argument("--worker", choices=ENGINES, help=argparse.SUPPRESS)
    p.add_argument("--worker-threads", type=int, help=argparse.SUPPRESS)
    a = p.parse_args(argv)

    if a.worker:
        r = WORKERS[a.worker](a.work, a.worker_threads, a.prompt_tokens, a.gen_tokens)
        r["peak_rss_mb"] = _peak_rss_mb()
        print(json.dumps(r))
        return 0

    prepare(a.work)
    threads = [int(t) for t in a.threads.split(",")]
    engines = a.engines.split(",")
    runs: dict[str, list[dict]] = {}
    total = a.rounds * len(threads) * len(engines)
    done = 0
    for rnd in range(a.rounds):
        for t in threads:
            for e in engines:
                cmd = [sys.executable, __file__, "--work", str(a.work), "--worker", e, "--worker-threads", str(t),
                       "--prompt-tokens", str(a.prompt_tokens), "--gen-tokens", str(a.gen_tokens)]
                env = dict(os.environ, OMP_NUM_THREADS=str(t), TOKENIZERS_PARALLELISM="false")
                out = subprocess.run(cmd, capture_output=True, text=True, env=env)
                if out.returncode:
                    print(out.stderr[-3000:], file=sys.stderr)
                    return 1
                r = json.loads(out.stdout.strip().splitlines()[-1])
                runs.setdefault(f"{e}@{t}", []).append(r)
                done += 1
                print(f"[{done}/{total}] round {rnd + 1} {e:12s} threads {t}: {r['tok_s']:6.2f} tok/s, "
                      f"prefill {r['prefill_ms']:7.1f} ms, peak RSS {r['peak_rss_mb']:6.0f} MB", file=sys.stderr)

    summary = {}
    for key, rs in runs.items():
        summary[key] = {k: statistics.median(r[k] for r in rs) for k in ("tok_s", "prefill_ms", "peak_rss_mb")}
        summary[key]["runs"] = rs
    lines = ["| engine | threads | decode tok/s (median) | vs ORT | prefill ms | peak RSS MB |",
             "|---|---|---|---|---|---|"]
    for t in threads:
        base = summary.get(f"ort@{t}", {}).get("tok_s")
        for e in engines:
            s = summary[f"{e}@{t}"]
            ratio = f"{s['tok_s'] / base:.2f}x" if base else "-"
            lines.append(f"| {e} | {t} | {s['tok_s']:.2f} | {ratio} | {s['prefill_ms']:.1f} | {s['peak_rss_mb']:.0f} |")
    table = "\n".join(lines)
    print(table)
    meta = {"rounds": a.rounds, "prompt_tokens": a.prompt_tokens, "gen_tokens": a.gen_tokens,
            "date": time.strftime("%Y-%m-%d %H:%M"), "cpu": _cpu_name()}
    (a.work / "bench_compare.json").write_text(json.dumps({"meta": meta, "summary": summary}, indent=1))
    (a.work / "bench_compare.md").write_text(table + "\n")
    _plot(summary, threads, engines, a.work / "bench_compare.png")
    return 0


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def _plot(summary, threads, engines, path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    width = 0.8 / len(engines)
    for i, e in enumerate(engines):
        xs = [j + i * width for j in range(len(threads))]
        axes[0].bar(xs, [summary[f"{e}@{t}"]["tok_s"] for t in threads], width, label=e)
        axes[1].bar(xs, [summary[f"{e}@{t}"]["peak_rss_mb"] for t in threads], width, label=e)
    for ax, title in zip(axes, ("decode tokens/s (median)", "peak RSS (MB)")):
        ax.set_xticks([j + width * (len(engines) - 1) / 2 for j in range(len(threads))])
        ax.set_xticklabels([f"{t} thread{'s' if t > 1 else ''}" for t in threads])
        ax.set_title(title)
    axes[0].legend()
    fig.suptitle("SmolLM2-135M float32, 128 tokens after a 32-token prompt")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())

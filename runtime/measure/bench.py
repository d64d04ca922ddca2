"""`edgesparse bench`: decode latency, throughput and memory of one package, configurations
side by side. Every measurement is a fresh process (RSS is that configuration's alone), the
configurations alternate within each round, and medians over rounds are reported: shared
machines are noisy, and only comparisons made in one run mean much.

A configuration is edgesparse at (ffn mode, sparsity, threads), optionally under a RAM budget
(residency.py), or another engine at a thread count (against.py names them: llama.cpp's own
llama-bench runs from llama_bench.py; the Hugging Face engines' workers are handed over by the
workstation side, export/engines.py). Every row reports the weight bytes a decode step reads and
the effective bandwidth, bytes x tok/s; bench_report.py writes the table. `run_positions` measures
latency against position instead (positions.py).
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from edgesparse.errors import EdgesparseError
from edgesparse.progress import Progress

from . import bench_report
from .against import LLAMA_CPP
from .metrics import latency_stats, prompt_ids, rss_split_mb


def _reset_peak_rss() -> None:
    """Start VmHWM afresh (Linux >= 4.0), so that a later reading is the peak of what follows: the
    decode loop's, which a RAM budget governs, not the load's or the prefill's."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5\n")
    except OSError:
        pass


def _major_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_majflt


def _warm_page_cache(m) -> None:
    """Read the weight files this configuration uses into the page cache without mapping them (so
    RSS is unchanged). A budgeted run before this one may have dropped pages from the cache, and
    the next configuration must not pay for re-reading them."""
    skip = set()
    if m.ffn_mode != "predict":
        skip = {n for e in m.pkg.manifest.layers for n in (e.pred_q, e.pred_scale) if n}
    files = {m.pkg.manifest.tensor(n).file for n in m.pkg.manifest.tensors if n not in skip}
    for rel in sorted(files):
        with open(m.pkg.file(rel), "rb", buffering=0) as fh:
            while fh.read(1 << 20):
                pass


def measure(pkg: str, threads: int, sparsity: float, n_prompt: int, n_gen: int, ffn: str = "threshold",
            budget_mb: float | None = None, load: str = "mmap", settings: dict | None = None) -> dict:
    """One configuration, in this process: load, warm up, prefill a fixed prompt, decode n_gen
    greedy tokens (EOS ignored, so every configuration decodes the same count). settings: the
    thresholds of (ffn, sparsity) as Model.configure takes them (sparsity/levels.py prepares them
    in the parent process). With a budget, the residency manager runs after every decode step,
    inside the timed interval: its cost is part of the price of the budget."""
    from ..core.model import Model
    from .residency import Residency, package_resident_bytes
    t0 = time.perf_counter()
    m = Model(pkg, threads=threads, ctx=n_prompt + n_gen + 8, load=load)
    load_s = time.perf_counter() - t0
    after_load = rss_split_mb()
    m.configure(ffn, **(settings or {}))
    _warm_page_cache(m)
    m.warmup()
    # With a budget, the FFN rows start released (see residency.py): the prefill reads them back,
    # and its time includes that and the first enforcement.
    res = Residency(m, int(budget_mb * 2**20)) if budget_mb else None
    ids = prompt_ids(n_prompt, m.cfg.vocab_size)
    t = time.perf_counter()
    logits = m.forward(ids)
    if res:
        res.enforce()
    prefill = time.perf_counter() - t
    lat = []
    end_prefill = rss_split_mb()
    _reset_peak_rss()
    faults = _major_faults()
    for _ in range(n_gen - 1):
        tok = int(logits.argmax())
        t = time.perf_counter()
        logits = m.forward([tok])
        if res:
            res.step()
        lat.append(time.perf_counter() - t)
    faults = _major_faults() - faults
    end = rss_split_mb()
    # peak over the whole run: VmHWM was reset before decoding
    decode_peak = end["peak_rss_mb"]
    end["peak_rss_mb"] = max(filter(None, (end_prefill["peak_rss_mb"], decode_peak)), default=None)
    out = {"engine": "edgesparse", "threads": threads, "sparsity": sparsity, "ffn": ffn, "budget_mb": budget_mb,
           "load": load, "load_s": load_s, **latency_stats(prefill, lat), "bytes_per_token": bytes_per_token(m),
           "major_faults_per_token": faults / len(lat), "after_load": after_load, "end": end,
           "decode_peak_rss_mb": decode_peak}
    if res:
        out["residency"] = res.report()
        out["weights_resident_mb"] = out["residency"]["resident_max_mb"]
        res.close()
    else:
        out["weights_resident_mb"] = package_resident_bytes(m.pkg) / 2**20
    return out


def bytes_per_token(m) -> float:
    """Weight bytes a decode step reads: the attention projections, the FFN rows the kernel touched
    (gate, up and down rows, counted per step), the predictor in predict mode, one embedding row,
    and the whole lm_head."""
    lw0, R = m.layers[0], m.cfg.ffn_rows
    # bytes of one FFN row with its scales: a neuron's gate, up or down row (in blocks of 16 neurons
    # each is 1/16 of the block's tiles or one down column: the same bytes)
    neurons = lw0.ffn.shape[0] * (16 if lw0.ffn_bits else 1)
    row = (lw0.ffn.nbytes + lw0.ffn_scale.nbytes) / (neurons * R)
    attn = sum(lw.qkv.nbytes + lw.o.nbytes + lw.qkv_scale.nbytes + lw.o_scale.nbytes for lw in m.layers)
    rows = np.mean(m.stats.ffn_rows) if m.stats.ffn_rows else 0.0
    ffn = rows * row
    if m.ffn_mode == "predict":
        ffn += sum(lw.pred_q.nbytes + lw.pred_scale.nbytes for lw in m.layers)
    embed_row = (m.embed.nbytes + m.embed_scale.nbytes) / m.cfg.vocab_size      # tiles: one row's share
    head = m.head.nbytes + m.head_scale.nbytes + embed_row
    return float(attn + ffn + head)


# -- orchestration ---------------------------------------------------------------------------------------
WORKER = [sys.executable, "-m", "edgesparse.runtime.measure.bench"]     # + SPEC_JSON: one measurement


def _label(c: dict) -> str:
    if c.get("kind") == "positions":
        return f"positions {c['ffn']} {c['sparsity']} threads {c['threads']}"
    ld = " load ram" if c.get("load", "mmap") != "mmap" else ""
    if c["engine"] != "edgesparse":
        return f"{c['engine']} threads {c['threads']}{ld}"
    b = f" budget {c['budget_mb']:g} MB" if c.get("budget_mb") else ""
    return f"{c['ffn']} {c['sparsity']} threads {c['threads']}{b}{ld}"


def _run_workers(specs: list[dict], rounds: int, progress: bool, desc: str) -> list[list[dict]]:
    """Run every spec once per round, in a fresh process each, alternating within the round.
    Returns the results per spec, in round order."""
    runs: list[list[dict]] = [[] for _ in specs]
    bar = Progress(rounds * len(specs), desc, progress)
    for rnd in range(rounds):
        for i, spec in enumerate(specs):
            # a worker command given with the spec (the workstation's engines), else this module's
            cmd = spec.get("worker", WORKER) + [json.dumps({k: v for k, v in spec.items() if k != "worker"}
                                                           | {"round": rnd})]
            env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]), TOKENIZERS_PARALLELISM="false")
            r = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if r.returncode:
                raise EdgesparseError(f"bench worker failed for {_label(spec)}: "
                                      f"{(r.stderr.strip().splitlines() or ['?'])[-1]}")
            res = json.loads(r.stdout.strip().splitlines()[-1])
            runs[i].append(res)
            bar.update(note=f"{_label(spec)}: " + (f"{res['tok_s']:.1f} tok/s" if "tok_s" in res else "done"))
    return runs


def worker(spec: dict) -> dict:
    kind = spec.get("kind", "decode")
    if kind == "positions":
        from . import positions
        return positions.measure(spec["package"], spec["threads"], spec["ffn"], spec["positions"], spec["steps"],
                                 spec.get("round", 0), spec["settings"])
    if spec["engine"] == "edgesparse":
        return measure(spec["package"], spec["threads"], spec["sparsity"], spec["prompt_tokens"], spec["gen_tokens"],
                       spec["ffn"], spec.get("budget_mb"), spec.get("load", "mmap"), spec["settings"])
    from . import llama_bench
    if spec["engine"] not in llama_bench.ENGINES:
        raise EdgesparseError(f"--against {spec['engine']}: measured by the workstation's worker, "
                              "edgesparse.export.engines")
    r = llama_bench.measure(spec["llama_bench"], spec["path"], spec["threads"], spec["prompt_tokens"],
                            spec["gen_tokens"], spec.get("load", "mmap"), llama_bench.ENGINES[spec["engine"]])
    return engine_row(spec, r)


def engine_row(spec: dict, r: dict) -> dict:
    """Another engine's measurement r as a result row beside edgesparse's (no ffn mode, sparsity or
    budget of its own)."""
    return {"engine": spec["engine"], "threads": spec["threads"], "sparsity": None, "ffn": None, "budget_mb": None,
            "load": spec.get("load", "mmap"), **r}


def _configs(threads, sparsities, ffns, budget_mb, loads=("mmap",)) -> list[tuple[float, str, float | None, str]]:
    # level 0 is the dense model under every mode: measured once, as "dense"
    base = [(s, "dense" if s == 0 else f) for s in sparsities for f in (ffns if s else ffns[:1])]
    return [(s, f, b, ld) for ld in loads for s, f in base for b in ([None, budget_mb] if budget_mb else [None])]


def package_info(pkg: str) -> dict:
    """What identifies the weights across machines: the source model, the storage dtype, the arch."""
    from edgesparse.format import read_manifest
    m = read_manifest(Path(pkg))
    ffn = m.tensor(m.layers[0].ffn)
    return {"source": m.source, "dtype": ffn.dtype, "arch": m.config.arch}


def machine() -> dict:
    cpu = "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith(("model name", "Model")):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "machine": os.uname().machine}


def run_bench(pkg: str, threads: list[int], sparsities: list[float], n_prompt: int, n_gen: int, rounds: int,
              out: Path, settings, progress: bool = True, ffns: tuple[str, ...] = ("threshold",),
              against: dict[str, dict] | None = None, budget_mb: float | None = None,
              project: str | None = None, loads: tuple[str, ...] = ("mmap",)) -> dict:
    """settings(ffn, sparsity): Model.configure's thresholds for a configuration, as data (the CLI
    hands over sparsity/levels.py's). against: engine -> what its worker loads ("path") and, for the
    workstation's engines, the worker command ("worker"). project: a board name or profile path for
    the roofline projection."""
    profile = None
    if project:
        from . import boards
        profile = boards.load_profile(project)           # fail before the runs, not after
    common = {"package": str(pkg), "prompt_tokens": n_prompt, "gen_tokens": n_gen}
    specs = [common | {"engine": "edgesparse", "threads": t, "sparsity": s, "ffn": f, "budget_mb": b, "load": ld,
                       "settings": settings(f, s)}
             for s, f, b, ld in _configs(threads, sparsities, list(ffns), budget_mb, loads) for t in threads]
    # llama.cpp also has both loads (mmap, -lm none); ORT and transformers always read into memory
    specs += [common | {"engine": e, "threads": t, "load": ld} | given for e, given in (against or {}).items()
              for ld in (loads if e in LLAMA_CPP else ("mmap",)) for t in threads]
    runs = _run_workers(specs, rounds, progress, "bench")
    summary = [_summarize(spec, rs) for spec, rs in zip(specs, runs)]
    res = {"package": str(pkg), "package_info": package_info(pkg), "prompt_tokens": n_prompt, "gen_tokens": n_gen,
           "rounds": rounds, "date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine(), "summary": summary}
    if profile:
        from . import boards, roofline
        res["projection"] = roofline.project(res, profile, boards.results_for(profile["board"], profile))
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(res, indent=1) + "\n")
    (out / "bench.md").write_text(bench_report.report(res) + "\n")
    from .plots import bench_png
    bench_png(res, out / "bench.png")
    return res


def _median(values) -> float | None:
    """The median, or None when an engine does not report the figure (llama-bench: no per-token
    latencies, no RSS after load)."""
    vs = list(values)
    return None if any(v is None for v in vs) else statistics.median(vs)


def _summarize(spec: dict, rs: list[dict]) -> dict:
    med = lambda f: _median(f(r) for r in rs)  # noqa: E731
    row = {k: spec.get(k) for k in ("engine", "threads", "sparsity", "ffn", "budget_mb", "load")}
    row.update({k: med(lambda r: r[k]) for k in ("tok_s", "prefill_ms", "p50_ms", "p90_ms", "p99_ms")})
    row.update(rss_after_load_mb=med(lambda r: r["after_load"]["rss_mb"]),
               peak_rss_mb=med(lambda r: r["end"]["peak_rss_mb"]),
               rss_file_mb=med(lambda r: r["end"]["rss_file_mb"]),
               rss_anon_mb=med(lambda r: r["end"]["rss_anon_mb"]),
               mb_read_per_token=med(lambda r: r["bytes_per_token"]) / 1e6,
               # effective bandwidth: the weight bytes a decode step reads x decode steps per second
               gb_s=med(lambda r: r["bytes_per_token"] * r["tok_s"]) / 1e9)
    if spec["engine"] in LLAMA_CPP:
        row.update(gguf=spec["path"], gguf_type=rs[0]["gguf_type"], repack=rs[0]["repack"],
                   llama_bench=rs[0]["llama_bench"])
    if spec["engine"] == "edgesparse":
        row.update(weights_resident_mb=med(lambda r: r["weights_resident_mb"]),
                   decode_peak_rss_mb=med(lambda r: r["decode_peak_rss_mb"]),
                   major_faults_per_token=med(lambda r: r["major_faults_per_token"]))
    if spec.get("budget_mb"):
        row["released_mb_per_token"] = med(lambda r: r["residency"]["released_mb_per_token"])
        row["over_budget_steps"] = max(r["residency"]["over_budget_steps"] for r in rs)
    row["runs"] = rs
    return row




def run_positions(pkg: str, threads: list[int], sparsities: list[float], ffns: list[str], positions: list[int],
                  steps: int, rounds: int, out: Path, settings, progress: bool = True) -> dict:
    """Latency vs position for every configuration (see positions.py); positions.json/.md/.png.
    settings: as in run_bench."""
    from . import positions as P
    specs = [{"kind": "positions", "package": str(pkg), "threads": t, "sparsity": s, "ffn": f,
              "positions": positions, "steps": steps, "settings": settings(f, s)}
             for s, f, _, _ in _configs(threads, sparsities, ffns, None) for t in threads]
    runs = _run_workers(specs, rounds, progress, "positions")
    configs = [{k: s[k] for k in ("threads", "sparsity", "ffn")} | P.summarize(rs) | {"runs": rs}
               for s, rs in zip(specs, runs)]
    res = {"package": str(pkg), "package_info": package_info(pkg), "steps": steps, "rounds": rounds,
           "positions": positions, "date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine(), "configs": configs}
    out.mkdir(parents=True, exist_ok=True)
    (out / "positions.json").write_text(json.dumps(res, indent=1) + "\n")
    (out / "positions.md").write_text(P.table(res) + "\n")
    P.plot(res, out / "positions.png")
    return res


if __name__ == "__main__":
    # worker: python -m edgesparse.runtime.measure.bench SPEC_JSON (one configuration; result JSON on stdout)
    print(json.dumps(worker(json.loads(sys.argv[1]))))

"""The bench command: decode speed and memory, configurations side by side (and latency vs
position)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from edgesparse.errors import EdgesparseError

from .args import HelpFormatter, ints, levels, output_dir


def bench(a: argparse.Namespace) -> int:
    from functools import partial

    from edgesparse.runtime.core.package import LOADS, Package
    from edgesparse.runtime.core.threads import check_threads
    from edgesparse.runtime.measure import against, bench, bench_report
    from edgesparse.runtime.sparsity.levels import settings as level_settings

    pkg = Package(a.package)              # fail here, not in a worker
    threads = [check_threads(ints(t, "--threads")) for t in a.threads.split(",")]
    sparsities = levels(a.sparsity, "--sparsity")
    for name in ("rounds", "prompt_tokens", "gen_tokens"):
        if getattr(a, name) < (2 if name == "gen_tokens" else 1):
            raise EdgesparseError(f"--{name.replace('_', '-')}: too small ({getattr(a, name)})")
    ffns = [f.strip() for f in a.ffn.split(",") if f.strip()]
    bad = [f for f in ffns if f not in ("dense", "threshold", "predict")]
    if not ffns or bad:
        raise EdgesparseError(f"--ffn: expected comma-separated dense, threshold, predict; got {a.ffn!r}")
    if "predict" in ffns and not all(e.pred_q for e in pkg.manifest.layers):
        raise EdgesparseError(f"{a.package}: --ffn predict needs a predictor (calibrate --predictor)")
    if any(sparsities) and not pkg.manifest.sparsity.get("calibration"):
        raise EdgesparseError(f"{a.package}: not calibrated; run `edgesparse calibrate` or use --sparsity 0")
    engines = against.parse(a.against)
    llama = [e for e in engines if e in against.LLAMA_CPP]
    for flag, given in (("--gguf", a.gguf), ("--llama-bench", a.llama_bench)):
        if given and not llama:
            raise EdgesparseError(f"{flag}: only used with --against llama.cpp (or llama.cpp-norepack)")
    loads = [x.strip() for x in a.load.split(",") if x.strip()]
    if not loads or any(x not in LOADS for x in loads):
        raise EdgesparseError(f"--load: expected comma-separated {', '.join(LOADS)}; got {a.load!r}")
    if a.ram_budget is not None:
        if loads != ["mmap"]:
            raise EdgesparseError("--ram-budget releases pages of mapped files: it needs --load mmap")
        if not a.ram_budget > 0:
            raise EdgesparseError(f"--ram-budget: expected a positive number of MB, got {a.ram_budget}")
        from edgesparse.runtime.measure.residency import check_budget
        check_budget(pkg.manifest, int(a.ram_budget * 2**20), "predict" in ffns and any(sparsities))
    out = output_dir(a.output)
    # each configuration's thresholds, as data for the workers
    settings = partial(level_settings, pkg.manifest.sparsity, pkg.config.n_layers)
    if a.positions:
        for flag, given in (("--against", engines), ("--ram-budget", a.ram_budget), ("--project", a.project),
                            ("--load", loads != ["mmap"])):
            if given:
                raise EdgesparseError(f"--positions measures latency against position only; drop {flag}")
        from edgesparse.runtime.measure import positions
        ps = positions.parse(a.positions, a.gen_tokens, pkg.config.max_position)
        res = bench.run_positions(a.package, threads, sparsities, ffns, ps, a.gen_tokens, a.rounds, out, settings,
                                  progress=not a.quiet)
        print(positions.table(res))
        print(f"wrote {out / 'positions.json'}", file=sys.stderr)
        return 0
    log = None if a.quiet else (lambda msg: print(msg, file=sys.stderr))
    cache = Path(a.against_cache) if a.against_cache else out.resolve().parent / "edgesparse-against"
    given = _prepare_engines(engines, pkg, cache, a.gguf, a.llama_bench, log)
    res = bench.run_bench(a.package, threads, sparsities, a.prompt_tokens, a.gen_tokens, a.rounds, out, settings,
                          progress=not a.quiet, ffns=ffns, against=given, budget_mb=a.ram_budget,
                          project=a.project, loads=tuple(loads))
    print(bench_report.report(res))
    print(f"wrote {out / 'bench.json'}", file=sys.stderr)
    return 0


def _prepare_engines(engines: list[str], pkg, cache: Path, gguf: str | None, llama_bench: str | None,
                     log) -> dict[str, dict]:
    """engine -> what bench hands its worker: for llama.cpp, the GGUF and the llama-bench binary; for
    ort and transformers, the model the workstation side (edgesparse.export.engines) made and its
    worker command. Every engine's requirements are checked before any (slow) export starts."""
    from edgesparse.runtime.measure import against, llama_bench as lb, llama_cpp
    llama = {}
    for e in engines:
        against.check_installed(e)
        if e in against.LLAMA_CPP and not llama:
            exe = llama_cpp.find("llama-bench", llama_bench, "--llama-bench")
            path = against.gguf_for(pkg.manifest, gguf)
            llama = {"path": str(path), "llama_bench": str(exe)}
            # not quiet: a comparison across widths must not pass unnoticed
            warn = lb.width_warning(str(path), pkg.manifest.tensor(pkg.manifest.layers[0].ffn).dtype)
            if warn:
                print(f"bench: {warn}", file=sys.stderr)
    given = {}
    for e in engines:
        if e in against.LLAMA_CPP:
            given[e] = dict(llama)
        else:
            from edgesparse.export import engines as workstation
            given[e] = workstation.prepare(e, pkg, cache, log)
    return given


def add_parsers(sub) -> None:
    b = sub.add_parser("bench", help="decode speed and memory, configurations side by side",
                       formatter_class=HelpFormatter, description="Decode speed and memory of a package, each "
                       "configuration (ffn mode x sparsity x threads) in fresh processes, alternating over rounds; "
                       "bench.json, bench.md and bench.png in -o.")
    b.add_argument("package", help="package directory (from `edgesparse export`)")
    b.add_argument("--sparsity", default="0", help="comma-separated calibrated levels (0 = dense)")
    b.add_argument("--ffn", default="threshold", help="comma-separated FFN modes: threshold, predict, dense")
    b.add_argument("--threads", default=str(os.cpu_count() or 1), help="comma-separated thread counts")
    b.add_argument("--prompt-tokens", type=int, default=32, help="tokens of the fixed pseudo-random prompt")
    b.add_argument("--gen-tokens", type=int, default=128, help="decode steps (per position with --positions)")
    b.add_argument("--rounds", type=int, default=3, help="runs of every configuration; medians are reported")
    b.add_argument("--against", default="", metavar="ENGINES",
                   help="also run the package's source model with: ort, transformers (need [export]), llama.cpp "
                   "(its llama-bench, defaults: repacking on), llama.cpp-norepack (an extra row, --repack 0)")
    b.add_argument("--gguf", metavar="FILE", help="the GGUF for --against llama.cpp (default: the package's source; "
                   "pass one of the package's width, e.g. Q4_0 for int4)")
    b.add_argument("--llama-bench", metavar="PATH", help="llama.cpp's llama-bench (default: $EDGESPARSE_LLAMA_CPP_BIN/"
                   "llama-bench, else the build of devices/llama.cpp/build)")
    b.add_argument("--against-cache", metavar="DIR",
                   help="where --against keeps its exports (default: edgesparse-against/ beside -o)")
    b.add_argument("--load", default="mmap", metavar="mmap,ram",
                   help="comma-separated: how the weights are loaded (see run --load)")
    b.add_argument("--ram-budget", type=float, metavar="MB",
                   help="also run every configuration with the resident weights kept under MB (cold FFN rows released)")
    b.add_argument("--positions", metavar="P,P,...",
                   help="instead: per-token latency at these positions, e.g. 32,128,512,1000,2000")
    b.add_argument("--project", metavar="BOARD",
                   help="projected tok/s on BOARD (devices/profiles/BOARD.json or a profile path): bandwidth / bytes")
    b.add_argument("-o", "--output", default="edgesparse-bench",
                   help="directory for bench.json, bench.md, bench.png (or positions.*); made before any run")
    b.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    b.set_defaults(fn=bench)


"""How fast this machine's cores stream the bytes a dense decode step reads, for one package: a
measured reference rate for "memory-bound", rather than a datasheet's peak.

A dense decode step reads every weight once: each layer's q|k|v and o projections and FFN rows
(with their scales), and the whole lm_head. This streams exactly those arrays (the views the
runtime itself uses, bench.bytes_per_token's dense bytes, from the package's file mappings or read
into huge-page memory as `run --load ram` does) through a bare sequential reader: a wrapping int64
sum (one vector add per 64 bytes, 1 cycle of latency: the loads, not the adds, set the pace), one
parallel call per array with a contiguous chunk per thread, as the kernels split their rows.

On 2 MB pages that single stream was the fastest reader tried here (a float32 sum was 15-25 %
slower, several interleaved streams slower still), so bytes / its time is close to a ceiling on any
engine's tokens/s at that width. On a file's 4 KB pages it is not: the hardware prefetchers stop at
every page, and readers with several streams in flight (the FFN kernel reads a neuron's gate and up
rows together) go faster than it.

    python devices/bench_stream.py PKG [--threads 1,2] [--load mmap,ram] [--rounds 15]

Prints per load and thread count the median time to stream a token's bytes, GB/s and the tok/s
that rate allows, and writes stream.json (or -o FILE). Numbers on a shared machine move between
runs; compare them with engine figures measured in the same session.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numba
import numpy as np
from numba import njit, prange


@njit(parallel=True, cache=True)
def stream_sum(a, chunks):
    """Wrapping sum of a [n] int64 in `chunks` contiguous parts (one per thread); the value only
    keeps the loads alive."""
    n = a.shape[0]
    part = np.zeros(chunks, np.int64)
    for c in prange(chunks):
        s = np.int64(0)
        for i in range(c * n // chunks, (c + 1) * n // chunks):
            s += a[i]
        part[c] = s
    return part.sum()


def token_arrays(model) -> list[np.ndarray]:
    """The arrays a dense decode step reads in full, as flat int64 views (the trailing 1-7 bytes of
    an array whose size is not a multiple of 8 are left out)."""
    arrays = []
    for lw in model.layers:
        arrays += [lw.qkv, lw.qkv_scale, lw.o, lw.o_scale, lw.ffn, lw.ffn_scale]
    arrays += [model.head, model.head_scale]
    out = []
    for a in arrays:
        b = np.asarray(a).reshape(-1).view(np.uint8)
        n = b.size // 8 * 8
        if n:
            out.append(b[:n].view(np.int64))
    return out


def measure(model, threads: int, rounds: int, load: str = "mmap") -> dict:
    numba.set_num_threads(threads)
    arrays = token_arrays(model)
    total = sum(a.nbytes for a in arrays)
    for a in arrays:                     # compile, and fault every page in once
        stream_sum(a, threads)
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        for a in arrays:
            stream_sum(a, threads)
        times.append(time.perf_counter() - t)
    med = statistics.median(times)
    return {"load": load, "threads": threads, "bytes": total, "calls": len(arrays), "median_ms": med * 1e3,
            "gb_s": total / med / 1e9, "stream_tok_s": 1.0 / med}


def main(argv=None) -> int:
    from edgesparse.errors import EdgesparseError
    from edgesparse.runtime.core.model import Model
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("package")
    p.add_argument("--threads", default="1,2", help="comma-separated thread counts (default 1,2)")
    p.add_argument("--load", default="mmap,ram", help="comma-separated: mmap, ram (default both)")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("-o", "--output", default="stream.json")
    a = p.parse_args(argv)
    loads = [x.strip() for x in a.load.split(",") if x.strip()]
    try:
        threads = [int(t) for t in a.threads.split(",")]
        if any(t < 1 for t in threads) or a.rounds < 1:
            raise ValueError
    except ValueError:
        print(f"bench_stream: --threads wants positive integers and --rounds >= 1, got {a.threads!r} / {a.rounds}",
              file=sys.stderr)
        return 2
    rows = []
    try:
        for load in loads:
            model = Model(a.package, threads=max(threads), load=load)
            rows += [measure(model, t, a.rounds, load) for t in threads]
            del model
    except EdgesparseError as e:
        print(f"bench_stream: {e}", file=sys.stderr)
        return 1
    print(f"{a.package}: {rows[0]['bytes'] / 1e6:.0f} MB per dense token in {rows[0]['calls']} arrays")
    print("| load | threads | ms per token's bytes | GB/s | tok/s at that rate |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['load']} | {r['threads']} | {r['median_ms']:.2f} | {r['gb_s']:.1f} | {r['stream_tok_s']:.1f} |")
    with open(a.output, "w") as f:
        json.dump({"package": str(a.package), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Per-token decode latency against position: evidence that the KV cache is written in place.

    python devices/bench_positions.py PKG [--positions 32,1000] [--steps 16] [--rounds 5] [--threads 2]
                                          [--buffers 1024,8192]

For each round and each position p (alternating), the sequence is prefilled to p tokens and
`--steps` single tokens are decoded; the median per-token latency per position and the ratio to
the first position are printed. Attention itself grows with p (it reads p keys), so the ratio is
not 1.0; a per-token copy of the whole cache would add another O(p) on top.

--buffers repeats the first position with KV buffers allocated for different context lengths: a
runtime that copied (or cleared) the whole cache every token would slow down with the buffer size.
The model runs dense (thresholds 0) whatever the package's calibration.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np


def main(argv=None) -> int:
    from edgesparse.runtime.model import Model
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("package")
    p.add_argument("--positions", default="32,1000")
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--buffers", default=None, help="comma-separated KV buffer lengths to compare")
    a = p.parse_args(argv)
    positions = [int(x) for x in a.positions.split(",")]
    need = max(positions) + a.steps + 1
    buffers = [int(x) for x in a.buffers.split(",")] if a.buffers else []
    models = {b: Model(a.package, ctx=b, threads=a.threads) for b in sorted({need, *buffers})}
    for m in models.values():
        m.set_thresholds(np.zeros(m.cfg.n_layers, np.float32))
        m.warmup()
    rng = np.random.default_rng(0)
    cases = [(need, q) for q in positions] + [(b, positions[0]) for b in buffers if b != need]
    lat: dict[tuple, list[float]] = {c: [] for c in cases}
    for r in range(a.rounds):
        for buf, q in cases:
            m = models[buf]
            m.reset()
            m.forward(rng.integers(100, m.cfg.vocab_size - 1, q))
            for _ in range(a.steps):
                t = time.perf_counter()
                m.forward([int(rng.integers(100, m.cfg.vocab_size - 1))])
                lat[(buf, q)].append(time.perf_counter() - t)
        print(f"round {r + 1}/{a.rounds} done", file=sys.stderr)
    base = statistics.median(lat[cases[0]])
    for buf, q in cases:
        med = statistics.median(lat[(buf, q)])
        print(f"position {q:5d}, KV buffer {buf:5d}: median {med * 1e3:7.2f} ms/token "
              f"({med / base:.2f}x position {positions[0]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

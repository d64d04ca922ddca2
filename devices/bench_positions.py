"""Per-token decode latency against position: evidence that the KV cache is written in place. Now
`edgesparse bench PKG --positions ...` (runtime/positions.py); this script keeps the old invocation:

    python devices/bench_positions.py PKG [--positions 32,128,512,1000,2000] [--steps 16] [--rounds 5]
                                          [--threads 2] [-o DIR]

Each position is prefilled and then `--steps` tokens are decoded; the first position is also run
with a KV buffer sized for it alone (a runtime that copied the cache per token would slow down
with the buffer). Writes positions.json, positions.md and positions.png.
"""

from __future__ import annotations

import argparse
import os
import sys

from edgesparse.cli import main as edgesparse


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("package")
    p.add_argument("--positions", default="32,128,512,1000,2000")
    p.add_argument("--steps", default="16")
    p.add_argument("--rounds", default="5")
    p.add_argument("--threads", default=str(os.cpu_count() or 1))
    p.add_argument("-o", "--output", default="edgesparse-positions")
    a = p.parse_args(argv)
    return edgesparse(["bench", a.package, "--positions", a.positions, "--gen-tokens", a.steps, "--rounds", a.rounds,
                       "--threads", a.threads, "-o", a.output])


if __name__ == "__main__":
    sys.exit(main())

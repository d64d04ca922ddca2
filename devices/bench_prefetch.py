"""Does prefetching help when the weights are not in the page cache? (edgesparse --prefetch)

Each measurement is a fresh process after `echo 1 > /proc/sys/vm/drop_caches` (needs root; the
script refuses to run without it, since a warm cache would measure nothing). The process loads the
package, prefills a fixed 8-token prompt and decodes N tokens; reported per configuration
(alternating, medians over rounds): load-to-first-token time, and the mean per-token latency of
the first 8 decode steps (still cold for the rows not yet touched) and of the rest.

    python devices/bench_prefetch.py PKG [--ffn threshold,predict] [--rounds 3] [--tokens 32]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def worker(pkg: str, ffn: str, prefetch: bool, tokens: int) -> dict:
    import numpy as np
    from edgesparse.runtime.core.model import Model
    from edgesparse.runtime.sparsity.levels import configure
    t0 = time.perf_counter()
    m = Model(pkg, threads=os.cpu_count(), ctx=64, prefetch=prefetch)
    configure(m, ffn, None if ffn != "dense" else 0.0)
    logits = m.forward(np.arange(100, 108))
    first = time.perf_counter() - t0
    lat = []
    for _ in range(tokens):
        t = time.perf_counter()
        logits = m.forward([int(logits.argmax())])
        lat.append(time.perf_counter() - t)
    return {"first_token_s": first, "early_ms": 1e3 * sum(lat[:8]) / 8, "late_ms": 1e3 * sum(lat[8:]) / max(len(lat) - 8, 1)}


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as fh:
        fh.write("1\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("package")
    p.add_argument("--ffn", default="threshold")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        print(json.dumps(worker(a.package, a.worker[0], a.worker[1] == "1", a.tokens)))
        return 0
    try:
        drop_caches()
    except OSError as e:
        print(f"bench_prefetch: cannot drop the page cache ({e}); run as root on the device", file=sys.stderr)
        return 2
    configs = [(f, pf) for f in a.ffn.split(",") for pf in ("0", "1")]
    runs: dict = {}
    for r in range(a.rounds):
        for f, pf in configs:
            drop_caches()
            out = subprocess.run([sys.executable, __file__, a.package, "--tokens", str(a.tokens), "--worker", f, pf],
                                 capture_output=True, text=True, check=True)
            res = json.loads(out.stdout.strip().splitlines()[-1])
            runs.setdefault((f, pf), []).append(res)
            print(f"[round {r + 1}] ffn {f} prefetch {pf}: first token {res['first_token_s']:.2f} s, "
                  f"early {res['early_ms']:.1f} ms, late {res['late_ms']:.1f} ms", file=sys.stderr)
    print("| ffn | prefetch | load + first token s | first 8 decode ms/token | later ms/token |")
    print("|---|---|---|---|---|")
    for (f, pf), rs in runs.items():
        med = lambda k: statistics.median(x[k] for x in rs)  # noqa: E731
        print(f"| {f} | {'on' if pf == '1' else 'off'} | {med('first_token_s'):.2f} | {med('early_ms'):.1f} | "
              f"{med('late_ms'):.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

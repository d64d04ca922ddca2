"""Decode speed and memory of edgesparse vs ONNX Runtime (optimum's export) vs transformers on the
same weights. The engines now live in the library (`edgesparse bench --against`); this script
keeps the old invocation and its defaults:

    python devices/bench_compare.py --work /tmp/esbench [--threads 1,2] [--rounds 3]

runs, after exporting the default model to WORK/smollm2.esp if that is missing or outdated,

    edgesparse bench WORK/smollm2.esp --against ort,transformers --against-cache WORK -o WORK/bench_compare

Needs the [export] extra (torch, transformers, optimum-onnx), so it runs on the workstation.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from edgesparse.cli import main as edgesparse


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", type=Path, required=True, help="directory for the package, the exports and the results")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--rounds", default="3")
    p.add_argument("--prompt-tokens", default="32")
    p.add_argument("--gen-tokens", default="128")
    a = p.parse_args(argv)
    pkg = a.work / "smollm2.esp"
    from edgesparse.errors import PackageError
    from edgesparse.format import read_manifest
    try:
        read_manifest(pkg)
    except PackageError:     # missing, or written by an older format version: (re-)export
        if edgesparse(["export", "-o", str(pkg), "--force"]) != 0:
            return 1
    return edgesparse(["bench", str(pkg), "--against", "ort,transformers", "--threads", a.threads,
                       "--rounds", a.rounds, "--prompt-tokens", a.prompt_tokens, "--gen-tokens", a.gen_tokens,
                       "--against-cache", str(a.work), "-o", str(a.work / "bench_compare")])


if __name__ == "__main__":
    sys.exit(main())

"""Command line: `edgesparse COMMAND ...`; main(argv) -> int, and `python -m edgesparse` works.
One module per group of commands, each adding its subparsers:
    workstation.py  export                               (needs the [export] extra)
    device.py       run, verify
    sparsity.py     calibrate, eval, analyze, prune
    bench.py        bench
Bad input raises EdgesparseError, printed as one line with a non-zero exit; --debug shows the
traceback instead.
"""

from __future__ import annotations

import argparse
import sys

from .. import __version__
from ..errors import EdgesparseError
from . import bench, device, sparsity, workstation


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgesparse", description="FFN activation sparsity runtime for small CPUs")
    p.add_argument("--version", action="version", version=f"edgesparse {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="cmd", required=True)
    for group in (workstation, sparsity, device, bench):
        group.add_parsers(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    try:
        return a.fn(a)
    except EdgesparseError as e:
        if a.debug:
            raise
        print(f"edgesparse: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

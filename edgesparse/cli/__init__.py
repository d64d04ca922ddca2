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
from .args import HelpFormatter


DESCRIPTION = """\
edgesparse runs small language models on Raspberry Pi and Jetson-class CPUs, skipping the FFN
neurons whose output is near zero for each token (activation sparsity, arXiv 2412.12178).

Typical flow:
  edgesparse export -o smol.esp                      # on the workstation: a model -> a package
  edgesparse calibrate smol.esp --text wikitext2     # per-layer thresholds (50 % sparsity active)
  edgesparse run smol.esp -p "The capital of France is" --stats     # on the device
Then eval (perplexity vs sparsity), bench (speed, memory), analyze, prune, verify.
`edgesparse COMMAND --help` describes a command; README.md and docs/ explain the rest."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgesparse", description=DESCRIPTION, formatter_class=HelpFormatter)
    p.add_argument("--version", action="version", version=f"edgesparse {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND", title="commands")
    for group in (workstation, device, sparsity, bench):
        group.add_parsers(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    if a.cmd is None:           # bare `edgesparse`: what it is and the commands, as a usage error
        parser.print_help(sys.stderr)
        return 2
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

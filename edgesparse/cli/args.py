"""What the commands share: parsing comma-separated levels and integers, the options of every
command that runs a package over text."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from edgesparse.errors import EdgesparseError


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Every option's default in its help (none shown where it is None or False), descriptions and
    epilogs kept as written."""

    def _get_help_string(self, action):
        if action.default in (None, False, argparse.SUPPRESS) or action.required:
            return action.help
        return super()._get_help_string(action)


def output_dir(path: str, arg: str = "-o/--output") -> Path:
    """The directory a command writes its results into, checked now, before the long work: an
    existing file or an unwritable place fails in the first second, not after the run. The
    command makes it when it writes."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise EdgesparseError(f"{arg} {path}: exists and is not a directory; expected a directory for the results")
    base = next(p for p in (out, *out.absolute().parents) if p.exists())     # what mkdir would create under
    if not base.is_dir() or not os.access(base, os.W_OK | os.X_OK):
        raise EdgesparseError(f"{arg} {path}: cannot create or write it ({base} is not a writable directory)")
    return out


def output_file(path: str, arg: str) -> Path:
    """A file a command writes at the end: its directory must exist and be writable now."""
    p = Path(path)
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise EdgesparseError(f"{arg} {path}: the directory {parent} does not exist")
    if p.is_dir() or not os.access(parent, os.W_OK | os.X_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise EdgesparseError(f"{arg} {path}: cannot write a file there")
    return p


def levels(spec: str, arg: str) -> list[float]:
    try:
        vals = [float(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise EdgesparseError(f"{arg}: expected comma-separated numbers in [0, 1), got {spec!r}") from None
    bad = [v for v in vals if not (0.0 <= v < 1.0)]
    if not vals or bad:
        raise EdgesparseError(f"{arg}: every sparsity must be in [0, 1), got {spec!r}")
    return vals


def ints(v: str, arg: str) -> int:
    try:
        return int(v)
    except ValueError:
        raise EdgesparseError(f"{arg}: expected integers, got {v!r}") from None


def text_command(sub, name: str, help: str, split: str, fn):
    """A subcommand that runs a package over text: PKG --text ... [--threads K] [-q]."""
    p = sub.add_parser(name, help=help, description=help, formatter_class=HelpFormatter)
    p.add_argument("package", help="package directory (from `edgesparse export`)")
    p.add_argument("--text", required=True, help=f"text file, 'wikitext2' ({split} split) or hub dataset id")
    p.add_argument("--threads", type=int, default=None, help="ORT and Numba threads (default: all cores)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    p.set_defaults(fn=fn)
    return p

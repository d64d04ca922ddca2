"""What the commands share: parsing comma-separated levels and integers, the options of every
command that runs a package over text."""

from __future__ import annotations

from edgesparse.errors import EdgesparseError


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
    p = sub.add_parser(name, help=help)
    p.add_argument("package")
    p.add_argument("--text", required=True, help=f"text file, 'wikitext2' ({split} split) or hub dataset id")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(fn=fn)
    return p

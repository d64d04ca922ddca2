"""Where `export -o OUT` may write, decided before any model is loaded.

What --force may replace, and nothing else (an export never deletes data that is not a package):
- an edgesparse package: a directory whose manifest.json says "format": "edgesparse" (whatever its
  version, so an old package can be re-exported), and everything in it;
- an empty directory.
A file, a symbolic link, or a directory holding anything else is refused, with or without --force.
Without --force an existing OUT is always refused; the message says whether --force would help.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from edgesparse.errors import EdgesparseError
from edgesparse.format import FORMAT_NAME, MANIFEST


def _is_package(d: Path) -> bool:
    try:
        doc = json.loads((d / MANIFEST).read_bytes())
    except (OSError, ValueError, RecursionError):     # no manifest, unreadable, or not JSON
        return False
    return isinstance(doc, dict) and doc.get("format") == FORMAT_NAME


def _is_empty(d: Path) -> bool:
    try:
        return next(d.iterdir(), None) is None
    except OSError:         # cannot list it: not known to be empty
        return False


def replaceable(out: Path) -> str | None:
    """What --force would replace at `out` ("package" or "empty directory"), None if not allowed.
    Asked again just before the replacement, in case OUT changed during the export."""
    if out.is_symlink() or not out.is_dir():
        return None
    return "package" if _is_package(out) else "empty directory" if _is_empty(out) else None


def check_output(out: Path, force: bool) -> None:
    """Fail now, in the first second, for any OUT the export could not write or must not replace."""
    out = Path(out)
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise EdgesparseError(f"-o {out}: the directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise EdgesparseError(f"-o {out}: cannot write in {parent}")
    if not (out.exists() or out.is_symlink()):
        return
    if out.is_symlink():
        raise EdgesparseError(f"-o {out}: is a symbolic link; refusing to replace it, even with --force "
                              "(name the directory itself)")
    if not out.is_dir():
        raise EdgesparseError(f"-o {out}: exists and is not a directory; refusing to replace it, even with --force")
    what = replaceable(out)
    if what is None:
        raise EdgesparseError(f"-o {out}: exists, is not an edgesparse package and is not empty; refusing to "
                              "replace it, even with --force (choose another -o)")
    if not force:
        raise EdgesparseError(f"-o {out}: already exists ({what}); pass --force to replace it")

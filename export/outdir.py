"""Where `export -o OUT` may write, decided before any model is loaded, and the hidden partial
directories a package is built in.

What --force may replace, and nothing else (an export never deletes data that is not a package):
- an edgesparse package: a directory whose manifest.json says "format": "edgesparse" (whatever its
  version, so an old package can be re-exported), and everything in it;
- an empty directory.
A file, a symbolic link, or a directory holding anything else is refused, with or without --force.
Without --force an existing OUT is always refused; the message says whether --force would help.

A package is written into `.OUT.partial-PID@HOST-XXXXXXXX` beside OUT (PID and HOST: the writing
process). The writer removes it on an exception or SIGTERM; a SIGKILL, a crash or a power cut
leaves it, so every export first removes the partial directories in OUT's parent whose process is
gone. One written from another host (over NFS, say) is left alone: its process cannot be checked
from here.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
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


# -- partial directories -----------------------------------------------------------------------
_SUFFIX = "[a-z0-9_]+"          # tempfile.mkdtemp's random part


def _host() -> str:
    """This host's name as it goes into a partial directory's name ('-' ends the field there)."""
    return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "host"


def partial_prefix(out: Path) -> str:
    """mkdtemp's prefix for OUT's partial directory: it records the writing process."""
    return f".{out.name}.partial-{os.getpid()}@{_host()}-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:     # another user's process: alive
        return True
    return True


def remove_stale_partials(parent: Path) -> list[Path]:
    """Remove the partial directories in `parent` whose writing process (on this host) is gone;
    returns them. Directories of live processes, of other hosts, and anything not named by
    partial_prefix stay."""
    pattern = re.compile(r"\..+\.partial-(\d+)@([A-Za-z0-9._]+)-" + _SUFFIX)
    removed = []
    try:
        entries = list(parent.iterdir())
    except OSError:
        return removed
    for d in entries:
        m = pattern.fullmatch(d.name)
        if m is None or m.group(2) != _host() or d.is_symlink() or not d.is_dir():
            continue
        if _alive(int(m.group(1))):
            continue
        shutil.rmtree(d, ignore_errors=True)
        removed.append(d)
    return removed

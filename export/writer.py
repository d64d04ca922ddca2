"""Write a package directory atomically: everything goes into a hidden temp dir beside the target,
the manifest is written last, and one rename makes it visible. A killed export leaves only a
`.NAME.partial-*` directory, which nothing loads unless it was already complete; an existing
package (or an empty directory: outdir.py says what --force may replace) is only replaced after
the new one is complete, by one atomic exchange where the platform has it (Linux renameat2), so
the old or the new package is always there."""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from edgesparse.format import MANIFEST, FileEntry, Manifest, TensorEntry, dump_manifest, write_raw

from .outdir import check_output


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths atomically (Linux renameat2 with RENAME_EXCHANGE).
    False where the C library, kernel or file system does not offer it."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except Exception:   # no renameat2 (not Linux/glibc), or no C library handle at all
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


class PackageWriter:
    def __init__(self, out: Path, force: bool = False):
        self.out = Path(out)
        self.force = force
        check_output(self.out, force)
        parent = self.out.parent if str(self.out.parent) else Path(".")
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.partial-", dir=parent))
        self.files: dict[str, FileEntry] = {}
        self.tensors: dict[str, TensorEntry] = {}

    def __enter__(self) -> "PackageWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def _open(self, rel: str):
        p = self.tmp / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        return open(p, "wb")

    def blob(self, rel: str, data: bytes, kind: str) -> None:
        with self._open(rel) as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        self.files[rel] = FileEntry(rel, kind, len(data), hashlib.sha256(data).hexdigest())

    def raw(self, rel: str, tensors: list[tuple[str, np.ndarray, str]]) -> None:
        """Write tensors (name, array, dtype name) into one raw file at page-aligned offsets."""
        p = self.tmp / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        self.files[rel], entries = write_raw(p, rel, tensors)
        self.tensors.update(entries)

    def finish(self, manifest: Manifest) -> Path:
        # mkdtemp creates the directory 0700; a package is meant to be shared (copied to a
        # device, run by other users), so give it the mode a plain mkdir would have.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self.tmp, 0o777 & ~umask)
        with open(self.tmp / MANIFEST, "wb") as fh:
            fh.write(dump_manifest(manifest))
            fh.flush()
            os.fsync(fh.fileno())
        if self.out.exists() or self.out.is_symlink():
            check_output(self.out, self.force)      # OUT may have changed while the package was written
        old = None
        if self.out.exists() and _exchange(self.tmp, self.out):
            # --force: one atomic swap, so OUT is never missing; the old package, now at tmp,
            # loses its manifest first (it no longer loads) and is then deleted.
            (self.tmp / MANIFEST).unlink(missing_ok=True)
            shutil.rmtree(self.tmp, ignore_errors=True)
            return self.out
        if self.out.exists():   # no atomic exchange here: two renames, OUT briefly missing
            old = self.out.with_name(f".{self.out.name}.old-{os.getpid()}")
            os.rename(self.out, old)
        os.rename(self.tmp, self.out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.out

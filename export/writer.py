"""Write a package directory atomically: everything goes into a hidden partial directory beside the
target (outdir.py names it), the manifest is written last, and one rename makes it visible. An
existing package is only replaced (with --force; outdir.py says what it may replace) after the new
one is complete, by one atomic exchange where the platform has it (Linux renameat2), so the old or
the new package is always there.

The partial directory is removed on an exception and on SIGTERM (for the duration of the write a
SIGTERM raises in the main thread, then is delivered again to the previous handler, so the process
still ends as killed by SIGTERM). A SIGKILL leaves it, unloadable unless it was already complete,
and the next export into the same directory removes it (outdir.remove_stale_partials)."""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import shutil
import signal
import tempfile
import threading
from pathlib import Path

import numpy as np

from edgesparse.errors import EdgesparseError
from edgesparse.format import MANIFEST, FileEntry, Manifest, TensorEntry
from edgesparse.format_write import dump_manifest, write_raw

from .outdir import check_output, partial_prefix, remove_stale_partials


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


class Terminated(BaseException):
    """SIGTERM during a write. A BaseException, like KeyboardInterrupt, so that no `except Exception`
    between the signal and the writer (the renameat2 lookup has one) swallows it."""


class _SigtermGuard:
    """While installed, SIGTERM raises Terminated in the main thread, or, while `hold` is set, waits
    until release(). Only the main thread can set a handler, and a SIGTERM the process ignores stays
    ignored: in those cases the guard does nothing."""

    def __init__(self):
        self.prev = None
        self.hold = False
        self.pending = False
        if threading.current_thread() is threading.main_thread():
            prev = signal.getsignal(signal.SIGTERM)
            if prev not in (signal.SIG_IGN, None):       # None: a handler set from C; leave it alone
                self.prev = prev
                signal.signal(signal.SIGTERM, self._handler)

    def _handler(self, signum, frame) -> None:
        if self.hold:
            self.pending = True
            return
        raise Terminated()

    def release(self) -> None:
        self.hold = False
        if self.pending:
            raise Terminated()

    def close(self, terminated: bool) -> None:
        """Put the previous handler back; after a SIGTERM, hand the signal to it (the default one
        ends the process here, with the status a SIGTERM gives)."""
        if self.prev is None:
            return
        signal.signal(signal.SIGTERM, self.prev)
        if terminated or self.pending:
            if self.prev is signal.SIG_DFL:
                os.kill(os.getpid(), signal.SIGTERM)
            elif callable(self.prev):
                self.prev(signal.SIGTERM, None)


class PackageWriter:
    def __init__(self, out: Path, force: bool = False):
        self.out = Path(out)
        self.force = force
        check_output(self.out, force)
        self.parent = self.out.parent if str(self.out.parent) else Path(".")
        remove_stale_partials(self.parent)      # left by exports that were killed
        self.files: dict[str, FileEntry] = {}
        self.tensors: dict[str, TensorEntry] = {}

    def __enter__(self) -> "PackageWriter":
        self._guard = _SigtermGuard()
        try:
            self.tmp = Path(tempfile.mkdtemp(prefix=partial_prefix(self.out), dir=self.parent))
        except BaseException as e:
            # a SIGTERM here may leave the directory unnamed: remove_stale_partials gets it later
            self._guard.close(isinstance(e, Terminated))
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._guard.hold = True          # a second SIGTERM must not interrupt the clean-up
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
        terminated = exc_type is not None and issubclass(exc_type, Terminated)
        self._guard.close(terminated)
        if terminated:      # still here: the previous handler let the process live
            raise EdgesparseError(f"{self.out}: export stopped by SIGTERM; its partial directory was removed") from None

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
        if self.out.exists() and _exchange(self.tmp, self.out):
            # --force: one atomic swap, so OUT is never missing; the old package, now at tmp,
            # loses its manifest first (it no longer loads) and is then deleted.
            (self.tmp / MANIFEST).unlink(missing_ok=True)
            shutil.rmtree(self.tmp, ignore_errors=True)
            return self.out
        if not self.out.exists():
            os.rename(self.tmp, self.out)
            return self.out
        # no atomic exchange here: two renames, OUT briefly missing. A SIGTERM between them would
        # remove the new package with OUT gone, so it waits until the old one is gone too.
        self._guard.hold = True
        old = self.out.with_name(f".{self.out.name}.old-{os.getpid()}")
        os.rename(self.out, old)
        os.rename(self.tmp, self.out)
        shutil.rmtree(old, ignore_errors=True)
        self._guard.release()
        return self.out

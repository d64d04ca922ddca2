"""Open a package: validate the manifest, check file sizes, mmap the raw tensors read-only."""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import numpy as np

from edgesparse.errors import PackageError
from edgesparse.format import DTYPES, Manifest, check_files_on_disk, read_manifest, verify_hashes


LOADS = ("mmap", "ram")


class Package:
    """A validated package directory. Tensors are zero-copy views of read-only mmaps, so the
    OS pages weight rows in on first touch and can drop them again under memory pressure;
    several processes running the same package share one copy in the page cache.

    load="ram" instead reads each raw file into an anonymous mapping advised MADV_HUGEPAGE (llama.cpp's
    --no-mmap): the weights stay mapped memory, but no longer file-backed, so there is no lazy
    paging, no sharing between processes and no RAM budget (bench --ram-budget). What it buys:
    Linux maps the page cache of an ext4 file in 4 KB pages, anonymous memory in 2 MB ones where
    transparent huge pages are enabled, and the cores here stream the latter twice as fast (the
    hardware prefetchers stop at every 4 KB page; devices/bench_stream.py: SmolLM2 float32 FFN rows
    at 8.1 vs 15.1 GB/s on one core, 13.6 vs 27.0 on two). The same rows on a tmpfs mounted
    huge=always stream at 16.7 GB/s through plain mmap: a board can have both, if root sets it up."""

    def __init__(self, path: str | Path, verify: bool = False, load: str = "mmap"):
        if load not in LOADS:
            raise PackageError(f"--load: expected one of {', '.join(LOADS)}, got {load!r}")
        self.load = load
        self.path = Path(path)
        self.manifest: Manifest = read_manifest(self.path)
        check_files_on_disk(self.path, self.manifest)
        if verify:
            verify_hashes(self.path, self.manifest)
        self._maps: dict[str, mmap.mmap] = {}
        self._start: dict[str, int] = {}        # where each file's byte 0 sits in its mapping
        self._size: dict[str, int] = {}         # each mapped file's size

    @property
    def config(self):
        return self.manifest.config

    def file(self, rel: str) -> Path:
        if rel not in self.manifest.files:
            raise PackageError(f"{self.path}: {rel} is not listed in the manifest")
        return self.path / rel

    def _map(self, rel: str) -> mmap.mmap:
        mm = self._maps.get(rel)
        if mm is None:
            with open(self.file(rel), "rb") as fh:
                size = self._size[rel] = os.fstat(fh.fileno()).st_size
                if self.load == "mmap":
                    mm, self._start[rel] = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ), 0
                else:
                    mm, self._start[rel] = _read_to_ram(fh, size)
            self._maps[rel] = mm
        return mm

    def tensor(self, name: str) -> np.ndarray:
        """Read-only array view. float16 tensors come back as float16 (callers view as uint16);
        int4 tensors as their packed uint8 bytes [..., D/2]."""
        t = self.manifest.tensor(name)
        mm = self._map(t.file)
        start, size = self._start[t.file], self._size[t.file]
        if t.offset + t.nbytes > size:
            raise PackageError(f"{self.file(t.file)}: tensor {name} needs bytes up to "
                               f"{t.offset + t.nbytes}, file has {size}")
        count = t.nbytes // np.dtype(DTYPES[t.dtype]).itemsize
        a = np.frombuffer(mm, dtype=np.dtype(DTYPES[t.dtype]), count=count, offset=start + t.offset)
        a.flags.writeable = False       # as from a read-only file map (and the same kernel signatures)
        return a.reshape(t.stored_shape)

    def willneed(self, name: str) -> None:
        """Ask the OS to start reading a tensor's pages now (madvise MADV_WILLNEED), so a later
        first touch does not wait for the disk. Asynchronous; a no-op where unsupported."""
        if self.load != "mmap":     # already in memory
            return
        t = self.manifest.tensor(name)
        mm = self._map(t.file)
        lo = t.offset - t.offset % mmap.PAGESIZE
        if hasattr(mm, "madvise") and hasattr(mmap, "MADV_WILLNEED"):
            mm.madvise(mmap.MADV_WILLNEED, lo, min(len(mm), t.offset + t.nbytes) - lo)

    def mappings(self) -> dict[str, mmap.mmap]:
        """The files mapped so far, by path relative to the package (a snapshot). Residency
        accounting (bench --ram-budget) measures and releases pages through these."""
        return dict(self._maps)

    def close(self) -> None:
        # Arrays handed out keep their mmap alive through the buffer protocol; closing an mmap
        # with live views raises BufferError, so we only drop our references.
        self._maps.clear()


_HUGE = 2 << 20


def _read_to_ram(fh, size: int) -> tuple[mmap.mmap, int]:
    """(mapping, offset of the file's first byte in it): the whole file in a fresh private anonymous
    mapping advised huge pages before the first write (the kernel backs a range with 2 MB pages on
    fault), starting on a 2 MB boundary: mmap's address is only page-aligned, and an unaligned
    10 MB FFN file left a third of its bytes in 4 KB pages at its two ends. size: the file's."""
    # private: a shared anonymous mapping is shmem, which follows shmem_enabled (often "never")
    mm = mmap.mmap(-1, size + _HUGE, flags=mmap.MAP_PRIVATE)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            mm.madvise(mmap.MADV_HUGEPAGE)
        except OSError:             # kernels without transparent huge pages: 4 KB pages, still correct
            pass
    view = memoryview(mm)
    start = -np.frombuffer(mm, np.uint8, count=1).ctypes.data % _HUGE
    got = 0
    while got < size:
        n = fh.readinto(view[start + got:start + size])
        if not n:
            raise PackageError(f"{fh.name}: file shrank while loading ({got} of {size} bytes read)")
        got += n
    view.release()
    return mm, start

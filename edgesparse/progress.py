"""A dependency-free progress line on stderr (the device side has no tqdm)."""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: int, desc: str, enabled: bool = True, stream=sys.stderr):
        self.total, self.desc, self.enabled, self.stream = total, desc, enabled, stream
        self.n, self.t0, self.last = 0, time.perf_counter(), 0.0

    def update(self, k: int = 1, note: str = "") -> None:
        self.n += k
        if not self.enabled:
            return
        now = time.perf_counter()
        if now - self.last < 0.5 and self.n < self.total:
            return
        self.last = now
        el = now - self.t0
        eta = el / self.n * (self.total - self.n) if self.n else 0.0
        end = "\n" if self.n >= self.total else ""
        self.stream.write(f"\r{self.desc}: {self.n}/{self.total} [{el:5.0f}s elapsed, ~{eta:4.0f}s left] {note}"
                          f"{end}")
        self.stream.flush()

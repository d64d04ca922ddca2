"""How many threads a model runs on: Numba's pool for the kernels; BLAS (long prefill) kept to one;
and, by default, a choice made while decoding (ThreadTuner)."""

from __future__ import annotations

import os
import statistics

import numba

from edgesparse.errors import EdgesparseError


def check_threads(threads: int | None) -> int:
    cores = os.cpu_count() or 1
    if threads is None:
        return min(cores, numba.config.NUMBA_NUM_THREADS)
    if not isinstance(threads, int) or threads < 1:
        raise EdgesparseError(f"--threads: expected a positive integer, got {threads!r}")
    if threads > numba.config.NUMBA_NUM_THREADS:
        raise EdgesparseError(f"--threads: {threads} is more than Numba's pool "
                              f"({numba.config.NUMBA_NUM_THREADS}; raise NUMBA_NUM_THREADS)")
    return threads


def limit_blas(threads: int):
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # optional: without it BLAS uses its own default thread count
        return None
    return threadpool_limits(limits=threads, user_api="blas")


class ThreadTuner:
    """Chooses the decode thread count from the decode steps' own times, and keeps choosing.

    Why: every kernel call is a parallel region that waits for its slowest thread. On a board that
    is doing something else, one of the cores is busy, and a region that needs it waits for the
    scheduler: measured here (SmolLM2 int4, 2 cores, a busy loop running beside), 2 threads 15.3 ms
    per token against 11.8 ms on 1; on an idle machine 2 threads win, 6.8 against 9.1 ms. No count
    is right for both, and load comes and goes, so the runtime measures: it tries each candidate
    for PROBE steps (alternating, twice), keeps the fastest by median, tries again every EVERY steps,
    and at once when the recent steps run SLOWER times the chosen count's median.
    Candidates: all threads, half of them, and 1."""

    PROBE, EVERY, SLOWER = 4, 64, 1.5

    def __init__(self, model, threads: int):
        self.model = model
        self.candidates = sorted({threads, max(1, threads // 2), 1}, reverse=True)
        self.plan = [t for _ in range(2) for t in self.candidates for _ in range(self.PROBE)]
        self.times: dict[int, list[float]] = {t: [] for t in self.candidates}
        self.best, self.best_ms, self.since = threads, float("inf"), 0
        self.recent: list[float] = []
        self.used: dict[int, int] = {t: 0 for t in self.candidates}
        self._apply(self.plan[0] if len(self.candidates) > 1 else threads)

    def _apply(self, t: int) -> None:
        self.model.set_threads(t)

    def step(self, seconds: float) -> None:
        """After a decode step that took `seconds` on the current count: choose the next count."""
        t = self.model.threads
        self.used[t] += 1
        if len(self.candidates) == 1:
            return
        ms = seconds * 1e3
        if self.plan:                                   # probing
            self.times[t].append(ms)
            self.plan.pop(0)
            if self.plan:
                self._apply(self.plan[0])
                return
            med = {c: statistics.median(v) for c, v in self.times.items()}
            self.best = min(med, key=med.get)
            self.best_ms, self.since, self.recent = med[self.best], 0, []
            self._apply(self.best)
            return
        self.since += 1
        self.recent = (self.recent + [ms])[-2 * self.PROBE:]
        slow = len(self.recent) == 2 * self.PROBE and statistics.median(self.recent) > self.SLOWER * self.best_ms
        if self.since >= self.EVERY or slow:
            self.plan = [c for c in self.candidates for _ in range(self.PROBE)]
            self.times = {c: [] for c in self.candidates}
            self._apply(self.plan[0])

    def summary(self) -> str:
        """e.g. "2 (auto: 2 on 90 steps, 1 on 10)"."""
        most = max(self.used, key=self.used.get)
        parts = ", ".join(f"{t} on {n}" for t, n in sorted(self.used.items(), reverse=True) if n)
        return f"{most} (auto: {parts})" if len(self.candidates) > 1 else str(most)

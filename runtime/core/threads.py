"""How many threads a model runs on: Numba's pool for the kernels; BLAS (long prefill) kept to one."""

from __future__ import annotations

import os

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

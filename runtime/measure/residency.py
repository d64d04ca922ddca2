"""`bench --ram-budget`: keep a model's resident weight pages under a budget between decode steps
by releasing the pages of the coldest FFN neuron rows.

"Resident" is page-cache residency as mincore(2) reports it: what the mmap'd weights cost the
board's RAM. Unmapping a file page (MADV_DONTNEED) lowers RSS but leaves the page in the cache,
still occupying memory until the kernel reclaims it; so a release unmaps the pages and then drops
them from the cache (POSIX_FADV_DONTNEED). A page that another process maps stays (so does a dirty
one, hence the fsync of a just-written package); `over_budget` counts the checks where that left
the set above the budget.

Coldness is per neuron: the decode step at which its entry in `Model.h` (the last step's neuron
outputs, [L, N]) was last nonzero. In predict mode that entry is nonzero for exactly the candidates,
whose rows the step read; in threshold and dense modes every neuron's gate and up rows are read at
every step, so a budget below the FFN's size makes those modes re-read what was released (the
price shows in the table). A page holds parts of one or more neurons' blocks ([R, D] rows each,
neuron-major) and is as warm as its warmest neuron. Attention, embeddings, lm_head (and in predict
mode the predictor) are read in full at every step, so they are never released; the budget must
leave room for them.

Pages leave the page cache in whole folios. Pages that came in through write(), read() or readahead
can sit in large folios where the kernel and filesystem support them (seen on this workstation's
6.18 kernel), and a release of some of a folio's pages drops nothing. So the manager starts the
FFN files cold and sets MADV_RANDOM on them: every fault then reads one page into a folio of its
own, and cold rows can be released page by page.
"""

from __future__ import annotations

import ctypes
import mmap
import os

import numpy as np

from edgesparse.errors import EdgesparseError

PAGE = mmap.PAGESIZE
# Release down to this fraction of the budget, not just under it: one release (many madvise calls)
# then covers several steps instead of running after every token.
LOW_WATER = 0.9

_mincore = None


def _libc_mincore():
    global _mincore
    if _mincore is None:
        libc = ctypes.CDLL(None, use_errno=True)
        f = libc.mincore
        f.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        f.restype = ctypes.c_int
        _mincore = f
    return _mincore


def resident(addr: int, length: int) -> np.ndarray:
    """Which pages of [addr, addr + length) are in memory (mincore). addr is page-aligned.
    Returns [ceil(length / PAGE)] bool."""
    n = -(-length // PAGE)
    vec = np.zeros(n, np.uint8)
    if n and _libc_mincore()(addr, length, vec.ctypes.data) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mincore: {os.strerror(err)}")
    return (vec & 1).astype(bool)


def address(mm: mmap.mmap) -> tuple[np.ndarray, int]:
    """(a uint8 view that keeps the mapping's buffer exported, the mapping's start address)."""
    view = np.frombuffer(mm, np.uint8)
    return view, view.ctypes.data


def package_resident_bytes(pkg) -> int:
    """Bytes of the package's mapped files that are in memory now."""
    total = 0
    for mm in pkg.mappings().values():
        view, addr = address(mm)
        total += int(resident(addr, len(mm)).sum()) * PAGE
        del view
    return total


def drop(mm: mmap.mmap, fd: int, off: int, length: int) -> None:
    """Unmap [off, off + length) of a file mapping (page-aligned) and drop it from the page cache."""
    mm.madvise(mmap.MADV_DONTNEED, off, length)
    os.posix_fadvise(fd, off, length, os.POSIX_FADV_DONTNEED)


class _FfnRegion:
    """One layer's FFN tensor [N, R, D] in its file: the pages entirely inside it (only those may be
    released: a page shared with another tensor belongs to it too) and, per page, the first and last
    neuron whose block overlaps it."""

    def __init__(self, pkg, name: str, block: int, n: int):
        t = pkg.manifest.tensor(name)
        self.mm = pkg.mappings()[t.file]
        self.path = pkg.file(t.file)
        self._view, self.base = address(self.mm)
        lo = -(-t.offset // PAGE)                          # first page entirely inside
        hi = (t.offset + n * block) // PAGE                # one past the last
        pages = np.arange(lo, max(hi, lo), dtype=np.int64)   # [P] file page indices
        self.first = lo
        self.n_lo = (pages * PAGE - t.offset) // block                       # [P] first neuron on each page
        self.n_hi = ((pages + 1) * PAGE - 1 - t.offset) // block             # [P] last neuron
        self.fd = os.open(self.path, os.O_RDONLY)
        # A package written moments ago (exported, copied) has dirty pages, which stay in the cache
        # until written back: flush them now, or the first releases would drop nothing.
        os.fsync(self.fd)

    def page_last_used(self, last: np.ndarray) -> np.ndarray:
        """last [N] step each neuron was last used -> [P] the page's warmest neuron's step."""
        if self.n_lo.size == 0:
            return np.zeros(0, last.dtype)
        # reduceat covers [n_lo[i], n_lo[i+1]); the page's last neuron may be n_lo[i+1] itself.
        return np.maximum(np.maximum.reduceat(last, self.n_lo), last[self.n_hi])

    def resident(self) -> np.ndarray:
        """[P] bool: which of the region's pages are in memory."""
        if self.n_lo.size == 0:
            return np.zeros(0, bool)
        return resident(self.base + self.first * PAGE, self.n_lo.size * PAGE)

    def release(self, pages: np.ndarray) -> None:
        """Drop pages (indices into the region, sorted) from this mapping and from the page cache,
        one call pair per contiguous run."""
        if pages.size == 0:
            return
        breaks = np.flatnonzero(np.diff(pages) != 1)
        starts = np.concatenate([[pages[0]], pages[breaks + 1]])
        ends = np.concatenate([pages[breaks], [pages[-1]]]) + 1
        for s, e in zip(starts.tolist(), ends.tolist()):
            drop(self.mm, self.fd, (self.first + s) * PAGE, (e - s) * PAGE)

    def close(self) -> None:
        os.close(self.fd)


class Residency:
    """Call `step()` after every decode step (and `enforce()` once before timing starts)."""

    def __init__(self, model, budget_bytes: int):
        pkg, L = model.pkg, model.cfg.n_layers
        if pkg.load != "mmap":      # MADV_DONTNEED on anonymous memory would discard the weights
            raise EdgesparseError("a RAM budget releases pages of mapped files: it needs --load mmap")
        self.model, self.budget = model, int(budget_bytes)
        check_budget(pkg.manifest, self.budget, model.ffn_mode == "predict")
        # the unit of a region is a neuron's rows, or a block of 16 neurons (int4 / int8 FFN blocks)
        self.regions = [_FfnRegion(pkg, e.ffn, model.ffn[l].strides[0], model.ffn[l].shape[0])
                        for l, e in enumerate(pkg.manifest.layers)]
        self.per_unit = [16 if lw.ffn_bits else 1 for lw in model.layers]
        self._maps = [address(mm) for mm in pkg.mappings().values()]     # (view, addr) per file
        self._sizes = [len(mm) for mm in pkg.mappings().values()]
        self.last = np.full((L, model.cfg.ffn_dim), -1, np.int64)   # [L, N] step each neuron was last used
        self.steps = 0
        self.released_bytes = 0
        self.over_budget = 0
        self.resident_trace: list[int] = []     # resident bytes after each step's enforcement
        if model.ffn_mode != "predict":
            self._drop_idle(pkg)
        for r in self.regions:
            # No read-around on faults in FFN rows (it would pull cold neighbours back in), and a
            # cold start, so that the rows come back one page per folio (see the module docstring).
            if r.n_lo.size:
                r.mm.madvise(mmap.MADV_RANDOM, r.first * PAGE, r.n_lo.size * PAGE)
                r.release(np.arange(r.n_lo.size))

    @staticmethod
    def _drop_idle(pkg) -> None:
        """Outside predict mode nothing reads the predictor; pages of it cached by an earlier run
        would count against the budget, so they go at once."""
        for e in pkg.manifest.layers:
            for name in (e.pred_q, e.pred_scale):
                if name is None:
                    continue
                t = pkg.manifest.tensor(name)
                mm = pkg.mappings().get(t.file)
                if mm is None:
                    continue
                lo, hi = -(-t.offset // PAGE) * PAGE, (t.offset + t.nbytes) // PAGE * PAGE
                if hi > lo:
                    fd = os.open(pkg.file(t.file), os.O_RDONLY)
                    try:
                        drop(mm, fd, lo, hi - lo)
                    finally:
                        os.close(fd)

    def resident_bytes(self) -> int:
        return sum(int(resident(a, n).sum()) for (_, a), n in zip(self._maps, self._sizes)) * PAGE

    def step(self) -> None:
        """After a decode step: note which neurons it used, then enforce the budget."""
        self.steps += 1
        self.last[self.model.h != 0] = self.steps
        self.resident_trace.append(self.enforce())

    def enforce(self) -> int:
        """Release the coldest FFN pages if the resident set is over the budget. Returns the
        resident bytes afterwards."""
        total = self.resident_bytes()
        if total <= self.budget:
            return total
        need = -(-(total - int(LOW_WATER * self.budget)) // PAGE)     # pages to free
        res = [r.resident() for r in self.regions]                   # [P_l] bool per layer
        warmth = np.concatenate([r.page_last_used(self._unit_last(l))[res[l]] for l, r in enumerate(self.regions)])
        layer = np.concatenate([np.full(int(m.sum()), l, np.int64) for l, m in enumerate(res)])
        page = np.concatenate([np.flatnonzero(m) for m in res])
        pick = np.argsort(warmth, kind="stable")[:need]              # coldest first
        for l, r in enumerate(self.regions):
            r.release(np.sort(page[pick][layer[pick] == l]))
        after = self.resident_bytes()
        self.released_bytes += max(total - after, 0)
        if after > self.budget:
            self.over_budget += 1
        return after

    def _unit_last(self, l: int) -> np.ndarray:
        """[units] the step each unit of layer l (a neuron, or a block of 16) was last used."""
        g, last = self.per_unit[l], self.last[l]
        if g == 1:
            return last
        units = self.model.ffn[l].shape[0]
        pad = np.full(units * g, -1, np.int64)
        pad[:min(last.size, units * g)] = last[:units * g]
        return pad.reshape(units, g).max(axis=1)

    def report(self) -> dict:
        tr = self.resident_trace or [self.resident_bytes()]
        return {"budget_mb": self.budget / 2**20, "resident_max_mb": max(tr) / 2**20,
                "resident_median_mb": float(np.median(tr)) / 2**20,
                "released_mb_per_token": self.released_bytes / 2**20 / max(self.steps, 1),
                "over_budget_steps": self.over_budget}

    def close(self) -> None:
        for r in self.regions:
            r.close()


def hot_bytes(manifest, predict: bool) -> int:
    """Weight bytes every decode step reads in full, which the budget must hold besides FFN rows:
    the attention projections, lm_head and the embedding (one row is read, but it is counted whole,
    as a token can be any row), and in predict mode the predictor."""
    names = [n for e in manifest.layers
             for n in (e.qkv, e.o) + ((e.pred_q, e.pred_scale) if predict else ())]
    names += [n for n in ("embed", "lm_head") if n in manifest.tensors]
    return sum(manifest.tensor(n).nbytes for n in names if n)


def check_budget(manifest, budget_bytes: int, predict: bool) -> None:
    floor = hot_bytes(manifest, predict)
    if budget_bytes <= floor:
        raise EdgesparseError(
            f"--ram-budget: {budget_bytes / 2**20:.2f} MB is not more than the {floor / 2**20:.2f} MB that every "
            f"decode step reads besides the FFN rows (attention, embedding, lm_head{', predictor' if predict else ''})"
            "; expected more than that")

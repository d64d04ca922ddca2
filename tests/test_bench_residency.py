"""bench --ram-budget: the residency manager (runtime/residency.py) on real mmap'd files.

Residency is measured with mincore(2) (residency.resident) and, independently, with the Rss of the
mapping in /proc/self/smaps. Files are fsync'ed first: dirty pages cannot be dropped from the page
cache until written back, and a just-exported package's pages are dirty.
"""

from __future__ import annotations

import mmap
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from edgesparse.errors import EdgesparseError
from edgesparse.runtime.measure import residency
from edgesparse.runtime.core.model import Model
from edgesparse.runtime.measure.residency import PAGE, Residency
from edgesparse.runtime.sparsity.levels import configure

PAGES = 64


def fsync_tree(root: Path) -> None:
    for p in root.rglob("*"):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def smaps_rss_kb(path: Path) -> int:
    """Rss of this process's mappings of `path`, from /proc/self/smaps."""
    total, inside = 0, False
    for line in open("/proc/self/smaps"):
        head = line.split()
        if head and "-" in head[0] and len(head) >= 5 and ":" not in head[0]:   # a mapping's header line
            inside = len(head) >= 6 and head[5] == str(path)
        elif inside and line.startswith("Rss:"):
            total += int(head[1])
    return total


@pytest.fixture
def page_file(tmp_path):
    p = tmp_path / "pages.bin"
    p.write_bytes(np.random.default_rng(0).integers(0, 255, PAGES * PAGE, dtype=np.uint8).tobytes())
    fsync_tree(tmp_path)
    with open(p, "rb") as fh:
        # Start cold and fault pages in one by one: pages written by write() may sit in large
        # folios, which leave the cache only as a whole (see residency's docstring).
        os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    mm.madvise(mmap.MADV_RANDOM)
    view, addr = residency.address(mm)
    assert int(view[::PAGE].astype(np.int64).sum()) >= 0         # touch every page
    if not residency.resident(addr, len(mm)).all():
        pytest.skip("touched pages are not reported resident here")
    yield p, mm, view, addr


def test_drop_releases_exactly_the_pages_asked_for(page_file):
    p, mm, view, addr = page_file
    fd = os.open(p, os.O_RDONLY)
    try:
        residency.drop(mm, fd, 8 * PAGE, 16 * PAGE)
    finally:
        os.close(fd)
    res = residency.resident(addr, len(mm))                    # [PAGES] bool
    if res[8:24].any():
        pytest.skip("this filesystem keeps dropped pages in memory (tmpfs?)")
    assert res[:8].all() and res[24:].all()
    assert smaps_rss_kb(p) * 1024 == (PAGES - 16) * PAGE
    # dropped pages read back the same bytes (from the file)
    assert bytes(view[8 * PAGE:9 * PAGE]) == p.read_bytes()[8 * PAGE:9 * PAGE]
    assert residency.resident(addr, len(mm))[8]


def test_page_to_neuron_map(tiny_llama_pkg):
    """Each page's warmth is the max over exactly the neurons whose blocks overlap it."""
    m = Model(tiny_llama_pkg, ctx=16, threads=1)
    r = residency._FfnRegion(m.pkg, m.pkg.manifest.layers[0].ffn, m.ffn[0].strides[0], m.ffn[0].shape[0])
    try:
        t = m.pkg.manifest.tensor(m.pkg.manifest.layers[0].ffn)
        block, n = m.ffn[0].strides[0], m.ffn[0].shape[0]
        last = np.random.default_rng(1).integers(0, 1000, n)
        warm = r.page_last_used(last)                          # [P]
        for i, pg in enumerate(range(r.first, r.first + warm.size)):
            lo = (pg * PAGE - t.offset) // block
            hi = ((pg + 1) * PAGE - 1 - t.offset) // block
            assert warm[i] == last[lo:hi + 1].max()
        assert warm.size == (t.offset + n * block) // PAGE - t.offset // PAGE    # every full page
    finally:
        r.close()


@pytest.fixture
def synced_pkg(tiny_llama_pkg, tmp_path):
    pkg = tmp_path / "pkg"
    shutil.copytree(tiny_llama_pkg, pkg)
    fsync_tree(pkg)
    return pkg


def test_budget_releases_the_coldest_ffn_rows(synced_pkg, tiny_llama_pkg):
    m = Model(synced_pkg, ctx=64, threads=1)
    configure(m, "dense", 0.0)
    ref = Model(tiny_llama_pkg, ctx=64, threads=1)     # the same weights in other files
    configure(ref, "dense", 0.0)
    res = Residency(m, 1 << 40)              # no pressure: nothing is released after the cold start
    try:
        regions = res.regions
        if any(r.resident().any() for r in regions):
            pytest.skip("pages could not be dropped here (shared with another process, or unflushed)")
        ids = np.arange(5, 25)
        for model in (m, ref):
            model.forward(ids)
        assert res.enforce() == res.resident_bytes()
        assert all(r.resident().all() for r in regions), "the prefill read every FFN row back"
        # neurons 0..33 of every layer were used at step 5, the rest never
        res.last[:, :34] = 5
        warm = [r.page_last_used(res.last[l]) for l, r in enumerate(regions)]   # [P_l] per layer
        cold_pages = sum(int((w < 0).sum()) for w in warm)
        total0 = res.resident_bytes()
        # a budget whose low-water mark needs half the cold pages released
        res.budget = int((total0 - cold_pages // 2 * PAGE) / residency.LOW_WATER) + 1
        assert res.budget > residency.hot_bytes(m.pkg.manifest, False)
        ffn_file = m.pkg.file(m.pkg.manifest.tensor(m.pkg.manifest.layers[0].ffn).file)
        rss0 = smaps_rss_kb(ffn_file)
        after = res.enforce()
        assert res.over_budget == 0
        assert after <= res.budget
        assert after == res.resident_bytes()
        now = [r.resident() for r in regions]
        for w, n in zip(warm, now):
            assert n[w >= 0].all(), "a page of a used neuron was released"
        dropped = sum(int((~n).sum()) for n in now)
        assert cold_pages // 2 <= dropped <= cold_pages
        assert smaps_rss_kb(ffn_file) < rss0
        # released rows come back on demand: the model's output is unchanged
        for _ in range(3):
            tok = int(ref.logits.argmax())
            np.testing.assert_array_equal(m.forward([tok]), ref.forward([tok]))
            res.step()
        assert res.steps == 3 and len(res.resident_trace) == 3
        assert max(res.resident_trace) <= res.budget
        rep = res.report()
        assert rep["resident_max_mb"] * 2**20 <= res.budget and rep["over_budget_steps"] == 0
    finally:
        res.close()


def test_step_marks_the_neurons_the_step_used(synced_pkg):
    m = Model(synced_pkg, ctx=64, threads=1)
    configure(m, "dense", 0.0)
    m.forward([5, 6, 7])
    res = Residency(m, 1 << 40)
    try:
        m.forward([8])
        res.step()
        np.testing.assert_array_equal(res.last == 1, m.h != 0)
        assert (m.h != 0).any()
    finally:
        res.close()


def test_budget_below_what_every_step_reads(synced_pkg):
    m = Model(synced_pkg, ctx=16, threads=1)
    floor = residency.hot_bytes(m.pkg.manifest, False)
    man = m.pkg.manifest
    expected = sum(man.tensor(n).nbytes for e in man.layers for n in (e.qkv, e.o)) + \
        man.tensor("embed").nbytes + man.tensor("lm_head").nbytes
    assert floor == expected
    with pytest.raises(EdgesparseError, match="--ram-budget"):
        Residency(m, floor)

"""Package(load="ram"): the weights read into anonymous memory instead of file mappings (llama.cpp's
--no-mmap). The model must compute exactly what the mmap'd package computes; the weights must really
leave the file mappings; what cannot work that way (a RAM budget) is refused."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from edgesparse.cli import main
from edgesparse.errors import EdgesparseError, PackageError
from edgesparse.runtime.core.model import Model
from edgesparse.runtime.core.package import Package


def _mapped_files() -> set[str]:
    """Paths of the files mapped into this process now (/proc/self/maps)."""
    out = set()
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            if len(parts) == 6 and parts[5].strip().startswith("/"):
                out.add(parts[5].strip())
    return out


def test_ram_load_gives_the_same_logits(tiny_llama_pkg):
    """Bit-identical logits for a 9-token prefill and 6 greedy decode steps: the same kernels on the
    same bytes, only where the bytes live differs."""
    ids = [5, 17, 42, 9, 100, 3, 77, 8, 150]
    got = {}
    for load in ("mmap", "ram"):
        m = Model(tiny_llama_pkg, ctx=64, load=load)
        logits = [m.forward(ids).copy()]
        for _ in range(6):
            logits.append(m.forward([int(np.argmax(logits[-1]))]).copy())
        got[load] = np.array(logits)                                     # [7, V]
    d = float(np.max(np.abs(got["mmap"] - got["ram"])))
    print(f"max |dlogit| mmap vs ram: {d}")
    assert d == 0.0


def test_ram_load_leaves_no_file_mapping(tiny_llama_pkg, tmp_path):
    pkg = tmp_path / "pkg"          # a private copy: other tests' models may still map the shared one
    shutil.copytree(tiny_llama_pkg, pkg)
    raw = {str(pkg / f) for f in Package(pkg).manifest.files if f.endswith(".bin")}
    m = Model(pkg, ctx=64, load="ram")
    assert not raw & _mapped_files()
    w = m.layers[0].ffn
    assert not w.flags.writeable                     # read-only views, as from a read-only file map
    with pytest.raises(ValueError):
        w[0, 0, 0] = 1
    m2 = Model(pkg, ctx=64)                           # and the default does map them
    assert raw <= _mapped_files()
    del m, m2


def test_ram_load_refuses_a_ram_budget_and_bad_values(tiny_llama_pkg, capsys):
    from edgesparse.runtime.measure.residency import Residency
    m = Model(tiny_llama_pkg, ctx=64, load="ram")
    with pytest.raises(EdgesparseError, match="--load mmap"):
        Residency(m, 1 << 30)
    with pytest.raises(PackageError, match="--load: expected one of mmap, ram, got 'disk'"):
        Package(tiny_llama_pkg, load="disk")


def test_run_with_load_ram_prints_the_same_text(tiny_llama_pkg, capsys):
    outs = []
    for extra in ([], ["--load", "ram"]):
        assert main(["run", str(tiny_llama_pkg), "-p", "w5 w6 w7", "-n", "8", *extra]) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1] and outs[0].strip()

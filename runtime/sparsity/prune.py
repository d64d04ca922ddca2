"""Pruning: drop the FFN neurons that calibration finds (almost) never active.

A neuron whose |h| stays below its layer's threshold on nearly every calibration token is zeroed
by the thresholded FFN anyway; removing it from the package saves its rows on disk, in the page
cache and in the predictor's pass, at the cost of the rare tokens where it would have fired
(`edgesparse eval` on the pruned package reports that cost).

    rate[l, i] = fraction of calibration tokens with |h_i| >= t_l      (t_l: the paper threshold at
                                                                        --level, dense model)
    keep neuron i of layer l  iff  rate[l, i] >= max_rate

The pruned package is a copy with each layer's neuron-major FFN file (and predictor file)
rewritten with the kept neurons only; layer l then has N_l <= config.ffn_dim neurons, read from
its tensor shapes. The thresholds stay valid: they apply to the same neurons' h. Counts of kept
neurons are still relative to ffn_dim, so achieved sparsity includes what pruning removed.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import numpy as np

from edgesparse import tiles
from edgesparse.errors import EdgesparseError
from edgesparse.format import FFN_BLOCKS, LayerEntry
from edgesparse.format_write import write_manifest_atomic, write_raw

from .. import kernels as K


def activity(model, windows: np.ndarray, thresholds, progress: bool = True) -> list[np.ndarray]:
    """Per layer [N_l]: fraction of the tokens of windows [n, W] on which |h_i| >= thresholds[l]
    (h of the dense model, through the BLAS prefill path)."""
    from .calibrate import run_dense
    act = K.ACT_CODES[model.cfg.activation]
    counts = [np.zeros(lw.n, np.int64) for lw in model.layers]
    seen = [0]

    def observe(l, off, f, g, u):
        a = np.empty_like(g)
        K.activation(g, act, a)
        counts[l] += np.count_nonzero(np.abs(a * u) >= thresholds[l], axis=0)
        if l == 0:
            seen[0] += g.shape[0]

    run_dense(model, windows, observe, "prune", progress)
    return [c / max(seen[0], 1) for c in counts]


def _layer_tensors(pkg, entry: LayerEntry, keep: np.ndarray) -> list[tuple]:
    """The per-neuron tensors of a layer's FFN file, restricted to the kept neurons. FFN blocks of
    16 neurons (int4 / int8) are decoded to their integer values and scales and packed again, a
    lossless repacking (edgesparse/tiles.py)."""
    t = pkg.manifest.tensors
    out = []
    f = t[entry.ffn]
    if f.dtype in FFN_BLOCKS:
        bits = FFN_BLOCKS[f.dtype]
        q, d = tiles.from_ffn_blocks(np.asarray(pkg.tensor(entry.ffn)).view(np.uint8), *f.shape, bits)
        out.append((entry.ffn, tiles.to_ffn_blocks(q[keep], d[keep], bits), f.dtype, (keep.size,) + f.shape[1:]))
    for name in ((entry.ffn, entry.ffn + ".scale") if f.dtype not in FFN_BLOCKS else ()) + (entry.ffn_bias_in,):
        if name is not None and name in t:
            out.append((name, np.asarray(pkg.tensor(name))[keep], t[name].dtype))
    if entry.ffn_bias_out is not None:
        out.append((entry.ffn_bias_out, np.asarray(pkg.tensor(entry.ffn_bias_out)), "float32"))
    return out


def prune(pkg, out: Path, rates: list[np.ndarray], max_rate: float, force: bool = False) -> tuple[Path, list[int]]:
    """Write a copy of package `pkg` (core.package.Package) to `out` without the neurons whose
    rate is below max_rate. Written into a temporary directory next to `out`, renamed at the end:
    nothing is half-written. Returns (out, neurons kept per layer)."""
    if not 0.0 <= max_rate < 1.0:
        raise EdgesparseError(f"--max-rate: expected a fraction in [0, 1), got {max_rate}")
    out = Path(out)
    if out.exists() and not force:
        raise EdgesparseError(f"{out}: already exists; pass --force to replace it")
    src, m = Path(pkg.path), pkg.manifest
    tmp = out.with_name(f".{out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        files, tensors, layers, kept = dict(m.files), dict(m.tensors), [], []
        rewritten = set()
        for l, (entry, rate) in enumerate(zip(m.layers, rates)):
            keep = np.flatnonzero(rate >= max_rate)
            if keep.size == 0:       # a layer keeps at least its most active neuron
                keep = np.array([int(np.argmax(rate))])
            kept.append(int(keep.size))
            groups = [(tensors[entry.ffn].file, _layer_tensors(pkg, entry, keep))]
            if entry.pred_q is not None:
                groups.append((tensors[entry.pred_q].file,
                               [(entry.pred_q, np.asarray(pkg.tensor(entry.pred_q))[keep], "int8"),
                                (entry.pred_scale, np.asarray(pkg.tensor(entry.pred_scale))[keep], "float32")]))
            for rel, ts in groups:
                # each FFN / predictor file holds exactly one layer's per-neuron tensors
                others = [n for n, te in m.tensors.items() if te.file == rel and n not in {x[0] for x in ts}]
                if others:
                    raise EdgesparseError(f"{src / rel}: holds tensors {others[:3]} besides layer {l}'s FFN; "
                                          "cannot prune this package")
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                fe, te = write_raw(tmp / rel, rel, ts)
                files[rel] = fe
                tensors.update(te)
                rewritten.add(rel)
            layers.append(entry)
        for rel in m.files:
            if rel not in rewritten:
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src / rel, tmp / rel)
        sparsity = dict(m.sparsity, pruned={"max_rate": max_rate, "neurons_per_layer": kept})
        write_manifest_atomic(tmp, dataclasses.replace(m, files=files, tensors=tensors, layers=tuple(layers),
                                                       sparsity=sparsity))
        from edgesparse.format import read_manifest
        read_manifest(tmp)                       # the result must load
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out, kept


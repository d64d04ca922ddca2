"""The activation predictor: which neurons will fire, known before their rows are read.

Why not a low-rank or small-MLP predictor (Deja Vu, PowerInfer, LLM in a Flash): on SwiGLU
models h = act(gate.x) * (up.x) depends on two projections, and their sign structure does not
compress. Measured on SmolLM2-135M (WikiText-2 test, the top 50% of neurons by predicted |h| per
token): an activation-aware rank-r SVD of [W_gate; W_up] recalls 60-74% of the truly active
neurons at r = 32..192 (costing 4-26% of the FFN's bytes) and loses 5-10x the FFN output that
exact selection loses. Quantized copies of the gate and up rows do far better; the output lost,
relative to exact selection, is 1.13x for int4 (groups of 32), 1.05x for int4 gate + int8 up and
1.00x for int8 (10 layers, max 1.001x). With the int4 predictor WikiText-2 perplexity at 50% rows
read was 23.58 (+3.6% over dense), so the predictor is int8: h^ ranks neurons like h itself.

Layout: neuron-major like the FFN file, so a decode step reads it sequentially,
    pq [N, 2, D] int8    q = round(w / scale), |q| <= 127, row 0 gate, row 1 up
    ps [N, 2] float32    one scale per row, max|w| / 127
(plain MLPs: [N, 1, D] and [N, 1], the fc1 row; their input biases are added exactly.)
1/4 of the float32 gate and up rows' bytes (1/6 of a float32 FFN layer). Per-row scales lose
nothing measurable against groups of 64 (1.001x either way) and keep the kernel's inner loop a
plain dot product that LLVM vectorizes (with groups of 32 it did not: 6x slower).
Candidates are the neurons with |h^| >= t_pred, t_pred a per-layer percentile of |h^| on the
calibration text, exactly as the paper's thresholds are percentiles of |h|.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgesparse import quant

QMAX = 127


def quantize(ffn: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """int8 predictor for one layer. ffn [N, R, D] (float32 or float16) -> (pq [N, R-1, D] int8,
    ps [N, R-1] float32): every row but the down column. Symmetric, per row: scale = max|w| / 127."""
    w = np.asarray(ffn[:, :-1, :], np.float32)          # [N, R-1, D] gate and up rows (or fc1)
    scale = np.abs(w).max(axis=2) / QMAX                 # [N, R-1]
    safe = np.where(scale > 0, scale, 1.0)
    q = np.clip(np.rint(w / safe[..., None]), -QMAX, QMAX).astype(np.int8)
    return np.ascontiguousarray(q), np.ascontiguousarray(scale.astype(np.float32))


def dequantize(pq: np.ndarray, ps: np.ndarray) -> np.ndarray:
    """NumPy reference of kernels.dequant_pred: [N, R-1, D] float32."""
    return pq.astype(np.float32) * ps[..., None]


def build(pkg, progress=None) -> list[tuple[np.ndarray, np.ndarray]]:
    """Quantize every layer's gate and up rows (fc1 rows) of a package: [(pq, ps)] per layer."""
    from edgesparse.errors import EdgesparseError
    from edgesparse.format import FFN_BLOCKS
    out = []
    for l in pkg.manifest.layers:
        if pkg.manifest.tensor(l.ffn).dtype in FFN_BLOCKS:
            # Predict mode reads single neurons' gate and up rows; an int4 / int8 FFN stores them
            # in tiles of 16 neurons (edgesparse/tiles.py), read whole. (At those widths the int8
            # predictor was as large as the rows it guards anyway.)
            raise EdgesparseError(f"{pkg.path}: --predictor needs an FFN stored in rows (float32 or float16); "
                                  f"this package's {l.ffn!r} is {pkg.manifest.tensor(l.ffn).dtype}, tiles of 16 neurons")
        w = pkg.tensor(l.ffn)                                         # [N, R, D]
        if l.ffn + ".scale" in pkg.manifest.tensors:                  # int8 rows: the values they stand for
            w = quant.dequantize(w, pkg.tensor(l.ffn + ".scale"))
        out.append(quantize(w))
        if progress:
            progress()
    return out


def load(pkg) -> list[tuple[np.ndarray, np.ndarray]] | None:
    """The package's predictor, or None if it has none."""
    layers = pkg.manifest.layers
    if any(l.pred_q is None for l in layers):
        return None
    return [(pkg.tensor(l.pred_q), pkg.tensor(l.pred_scale)) for l in layers]


def install(pkg_dir: Path, manifest, pred, t_pred) -> "Manifest":
    """Write the predictor's files into a new directory of the package and return the manifest
    that lists them (the caller writes it; until then nothing refers to the new files, and the
    files of an older predictor stay untouched, so a crash leaves the old package intact)."""
    import dataclasses
    import os
    import secrets

    from edgesparse.format_write import write_raw
    pkg_dir = Path(pkg_dir)
    name = f"pred-{secrets.token_hex(4)}"
    tmp = pkg_dir / f".{name}.partial"
    tmp.mkdir()
    files, tensors, layers = dict(manifest.files), dict(manifest.tensors), []
    for i, (l, (pq, ps), tp) in enumerate(zip(manifest.layers, pred, t_pred)):
        rel = f"{name}/{i:03d}.bin"
        q, s = f"layers.{i}.pred_q", f"layers.{i}.pred_scale"
        fe, te = write_raw(tmp / f"{i:03d}.bin", rel, [(q, pq, "int8"), (s, ps, "float32")])
        for old in (l.pred_q, l.pred_scale):     # the old predictor's entries go
            if old is not None:
                files.pop(tensors.pop(old).file, None)
        files[rel] = fe
        tensors.update(te)
        layers.append(dataclasses.replace(l, pred_q=q, pred_scale=s, pred_threshold=float(tp)))
    os.rename(tmp, pkg_dir / name)
    return dataclasses.replace(manifest, files=files, tensors=tensors, layers=tuple(layers))


def remove_stale(pkg_dir: Path, manifest) -> None:
    """Delete predictor directories the manifest no longer lists (after it was replaced)."""
    import shutil
    live = {f.split("/", 1)[0] for f in manifest.files if f.startswith("pred-")}
    for p in Path(pkg_dir).iterdir():
        if p.is_dir() and p.name.lstrip(".").startswith("pred-") and p.name not in live:
            shutil.rmtree(p, ignore_errors=True)

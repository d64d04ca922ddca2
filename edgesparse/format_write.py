"""Writing the package format (edgesparse/format.py describes and reads it): manifest.json and the raw
tensor files, each written whole and fsync'd; a manifest replaced in one rename."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from .format import DTYPES, FORMAT_NAME, FORMAT_VERSION, MANIFEST, PAGE, FileEntry, Manifest, TensorEntry


def manifest_to_json(m: Manifest) -> dict:
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "exporter": m.exporter,
        "source": m.source,
        "config": m.config.to_json(),
        "files": [{"path": f.path, "kind": f.kind, "size": f.size, "sha256": f.sha256} for f in m.files.values()],
        "tensors": {t.name: {"file": t.file, "dtype": t.dtype, "shape": list(t.shape), "offset": t.offset}
                    for t in m.tensors.values()},
        "layers": [{"attention": l.attention, **l.tensor_names(), "threshold": l.threshold,
                    **({} if l.pred_threshold is None else {"pred_threshold": l.pred_threshold})}
                   for l in m.layers],
        "sparsity": m.sparsity,
        "chat_template": m.chat_template,
    }


def dump_manifest(m: Manifest) -> bytes:
    # allow_nan=True writes +inf as `Infinity`; _no_constants reads only that one back.
    return (json.dumps(manifest_to_json(m), indent=1, allow_nan=True) + "\n").encode("utf-8")


def write_raw(path: Path, rel: str, tensors) -> tuple[FileEntry, dict[str, TensorEntry]]:
    """Write tensors [(name, array, dtype name[, logical shape])] into one raw file at page-aligned
    offsets, fsync'd; returns its file entry and tensor entries (rel = its path inside the
    package). A tiled tensor's array is its stored bytes; the 4th item gives the matrix's shape."""
    import numpy as np
    h = hashlib.sha256()
    pos = 0
    entries = {}
    with open(path, "wb") as fh:
        for name, arr, dtype, *logical in tensors:
            pad = (-pos) % PAGE
            if pad:
                fh.write(b"\0" * pad)
                h.update(b"\0" * pad)
                pos += pad
            data = np.ascontiguousarray(arr, dtype=np.dtype(DTYPES[dtype])).tobytes()
            fh.write(data)
            h.update(data)
            shape = tuple(int(s) for s in (logical[0] if logical else arr.shape))
            entries[name] = TensorEntry(name, rel, dtype, shape, pos)
            if entries[name].stored_shape != arr.shape:
                raise ValueError(f"{name}: {dtype} of shape {list(shape)} is stored as {list(entries[name].stored_shape)}, "
                                 f"got an array of shape {list(arr.shape)}")
            pos += len(data)
        fh.flush()
        os.fsync(fh.fileno())
    return FileEntry(rel, "raw", pos, h.hexdigest()), entries


def write_manifest_atomic(pkg: Path, m: Manifest) -> None:
    """Replace PKG/manifest.json in one rename (used when calibration updates thresholds)."""
    pkg = Path(pkg)
    tmp = pkg / (MANIFEST + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(dump_manifest(m))
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, pkg / MANIFEST)

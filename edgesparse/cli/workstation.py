"""The workstation command: export a model to a package (needs the [export] extra)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from edgesparse.errors import EdgesparseError

from .sparsity import calibrate


def export(a: argparse.Namespace) -> int:
    try:
        from edgesparse.export import export
    except ImportError as e:
        raise EdgesparseError(f"export needs the workstation extra: pip install 'edgesparse[export]' ({e})") from None
    out = export(a.model, Path(a.output), dtype=a.dtype, force=a.force, progress=not a.quiet, head_dtype=a.head_dtype,
                 calibrate=a.calibrate)
    print(f"wrote {out}", file=sys.stderr)
    if a.calibrate:
        a.package, a.text, a.tokens, a.method, a.target, a.dump, a.threads, a.predictor = (
            str(out), a.calibrate, 16384, "paper", 0.5, None, None, False)
        return calibrate(a)
    return 0


def add_parsers(sub) -> None:
    e = sub.add_parser("export", help="export a model to a package (workstation; needs [export])")
    e.add_argument("model", nargs="?", default=None,
                   help="GGUF file, HF model directory or hub id (default: embedded SmolLM2-135M-Instruct)")
    e.add_argument("-o", "--output", required=True, help="package directory to create")
    e.add_argument("--dtype", default="float32", choices=["float32", "float16", "int8", "int4"],
                   help="weight storage (int8: Q8_0-style groups of 32; int4: Q4_0-style groups of 32)")
    e.add_argument("--head-dtype", choices=["float32", "float16", "int8", "int4"],
                   help="storage of the embedding and lm_head (default: --dtype; int8 when --dtype is int4)")
    e.add_argument("--force", action="store_true", help="replace an existing package")
    e.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    e.add_argument("--calibrate", metavar="TEXT",
                   help="calibrate thresholds on TEXT after export; int4 also weighs its rounding by TEXT's activations")
    e.set_defaults(fn=export)


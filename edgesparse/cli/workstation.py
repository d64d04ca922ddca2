"""The workstation command: export a model to a package (needs the [export] extra)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from edgesparse.errors import EdgesparseError

from .args import HelpFormatter
from . import quality
from .sparsity import calibrate


class _ExportHelp(HelpFormatter):
    """export --help ends with the embedded models. The registry is read only when that help is
    shown: the device side builds this parser too and must not import the workstation package."""

    def format_help(self) -> str:
        try:
            from edgesparse.export.embedded import DEFAULT, MODELS
        except ImportError:         # no [export] extra here: export cannot run either
            self.add_text("embedded models: pip install 'edgesparse[export]' to list and export them")
        else:
            self.add_text("embedded models (install with the pip command shown, then name it as MODEL):\n" + "\n".join(
                f"  {m.name:<20} {m.description}{' (default)' if m.name == DEFAULT else ''}: {m.pip_command()}"
                for m in MODELS.values()))
        return super().format_help()


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
            str(out), a.calibrate, 16384, "paper", None, None, None, False)
        vars(a).update(quality.calibrate_defaults())     # chat transcripts, the budget: as `calibrate` does
        return calibrate(a)
    return 0


def add_parsers(sub) -> None:
    e = sub.add_parser("export", help="export a model to a package (workstation; needs [export])",
                       formatter_class=_ExportHelp, description="Export a model to a package directory (the "
                       "workstation side: needs pip install 'edgesparse[export]').")
    e.add_argument("model", nargs="?", default=None,
                   help="an embedded model's name (listed below), a GGUF file, a Hugging Face model directory or "
                        "a hub id (default: the embedded smollm2-135m)")
    e.add_argument("-o", "--output", required=True, help="package directory to create")
    e.add_argument("--dtype", default="float32", choices=["float32", "float16", "int8", "int4"],
                   help="weight storage (int8: Q8_0-style groups of 32; int4: Q4_0-style groups of 32)")
    e.add_argument("--head-dtype", choices=["float32", "float16", "int8", "int4"],
                   help="storage of the embedding and lm_head (default: --dtype; int8 when --dtype is int4)")
    e.add_argument("--force", action="store_true",
                   help="replace an existing package or empty directory (never a directory holding anything else)")
    e.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    e.add_argument("--calibrate", metavar="TEXT",
                   help="calibrate thresholds on TEXT after export; int4 also weighs its rounding by TEXT's activations")
    e.set_defaults(fn=export)


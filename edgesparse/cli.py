"""Command line: a thin layer over the library. `main(argv) -> int`; `python -m edgesparse` works.

    edgesparse export [MODEL] -o DIR [--dtype float32|float16] [--force]     (workstation)
    edgesparse run PKG -p PROMPT [-n N] [--temperature T] [--top-p P] ...     (device)
    edgesparse verify PKG                                                     (device)

Bad input raises EdgesparseError, printed as one line with a non-zero exit; --debug shows the
traceback instead.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import __version__
from .errors import EdgesparseError


def _export(a: argparse.Namespace) -> int:
    try:
        from edgesparse.export import export
    except ImportError as e:
        raise EdgesparseError(f"export needs the workstation extra: pip install 'edgesparse[export]' ({e})") from None
    out = export(a.model, Path(a.output), dtype=a.dtype, force=a.force, progress=not a.quiet)
    print(f"wrote {out}", file=sys.stderr)
    return 0


def _run(a: argparse.Namespace) -> int:
    from edgesparse.runtime.generate import generate
    from edgesparse.runtime.model import Model
    from edgesparse.runtime.sampling import Sampler
    from edgesparse.runtime.text import StreamDecoder, TextCodec

    if a.tokens < 1:
        raise EdgesparseError(f"-n/--tokens: expected a positive integer, got {a.tokens}")
    sampler = Sampler(a.temperature, a.top_p, a.seed)
    model = Model(a.package, ctx=a.ctx, threads=a.threads, verify=a.verify)
    codec = TextCodec(model.pkg)
    if a.prompt == "":
        raise EdgesparseError("-p/--prompt: the prompt is empty")
    ids = codec.chat_prompt(a.prompt) if a.chat else codec.encode(a.prompt)
    if not ids:
        raise EdgesparseError("-p/--prompt: the prompt encodes to no tokens")
    if len(ids) >= model.ctx:
        raise EdgesparseError(f"-p/--prompt: {len(ids)} tokens do not fit the context of {model.ctx} "
                              f"(raise --ctx, up to {model.cfg.max_position})")
    model.warmup()  # JIT-cache load and ORT's first-run setup, kept out of the timings
    stream = StreamDecoder(codec)
    eos = set(model.cfg.eos_token_ids)

    def on_token(t: int) -> None:
        if t not in eos:
            sys.stdout.write(stream.push(t))
            sys.stdout.flush()

    _, stats = generate(model, ids, a.tokens, sampler, on_token)
    sys.stdout.write("\n")
    sys.stdout.flush()
    if a.stats:
        for line in stats.lines():
            print(line, file=sys.stderr)
    if a.stats_json:
        Path(a.stats_json).write_text(json.dumps(stats.to_json(), indent=1) + "\n")
    return 0


def _verify(a: argparse.Namespace) -> int:
    from .format import read_manifest, verify_hashes
    pkg = Path(a.package)
    m = read_manifest(pkg)
    verify_hashes(pkg, m)
    print(f"{pkg}: ok ({len(m.files)} files, format v{m.exporter.get('version', '?')} exporter, "
          f"{m.config.arch}, {m.config.n_layers} layers)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgesparse", description=__doc__.split("\n")[0])
    p.add_argument("--version", action="version", version=f"edgesparse {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="cmd", required=True)

    e = sub.add_parser("export", help="export a model to a package (workstation; needs [export])")
    e.add_argument("model", nargs="?", default=None,
                   help="GGUF file, HF model directory or hub id (default: embedded SmolLM2-135M-Instruct)")
    e.add_argument("-o", "--output", required=True, help="package directory to create")
    e.add_argument("--dtype", default="float32", choices=["float32", "float16"], help="weight storage")
    e.add_argument("--force", action="store_true", help="replace an existing package")
    e.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    e.set_defaults(fn=_export)

    r = sub.add_parser("run", help="generate text from a package (device)")
    r.add_argument("package")
    r.add_argument("-p", "--prompt", required=True)
    r.add_argument("-n", "--tokens", type=int, default=64, help="max new tokens (default 64)")
    r.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    r.add_argument("--top-p", type=float, default=1.0)
    r.add_argument("--seed", type=int, default=None)
    r.add_argument("--chat", action="store_true", help="apply the model's chat template")
    r.add_argument("--threads", type=int, default=None, help="ORT and Numba threads (default: all cores)")
    r.add_argument("--ctx", type=int, default=None, help="context length to allocate (default 2048)")
    r.add_argument("--stats", action="store_true", help="print timing, RSS and FFN rows read to stderr")
    r.add_argument("--stats-json", metavar="FILE", help="write the same statistics as JSON")
    r.add_argument("--verify", action="store_true", help="check every file's sha256 before loading")
    r.set_defaults(fn=_run)

    v = sub.add_parser("verify", help="check a package's manifest, sizes and sha256 hashes")
    v.add_argument("package")
    v.set_defaults(fn=_verify)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    try:
        return a.fn(a)
    except EdgesparseError as e:
        if a.debug:
            raise
        print(f"edgesparse: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

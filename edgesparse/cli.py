"""Command line: a thin layer over the library. `main(argv) -> int`; `python -m edgesparse` works.

    edgesparse export [MODEL] -o DIR [--dtype float32|float16|int8|int4] [--head-dtype D] [--calibrate TEXT]
                      [--force]                                               (workstation)
    edgesparse run PKG -p PROMPT [-n N] [--ffn dense|threshold|predict] ...   (device)
    edgesparse calibrate PKG --text FILE|wikitext2 [--tokens N] [--method paper|gate|input] [--predictor]
    edgesparse eval PKG --text FILE|wikitext2 [--ctx 1024] [--windows N] [--sparsity 0,0.5] [--methods ...]
                    [--against llama.cpp [--gguf FILE]]
    edgesparse analyze PKG --text FILE|wikitext2 [--tokens 4096] [--sparsity 0.5] [--load mmap|ram]
    edgesparse prune PKG -o OUT --text FILE|wikitext2 [--max-rate 0.01] [--level 0.5] [--tokens N]
    edgesparse bench PKG [--sparsity 0,0.5] [--ffn threshold,predict] [--threads 1,2] [--rounds 3]
                     [--against ort,llama.cpp] [--load mmap,ram] [--ram-budget MB] [--positions 32,2000]
                     [--project BOARD]
    edgesparse verify PKG                                                     (device)

Bad input raises EdgesparseError, printed as one line with a non-zero exit; --debug shows the
traceback instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from . import __version__
from .errors import EdgesparseError


def _export(a: argparse.Namespace) -> int:
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
        return _calibrate(a)
    return 0


def _levels(spec: str, arg: str) -> list[float]:
    try:
        vals = [float(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise EdgesparseError(f"{arg}: expected comma-separated numbers in [0, 1), got {spec!r}") from None
    bad = [v for v in vals if not (0.0 <= v < 1.0)]
    if not vals or bad:
        raise EdgesparseError(f"{arg}: every sparsity must be in [0, 1), got {spec!r}")
    return vals


def _calibrate(a: argparse.Namespace) -> int:
    import dataclasses
    import time

    from .format import write_manifest_atomic
    from edgesparse.runtime import predictor
    from edgesparse.runtime.calibrate import calibrate, thresholds_for
    from edgesparse.runtime.model import Model
    from edgesparse.runtime.text import TextCodec
    from edgesparse.runtime.textdata import load_text

    if a.method not in ("paper", "gate", "input"):
        raise EdgesparseError(f"--method: expected paper, gate or input, got {a.method!r}")
    from edgesparse.runtime.calibrate import LEVELS
    target = _levels(str(a.target), "--target")[0]
    if not any(abs(target - q) < 1e-9 for q in LEVELS):
        raise EdgesparseError(f"--target {a.target}: not a calibrated level (calibrated: {list(LEVELS)})")
    model = Model(a.package, threads=a.threads, ctx=1024, max_batch=512)
    text, desc = load_text(a.text, "valid")
    ids = TextCodec(model.pkg).encode(text, special=False)
    dump = _h5_dump(a.dump, model, a.tokens) if a.dump else None
    t0 = time.perf_counter()
    # An existing predictor is re-tabulated on every calibration (its thresholds follow the level).
    pred = predictor.load(model.pkg)
    new_pred = pred is None and a.predictor
    if new_pred:
        pred = predictor.build(model.pkg)
    try:
        # windows of 512 tokens, or the whole context for models with a shorter one
        table = calibrate(model, ids, tokens=a.tokens, window=min(512, model.ctx), progress=not a.quiet,
                          dump=dump.write if dump else None, what=desc, predictor=pred)
    finally:
        if dump:
            dump.close()
    table["text"] = desc
    m = model.pkg.manifest
    sparsity = {"method": a.method, "level": target, "calibration": table}
    t = [0.0] * m.config.n_layers if target == 0.0 else thresholds_for(sparsity, a.method, target)
    layers = tuple(dataclasses.replace(l, threshold=float(v)) for l, v in zip(m.layers, t))
    m = dataclasses.replace(m, sparsity=sparsity, layers=layers)
    if pred is not None:
        tp = [0.0] * m.config.n_layers if target == 0.0 else thresholds_for(sparsity, "predicted", target)
        if new_pred:
            m = predictor.install(model.pkg.path, m, pred, tp)
        else:
            m = dataclasses.replace(m, layers=tuple(dataclasses.replace(l, pred_threshold=float(v))
                                                    for l, v in zip(m.layers, tp)))
    write_manifest_atomic(model.pkg.path, m)
    predictor.remove_stale(model.pkg.path, m)
    print(f"calibrated {a.package} on {table['tokens']} tokens of {desc} in {time.perf_counter() - t0:.0f} s; "
          f"active: {a.method} at {target:.0%} sparsity", file=sys.stderr)
    return 0


class _h5_dump:
    """--dump: dense neuron outputs h as HDF5 dataset h[layer, token, neuron] (float16)."""

    def __init__(self, path: str, model, tokens: int):
        try:
            import h5py
        except ImportError:
            raise EdgesparseError("--dump needs h5py: pip install 'edgesparse[dump]'") from None
        cfg = model.cfg
        self.f = h5py.File(path, "w")
        self.d = self.f.create_dataset("h", (cfg.n_layers, tokens, cfg.ffn_dim), dtype="f2",
                                       chunks=(1, min(tokens, 512), cfg.ffn_dim))
        self.f.attrs["description"] = "dense FFN neuron outputs h = act(gate.x)*(up.x), [layer, token, neuron]"
        self.tokens = tokens

    def write(self, layer: int, offset: int, h) -> None:
        n = min(h.shape[0], self.tokens - offset)
        if n > 0:
            self.d[layer, offset:offset + n] = h[:n]

    def close(self) -> None:
        self.f.close()


def _eval(a: argparse.Namespace) -> int:
    import time

    from edgesparse.runtime.evaluate import evaluate, table
    from edgesparse.runtime.model import Model
    from edgesparse.runtime.plots import eval_figures
    from edgesparse.runtime.text import TextCodec
    from edgesparse.runtime.textdata import load_text, token_windows

    levels = _levels(a.sparsity, "--sparsity")
    if a.ctx < 2:
        raise EdgesparseError(f"--ctx: expected at least 2 tokens, got {a.ctx}")
    if a.windows is not None and a.windows < 1:
        raise EdgesparseError(f"--windows: expected a positive integer, got {a.windows}")
    model = Model(a.package, threads=a.threads, ctx=a.ctx, max_batch=a.ctx)
    if a.ctx > model.cfg.max_position:
        raise EdgesparseError(f"--ctx {a.ctx}: longer than the model's context ({model.cfg.max_position}); "
                              "lower --ctx")
    sp = model.pkg.manifest.sparsity
    calibrated = sorted(sp["calibration"]["thresholds"]) if sp.get("calibration") else ["paper"]
    methods = a.methods.split(",") if a.methods else [
        "predict" if m == "predicted" else m for m in calibrated]
    unknown = [m for m in methods if m not in ("paper", "gate", "input", "predict")]
    if unknown:
        raise EdgesparseError(f"--methods: unknown {unknown}; expected paper, gate, input, predict")
    if "predict" in methods and not model.has_predictor:
        raise EdgesparseError(f"{a.package}: --methods predict needs a predictor (calibrate --predictor)")
    if any(q > 0 for q in levels) and not sp.get("calibration"):
        raise EdgesparseError(f"{a.package}: not calibrated; run `edgesparse calibrate` or use --sparsity 0")
    gguf = None
    if a.against:
        from edgesparse.runtime import against
        if a.against != "llama.cpp":
            raise EdgesparseError(f"--against {a.against}: eval compares with llama.cpp only")
        against.check_installed("llama.cpp")
        gguf = against.gguf_for(model.pkg.manifest, a.gguf)
    elif a.gguf:
        raise EdgesparseError("--gguf: only used with --against llama.cpp")
    text, desc = load_text(a.text, "test")
    windows = token_windows(TextCodec(model.pkg).encode(text, special=False), a.ctx, a.windows, desc)
    t0 = time.perf_counter()
    res = evaluate(model, windows, methods, levels, progress=not a.quiet)
    if gguf is not None:
        from edgesparse.runtime.progress import Progress
        bar = Progress(len(windows), "llama.cpp", not a.quiet)
        res["against"] = {"engine": "llama.cpp", "gguf": str(gguf), "size_bytes": gguf.stat().st_size,
                          "perplexity": against.llama_cpp_perplexity(str(gguf), windows, model.threads, bar)}
    res["text"], res["seconds"], res["threads"] = desc, time.perf_counter() - t0, model.threads
    out = Path(a.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(res, indent=1) + "\n")
    md = table(res)
    (out / "eval.md").write_text(md + "\n")
    figs = eval_figures(res, sp, out, model.cfg.arch)
    print(md)
    print(f"{desc}: {res['windows']} windows x {a.ctx} tokens, {res['seconds']:.0f} s; wrote {out / 'eval.json'}"
          + (f" and {len(figs)} figures" if figs else " (no figures: pip install matplotlib)"), file=sys.stderr)
    return 0


def _prune(a: argparse.Namespace) -> int:
    from edgesparse.runtime import prune
    from edgesparse.runtime.calibrate import thresholds_for
    from edgesparse.runtime.model import Model
    from edgesparse.runtime.text import TextCodec
    from edgesparse.runtime.textdata import load_text, token_windows

    level = _levels(str(a.level), "--level")[0]
    if level == 0:
        raise EdgesparseError("--level: pruning needs a calibrated sparsity level > 0 to define 'active'")
    if not 0.0 <= a.max_rate < 1.0:
        raise EdgesparseError(f"--max-rate: expected a fraction in [0, 1), got {a.max_rate}")
    model = Model(a.package, threads=a.threads, ctx=512, max_batch=512)
    t = thresholds_for(model.pkg.manifest.sparsity, "paper", level)
    text, desc = load_text(a.text, "valid")
    window = model.ctx
    ids = TextCodec(model.pkg).encode(text, special=False)
    windows = token_windows(ids, window, max(1, a.tokens // window), desc)
    rates = prune.activity(model, windows, t, progress=not a.quiet)
    out, kept = prune.prune(model.pkg, Path(a.output), rates, a.max_rate, force=a.force)
    n = model.cfg.ffn_dim
    total = n * len(kept)
    print(f"{desc}: {windows.size} tokens; pruned {total - sum(kept)} of {total} FFN neurons "
          f"({1 - sum(kept) / total:.2%}) active on < {a.max_rate:g} of tokens at the {level:.0%} thresholds; "
          f"kept per layer {kept}; wrote {out}", file=sys.stderr)
    return 0


def _analyze(a: argparse.Namespace) -> int:
    import time

    from edgesparse.runtime import analyze, layer_cost
    from edgesparse.runtime.calibrate import thresholds_for
    from edgesparse.runtime.model import Model
    from edgesparse.runtime.text import TextCodec
    from edgesparse.runtime.textdata import load_text, token_windows

    level = _levels(str(a.sparsity), "--sparsity")[0]
    model = Model(a.package, threads=a.threads, ctx=512, max_batch=512, load=a.load)
    window = model.ctx        # 512 tokens, or the whole context of a model with a shorter one
    analyze.check_tokens(a.tokens, window)
    sp = model.pkg.manifest.sparsity
    t = thresholds_for(sp, "paper", level)
    tp = thresholds_for(sp, "predicted", level) if model.has_predictor else None
    text, desc = load_text(a.text, "test")
    windows = token_windows(TextCodec(model.pkg).encode(text, special=False), window, a.tokens // window, desc)
    t0 = time.perf_counter()
    A, P, sig = analyze.collect(model, windows, t, tp, progress=not a.quiet)
    res = analyze.study(A, P, sig, window)
    md = analyze.summary_table(res)
    if model.has_predictor:     # the predictor's own bytes and time per layer, in the decode kernels
        res["cost"] = layer_cost.measure(model, windows.ravel(), level, progress=not a.quiet)
        md += "\n\n" + layer_cost.table(res["cost"])
    res.update(text=desc, level=level, seconds=time.perf_counter() - t0)
    out = Path(a.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "analyze.json").write_text(json.dumps(res, indent=1) + "\n")
    (out / "analyze.md").write_text(md + "\n")
    figs = analyze.figures(res, out, model.cfg.arch)
    if "cost" in res:
        figs += layer_cost.figure(res["cost"], out, model.cfg.arch)
    print(md)
    print(f"{desc}: {res['tokens']} tokens at {level:.0%} sparsity, {res['seconds']:.0f} s; wrote "
          f"{out / 'analyze.json'}" + (f" and {', '.join(f.name for f in figs)}" if figs else ""), file=sys.stderr)
    return 0


def _run(a: argparse.Namespace) -> int:
    from edgesparse.runtime.generate import generate
    from edgesparse.runtime.model import Model
    from edgesparse.runtime.sampling import Sampler
    from edgesparse.runtime.text import StreamDecoder, TextCodec

    if a.tokens < 1:
        raise EdgesparseError(f"-n/--tokens: expected a positive integer, got {a.tokens}")
    sampler = Sampler(a.temperature, a.top_p, a.seed)
    model = Model(a.package, ctx=a.ctx, threads=a.threads, verify=a.verify, load=a.load)
    model.configure(a.ffn, None if a.sparsity is None else _levels(str(a.sparsity), "--sparsity")[0])
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


def _bench(a: argparse.Namespace) -> int:
    from edgesparse.runtime import against, bench
    from edgesparse.runtime.model import check_threads
    from edgesparse.runtime.package import LOADS, Package

    pkg = Package(a.package)              # fail here, not in a worker
    threads = [check_threads(_int(t, "--threads")) for t in a.threads.split(",")]
    sparsities = _levels(a.sparsity, "--sparsity")
    for name in ("rounds", "prompt_tokens", "gen_tokens"):
        if getattr(a, name) < (2 if name == "gen_tokens" else 1):
            raise EdgesparseError(f"--{name.replace('_', '-')}: too small ({getattr(a, name)})")
    ffns = [f.strip() for f in a.ffn.split(",") if f.strip()]
    bad = [f for f in ffns if f not in ("dense", "threshold", "predict")]
    if not ffns or bad:
        raise EdgesparseError(f"--ffn: expected comma-separated dense, threshold, predict; got {a.ffn!r}")
    if "predict" in ffns and not all(e.pred_q for e in pkg.manifest.layers):
        raise EdgesparseError(f"{a.package}: --ffn predict needs a predictor (calibrate --predictor)")
    if any(sparsities) and not pkg.manifest.sparsity.get("calibration"):
        raise EdgesparseError(f"{a.package}: not calibrated; run `edgesparse calibrate` or use --sparsity 0")
    engines = against.parse(a.against)
    if a.gguf and "llama.cpp" not in engines:
        raise EdgesparseError("--gguf: only used with --against llama.cpp")
    loads = [x.strip() for x in a.load.split(",") if x.strip()]
    if not loads or any(x not in LOADS for x in loads):
        raise EdgesparseError(f"--load: expected comma-separated {', '.join(LOADS)}; got {a.load!r}")
    if a.ram_budget is not None:
        if loads != ["mmap"]:
            raise EdgesparseError("--ram-budget releases pages of mapped files: it needs --load mmap")
        if not a.ram_budget > 0:
            raise EdgesparseError(f"--ram-budget: expected a positive number of MB, got {a.ram_budget}")
        from edgesparse.runtime.residency import check_budget
        check_budget(pkg.manifest, int(a.ram_budget * 2**20), "predict" in ffns and any(sparsities))
    out = Path(a.output)
    if a.positions:
        for flag, given in (("--against", engines), ("--ram-budget", a.ram_budget), ("--project", a.project),
                            ("--load", loads != ["mmap"])):
            if given:
                raise EdgesparseError(f"--positions measures latency against position only; drop {flag}")
        from edgesparse.runtime import positions
        ps = positions.parse(a.positions, a.gen_tokens, pkg.config.max_position)
        res = bench.run_positions(a.package, threads, sparsities, ffns, ps, a.gen_tokens, a.rounds, out,
                                  progress=not a.quiet)
        print(positions.table(res))
        print(f"wrote {out / 'positions.json'}", file=sys.stderr)
        return 0
    log = None if a.quiet else (lambda msg: print(msg, file=sys.stderr))
    cache = Path(a.against_cache) if a.against_cache else out.resolve().parent / "edgesparse-against"
    paths = against.prepare_all(engines, pkg, cache, a.gguf, log)
    res = bench.run_bench(a.package, threads, sparsities, a.prompt_tokens, a.gen_tokens, a.rounds, out,
                          progress=not a.quiet, ffns=ffns, against=paths, budget_mb=a.ram_budget,
                          project=a.project, loads=tuple(loads))
    print(bench.report(res))
    print(f"wrote {out / 'bench.json'}", file=sys.stderr)
    return 0


def _int(v: str, arg: str) -> int:
    try:
        return int(v)
    except ValueError:
        raise EdgesparseError(f"{arg}: expected integers, got {v!r}") from None


def _verify(a: argparse.Namespace) -> int:
    from .format import FORMAT_VERSION, read_manifest, verify_hashes
    pkg = Path(a.package)
    m = read_manifest(pkg)
    verify_hashes(pkg, m)
    print(f"{pkg}: ok (format v{FORMAT_VERSION}, "
          f"{len(m.files)} files, sha256 verified, {m.config.arch}, {m.config.n_layers} layers)")
    return 0


def _text_command(sub, name: str, help: str, split: str, fn):
    """A subcommand that runs a package over text: PKG --text ... [--threads K] [-q]."""
    p = sub.add_parser(name, help=help)
    p.add_argument("package")
    p.add_argument("--text", required=True, help=f"text file, 'wikitext2' ({split} split) or hub dataset id")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(fn=fn)
    return p


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgesparse", description=__doc__.split("\n")[0])
    p.add_argument("--version", action="version", version=f"edgesparse {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="cmd", required=True)

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
    e.set_defaults(fn=_export)

    c = _text_command(sub, "calibrate", "calibrate per-layer sparsity thresholds on text", "validation", _calibrate)
    c.add_argument("--tokens", type=int, default=16384, help="calibration tokens (default 16384)")
    c.add_argument("--method", default="paper", help="active method: paper (|h|), gate (CATS), input (TEAL)")
    c.add_argument("--target", default="0.5", help="active target sparsity (default 0.5)")
    c.add_argument("--dump", metavar="FILE.h5", help="write the dense activations h[layer, token, neuron]")
    c.add_argument("--predictor", action="store_true",
                   help="also build the activation predictor (int8 gate/up rows) and calibrate its thresholds")

    ev = _text_command(sub, "eval", "perplexity vs sparsity with the runtime", "test", _eval)
    ev.add_argument("--ctx", type=int, default=1024, help="window length in tokens (default 1024)")
    ev.add_argument("--windows", type=int, default=None, help="use the first N windows (default: all)")
    ev.add_argument("--sparsity", default="0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9")
    ev.add_argument("--methods", default=None,
                    help="comma-separated: paper, gate, input, predict (default: every calibrated one)")
    ev.add_argument("--against", metavar="llama.cpp", help="also llama.cpp's perplexity on the same windows")
    ev.add_argument("--gguf", metavar="FILE", help="the GGUF for --against llama.cpp (default: the package's source)")
    ev.add_argument("-o", "--output", default="edgesparse-eval", help="directory for eval.json and figures")

    an = _text_command(sub, "analyze", "how predictable the active neurons are (per layer, JSON and plots)", "test",
                       _analyze)
    an.add_argument("--tokens", type=int, default=4096, help="tokens to study (default 4096)")
    an.add_argument("--sparsity", default="0.5", help="calibrated level that defines 'active' (default 0.5)")
    an.add_argument("--load", default="mmap", metavar="mmap|ram",
                    help="how the weights are loaded for the per-layer cost (see run --load)")
    an.add_argument("-o", "--output", default="edgesparse-analyze", help="directory for analyze.json and the plots")

    pr = _text_command(sub, "prune", "drop FFN neurons calibration finds almost never active (writes a copy)",
                       "validation", _prune)
    pr.add_argument("-o", "--output", required=True, help="pruned package directory to create")
    pr.add_argument("--max-rate", type=float, default=0.01,
                    help="drop neurons active on fewer than this fraction of tokens (default 0.01)")
    pr.add_argument("--level", default="0.5", help="calibrated level whose thresholds define 'active' (default 0.5)")
    pr.add_argument("--tokens", type=int, default=16384, help="tokens to count activity on (default 16384)")
    pr.add_argument("--force", action="store_true", help="replace an existing output directory")

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
    r.add_argument("--load", default="mmap", choices=["mmap", "ram"],
                   help="mmap the weight files (default), or read them into huge-page memory (faster here)")
    r.add_argument("--sparsity", type=float, default=None,
                   help="use the calibrated thresholds for this target (default: the package's active ones)")
    r.add_argument("--ffn", default="threshold", choices=["dense", "threshold", "predict"],
                   help="FFN mode: dense; threshold (the paper's rule, default); predict (the predictor "
                        "picks the rows to read)")
    r.set_defaults(fn=_run)

    b = sub.add_parser("bench", help="decode speed and memory, configurations side by side")
    b.add_argument("package")
    b.add_argument("--sparsity", default="0", help="comma-separated calibrated levels (default 0 = dense)")
    b.add_argument("--ffn", default="threshold", help="comma-separated FFN modes: threshold, predict, dense")
    b.add_argument("--threads", default=str(os.cpu_count() or 1), help="comma-separated thread counts")
    b.add_argument("--prompt-tokens", type=int, default=32)
    b.add_argument("--gen-tokens", type=int, default=128, help="decode steps (per position with --positions)")
    b.add_argument("--rounds", type=int, default=3)
    b.add_argument("--against", default="", metavar="ENGINES",
                   help="also run the package's source model with: ort, transformers (need [export]), llama.cpp")
    b.add_argument("--gguf", metavar="FILE", help="the GGUF for --against llama.cpp (default: the package's source)")
    b.add_argument("--against-cache", metavar="DIR",
                   help="where --against keeps its exports (default: edgesparse-against/ beside -o)")
    b.add_argument("--load", default="mmap", metavar="mmap,ram",
                   help="comma-separated: how the weights are loaded (see run --load; default mmap)")
    b.add_argument("--ram-budget", type=float, metavar="MB",
                   help="also run every configuration with the resident weights kept under MB (cold FFN rows released)")
    b.add_argument("--positions", metavar="P,P,...",
                   help="instead: per-token latency at these positions, e.g. 32,128,512,1000,2000")
    b.add_argument("--project", metavar="BOARD",
                   help="projected tok/s on BOARD (devices/profiles/BOARD.json or a profile path): bandwidth / bytes")
    b.add_argument("-o", "--output", default="edgesparse-bench")
    b.add_argument("-q", "--quiet", action="store_true")
    b.set_defaults(fn=_bench)

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

"""The sparsity commands: calibrate, eval, analyze, prune: a package run over text."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from edgesparse.errors import EdgesparseError

from . import quality
from .args import levels, output_dir, text_command


def calibrate(a: argparse.Namespace) -> int:
    import time

    from edgesparse.format_write import write_manifest_atomic
    from edgesparse.runtime.sparsity import predictor
    from edgesparse.runtime.sparsity.budget import parse
    from edgesparse.runtime.sparsity.calibrate import calibrate
    from edgesparse.runtime.sparsity.levels import LEVELS
    from edgesparse.runtime.core.model import Model
    from edgesparse.runtime.core.text import TextCodec
    from edgesparse.runtime.sparsity.textdata import load_text

    if a.method not in ("paper", "gate", "input"):
        raise EdgesparseError(f"--method: expected paper, gate or input, got {a.method!r}")
    target, how = None, "--target"
    if a.target is not None:
        target = levels(str(a.target), "--target")[0]
        if not any(abs(target - q) < 1e-9 for q in LEVELS):
            raise EdgesparseError(f"--target {a.target}: not a calibrated level (calibrated: {list(LEVELS)})")
    elif a.budget and parse(a.budget).relative and not a.yardstick:    # fail now, not after the calibration
        parse(a.budget).limit(None)
    model = Model(a.package, threads=a.threads, ctx=1024, max_batch=512)
    if target is None and not model.pkg.manifest.chat_template:
        if a.budget:
            raise EdgesparseError(f"--budget: {a.package} has no chat template to measure chat quality with; "
                                  "pass --target LEVEL")
        # said in the closing line, once the text has been read: a bad --text stays a one-line error
        target, how = 0.5, "no chat template to measure a quality budget on: the paper's level; --target to choose"
    text, desc = load_text(a.text, "valid")
    ids = TextCodec(model.pkg).encode(text, special=False)
    chat, chat_info = quality.chat_transcripts(a, model)
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
                          dump=dump.write if dump else None, what=desc, predictor=pred, chat=chat)
    finally:
        if dump:
            dump.close()
    table["text"] = desc
    if chat_info:
        table["chat"] = chat_info
    path = model.pkg.path
    sparsity = {"method": a.method, "level": 0.0 if target is None else target, "prefill": a.prefill,
                "calibration": table}
    m = _activate(path, model.pkg.manifest, sparsity, pred, new_pred)
    write_manifest_atomic(path, m)
    predictor.remove_stale(path, m)
    if target is None:          # the highest level within the quality budget, measured on the package just written
        del model
        target, info = quality.budget_level(a, path, a.threads, a.method)
        sparsity = dict(sparsity, level=target, budget=info)
        write_manifest_atomic(path, _activate(path, m, sparsity, pred, False))
        how = f"budget {info['budget']}"
    print(f"calibrated {a.package} on {table['tokens']} tokens of {desc}"
          + (f" and {table['chat_tokens']} answer tokens of {chat_info['transcripts']} chat transcripts" if chat else "")
          + f" in {time.perf_counter() - t0:.0f} s; active: {a.method} at {target:.0%} sparsity ({how}), "
          f"{a.prefill} prefill", file=sys.stderr)
    return 0


def _activate(path, m, sparsity: dict, pred, new_pred: bool):
    """The manifest m with `sparsity` and the thresholds of its active method and level in every
    layer (the predictor's too; a new predictor's files are written into the package here)."""
    import dataclasses

    from edgesparse.runtime.sparsity import predictor
    from edgesparse.runtime.sparsity.levels import thresholds_for
    level, method, L = sparsity["level"], sparsity["method"], m.config.n_layers
    t = [0.0] * L if level == 0.0 else thresholds_for(sparsity, method, level)
    layers = tuple(dataclasses.replace(l, threshold=float(v)) for l, v in zip(m.layers, t))
    m = dataclasses.replace(m, sparsity=sparsity, layers=layers)
    if pred is not None:
        tp = [0.0] * L if level == 0.0 else thresholds_for(sparsity, "predicted", level)
        if new_pred:
            return predictor.install(path, m, pred, tp)
        m = dataclasses.replace(m, layers=tuple(dataclasses.replace(l, pred_threshold=float(v))
                                                for l, v in zip(m.layers, tp)))
    return m


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


def evaluate(a: argparse.Namespace) -> int:
    import time

    from edgesparse.runtime.sparsity.evaluate import evaluate, table
    from edgesparse.runtime.core.model import Model
    from edgesparse.runtime.measure.plots import eval_figures
    from edgesparse.runtime.measure.quality_plots import quality_figure
    from edgesparse.runtime.core.text import TextCodec
    from edgesparse.runtime.sparsity.textdata import load_text, token_windows

    targets = levels(a.sparsity, "--sparsity")
    if a.ctx < 2:
        raise EdgesparseError(f"--ctx: expected at least 2 tokens, got {a.ctx}")
    if a.windows is not None and a.windows < 1:
        raise EdgesparseError(f"--windows: expected a positive integer, got {a.windows}")
    out = output_dir(a.output)
    model = Model(a.package, threads=a.threads, ctx=max(a.ctx, quality.CHAT_CTX), max_batch=a.ctx)
    if a.ctx > model.cfg.max_position:
        raise EdgesparseError(f"--ctx {a.ctx}: longer than the model's context ({model.cfg.max_position}); "
                              "lower --ctx")
    sp = model.pkg.manifest.sparsity
    quality.check_eval_options(a)
    methods, settings, _ = quality.eval_plan(a, model, targets)
    if any(q > 0 for q in targets) and not sp.get("calibration"):
        raise EdgesparseError(f"{a.package}: not calibrated; run `edgesparse calibrate` or use --sparsity 0")
    tools = None
    if a.against:
        from edgesparse.runtime.measure import against, llama_cpp
        if a.against != "llama.cpp":
            raise EdgesparseError(f"--against {a.against}: eval compares with llama.cpp only")
        tools = {t: llama_cpp.find(t) for t in ("llama-perplexity", "llama-tokenize")}
        tools["gguf"] = against.gguf_for(model.pkg.manifest, a.gguf)
    elif a.gguf:
        raise EdgesparseError("--gguf: only used with --against llama.cpp")
    text, desc = load_text(a.text, "test")
    ids = TextCodec(model.pkg).encode(text, special=False)
    windows = token_windows(ids, a.ctx, a.windows, desc)
    t0 = time.perf_counter()
    res = evaluate(model, windows, methods, targets, progress=not a.quiet)
    res["text"] = desc
    extra = quality.eval_quality(a, model, windows, settings, res)
    if tools is not None:
        res["against"] = _against_llama_cpp(model, text, ids, a.ctx, len(windows), tools, a.quiet)
    res["text"], res["seconds"], res["threads"] = desc, time.perf_counter() - t0, model.threads
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(res, indent=1) + "\n")
    md = "\n\n".join([table(res), *extra])
    (out / "eval.md").write_text(md + "\n")
    figs = eval_figures(res, sp, out, model.cfg.arch) + quality_figure(res, out, model.cfg.arch)
    print(md)
    print(f"{desc}: {res['windows']} windows x {a.ctx} tokens, {res['seconds']:.0f} s; wrote {out / 'eval.json'}"
          + (f" and {len(figs)} figures" if figs else " (no figures: pip install matplotlib)"), file=sys.stderr)
    return 0


def _against_llama_cpp(model, text: str, ids: list[int], ctx: int, count: int, tools: dict, quiet: bool) -> dict:
    """llama-perplexity on the text, and the runtime's dense perplexity on exactly the tokens and
    positions it scores (measure/llama_perplexity.py says which)."""
    import tempfile

    from edgesparse.progress import Progress
    from edgesparse.runtime.measure import gguf_info, llama_perplexity as lp
    from edgesparse.runtime.sparsity.evaluate import dense_perplexity

    gguf = tools["gguf"]
    theirs = lp.tokenize(tools["llama-tokenize"], gguf, lp.perplexity_text(text))
    bos = lp.bos_token(tools["llama-tokenize"], gguf)
    chunks = lp.windows(theirs, bos, ctx, count)
    first = ctx // 2
    ours = dense_perplexity(model, chunks, first, Progress(len(chunks), "edgesparse, llama.cpp's windows", not quiet))
    with tempfile.TemporaryDirectory() as tmp:
        f = Path(tmp) / "text.txt"
        f.write_text(text, encoding="utf-8", newline="")
        if not quiet:
            print(f"llama.cpp: llama-perplexity on {len(chunks)} chunks of {ctx} tokens", file=sys.stderr)
        r = lp.run(tools["llama-perplexity"], gguf, str(f), ctx, len(chunks), model.threads)
    m = model.pkg.manifest
    r["command"][r["command"].index("-f") + 1] = "TEXT"          # a temporary file: name what it held
    return {"engine": "llama.cpp", "gguf": str(gguf), "gguf_type": gguf_info.read(gguf).file_type,
            "size_bytes": gguf.stat().st_size, "package_dtype": m.tensor(m.layers[0].ffn).dtype,
            "ctx": ctx, "chunks": len(chunks), "first_scored": first, "predictions": len(chunks) * (ctx - first - 1),
            "bos": bos, "llama_cpp_tokens": len(theirs),
            # over the tokens edgesparse's own table scored: did it see llama.cpp's tokens?
            "tokenizer_first_difference": lp.first_difference(ids[:count * ctx],
                                                              (theirs[1:] if bos is not None else theirs)[:count * ctx]),
            "edgesparse_perplexity": ours, **r}


def prune(a: argparse.Namespace) -> int:
    from edgesparse.runtime.sparsity import prune
    from edgesparse.runtime.sparsity.levels import thresholds_for
    from edgesparse.runtime.core.model import Model
    from edgesparse.runtime.core.text import TextCodec
    from edgesparse.runtime.sparsity.textdata import load_text, token_windows

    level = levels(str(a.level), "--level")[0]
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


def analyze(a: argparse.Namespace) -> int:
    import time

    from edgesparse.runtime.measure import plots
    from edgesparse.runtime.sparsity import analyze, layer_cost
    from edgesparse.runtime.sparsity.levels import thresholds_for
    from edgesparse.runtime.core.head import set_head
    from edgesparse.runtime.core.model import Model
    from edgesparse.runtime.core.text import TextCodec
    from edgesparse.runtime.sparsity.textdata import load_text, token_windows

    level = levels(str(a.sparsity), "--sparsity")[0]
    out = output_dir(a.output)
    model = Model(a.package, threads=a.threads, ctx=512, max_batch=512, load=a.load)
    set_head(model, a.head)
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
    out.mkdir(parents=True, exist_ok=True)
    (out / "analyze.json").write_text(json.dumps(res, indent=1) + "\n")
    (out / "analyze.md").write_text(md + "\n")
    figs = plots.analyze_figures(res, out, model.cfg.arch)
    if "cost" in res:
        figs += plots.layer_cost_figure(res["cost"], out, model.cfg.arch)
    print(md)
    print(f"{desc}: {res['tokens']} tokens at {level:.0%} sparsity, {res['seconds']:.0f} s; wrote "
          f"{out / 'analyze.json'}" + (f" and {', '.join(f.name for f in figs)}" if figs else ""), file=sys.stderr)
    return 0


def add_parsers(sub) -> None:
    c = text_command(sub, "calibrate", "calibrate per-layer sparsity thresholds on text", "validation", calibrate)
    c.add_argument("--tokens", type=int, default=16384, help="calibration tokens")
    c.add_argument("--method", default="paper", help="active method: paper (|h|), gate (CATS), input (TEAL)")
    c.add_argument("--target", default=None, help="force this active target sparsity instead of the --budget's level")
    c.add_argument("--dump", metavar="FILE.h5", help="write the dense activations h[layer, token, neuron]")
    c.add_argument("--predictor", action="store_true",
                   help="also build the activation predictor (int8 gate/up rows) and calibrate its thresholds")
    quality.add_calibrate_options(c)

    ev = text_command(sub, "eval", "perplexity vs sparsity with the runtime", "test", evaluate)
    ev.add_argument("--ctx", type=int, default=1024, help="window length in tokens")
    ev.add_argument("--windows", type=int, default=None, help="use the first N windows (default: all)")
    ev.add_argument("--sparsity", default="0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9",
                    help="comma-separated calibrated target sparsities to evaluate (0 = dense)")
    ev.add_argument("--methods", default=None,
                    help="comma-separated criteria of threshold mode: paper, gate, input (default: every calibrated "
                         "one, the package's active one first, then paper, gate, input); 'predict' still works "
                         "but is --ffn predict")
    ev.add_argument("--against", metavar="llama.cpp", help="also llama.cpp's llama-perplexity, and the dense model "
                    "on exactly the tokens and positions it scores (second half of each --ctx chunk)")
    ev.add_argument("--gguf", metavar="FILE", help="the GGUF for --against llama.cpp (default: the package's source)")
    ev.add_argument("-o", "--output", default="edgesparse-eval", help="directory for eval.json and figures")
    quality.add_eval_options(ev)

    an = text_command(sub, "analyze", "how predictable the active neurons are (per layer, JSON and plots)", "test",
                       analyze)
    an.add_argument("--tokens", type=int, default=4096, help="tokens to study")
    an.add_argument("--sparsity", default="0.5", help="calibrated level that defines 'active'")
    an.add_argument("--load", default="mmap", metavar="mmap|ram",
                    help="how the weights are loaded for the per-layer cost (see run --load)")
    an.add_argument("--head", default="full", choices=["full", "sparse"],
                    help="lm_head of the per-layer cost's decode steps (see run --head); its bytes per token are reported")
    an.add_argument("-o", "--output", default="edgesparse-analyze", help="directory for analyze.json and the plots")

    pr = text_command(sub, "prune", "drop FFN neurons calibration finds almost never active (writes a copy)",
                       "validation", prune)
    pr.add_argument("-o", "--output", required=True, help="pruned package directory to create")
    pr.add_argument("--max-rate", type=float, default=0.01,
                    help="drop neurons active on fewer than this fraction of tokens")
    pr.add_argument("--level", default="0.5", help="calibrated level whose thresholds define 'active'")
    pr.add_argument("--tokens", type=int, default=16384, help="tokens to count activity on")
    pr.add_argument("--force", action="store_true", help="replace an existing output directory")


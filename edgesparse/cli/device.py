"""The device commands: run (generate text from a package) and verify (check one)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from edgesparse.errors import EdgesparseError

from .args import HelpFormatter, levels, output_file


def run(a: argparse.Namespace) -> int:
    from edgesparse.runtime.core.generate import generate
    from edgesparse.runtime.core.head import set_head
    from edgesparse.runtime.core.model import Model
    from edgesparse.runtime.core.sampling import Sampler
    from edgesparse.runtime.core.text import StreamDecoder, TextCodec
    from edgesparse.runtime.core.threads import ThreadTuner
    from edgesparse.runtime.sparsity.levels import configure, prefill_policy

    if a.tokens < 1:
        raise EdgesparseError(f"-n/--tokens: expected a positive integer, got {a.tokens}")
    try:        # the shell hands undecodable bytes over as surrogates; the tokenizer takes UTF-8 only
        a.prompt.encode("utf-8")
    except UnicodeEncodeError as e:
        raise EdgesparseError(f"-p/--prompt: not valid UTF-8 (byte {e.start} of the prompt); "
                              "expected UTF-8 text") from None
    stats_json = output_file(a.stats_json, "--stats-json") if a.stats_json else None
    sampler = Sampler(a.temperature, a.top_p, a.seed)
    model = Model(a.package, ctx=a.ctx, threads=a.threads, verify=a.verify, load=a.load)
    level = None if a.sparsity is None else levels(str(a.sparsity), "--sparsity")[0]
    configure(model, a.ffn, level)
    took = set_head(model, a.head, a.temperature, a.top_p)
    if took:
        print(f"edgesparse: {a.package} has no lm_head draft (exported before it existed); derived one at load "
              f"in {took:.1f} s (re-export to store it)", file=sys.stderr)
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

    prefill = a.prefill or prefill_policy(model.pkg.manifest.sparsity)
    # no --threads: the decode thread count is chosen, and chosen again, from the steps' own times
    tuner = ThreadTuner(model, model.threads) if a.threads is None else None
    _, stats = generate(model, ids, a.tokens, sampler, on_token, "sparse" if a.ffn == "dense" else prefill,
                        tuner)
    sys.stdout.write("\n")
    sys.stdout.flush()
    if stats.stop == "context":
        print(f"edgesparse: stopped after {stats.generated_tokens} tokens: the context of {model.ctx} tokens is "
              f"full (raise --ctx, up to {model.cfg.max_position})", file=sys.stderr)
    if a.stats:
        for line in stats.lines():
            print(line, file=sys.stderr)
    if stats_json:
        stats_json.write_text(json.dumps(stats.to_json(), indent=1) + "\n")
    return 0


def verify(a: argparse.Namespace) -> int:
    from edgesparse.format import FORMAT_VERSION, read_manifest, verify_hashes
    pkg = Path(a.package)
    m = read_manifest(pkg)
    verify_hashes(pkg, m)
    print(f"{pkg}: ok (format v{FORMAT_VERSION}, "
          f"{len(m.files)} files, sha256 verified, {m.config.arch}, {m.config.n_layers} layers)")
    return 0



def add_parsers(sub) -> None:
    r = sub.add_parser("run", help="generate text from a package (device)", formatter_class=HelpFormatter,
                       description="Generate text from a package. Stops after -n tokens, at EOS, or when the "
                                   "context (--ctx) is full (said on stderr).")
    r.add_argument("package", help="package directory (from `edgesparse export`)")
    r.add_argument("-p", "--prompt", required=True, help="the prompt text (UTF-8)")
    r.add_argument("-n", "--tokens", type=int, default=64, help="max new tokens")
    r.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy")
    r.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: keep the smallest set of tokens "
                                                           "with this much probability (1 = all)")
    r.add_argument("--seed", type=int, default=None, help="random seed for sampling (default: a fresh one)")
    r.add_argument("--chat", action="store_true", help="apply the model's chat template")
    r.add_argument("--threads", type=int, default=None,
                   help="kernel threads (default: chosen while decoding among all cores, half and 1, from the "
                        "steps' own times, so a board busy with something else is not slowed by waiting threads)")
    r.add_argument("--ctx", type=int, default=None, help="context length to allocate (default 2048)")
    r.add_argument("--stats", action="store_true", help="print timing, RSS, FFN rows read and why generation "
                                                         "stopped (-n, EOS or a full context) to stderr")
    r.add_argument("--stats-json", metavar="FILE", help="write the same statistics as JSON")
    r.add_argument("--verify", action="store_true", help="check every file's sha256 before loading")
    r.add_argument("--load", default="mmap", choices=["mmap", "ram"],
                   help="mmap the weight files (default), or read them into huge-page memory (faster here)")
    r.add_argument("--sparsity", type=float, default=None,
                   help="use the calibrated thresholds for this target (default: the package's active ones)")
    r.add_argument("--ffn", default="threshold", choices=["dense", "threshold", "predict"],
                   help="FFN mode: dense; threshold (the paper's rule, default); predict (the predictor "
                        "picks the rows to read)")
    r.add_argument("--head", default="full", choices=["full", "sparse"],
                   help="lm_head for decode: full (every token's logit); sparse (a 4-bit draft picks candidate "
                        "tokens, exact logits for those alone; the full head when sampling cannot be certified)")
    r.add_argument("--prefill", default=None, choices=["dense", "sparse"],
                   help="dense: the prompt runs dense and only the generated tokens sparse; sparse: both at the "
                        "level (default: the package's policy, which calibrate records; dense unless told)")
    r.set_defaults(fn=run)

    v = sub.add_parser("verify", help="check a package's manifest, sizes and sha256 hashes",
                       formatter_class=HelpFormatter)
    v.add_argument("package", help="package directory")
    v.set_defaults(fn=verify)

"""The vocabulary-sparse lm_head (`run --head sparse`, runtime/core/head.py) against the full head,
on a package's own decode steps over WikiText-2 test text (teacher forcing: each step feeds the
text's next token, so every step is a decode step on real text).

At every step both heads see the same final state:
    agreement        the sparse head's greedy token equals the full head's
    blocks           candidate blocks of 16 tokens (draft's top blocks + those within the margin)
    fallbacks        steps with more than max_blocks candidates (the full head read instead)
    sampling         how often a temperature / top-p draw could use the candidates alone (certified)
    MB per token     head bytes read: full head; draft + candidate blocks (+ full head on fallback)
Then the head alone is timed on the stored states, sparse and full alternating, medians per thread
count (keep it short on a shared machine: --time-steps).

    python devices/bench_head.py PKG [--tokens 2000] [--threads 1,2] [--time-steps 200] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import time

import numba
import numpy as np

from edgesparse.runtime.core.head import set_head
from edgesparse.runtime.core.model import Model
from edgesparse.runtime.core.text import TextCodec
from edgesparse.runtime.sparsity.textdata import wikitext

SAMPLING = ((0.7, 0.9), (1.0, 0.9), (1.0, 1.0))   # (temperature, top-p) settings whose certificate is counted


def agreement(model: Model, ids: np.ndarray, steps: int) -> tuple[dict, np.ndarray]:
    """Teacher-forced decode over ids; returns the counts and the final states [steps, E] seen."""
    sh = model.sparse_head
    sh.adaptive = False          # the certificate of every step, not only of the probes
    full_bytes = model.head.nbytes
    model.reset()
    model.forward(ids[:1])
    agree, blocks, fallbacks, read = 0, [], 0, []
    cert = {f"T={t},top_p={p}": 0 for t, p in SAMPLING}
    states = np.zeros((steps, model.cfg.d_model), np.float32)        # [steps, D] final residual stream
    y = np.zeros(model.cfg.vocab_size, np.float32)
    for i in range(steps):
        if model.pos >= model.ctx:
            model.reset()
        model.sparse_head = None
        model.forward(ids[i + 1:i + 2])
        x = model.s.hidden[:1]
        states[i] = x[0]
        want = int(np.argmax(model.logits))
        model.sparse_head = sh
        xf = np.ascontiguousarray(model._final(x, model.s.xn))
        sh.set_sampling(0.0, 1.0)
        got = sh.run(xf, y, model.s.xb, model.threads)
        if got:
            agree += int(np.argmax(y)) == want
            blocks.append(sh.blocks)
            read.append(got)
        else:
            agree += 1          # the full head itself answers the step
            fallbacks += 1
            read.append(sh.draft_bytes + full_bytes)
        for t, p in SAMPLING:
            sh.set_sampling(t, p)
            cert[f"T={t},top_p={p}"] += bool(sh.run(xf, y, model.s.xb, model.threads))
    sh.set_sampling(0.0, 1.0)
    return {"steps": steps, "greedy_agreement": agree / steps, "disagreements": steps - agree,
            "fallbacks": fallbacks, "blocks_mean": float(np.mean(blocks)), "blocks_max": int(np.max(blocks)),
            "head_mb_full": full_bytes / 1e6, "head_mb_sparse": float(np.mean(read)) / 1e6,
            "draft_mb": sh.draft_bytes / 1e6,
            "sampling_certified": {k: v / steps for k, v in cert.items()}}, states


def timing(model: Model, states: np.ndarray, threads: list[int], rounds: int = 3) -> dict:
    sh = model.sparse_head
    y = np.zeros(model.cfg.vocab_size, np.float32)
    out = {}
    for th in threads:
        model.set_threads(th)
        ts = {"full": [], "sparse": []}
        for r in range(rounds):
            for which in ("sparse", "full"):
                for x in states:
                    xf = np.ascontiguousarray(model._final(x[None], model.s.xn))
                    t0 = time.perf_counter()
                    if which == "sparse":
                        sh.run(xf, y, model.s.xb, th)
                    else:
                        model._linear(model.head, model.head_scale, xf, model.head_bias, None, model.logits.reshape(1, -1))
                    ts[which].append(time.perf_counter() - t0)
        out[th] = {k: float(np.median(v)) * 1e3 for k, v in ts.items()}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("package", help="an int4 / int8 package (int8 head)")
    ap.add_argument("--tokens", type=int, default=2000, help="decode steps of WikiText-2 test text")
    ap.add_argument("--threads", default="1,2", help="thread counts for the head timing")
    ap.add_argument("--time-steps", type=int, default=200, help="stored states timed per round (0: no timing)")
    ap.add_argument("--ctx", type=int, default=1024, help="context: the text restarts from an empty cache past it")
    ap.add_argument("--json", help="write the results as JSON")
    a = ap.parse_args()
    threads = [int(t) for t in a.threads.split(",")]
    model = Model(a.package, ctx=a.ctx, threads=max(threads))
    took = set_head(model, "sparse")
    model.warmup()
    ids = np.array(TextCodec(model.pkg).encode(wikitext("test")), np.int64)
    res, states = agreement(model, ids, a.tokens)
    res["draft_derived_s"] = took
    if a.time_steps:
        res["head_ms"] = timing(model, states[:a.time_steps], threads)
    numba.set_num_threads(max(threads))
    print(json.dumps(res, indent=1))
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(res, fh, indent=1)


if __name__ == "__main__":
    main()

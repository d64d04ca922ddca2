"""Generation loop with the measurements `edgesparse run --stats` prints."""

from __future__ import annotations

import math
import resource
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np

from edgesparse.errors import EdgesparseError

from .model import Model
from .sampling import Sampler


# The three ways generation ends, as `--stats` names them.
STOPS = {"tokens": "-n tokens generated", "eos": "end of sequence", "context": "context full"}


@dataclass
class RunStats:
    prompt_tokens: int
    generated_tokens: int
    prefill_ms: float
    decode_tokens_per_s: float
    latency_p50_ms: float
    latency_p90_ms: float
    peak_rss_mb: float
    ffn_rows_read_per_token: float   # gate rows + up rows + down columns, summed over layers
    ffn_rows_total: int              # R * n_neurons * n_layers (R = 3 gated, 2 plain MLP)
    ffn_rows_read_fraction: float
    head_mb_per_token: float         # lm_head bytes read per decode step (MB): the whole head, or draft + candidates
    head_full_mb: float              # the whole head (MB)
    head: str                        # "full", or "sparse (N fallbacks to the full head)"
    threads: int                     # the count most decode steps ran on
    stop: str                        # why generation stopped: STOPS
    thread_choice: str               # e.g. "2 (auto: 2 on 90 steps, 1 on 10)", or the fixed count

    def to_json(self) -> dict:
        # NaN (no decode step, e.g. -n 1) is not JSON: write null instead.
        return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in asdict(self).items()}

    def lines(self) -> list[str]:
        return [
            f"prompt {self.prompt_tokens} tokens, prefill {self.prefill_ms:.1f} ms",
            f"decode {self.generated_tokens} tokens ({STOPS[self.stop]}): {self.decode_tokens_per_s:.2f} tok/s, "
            f"per-token p50 {self.latency_p50_ms:.2f} ms, p90 {self.latency_p90_ms:.2f} ms",
            f"peak RSS {self.peak_rss_mb:.0f} MB, threads {self.thread_choice}",
            f"FFN rows read per token {self.ffn_rows_read_per_token:.0f} of {self.ffn_rows_total} "
            f"({100 * self.ffn_rows_read_fraction:.1f}%)",
            f"lm_head read per token {self.head_mb_per_token:.2f} MB of {self.head_full_mb:.2f} MB, head {self.head}",
        ]


def peak_rss_mb() -> float:
    # ru_maxrss is KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def generate(model: Model, prompt_ids: list[int], max_new: int, sampler: Sampler,
             on_token=None, prefill: str = "sparse", tuner=None) -> tuple[list[int], RunStats]:
    """Prefill the prompt, then decode up to max_new tokens, stopping at EOS or when the context is
    full (RunStats.stop says which).
    on_token(id) is called as each token is chosen, for streaming.
    prefill: 'sparse' runs the prompt in the model's FFN mode, 'dense' runs it dense and only the
    generated tokens sparse (the prefill policy: sparsity/levels.py says why it is the default).
    tuner (threads.ThreadTuner), if given, sees each decode step's time and sets the next step's
    thread count."""
    if prefill not in ("sparse", "dense"):
        raise EdgesparseError(f"--prefill: expected sparse or dense, got {prefill!r}")
    cfg = model.cfg
    eos = set(cfg.eos_token_ids)
    model.reset()
    t0 = time.perf_counter()
    mode = model.ffn_mode
    if prefill == "dense":
        model.set_ffn_mode("dense")
    try:
        logits = model.forward(prompt_ids)
    finally:
        model.ffn_mode = mode
    t_prefill = time.perf_counter() - t0
    out, lat, stop = [], [], "tokens"
    for i in range(max_new):
        tok = sampler(logits)
        out.append(tok)
        if on_token:
            on_token(tok)
        if tok in eos or i == max_new - 1 or model.pos >= model.ctx:
            stop = "eos" if tok in eos else "tokens" if i == max_new - 1 else "context"
            break
        t = time.perf_counter()
        logits = model.forward([tok])
        lat.append(time.perf_counter() - t)
        if tuner is not None:
            tuner.step(lat[-1])
    lat_ms = np.array(lat) * 1e3 if lat else np.array([np.nan])
    L, N = cfg.n_layers, cfg.ffn_dim
    total = cfg.ffn_rows * N * L
    rows = float(np.mean(model.stats.ffn_rows)) if model.stats.ffn_rows else float("nan")
    hb = np.array(model.stats.head_bytes, np.float64)
    full = model.head.nbytes + model.head_scale.nbytes
    sh = model.sparse_head
    # a step that falls back reads the whole head (and the draft, unless it was skipped)
    head = "full" if sh is None else f"sparse ({int((hb >= full).sum())} of {hb.size} steps read the full head)"
    stats = RunStats(
        prompt_tokens=len(prompt_ids), generated_tokens=len(out), prefill_ms=t_prefill * 1e3,
        decode_tokens_per_s=(len(lat) / sum(lat)) if lat else float("nan"),
        latency_p50_ms=float(np.percentile(lat_ms, 50)), latency_p90_ms=float(np.percentile(lat_ms, 90)),
        peak_rss_mb=peak_rss_mb(), ffn_rows_read_per_token=float(rows), ffn_rows_total=total,
        ffn_rows_read_fraction=float(rows / total), stop=stop,
        head_mb_per_token=float(hb.mean() / 1e6) if hb.size else float("nan"), head_full_mb=full / 1e6, head=head,
        threads=int(tuner.summary().split()[0]) if tuner else model.threads,
        thread_choice=tuner.summary() if tuner else str(model.threads))
    return out, stats


def stream_to(fh=sys.stdout):
    def write(text: str) -> None:
        fh.write(text)
        fh.flush()
    return write

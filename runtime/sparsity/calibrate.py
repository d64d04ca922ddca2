"""Per-layer threshold calibration (arXiv 2412.12178, no retraining).

Run the dense model over calibration text, collect per layer the distribution of the quantity a
method thresholds, and take its percentiles: the threshold for target sparsity q is the t with
P(|value| < t) = q on the calibration text. Methods:
    paper  |h|, h = act(gate.x) * (up.x)   the neuron output (the paper's criterion)
    gate   |act(gate.x)|                    CATS
    input  |x_k|, x the FFN input           TEAL
All three come from the same forward pass, so one calibration stores all three tables. With a
predictor (predictor.py) the same pass also tabulates |h^|, its predicted |h| ("predicted"),
whose percentiles are the candidate thresholds t_pred.

One level for every layer, as in the paper. Tried on SmolLM2-135M (predict mode, WikiText-2 test
16 x 1024) and not kept: per-layer levels chosen by a dynamic program from each layer's own
validation-loss increase at 0.4..0.8 (the others dense) were worse than uniform at the same mean
(23.80 vs 23.40 at 50 %, 24.20 vs 23.72 at 55 %): single-layer effects are ~0.001 nats and
noisier than the differences between layers, and they do not add up. Ranking by |h| * ||down_i||
(WINA; SwiGLU permits it as a reparametrization, up_i * n_i and down_i / n_i) gave 23.38 vs 23.36.

Distributions are kept as per-layer log-spaced histograms (2048 bins over 1e-10..1e4, 0.7% wide),
so memory does not grow with the token count and percentiles are exact to well under a point of
sparsity. The manifest gets a 64-bin version of them for plots.
"""

from __future__ import annotations

import numpy as np

from edgesparse.errors import EdgesparseError
from edgesparse.progress import Progress

from .. import kernels as K
from .levels import LEVELS

METHODS = ("paper", "gate", "input")
LOG_LO, LOG_HI, BINS = -10.0, 4.0, 2048
COMPACT = 64


class LogHistogram:
    """Counts of |v| per layer: bin 0 holds [0, 1e-10), bins 1..BINS are log-spaced up to 1e4,
    bin BINS+1 holds the rest."""

    def __init__(self, n_layers: int):
        self.counts = np.zeros((n_layers, BINS + 2), np.int64)
        self.edges = np.concatenate([[0.0], np.logspace(LOG_LO, LOG_HI, BINS + 1)])   # [BINS+2]

    def add(self, layer: int, v: np.ndarray) -> None:
        # exact zeros (ReLU) land in bin 0 through the 1e-30 floor
        a = np.maximum(np.abs(v, dtype=np.float32).ravel(), np.float32(1e-30))
        idx = np.floor((np.log10(a) - LOG_LO) * (BINS / (LOG_HI - LOG_LO))).astype(np.int64) + 1
        np.clip(idx, 0, BINS + 1, out=idx)
        self.counts[layer] += np.bincount(idx, minlength=BINS + 2)

    def quantile(self, layer: int, q: float) -> float:
        """t with fraction q of the values below it (log-linear inside a bin)."""
        if q <= 0.0:
            return 0.0
        c = self.counts[layer]
        total = c.sum()
        if total == 0:
            raise EdgesparseError("calibration saw no values")
        cdf = np.cumsum(c) / total
        b = int(np.searchsorted(cdf, q, side="left"))
        if b == 0:
            return float(self.edges[1])                  # exact zeros (ReLU): zero exactly those
        if b >= BINS + 1:
            return float(self.edges[-1])
        lo_cdf = cdf[b - 1]
        frac = (q - lo_cdf) / max(cdf[b] - lo_cdf, 1e-300)
        lo, hi = np.log10(self.edges[b]), np.log10(self.edges[b + 1])
        return float(10 ** (lo + frac * (hi - lo)))

    def compact(self) -> dict:
        inner = self.counts[:, 1:BINS + 1].reshape(self.counts.shape[0], COMPACT, BINS // COMPACT).sum(2)
        return {"log10_edges": [float(x) for x in np.linspace(LOG_LO, LOG_HI, COMPACT + 1)],
                "zeros": self.counts[:, 0].tolist(), "overflow": self.counts[:, -1].tolist(),
                "counts": inner.tolist()}


def calibrate(model, ids: list[int], tokens: int = 16384, window: int = 512, progress: bool = True,
              dump=None, what: str = "the calibration text", predictor=None, chat=None) -> dict:
    """Collect the three distributions on up to `tokens` tokens of `ids` (windows of `window`
    tokens from position 0, dense model) and return the calibration table for the manifest.
    dump: optional callable(layer, token_offset, h [S, N]) receiving the text's dense neuron outputs.
    predictor: optional list per layer of (pq, ps) int8 predictor arrays to tabulate |h^| for.
    chat: optional chat transcripts [(ids [T], first)], each run whole from position 0 with the
    positions first.. (the answer) added to the same distributions (answers.transcripts)."""
    from .textdata import token_windows
    if window <= 64:
        raise EdgesparseError(f"calibration window {window}: must be more than 64 tokens")
    if tokens < window:
        raise EdgesparseError(f"--tokens {tokens}: must be at least one window ({window})")
    wins = token_windows(ids, window, tokens // window, what)
    chat = list(chat or [])
    longest = max([window] + [len(t) for t, _ in chat])
    if longest > model.max_batch:
        raise EdgesparseError(f"a chat transcript of {longest} tokens is longer than the calibration batch "
                              f"({model.max_batch}); use shorter answers")
    L = model.cfg.n_layers
    methods = METHODS + (("predicted",) if predictor is not None else ())
    hist = {m: LogHistogram(L) for m in methods}
    act = K.ACT_CODES[model.cfg.activation]
    h_buf = np.empty(longest * model.cfg.ffn_dim, np.float32)   # [S, N_l] views (N_l < N when pruned)
    a_buf = np.empty_like(h_buf)

    def tally(layer: int, f, g, u) -> np.ndarray:
        """Add one layer's rows f [S, D], g, u [S, N] to the distributions; returns h [S, N]."""
        S, N = g.shape
        a, h = a_buf[:S * N].reshape(S, N), h_buf[:S * N].reshape(S, N)
        K.activation(g, act, a)
        np.multiply(a, u, out=h)
        hist["paper"].add(layer, h)
        hist["gate"].add(layer, a)
        hist["input"].add(layer, f)
        if predictor is not None:
            lw = model.layers[layer]
            wp = np.empty((g.shape[1], model.cfg.ffn_rows - 1, f.shape[1]), np.float32)     # [N, R-1, D]
            gp, up = K.predicted_gate_up(*predictor[layer], lw.ffn_bias_in, f, wp)        # [S, N]
            K.activation(gp, act, gp)
            hist["predicted"].add(layer, gp if up is None else gp * up)
        return h

    def observe(layer: int, offset: int, f, g, u) -> None:
        h = tally(layer, f, g, u)
        if dump is not None:
            dump(layer, offset, h)

    run_dense(model, wins, observe, "calibrate", progress)
    table = {"tokens": int(wins.size), "window": window, "levels": list(LEVELS),
             "thresholds": {}, "histograms": {}}
    if chat:
        # run_dense hands each transcript's rows over with the offset of its first token
        starts = np.cumsum([0] + [len(t) for t, _ in chat])[:-1]
        first = {int(o): k for o, (_, k) in zip(starts, chat)}
        run_dense(model, [np.asarray(t, np.int64) for t, _ in chat],
                  lambda layer, offset, f, g, u: tally(layer, f[first[offset]:], g[first[offset]:], u[first[offset]:]),
                  "calibrate, chat", progress)
        table["chat_tokens"] = int(sum(len(t) - k for t, k in chat))
    for m in methods:
        th = [[hist[m].quantile(l, q) for l in range(L)] for q in LEVELS]
        table["thresholds"][m] = th
        table["histograms"][m] = hist[m].compact()
    return table


def run_dense(model, windows, observe, what: str, progress: bool = True) -> None:
    """Feed each window [W] of windows from position 0 through the dense model, calling
    observe(layer, token_offset, ffn_in [S,D], gate [S,N], up [S,N]) at every layer (the BLAS
    prefill path); the model's thresholds and FFN mode are restored afterwards."""
    saved = model.thresholds.copy(), model.method, model.ffn_mode
    model.set_thresholds(np.zeros(model.cfg.n_layers, np.float32), "paper")
    model.set_ffn_mode("dense")
    offset = 0
    model.observer = lambda layer, f, g, u: observe(layer, offset, f, g, u)
    bar = Progress(len(windows), what, progress)
    try:
        for w in windows:
            model.reset()
            model.forward(w)
            offset += w.size
            bar.update()
    finally:
        model.observer = None
        model.set_thresholds(saved[0], saved[1])
        model.ffn_mode = saved[2]

"""`edgesparse analyze`: how predictable are the active neurons? (the paper's predictability study)

On `tokens` tokens of text (windows from position 0, dense model), a neuron is *active* when the
paper's rule keeps it, |h| >= t_l at the chosen level. Reported per layer:

  consecutive   Jaccard(A_t, A_t+1) of neighbouring tokens, next to the Jaccard of random token
                pairs (what overlap by chance looks like at this sparsity)
  similar       inputs that look alike share patterns (the paper's Table II idea): the text is cut
                into chunks of 32 tokens; a chunk's pattern is its 50% most often active neurons;
                overlap with its most similar chunk (cosine of the mean FFN input) vs a random one
  cross-layer   early layers predict later ones: each neuron of layer l is paired with the
                neuron of layer l-1 it co-fires with most (phi coefficient, first half of the
                tokens) and predicted active when its partner is (second half)
  predictors    recall |P∩A|/|A| and precision |P∩A|/|P| per layer of: the previous token's
                set (LLM in a Flash's reuse), a static set of the most often active neurons
                (first half -> second half), the prompt's set (GRIFFIN: the first 64 tokens of
                each window choose the neurons for the rest) and, if the package has one, the
                int8 predictor at the same level (what `--ffn predict` uses)
"""

from __future__ import annotations

import numpy as np

from edgesparse.errors import EdgesparseError

from .. import kernels as K
from .calibrate import run_dense

CHUNK = 32
PROMPT = 64


def collect(model, windows: np.ndarray, thresholds, t_pred=None, progress: bool = True):
    """Active sets A [L, T, N] bool, predicted sets [L, T, N] (or None) and the FFN input mean per
    32-token chunk of the middle layer [T/32, D], over every token of `windows` [n, W]."""
    cfg = model.cfg
    L, N = cfg.n_layers, cfg.ffn_dim
    T = windows.size
    A = np.zeros((L, T, N), bool)
    P = np.zeros((L, T, N), bool) if t_pred is not None else None
    sig = np.zeros((T // CHUNK, cfg.d_model), np.float64)
    act = K.ACT_CODES[cfg.activation]
    wp = np.empty((N, cfg.ffn_rows - 1, cfg.d_model), np.float32) if t_pred is not None else None

    def observe(l, off, f, g, u):
        S = g.shape[0]
        a = np.empty_like(g)
        K.activation(g, act, a)
        A[l, off:off + S, :g.shape[1]] = np.abs(a * u) >= thresholds[l]    # pruned neurons: never active
        if P is not None:
            lw = model.layers[l]
            gp, up = K.predicted_gate_up(lw.pred_q, lw.pred_scale, lw.ffn_bias_in, f, wp[:g.shape[1]])
            K.activation(gp, act, gp)
            P[l, off:off + S, :g.shape[1]] = np.abs(gp if up is None else gp * up) >= t_pred[l]
        if l == L // 2:
            n = S // CHUNK
            c0 = off // CHUNK
            sig[c0:c0 + n] = f[:n * CHUNK].reshape(n, CHUNK, -1).mean(1)

    run_dense(model, windows, observe, "analyze", progress)
    return A, P, sig


def _jaccard(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise Jaccard of bool [M, N] arrays (1 where both are empty)."""
    inter = (a & b).sum(1)
    union = (a | b).sum(1)
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def _recall_precision(pred: np.ndarray, true: np.ndarray) -> tuple[float, float]:
    tp = float((pred & true).sum())
    return tp / max(float(true.sum()), 1.0), tp / max(float(pred.sum()), 1.0)


def _top_half(freq: np.ndarray) -> np.ndarray:
    """bool mask of the 50% largest entries along the last axis."""
    k = freq.shape[-1] // 2
    idx = np.argsort(-freq, axis=-1, kind="stable")[..., :k]
    out = np.zeros(freq.shape, bool)
    np.put_along_axis(out, idx, True, axis=-1)
    return out


def study(A: np.ndarray, P, sig: np.ndarray, window: int, seed: int = 0) -> dict:
    """The four studies from active sets A [L, T, N] (tokens in windows of `window`)."""
    L, T, N = A.shape
    rng = np.random.default_rng(seed)
    pos = np.arange(T) % window
    nxt = np.flatnonzero(pos[:-1] < window - 1)          # t with t+1 in the same window
    r1, r2 = rng.integers(0, T, T), rng.integers(0, T, T)
    half = T // 2
    res = {"layers": L, "tokens": T, "active_fraction": A.mean((1, 2)).tolist(), "per_layer": []}

    # similar inputs: chunk patterns and their nearest neighbour by the FFN input's direction
    nc = T // CHUNK
    s = sig[:nc] / np.maximum(np.linalg.norm(sig[:nc], axis=1, keepdims=True), 1e-30)
    cos = s @ s.T
    np.fill_diagonal(cos, -np.inf)
    near = cos.argmax(1)
    rand = (np.arange(nc) + rng.integers(1, max(nc, 2), nc)) % max(nc, 1)

    for l in range(L):
        a = A[l]
        row = {"layer": l}
        row["consecutive_jaccard"] = float(_jaccard(a[nxt], a[nxt + 1]).mean())
        row["random_pair_jaccard"] = float(_jaccard(a[r1], a[r2]).mean())
        pat = _top_half(a[:nc * CHUNK].reshape(nc, CHUNK, N).mean(1))      # [nc, N]
        row["similar_chunk_jaccard"] = float(_jaccard(pat, pat[near]).mean()) if nc > 1 else float("nan")
        row["random_chunk_jaccard"] = float(_jaccard(pat, pat[rand]).mean()) if nc > 1 else float("nan")
        preds = {}
        prev = np.zeros_like(a)
        prev[1:] = a[:-1]
        keep = pos > 0                                                     # a previous token exists
        preds["previous_token"] = (prev[keep], a[keep])
        static = _top_half(a[:half].mean(0))                               # [N]
        preds["static"] = (np.broadcast_to(static, a[half:].shape), a[half:])
        gr = pos >= PROMPT
        if gr.any():
            starts = np.arange(0, T, window)
            prompt = np.concatenate([np.broadcast_to(_top_half(a[s0:s0 + PROMPT].mean(0)), (window, N))
                                     for s0 in starts])[:T]
            preds["prompt_set"] = (prompt[gr], a[gr])
        if l > 0:
            preds["previous_layer"] = (_cross_layer(A[l - 1], a, half), a[half:])
        if P is not None:
            preds["int8_predictor"] = (P[l], a)
        for name, (p, t) in preds.items():
            rc, pr = _recall_precision(p, t)
            row[name] = {"recall": rc, "precision": pr, "predicted_fraction": float(p.mean())}
        res["per_layer"].append(row)
    names = sorted({k for r in res["per_layer"] for k, v in r.items() if isinstance(v, dict)})
    res["mean"] = {n: {m: float(np.mean([r[n][m] for r in res["per_layer"] if n in r]))
                       for m in ("recall", "precision")} for n in names}
    for k in ("consecutive_jaccard", "random_pair_jaccard", "similar_chunk_jaccard", "random_chunk_jaccard"):
        res["mean"][k] = float(np.nanmean([r[k] for r in res["per_layer"]]))
    return res


def _cross_layer(prev: np.ndarray, cur: np.ndarray, half: int) -> np.ndarray:
    """Predict cur [T, N] from prev [T, N]: each neuron copies the previous-layer neuron it is most
    correlated with (phi coefficient on the first half); returns predictions for the second half."""
    x, y = prev[:half].astype(np.float32), cur[:half].astype(np.float32)
    xc, yc = x - x.mean(0), y - y.mean(0)
    phi = (xc.T @ yc) / np.maximum(np.outer(np.linalg.norm(xc, axis=0), np.linalg.norm(yc, axis=0)), 1e-12)
    partner = phi.argmax(0)                                    # [N] neuron of the previous layer
    return prev[half:][:, partner]


def summary_table(res: dict) -> str:
    m = res["mean"]
    lines = ["| study | value (mean over layers) |", "|---|---|",
             f"| consecutive tokens, Jaccard | {m['consecutive_jaccard']:.3f} (random pairs {m['random_pair_jaccard']:.3f}) |",
             f"| similar 32-token chunks, Jaccard | {m['similar_chunk_jaccard']:.3f} "
             f"(random chunks {m['random_chunk_jaccard']:.3f}) |"]
    for name in ("previous_token", "static", "prompt_set", "previous_layer", "int8_predictor"):
        if name in m:
            lines.append(f"| {name}: recall / precision | {m[name]['recall']:.3f} / {m[name]['precision']:.3f} |")
    return "\n".join(lines)


def check_tokens(tokens: int, window: int) -> None:
    if tokens < 2 * window:
        raise EdgesparseError(f"--tokens {tokens}: need at least two windows of {window} tokens")

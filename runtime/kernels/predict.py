"""The activation predictor's kernels: int8 copies of each neuron's gate and up rows (fc1 for
plain MLPs; sparsity/predictor.py builds them) pick the candidates whose rows are read.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .activations import _act
from .ffn import _BLOCK, _add_down, _kept, _neuron_h, _sum_partials
from .ir import _prefetch_line
from .rows import _dot_w

# Per neuron, int8 copies of its gate and up rows (fc1 for plain MLPs; sparsity/predictor.py):
# pq [N, R-1, D] int8 and ps [N, R-1] float32, w ≈ q * scale per row. The predicted output
# h^ = act(gate^.x + b) * (up^.x + b) costs 1/4 of the float32 rows' bytes; a neuron is a
# candidate when |h^| >= t_pred, and only candidates' float32 rows are read.

@njit(inline="always", fastmath=True)
def _pred_h(pq, ps, b, i, x, act):
    """h^ for neuron i: pq [R-1, D] int8, ps [R-1], b [N, R-1] exact input biases (or [0, ·]), x [D]."""
    g = _dot_w(pq[0], x) * ps[0]
    if b.shape[0] > 0:
        g += b[i, 0]
    if pq.shape[0] == 1:
        return _act(act, g)
    u = _dot_w(pq[1], x) * ps[1]
    if b.shape[0] > 0:
        u += b[i, 1]
    return _act(act, g) * u


_KICK, _KICK_AHEAD = 512, 4      # see ffn_predict_batch


@njit(parallel=True, fastmath=True, cache=True)
def ffn_predict_batch(w, ws, b, pq, ps, X, base, t_pred, thr, act, out, h_out, partial, kept, cand, order):
    """Predicted sparse FFN for S tokens: out = base + sum over neurons i that are candidates
    (|h^_i| >= t_pred) and survive the threshold (|h_i| >= thr) of h_i * w[i, R-1].

    w [N, R, D] neuron-major float32 (or uint16 float16 bits, or int8 with row scales ws [N, R];
    ws is [0, R] otherwise), b [N, R-1] or [0, R-1] input
    biases; pq [N, R-1, D] int8, ps [N, R-1] float32 (the int8 predictor); X, base, out [S, D] (out may alias base); h_out [S, N]: exact h
    of candidates, 0 for the rest; partial [C, >=S, D], kept [C], cand [C], order [C, >=N] int32
    scratch. Returns (neuron-token pairs kept, candidate pairs). A non-candidate's three rows are
    not read; a candidate's gate and up rows are, and its down row only if it survives thr.

    Two passes per thread: the predictor rows (one sequential stream) give the list of
    candidates, then the candidates' blocks are read. Candidates are a random subset, so every
    block starts a new stream that the hardware prefetchers must first detect; the first _KICK
    bytes of the candidate _KICK_AHEAD places ahead are hinted (llvm.prefetch) so that stream is
    under way when its turn comes. Measured on a random half of the float32 blocks, 30 layers,
    1 / 2 threads: SmolLM2 (6.9 KB blocks) 14.0 -> 13.2 / 6.8 -> 6.4 ms, Qwen2.5-0.5B (10.8 KB)
    51.3 -> 50.8 / 28.7 -> 28.2 ms; kicks of 128 B-2 KB and 1-8 candidates ahead were measured, and
    prefetching whole blocks ahead made it slower (17.4 -> 14.0 GB/s). In the decode step (SmolLM2
    at 50 %, FFN ms per token, medians of alternating runs, 1 / 2 threads): float32 18.2 -> 17.7 /
    9.9 -> 9.8, float16 15.4 -> 14.9 / 8.2 -> 8.0. Narrower rows also prefetch a fixed distance
    ahead inside their dot products (_PREFETCH): float16 at 50 %, 1 / 2 threads, whole decode
    step 32.4 -> 30.4 / 18.6 -> 15.8 ms (same process, alternating).
    """
    N = w.shape[0]
    S = X.shape[0]
    C = partial.shape[0]
    for c in prange(C):
        lo = c * N // C
        hi = (c + 1) * N // C
        acc = partial[c]
        acc[:S] = 0.0
        lst = order[c]
        m = 0
        nc = 0
        for i in range(lo, hi):
            qi = pq[i]  # [R-1, D]
            si = ps[i]
            any_s = False
            for s in range(S):
                hp = _pred_h(qi, si, b, i, X[s], act)
                flag = abs(hp) >= t_pred
                h_out[s, i] = 1.0 if flag else 0.0     # candidate flag, replaced by h below
                any_s |= flag
            if any_s:
                lst[m] = i
                m += 1
        n = 0
        for j0 in range(0, m, _BLOCK):        # blocks of candidates, two passes (see ffn_glu_batch)
            j1 = min(j0 + _BLOCK, m)
            for j in range(j0, j1):
                i = lst[j]
                if j + _KICK_AHEAD < m:
                    ahead = w[lst[j + _KICK_AHEAD]]
                    for o in range(0, _KICK, 64):
                        _prefetch_line(ahead, o)
                wi = w[i]
                for s in range(S):
                    if h_out[s, i] == 0.0:
                        continue
                    nc += 1
                    h_out[s, i] = _neuron_h(wi, ws, b, i, X, s, act, thr, 0)[0]
            for j in range(j0, j1):
                i = lst[j]
                wi = w[i]
                for s in range(S):
                    h = h_out[s, i]
                    if _kept(h, thr, 0, w.shape[1] == 3):
                        n += 1
                        _add_down(acc, s, wi, ws, i, h)
        kept[c] = n
        cand[c] = nc
    for s in prange(S):
        _sum_partials(partial, base, out, s)
    tk = 0
    tc = 0
    for c in range(C):
        tk += kept[c]
        tc += cand[c]
    return tk, tc


@njit(fastmath=True, cache=True)
def ffn_predict(w, ws, b, pq, ps, x, base, t_pred, thr, act, out, h_out, partial, kept, cand, order):
    """ffn_predict_batch for one token (decode): x, base, out [D]; h_out [N]; partial [C, D]."""
    D = x.shape[0]
    return ffn_predict_batch(w, ws, b, pq, ps, x.reshape((1, D)), base.reshape((1, D)), t_pred, thr, act,
                             out.reshape((1, D)), h_out.reshape((1, h_out.shape[0])),
                             partial.reshape((partial.shape[0], 1, D)), kept, cand, order)


@njit(parallel=True, cache=True)
def dequant_pred(pq, ps, out):
    """out[i, r, k] = q * scale: the predictor's rows as float32 [N, R-1, D] (BLAS prefill)."""
    N, Rp, D = pq.shape
    for i in prange(N):
        for r in range(Rp):
            sc = ps[i, r]
            for k in range(D):
                out[i, r, k] = np.float32(pq[i, r, k]) * sc


@njit(parallel=True, fastmath=True, cache=True)
def predict_mask(h, gp, up, t_pred, act, cand):
    """Prefill: h <- 0 where the predicted |act(gp) * up| < t_pred, in place; cand[s] = candidates
    of token s. h, gp, up: [S, N] (exact h after glu_threshold; predicted gate and up, biases
    included; up = 1 for plain MLPs)."""
    S, N = h.shape
    for s in prange(S):
        n = 0
        for i in range(N):
            if abs(_act(act, gp[s, i]) * up[s, i]) >= t_pred:
                n += 1
            else:
                h[s, i] = 0.0
        cand[s] = n


def predicted_gate_up(pq: np.ndarray, ps: np.ndarray, bias_in: np.ndarray, f: np.ndarray,
                      wp: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Predicted pre-activations of S tokens through BLAS (prefill, calibration, analysis):
    f [S, D] -> (gate^ [S, N], up^ [S, N], or None for plain MLPs whose up is 1), input biases
    bias_in [N, R-1] (or [0, ·]) added exactly. wp [N, R-1, D] float32 scratch."""
    dequant_pred(pq, ps, wp)
    gp = f @ wp[:, 0].T
    up = f @ wp[:, 1].T if wp.shape[1] == 2 else None
    if bias_in.shape[0]:
        gp += bias_in[:, 0]
        if up is not None:
            up += bias_in[:, 1]
    return gp, up

"""The vocabulary-sparse lm_head's kernels (core/head.py runs them; edgesparse/headdraft.py says
why the draft is a 4-bit copy): the draft's scores per block of 16 tokens, the candidate blocks,
and the exact logits of those blocks alone from the head's own tiles.

Candidates are whole blocks of 16 tokens because a tile holds 16 rows: reading one token's row
reads its block's, so the other 15 exact logits come free. The exact logits are tiles16 over the
same tiles and the same prepared input as linear_tiles, so a candidate's logit is bitwise the one
the full head computes (the greedy token agrees whenever the true argmax is among the candidates).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .tiles import tiles16


@njit(cache=True)
def block_max(a, bmax):
    """bmax [B] = the largest of each block of 16 in a [V] (the last block may be short)."""
    V = a.shape[0]
    for b in range(bmax.shape[0]):
        m = a[16 * b]
        for i in range(16 * b + 1, min(16 * b + 16, V)):
            if a[i] > m:
                m = a[i]
        bmax[b] = m


@njit(cache=True)
def top_blocks(bmax, k, sel, topv, mark):
    """sel[:k] = the k blocks of largest bmax [B] (in no order), marked in mark [B] (all 0 on entry);
    topv [>= k] float32 scratch. One pass with the k best so far: k is small (8)."""
    B = bmax.shape[0]
    k = min(k, B)
    lo = 0
    for b in range(B):
        v = bmax[b]
        if b < k:
            sel[b], topv[b] = b, v
            if b == k - 1:
                for j in range(k):
                    if topv[j] < topv[lo]:
                        lo = j
        elif v > topv[lo]:
            sel[lo], topv[lo] = b, v
            for j in range(k):
                if topv[j] < topv[lo]:
                    lo = j
    for j in range(k):
        mark[sel[j]] = 1
    return k


@njit(cache=True)
def extend_blocks(bmax, cut, sel, n, mark):
    """Append to sel [cap] (n used) every unmarked block with bmax >= cut, marking it. Returns the
    new count, or cap + 1 when they do not fit (the caller then reads the whole head)."""
    cap = sel.shape[0]
    for b in range(bmax.shape[0]):
        if bmax[b] >= cut and mark[b] == 0:
            if n == cap:
                return cap + 1
            sel[n] = b
            mark[b] = 1
            n += 1
    return n


@njit(cache=True)
def clear_marks(sel, n, mark):
    for j in range(min(n, sel.shape[0])):
        mark[sel[j]] = 0


@njit(parallel=True, fastmath=True, cache=True)
def tile_blocks(t, sel, lo, hi, xb, bias, y, chunks, scratch):
    """y[16 b + i] = W[16 b + i] . x (+ bias) for the blocks b in sel[lo:hi], W [V, D] stored as
    tiles t [B, G, tile]; x is row 0 of xb, prepared by quantize_activations (linear_tiles over the
    draft did it). y [V]; bias [V] or [0]; scratch [chunks, 16] float32."""
    B, V = t.shape[0], y.shape[0]
    t4 = t.reshape((B, 1, t.shape[1], t.shape[2]))
    m = hi - lo
    for c in prange(chunks):
        for j in range(lo + c * m // chunks, lo + (c + 1) * m // chunks):
            b = sel[j]
            tiles16(t4, b, 0, xb[0], xb[1], xb[2], 0, scratch, 16 * c)
            for i in range(min(16, V - 16 * b)):
                v = scratch[c, i]
                if bias.shape[0] > 0:
                    v += bias[16 * b + i]
                y[16 * b + i] = v


@njit(cache=True)
def candidate_stats(y, a, sel, n):
    """(l*, sigma): the largest exact logit y [V] over the blocks sel[:n], and the root mean square
    of exact minus draft (a [V]) over their rows: the draft's error scale at this step."""
    V = y.shape[0]
    best = -np.inf
    s = 0.0
    cnt = 0
    for j in range(n):
        b = sel[j]
        for i in range(16 * b, min(16 * b + 16, V)):
            best = max(best, y[i])
            d = np.float64(y[i]) - np.float64(a[i])
            s += d * d
            cnt += 1
    return best, np.sqrt(s / max(cnt, 1))


@njit(cache=True)
def outside_mass(a, mark, top, inv_t):
    """(sum, largest) of exp((a_v + margin - l*) / T) over the tokens of the unmarked blocks: an
    upper bound on the unnormalized probability mass (and on the single largest probability)
    outside the candidates, given a [V] the draft's scores, top = l* - margin and inv_t = 1 / T."""
    V = a.shape[0]
    s = 0.0
    big = 0.0
    for b in range(mark.shape[0]):
        if mark[b] == 0:
            for v in range(16 * b, min(16 * b + 16, V)):
                e = np.exp((np.float64(a[v]) - top) * inv_t)
                s += e
                big = max(big, e)
    return s, big

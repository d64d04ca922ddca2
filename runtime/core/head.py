"""The vocabulary-sparse lm_head of a decode step (`run --head sparse`).

    a  = draft . x                     the 4-bit draft, every token              [V]   (linear_tiles)
    C  = the top_blocks blocks of 16 tokens by their largest a
    l  = head . x  for the tokens of C  exact, from the head's own tiles          (tile_blocks)
    l* = max l;  sigma = rms(l - a) over C: the draft's error at this step
    C += every block whose largest a reaches l* - margin * sigma, and the exact logits of those
    more than max_blocks blocks in C: the full head instead ("fallback")

Tokens outside C get logit -inf. Greedy then picks the full head's token whenever the true argmax
is in C: a token outside C would need a draft error beyond margin sigmas (docs/FORMAT.md has the
measured agreement). Sampling (temperature T > 0) must also account for the mass outside C: with
the same margin as a bound on each outside token's logit (a + margin sigma), the outside mass is
at most U = sum exp((a + margin sigma - l*) / T) over the outside tokens. The candidates alone
are used only when that cannot change the draw:
    top-p < 1: the nucleus cut among the candidates is the same whether the total mass is the
               candidates' own or theirs plus U, and the nucleus' smallest member is more likely
               than any outside token can be; the nucleus is then exactly the full head's;
    top-p = 1: U is at most OUTSIDE_MASS of the candidates' mass (the draw differs from the full
               head's with probability below that).
Otherwise the step reads the full head (a fallback, counted). A fallback costs the draft and the
whole head, so while fewer than draft / head (0.53) of the recent sampled steps certify, the
draft is read only on every PROBE-th step and the others go straight to the full head (WikiText-2
at temperature 0.7, top-p 0.9: 19 % of SmolLM2's steps certify; peaked chat answers more).
Perplexity and prefill of many rows never come here (Model._head_all).
"""

from __future__ import annotations

import time

import numpy as np

from edgesparse.errors import EdgesparseError
from edgesparse.headdraft import DRAFT_DTYPE, HeadDraft, draft_tiles
from edgesparse.tiles import TILE_BYTES

from .. import kernels as K
from .package import Package
from .state import zeros64

HEADS = ("full", "sparse")
OUTSIDE_MASS = 1e-4     # top-p = 1: the largest outside mass (relative) left out of a draw
PROBE = 8               # while sampled steps rarely certify, the draft is tried every PROBE-th step


def check_sparse(pkg: Package) -> None:
    """A sparse head needs the lm_head in int8 tiles: an int4 one reads no more than its draft, and
    float rows have no 16-row blocks to gather."""
    name = "embed" if pkg.config.tie_embeddings else "lm_head"
    dt = pkg.manifest.tensor(name).dtype
    if dt != "q8x16":
        why = "int4 already: a 4-bit draft would read as much" if dt == "q4x16" else "not in int8 tiles"
        raise EdgesparseError(f"--head sparse: {pkg.path}'s lm_head ({name!r}) is {dt} ({why}); export with "
                              "--dtype int8, or int4 with its default int8 head")


def load_draft(pkg: Package, head: np.ndarray) -> tuple[np.ndarray, HeadDraft, float]:
    """(draft tiles [ceil(V/16), E/32, 288], its settings, seconds spent deriving it: 0 when the
    package has one). A package exported without a draft gets one made here from the head's int8
    tiles, the same bytes the exporter would write (edgesparse/headdraft.py)."""
    check_sparse(pkg)
    spec = pkg.manifest.head_draft
    if spec is not None:
        return pkg.tensor(spec.tensor), spec, 0.0
    t0 = time.perf_counter()
    t = draft_tiles(head, pkg.config.vocab_size, 8)
    return t, HeadDraft(), time.perf_counter() - t0


class SparseHead:
    """Buffers allocated once; run() per decode step. head: the head's tiles [B, G, tile] (int8),
    draft [B, G, 288] (uint8), bias [V] or [0]."""

    def __init__(self, head: np.ndarray, draft: np.ndarray, bias: np.ndarray, spec: HeadDraft, vocab: int,
                 threads: int):
        B, G = head.shape[0], head.shape[1]
        if draft.shape[:2] != (B, G) or draft.dtype != np.uint8:
            raise EdgesparseError(f"head draft: expected {DRAFT_DTYPE} tiles of shape {[B, G, 288]}")
        self.head, self.draft, self.bias, self.spec, self.V = head, draft, bias, spec, vocab
        self.temperature, self.top_p = 0.0, 1.0
        self.a = zeros64((1, vocab))                       # [1, V] draft scores
        self.bmax = np.zeros(B, np.float32)                # [B] each block's largest score
        self.sel = np.zeros(spec.max_blocks, np.int64)     # candidate blocks
        self.topv = np.zeros(spec.top_blocks, np.float32)
        self.mark = np.zeros(B, np.uint8)                  # 1 for the blocks in sel (cleared after)
        self.scratch = zeros64((max(1, threads), 16))
        self.nobase = np.zeros((0, vocab), np.float32)
        self.draft_bytes = draft.nbytes
        self.block_bytes = G * TILE_BYTES[8]
        self.blocks = 0                                    # candidate blocks of the last step
        self.draft_read = 0                                # draft bytes the last step read (0: skipped)
        self.breakeven = draft.nbytes / head.nbytes         # certified share below which the draft costs more
        self.cert_rate, self.sampled = 1.0, 0              # recent share of certified sampled steps; their count
        self.adaptive = True                               # False: try the draft on every step (measurements)

    def set_sampling(self, temperature: float, top_p: float) -> None:
        self.temperature, self.top_p = float(temperature), float(top_p)

    def run(self, xf: np.ndarray, y: np.ndarray, xb, threads: int) -> int:
        """Logits of one row xf [1, E] into y [V] (-inf outside the candidates); returns the head
        bytes read, or 0 when the step needs the full head (y is then not usable)."""
        sp, V = self.spec, self.V
        self.draft_read = 0
        if self.temperature > 0.0:
            self.sampled += 1
            if self.adaptive and self.cert_rate < self.breakeven and self.sampled % PROBE:
                return 0
        self.draft_read = self.draft_bytes
        K.linear_tiles(self.draft, xf, self.bias, self.nobase, self.a, threads, xb, self.scratch)
        a = self.a[0]
        K.block_max(a, self.bmax)
        n = K.top_blocks(self.bmax, sp.top_blocks, self.sel, self.topv, self.mark)
        y[:] = -np.inf
        K.tile_blocks(self.head, self.sel, 0, n, xb, self.bias, y, threads, self.scratch)
        lstar, sigma = K.candidate_stats(y, a, self.sel, n)
        delta = sp.margin * sigma
        m = K.extend_blocks(self.bmax, np.float32(lstar - delta), self.sel, n, self.mark)
        ok = m <= sp.max_blocks
        if ok:
            K.tile_blocks(self.head, self.sel, n, m, xb, self.bias, y, threads, self.scratch)
            if self.temperature > 0.0:
                ok = self._certified(y, m, lstar, delta)
        if self.temperature > 0.0:
            self.cert_rate += (float(ok) - self.cert_rate) / PROBE     # a moving average over ~PROBE probes
        K.clear_marks(self.sel, m, self.mark)
        self.blocks = m if ok else 0
        return self.draft_bytes + m * self.block_bytes if ok else 0

    def _certified(self, y: np.ndarray, m: int, lstar: float, delta: float) -> bool:
        """Whether sampling from the candidates alone draws as the full head would (module docstring)."""
        inv_t = 1.0 / self.temperature
        u, umax = K.outside_mass(self.a[0], self.mark, lstar - delta, inv_t)
        rows = (self.sel[:m, None] * 16 + np.arange(16)).ravel()
        c = np.exp((y[rows[rows < self.V]].astype(np.float64) - lstar) * inv_t)
        c = -np.sort(-c)
        m_in = c.sum()
        if self.top_p >= 1.0:
            return u <= OUTSIDE_MASS * m_in
        cum = np.cumsum(c)
        k1 = int(np.searchsorted(cum, self.top_p * m_in))
        k2 = int(np.searchsorted(cum, self.top_p * (m_in + u)))
        return k1 == k2 and k2 < c.size and c[k2] > umax


def set_head(model, mode: str, temperature: float = 0.0, top_p: float = 1.0) -> float:
    """Give a Model's decode steps the full or the sparse lm_head (HEADS), sampling with
    temperature / top-p (the sparse head certifies its draws against them). Returns the seconds
    spent deriving a draft the package lacks (0 otherwise)."""
    if mode not in HEADS:
        raise EdgesparseError(f"--head: expected one of {', '.join(HEADS)}, got {mode!r}")
    took = 0.0
    if mode == "full":
        model.sparse_head = None
    elif model.sparse_head is None:
        draft, spec, took = load_draft(model.pkg, model.head)
        model.sparse_head = SparseHead(model.head, draft, model.head_bias, spec, model.cfg.vocab_size,
                                       model.s.partial.shape[0])
    if model.sparse_head is not None:
        model.sparse_head.set_sampling(temperature, top_p)
    return took

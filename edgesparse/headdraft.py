"""The lm_head's draft: a 4-bit copy of the head that picks the candidate tokens of a decode step
(`run --head sparse`), and the manifest entry that describes it (NumPy only).

Why a 4-bit copy. The candidate stage was chosen by measurement (docs/FORMAT.md#the-head-draft):
SmolLM2-135M's int8 head, 4096 WikiText-2 test positions, the rank of the true argmax's 16-row
block among the blocks ordered by the draft's largest score:

    draft                         MB     logit error rms   argmax block in the top 8 / 16 / 32
    4-bit copy (Q4_0, this one)   15.9   0.77              99.68 / 99.98 / 100 %
    2-bit copy                     8.8   3.7               45.7 / 55.7 / 65.1 %
    sign bits + group scale        5.3   5.7               35.3 / 45.0 / 55.5 %
    rank 64 / 128 / 256 (SVD)      3.3 / 6.7 / 13.4   2.4 / 2.3 / 2.1   <= 23 / 31 / 41 %

The head's rows share no low-rank structure that ranks tokens (the spectrum is flat), and a 2-bit
or sign copy errs by several logits; the 4-bit copy errs by less than one and costs half the int8
head. Plain Q4_0 scales (d = m / -8), not quant.py's search: the draft only ranks, the exact logits
come from the head itself, and plain Q4_0 takes seconds (0.8 s for SmolLM2's head, NumPy, one core),
so a device can derive it at load from a package exported without one.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from . import tiles
from .errors import PackageError

DRAFT_DTYPE = "q4x16"
DRAFT_TENSOR = "lm_head.draft"
DRAFT_FILE = "head_draft.bin"


@dataclass(frozen=True)
class HeadDraft:
    """The manifest's `head_draft` object: where the draft is and how candidates are chosen."""
    tensor: str = DRAFT_TENSOR   # a q4x16 tensor [vocab_size, embed_dim]: the draft's tiles
    top_blocks: int = 8          # blocks of 16 tokens taken by the draft's largest score
    margin: float = 4.0          # ... then every block whose draft score reaches l* - margin * sigma
    max_blocks: int = 256        # more candidate blocks than this: the full head instead

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, doc: object, where: str) -> "HeadDraft":
        if not isinstance(doc, dict):
            raise PackageError(f"{where}: head_draft must be an object")
        unknown = set(doc) - set(cls.__dataclass_fields__)
        if unknown:
            raise PackageError(f"{where}: head_draft has unknown keys {sorted(unknown)}")
        d = cls(**doc)
        if not isinstance(d.tensor, str):
            raise PackageError(f"{where}: head_draft.tensor must be a tensor name")
        for k in ("top_blocks", "max_blocks"):
            v = getattr(d, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise PackageError(f"{where}: head_draft.{k} must be a positive integer, got {v!r}")
        if d.top_blocks > d.max_blocks:
            raise PackageError(f"{where}: head_draft.top_blocks {d.top_blocks} exceeds max_blocks {d.max_blocks}")
        if isinstance(d.margin, bool) or not isinstance(d.margin, (int, float)) or not 0 <= d.margin < 1e6:
            raise PackageError(f"{where}: head_draft.margin must be a number >= 0, got {d.margin!r}")
        return d


def q4_0(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Plain Q4_0: w [n, D] float32 -> (q [n, D] int8 in -8..7, d [n, D/32] float16), d = m / -8
    for the group's value m of largest magnitude, q rounded against d as stored."""
    n, D = w.shape
    g = w.reshape(n, D // tiles.GROUP, tiles.GROUP)                          # [n, G, 32]
    m = np.take_along_axis(g, np.abs(g).argmax(-1)[..., None], -1)[..., 0]   # [n, G]
    d = (m / np.float32(-8.0)).astype(np.float16)
    df = d.astype(np.float32)[..., None]
    q = np.clip(np.rint(g / np.where(df != 0, df, 1)), -8, 7) * (df != 0)
    return q.astype(np.int8).reshape(n, D), d


def draft_tiles(head: np.ndarray, rows: int, bits: int, chunk: int = 8192) -> np.ndarray:
    """The draft of a tiled head (its bytes [ceil(V/16), D/32, tile], int4 or int8 by bits) or of
    a float32 head [V, D]: q4x16 tiles [ceil(V/16), D/32, 288] uint8, chunk rows at a time (a
    float copy of Qwen2.5's whole head would be 545 MB)."""
    out = []
    for r in range(0, rows, chunk):
        n = min(chunk, rows - r)
        if bits:
            w = tiles.dequantize_tiles(head[r // tiles.ROWS:(r + n + tiles.ROWS - 1) // tiles.ROWS].view(np.uint8), n, bits)
        else:
            w = np.asarray(head[r:r + n], np.float32)
        out.append(tiles.to_tiles(*q4_0(w), 4))
    return np.ascontiguousarray(np.concatenate(out))

"""Next-token choice: greedy at temperature 0, else temperature + nucleus (top-p) sampling."""

from __future__ import annotations

import numpy as np

from edgesparse.errors import EdgesparseError


class Sampler:
    def __init__(self, temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None):
        if not (temperature >= 0.0) or not np.isfinite(temperature):
            raise EdgesparseError(f"--temperature: expected a finite number >= 0, got {temperature}")
        if not (0.0 < top_p <= 1.0):
            raise EdgesparseError(f"--top-p: expected a number in (0, 1], got {top_p}")
        self.temperature, self.top_p = float(temperature), float(top_p)
        self.rng = np.random.default_rng(seed)

    def __call__(self, logits: np.ndarray) -> int:
        """logits [V] -> token id."""
        # -inf is a token ruled out (the sparse head's non-candidates, core/head.py); NaN or +inf
        # only comes from damaged weights
        if np.isnan(logits).any() or np.isposinf(logits).any():
            raise EdgesparseError("the model computed non-finite logits (NaN or inf): the package's weights are "
                                  "damaged; check it with `edgesparse verify`")
        if self.temperature == 0.0:
            return int(np.argmax(logits))
        z = logits.astype(np.float64) / self.temperature
        p = np.exp(z - z.max())
        p /= p.sum()
        if self.top_p < 1.0:
            order = np.argsort(-p)
            cum = np.cumsum(p[order])
            keep = order[: int(np.searchsorted(cum, self.top_p)) + 1]  # smallest set with mass >= top_p
            q = np.zeros_like(p)
            q[keep] = p[keep]
            p = q / q.sum()
        return int(self.rng.choice(p.size, p=p))

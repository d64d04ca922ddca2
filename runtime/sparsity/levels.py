"""The calibrated levels as data for the model: the per-layer thresholds a package's calibration
table holds for (method, target sparsity), and the predictor's candidate thresholds at the same
level. The model never reads the table itself: it gets plain arrays (Model.configure)."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

from edgesparse.errors import EdgesparseError

from ..kernels import MODE_CODES

LEVELS = tuple(round(0.1 * i, 1) for i in range(10))      # 0.0 .. 0.9


def thresholds_for(sparsity: dict, method: str, level: float) -> list[float]:
    """The calibrated per-layer thresholds for (method, target sparsity) from a manifest's table."""
    cal = sparsity.get("calibration")
    if not cal:
        raise EdgesparseError("this package is not calibrated: run `edgesparse calibrate PKG --text ...` first")
    if method not in cal["thresholds"]:
        raise EdgesparseError(f"method {method!r} was not calibrated (have {sorted(cal['thresholds'])})")
    levels = cal["levels"]
    for i, q in enumerate(levels):
        if abs(q - level) < 1e-9:
            return cal["thresholds"][method][i]
    raise EdgesparseError(f"sparsity {level}: not a calibrated level (calibrated: {levels})")


def settings(sparsity: dict, n_layers: int, ffn: str, level: float | None) -> dict:
    """Model.configure's keyword arguments for FFN mode `ffn` at a calibrated target sparsity of a
    manifest's `sparsity` (level 0: dense, no table needed; None: the package's active thresholds,
    nothing to hand over). predict takes the paper thresholds and the predictor's candidate
    thresholds at the same level."""
    if level is None:
        return {}
    zero = [0.0] * n_layers
    # "none" and "synthetic" packages apply their thresholds to |h|: the paper rule
    method = "paper" if ffn == "predict" else (sparsity["method"] if sparsity["method"] in MODE_CODES else "paper")
    out = {"thresholds": zero if level == 0 else thresholds_for(sparsity, method, level), "method": method}
    if ffn == "predict":
        out["t_pred"] = zero if level == 0 else thresholds_for(sparsity, "predicted", level)
    return out


def configure(model, ffn: str, level: float | None) -> None:
    """Put `model` in FFN mode `ffn` at a calibrated level of its package (None: the active one)."""
    model.configure(ffn, **settings(model.pkg.manifest.sparsity, model.cfg.n_layers, ffn, level))


# What the prompt runs as, by default, when a level is active: the prompt's FFN dense, generated
# tokens sparse. Decode is where sparsity saves time; the prompt is one batched pass, but a sparse
# prompt corrupts the KV cache every answer token reads. SmolLM2-135M float32, paper 0.5, the 115
# chat instructions (chat_eval.py): sparse prefill KLD 0.0368, same top-1 90.5 %, first token 85 %,
# greedy tokens 50 %; dense prefill 0.0259, 92.5 %, 100 %, 65 % (at 0.3: 0.0049 -> 0.0032). A
# probe of the prompt's position classes found the damage mostly at the system prompt and role
# tokens (their own predictions' KLD 0.13 and 0.06, the user's text 0.03): dense prefill covers
# them all, so no special-token rule is needed on top.
PREFILL_POLICIES = ("dense", "sparse")
DEFAULT_PREFILL = "dense"


def prefill_policy(sparsity: dict) -> str:
    """The package's prefill policy (calibrate records it), or the default."""
    p = sparsity.get("prefill", DEFAULT_PREFILL)
    if p not in PREFILL_POLICIES:
        raise EdgesparseError(f"manifest sparsity.prefill {p!r}: expected one of {', '.join(PREFILL_POLICIES)}")
    return p


@dataclass(frozen=True)
class Setting:
    """One configuration a quality measurement runs: FFN mode, criterion, calibrated level, and
    what a prompt runs as (prefill 'dense': the prompt's FFN dense and the generated tokens at the
    level; 'sparse': both at the level). Level 0 is the dense model whatever the rest says."""
    ffn: str = "threshold"      # threshold | predict
    method: str = "paper"       # paper | gate | input (predict applies the paper rule)
    level: float = 0.0
    prefill: str = "sparse"     # dense | sparse

    @property
    def dense(self) -> bool:
        return self.level == 0.0

    @property
    def short(self) -> str:
        """'dense', 'paper 0.5', 'predict 0.5', ...: without the prefill policy."""
        return "dense" if self.dense else f"{'predict' if self.ffn == 'predict' else self.method} {self.level:.1f}"

    @property
    def name(self) -> str:
        return self.short if self.dense else f"{self.short}, {self.prefill} prefill"


DENSE = Setting()


def apply(model, s: Setting, phase: str) -> None:
    """Configure `model` for the prompt ('prompt') or the generated tokens ('decode') of s."""
    if s.dense or (phase == "prompt" and s.prefill == "dense"):
        model.configure("dense")
        return
    sp = model.pkg.manifest.sparsity
    method = "paper" if s.ffn == "predict" else s.method
    t_pred = thresholds_for(sp, "predicted", s.level) if s.ffn == "predict" else None
    model.configure(s.ffn, thresholds_for(sp, method, s.level), method, t_pred)


@contextmanager
def kept(model):
    """Run a block that reconfigures `model`, then give it back its thresholds, method, FFN mode
    and candidate thresholds."""
    saved = model.thresholds.copy(), model.method, model.ffn_mode, model.t_pred.copy()
    try:
        yield model
    finally:
        model.set_thresholds(saved[0], saved[1])
        model.ffn_mode = saved[2]
        model.t_pred[:] = saved[3]

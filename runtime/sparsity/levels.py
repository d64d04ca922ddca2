"""The calibrated levels as data for the model: the per-layer thresholds a package's calibration
table holds for (method, target sparsity), and the predictor's candidate thresholds at the same
level. The model never reads the table itself: it gets plain arrays (Model.configure)."""

from __future__ import annotations

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

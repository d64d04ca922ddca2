"""Calibration and evaluation tests' references and fixtures (tests/test_calibration*.py):
transformers' NLL and FFN values, the synthetic calibration text and the package calibrated on it."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest

from edgesparse.cli import main
from edgesparse.runtime.sparsity.calibrate import BINS, LOG_HI, LOG_LO
from edgesparse.runtime.core.model import Model
from edgesparse.runtime.sparsity.textdata import token_windows

TEXT_WORDS = 3000
CAL_TOKENS = 2048
TINY_WINDOW = 256          # the CLI's window for the tiny package: min(512, max_position 256)
EVAL_KEYS = {"windows", "window_tokens", "predicted_tokens", "results", "text", "seconds", "threads", "kld"}
RESULT_KEYS = {"method", "target", "perplexity", "achieved_sparsity_mean", "achieved_sparsity_per_layer",
               "ffn_bytes_skippable"}
BIN_LOG10 = (LOG_HI - LOG_LO) / BINS           # width of one histogram bin in log10 units


# -- helpers -----------------------------------------------------------------------------------------
def run_ok(capsys, *args) -> tuple[str, str]:
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    assert rc == 0, err
    return out, err


def cli_error(capsys, argv, *needles) -> str:
    """A non-zero exit with exactly one line `edgesparse: error: ...` naming every needle."""
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert rc != 0, err
    assert "Traceback" not in out + err
    lines = err.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {lines}"
    assert lines[0].startswith("edgesparse: error: ")
    for n in needles:
        assert str(n) in lines[0], f"{n!r} not named in {lines[0]!r}"
    print(lines[0])
    return lines[0]


def tree_digest(d: Path) -> dict[str, str]:
    return {p.relative_to(d).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file()}


def text_ids(path: Path) -> list[int]:
    """The synthetic text's token ids: word wN is token N (WordLevel vocabulary, whitespace split)."""
    return [int(w[1:]) for w in path.read_text().split()]


def hf_nll(hf, window) -> np.ndarray:
    """Per-token cross-entropy of window[1:] from transformers' float32 logits, in float64."""
    import torch
    logits = hf(torch.tensor(np.asarray(window))[None]).logits[0].double()
    return torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(np.asarray(window[1:])),
                                             reduction="none").numpy()


def hf_ffn_values(hf, window) -> list[dict[str, np.ndarray]]:
    """Per layer, from transformers' own forward pass: the FFN input x [S, D] (float32, captured
    with a hook) and, from it in float64, a = act(gate.x) and h = a * (up.x) [S, N]."""
    import torch
    xs = []
    hooks = [layer.mlp.register_forward_hook(lambda mod, inp, out: xs.append(inp[0][0].detach().clone()))
             for layer in hf.model.layers]
    try:
        hf(torch.tensor(np.asarray(window))[None])
    finally:
        for hk in hooks:
            hk.remove()
    out = []
    for layer, x in zip(hf.model.layers, xs):
        mlp = layer.mlp
        x64 = x.double()
        g = x64 @ mlp.gate_proj.weight.double().T
        u = x64 @ mlp.up_proj.weight.double().T
        a = mlp.act_fn(g)
        out.append({"x": x.numpy(), "a": a.numpy(), "h": (a * u).numpy()})
    return out


def achieved(model: Model, windows) -> np.ndarray:
    """Per-layer fraction zeroed by the model's current thresholds over windows (each from pos 0)."""
    model.reset_counts()
    for w in windows:
        model.reset()
        model.forward(w)
    return 1.0 - model.counts[:, 0] / model.counts[:, 1]


# -- fixtures ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    rng = np.random.default_rng(2024)
    words = [f"w{i}" for i in rng.integers(3, 211, TEXT_WORDS)]
    p = tmp_path_factory.mktemp("text") / "cal.txt"
    p.write_text("\n".join(" ".join(words[i:i + 25]) for i in range(0, len(words), 25)) + "\n")
    return p


def calibrate_copy(src: Path, dst: Path, text: Path, *args) -> Path:
    shutil.copytree(src, dst)
    rc = main(["calibrate", str(dst), "--text", str(text), "--tokens", str(CAL_TOKENS), "-q", *map(str, args)])
    assert rc == 0
    return dst


@pytest.fixture(scope="module")
def calibrated_pkg(tiny_llama_pkg, text_file, tmp_path_factory) -> Path:
    """tiny_llama_pkg calibrated through the CLI (defaults: paper, 0.5). Read-only."""
    return calibrate_copy(tiny_llama_pkg, tmp_path_factory.mktemp("cal") / "pkg", text_file)


@pytest.fixture(scope="module")
def cal_windows(text_file) -> np.ndarray:
    """The windows the CLI calibrated on: the first 2048 tokens in windows of 256."""
    return token_windows(text_ids(text_file), TINY_WINDOW, CAL_TOKENS // TINY_WINDOW)

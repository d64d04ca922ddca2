"""Quality tests' references and fixtures (tests/test_quality*.py): KL divergence in plain NumPy,
and tiny packages with a chat template."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest

from edgesparse.format import read_manifest
from edgesparse.format_write import write_manifest_atomic

# A one-turn chat in the tiny WordLevel vocabulary: w1 (BOS) w3 CONTENT w4, then w5 to answer.
TEMPLATE = ("{{ bos_token }} w3{% for m in messages %} {{ m['content'] }} w4{% endfor %}"
            "{% if add_generation_prompt %} w5{% endif %}")


def numpy_kld(p_logits, q_logits, targets=None):
    """KL(softmax(p) || softmax(q)) per row, argmax equality and -log softmax(q)[target], in
    float64, written out the textbook way."""
    p64, q64 = np.asarray(p_logits, np.float64), np.asarray(q_logits, np.float64)
    lp = p64 - p64.max(1, keepdims=True)
    lp = lp - np.log(np.exp(lp).sum(1, keepdims=True))
    lq = q64 - q64.max(1, keepdims=True)
    lq = lq - np.log(np.exp(lq).sum(1, keepdims=True))
    kld = np.maximum(np.sum(np.exp(lp) * (lp - lq), axis=1), 0.0)
    nll = None if targets is None else -lq[np.arange(len(targets)), np.asarray(targets)]
    return kld, p64.argmax(1) == q64.argmax(1), nll


def with_template(src: Path, dst: Path, template: str = TEMPLATE) -> Path:
    """A copy of package src with a chat template."""
    shutil.copytree(src, dst)
    m = read_manifest(dst)
    write_manifest_atomic(dst, dataclasses.replace(m, chat_template=template))
    return dst


@pytest.fixture(scope="module")
def chat_pkg(calibrated_pkg, tmp_path_factory) -> Path:
    """The calibrated tiny package (paper, 0.5) with a chat template. Read-only."""
    return with_template(calibrated_pkg, tmp_path_factory.mktemp("chat") / "pkg")

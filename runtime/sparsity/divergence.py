"""How far a configuration's next-token distributions are from the dense model's: KL divergence
KL(P_dense || Q) per position, and whether the two agree on the most likely token, as llama.cpp's
perplexity tool reports quantization quality (`--kl-divergence`). Perplexity on Wikipedia text
hides what users feel: SmolLM2 at 30 % moved WikiText-2 perplexity by +0.4 % while its chat
answers turned to nonsense. The KLD of every position says how much each prediction moved.

On text (`text_kld`): every window runs once dense, then once per configuration and once per
yardstick package (the same model at another width), on the same windows and positions as eval's
perplexity (positions 0..S-2 of each window, each predicting the next token).
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from edgesparse.errors import EdgesparseError
from edgesparse.format import FFN_BLOCKS
from edgesparse.progress import Progress

from .levels import DENSE, Setting, apply, kept

ROWS = 64       # rows of [S, V] logits turned into float64 log-probabilities at a time


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """[S, V] float32 -> [S, V] float64 log-probabilities."""
    z = logits.astype(np.float64)
    z -= z.max(axis=1, keepdims=True)
    z -= np.log(np.exp(z).sum(axis=1, keepdims=True))
    return z


def kld_rows(p_logits: np.ndarray, q_logits: np.ndarray, targets: np.ndarray | None = None):
    """Per row of p_logits, q_logits [S, V]: (KL(P || Q) [S] float64, argmax equal [S] bool,
    -log Q(target) [S] float64 or None), P = softmax(p_logits) the reference."""
    if p_logits.shape != q_logits.shape:
        raise EdgesparseError(f"logits shapes differ: {p_logits.shape} vs {q_logits.shape} (not the same vocabulary?)")
    S = p_logits.shape[0]
    kld, same = np.empty(S, np.float64), np.empty(S, bool)
    nll = None if targets is None else np.empty(S, np.float64)
    for i in range(0, S, ROWS):
        lp, lq = log_softmax(p_logits[i:i + ROWS]), log_softmax(q_logits[i:i + ROWS])   # [r, V]
        # clip: rounding can leave a sum of ~ -1e-17 where P == Q
        kld[i:i + ROWS] = np.maximum((np.exp(lp) * (lp - lq)).sum(axis=1), 0.0)
        same[i:i + ROWS] = lp.argmax(axis=1) == lq.argmax(axis=1)
        if nll is not None:
            t = targets[i:i + ROWS]
            nll[i:i + ROWS] = -lq[np.arange(t.size), t]
    return kld, same, nll


def summary(kld: np.ndarray, same: np.ndarray) -> dict:
    """The figures a table shows of per-position KLD values and top-1 agreements."""
    if kld.size == 0:
        raise EdgesparseError("no positions to summarize")
    return {"positions": int(kld.size), "kld_mean": float(kld.mean()), "kld_median": float(np.median(kld)),
            "kld_p90": float(np.percentile(kld, 90)), "kld_p99": float(np.percentile(kld, 99)),
            "kld_max": float(kld.max()), "same_top1": float(same.mean())}


def check_yardstick(model, other, name: str) -> None:
    """A yardstick must be the same model at another width: the same config and tokenizer."""
    a, b = model.pkg.manifest, other.pkg.manifest
    ta, tb = a.files.get("tokenizer.json"), b.files.get("tokenizer.json")
    if a.config != b.config or (ta and tb and ta.sha256 != tb.sha256):
        raise EdgesparseError(f"--yardstick {name}: another model than {model.pkg.path} (its config or tokenizer "
                              "differ; expected the same model at another width)")


def text_kld(model, windows: np.ndarray, settings: list[Setting], yardsticks: dict | None = None,
             progress: bool = True) -> dict:
    """KLD from the dense model of every setting (all positions at its level: the prefill policy
    does not apply to teacher-forced text) and of every yardstick model {name: Model} (dense), on
    windows [n, S]. Returns {"windows", "positions", "results": [...]}, results in the order given,
    dense first, yardsticks last."""
    yardsticks = yardsticks or {}
    # the prefill policy is a matter of prompts: here every position runs at the level
    text = dict.fromkeys(replace(s, prefill="sparse") for s in settings if not s.dense)
    runs = [("setting", s) for s in [DENSE, *text]] + [("yardstick", n) for n in yardsticks]
    acc = [([], [], []) for _ in runs]                      # per run: kld, same, nll arrays per window
    bar = Progress(len(windows) * len(runs), "text KLD", progress)
    with kept(model):
        for w in windows:
            targets = w[1:]
            p = None
            for (kind, what), (k, s, n) in zip(runs, acc):
                m = yardsticks[what] if kind == "yardstick" else model
                if kind == "setting":
                    apply(model, what, "decode")
                else:
                    m.configure("dense")
                m.reset()
                q = m.forward(w, all_logits=True)[:-1]         # [S-1, V]: positions 0..S-2
                if p is None:
                    p = q                                       # the first run is the dense model
                kv, sv, nv = kld_rows(p, q, targets)
                k.append(kv)
                s.append(sv)
                n.append(nv)
                bar.update(note=getattr(what, "short", what))
    results = []
    for (kind, what), (k, s, n) in zip(runs, acc):
        r = summary(np.concatenate(k), np.concatenate(s))
        r["perplexity"] = math.exp(float(np.concatenate(n).mean()))
        if kind == "setting":
            r.update(setting_fields(what))
        else:
            r.update(yardstick_fields(what, yardsticks[what]))
        results.append(r)
    return {"windows": int(len(windows)), "window_tokens": int(windows.shape[1]),
            "positions": int(len(windows) * (windows.shape[1] - 1)), "results": results}


def setting_fields(s: Setting, text: bool = True) -> dict:
    return {"name": s.short if text else s.name, "ffn": "dense" if s.dense else s.ffn, "method": "dense" if s.dense else
            ("paper" if s.ffn == "predict" else s.method), "target": s.level, "prefill": None if s.dense else s.prefill}


def yardstick_fields(name: str, m) -> dict:
    dtype = width(m.pkg.manifest.tensor(m.pkg.manifest.layers[0].ffn).dtype)
    return {"name": f"{dtype} dense ({name})", "ffn": "dense", "method": "yardstick", "target": 0.0,
            "prefill": None, "yardstick": name, "dtype": dtype}


def width(dtype: str) -> str:
    """A weight width as export --dtype names it: an int4 / int8 FFN is stored as tiles (q4ffn, q8ffn)."""
    return f"int{FFN_BLOCKS[dtype]}" if dtype in FFN_BLOCKS else dtype


def _f(v: float) -> str:
    """A KLD for a table: 4 decimals, or 2 significant digits below 0.001 (small models, float16)."""
    return f"{v:.4f}" if v == 0 or v >= 1e-3 else f"{v:.1e}"


def table(res: dict, title: str) -> str:
    """Markdown: one row per configuration."""
    lines = [title, "", "| configuration | perplexity | KLD mean | median | p99 | max | same top-1 |",
             "|---|---|---|---|---|---|---|"]
    for r in res["results"]:
        lines.append(f"| {r['name']} | {r['perplexity']:.2f} | {_f(r['kld_mean'])} | {_f(r['kld_median'])} | "
                     f"{_f(r['kld_p99'])} | {_f(r['kld_max'])} | {100 * r['same_top1']:.1f}% |")
    return "\n".join(lines)

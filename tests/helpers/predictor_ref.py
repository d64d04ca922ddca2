"""The activation predictor's test references (tests/test_predictor_*.py): the float64 NumPy
references of the kernels and of a whole tiny Llama with the predict rule, tolerances, CLI helpers
and the calibrated package they share."""

from __future__ import annotations

import hashlib
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from edgesparse.cli import main
from edgesparse.runtime import kernels as K
from edgesparse.runtime.sparsity import predictor as P
from edgesparse.runtime.core.model import Model
from edgesparse.runtime.core.package import Package

EPS32 = float(np.finfo(np.float32).eps)   # 2**-23
ACTS = ["silu", "gelu_tanh", "gelu", "relu"]
DTYPES = ["float32", "float16"]
CHUNKS = [1, 2, 3]
ACT_SLOPE = 1.2                           # max |act'(g)| over the reals is 1.13 (gelu)
LOGIT_TOL = 2e-5                          # tests/test_tiny_llama.py: float32 lm_head dot product of length 96
TEXT_WORDS = 3000
CAL_TOKENS = 1024
TINY_WINDOW = 256                         # the CLI calibrates the tiny package in windows of min(512, 256)
PROMPT = ["-p", "w5 w6 w7 w8"]

_erf = np.vectorize(math.erf, otypes=[np.float64])

QMAX = 127                                # int8, symmetric: |q| <= 127, never -128

def rule(h, t):
    """The kernels' keep rule: |h| >= t, and never an exact zero (ReLU's natural zeros)."""
    return (h != 0) & (np.abs(h) >= t)


def nob(w):
    """"no input biases" for the FFN kernels: shape [0, R-1]."""
    return np.zeros((0, w.shape[1] - 1), np.float32)


def nos(w):
    """"no row scales" (float weights) for the FFN kernels: shape [0, R]."""
    return np.zeros((0, w.shape[1]), np.float32)


# -- helpers -----------------------------------------------------------------------------------------
def act_ref(name: str, g) -> np.ndarray:
    g = np.asarray(g, np.float64)
    if name == "silu":
        with np.errstate(over="ignore"):
            return g / (1.0 + np.exp(-g))
    if name == "gelu_tanh":
        return 0.5 * g * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (g + 0.044715 * g ** 3)))
    if name == "gelu":
        return 0.5 * g * (1.0 + _erf(g / math.sqrt(2.0)))
    if name == "relu":
        return np.maximum(g, 0.0)
    raise ValueError(name)


def act_err(a, g):
    return 8 * EPS32 * (np.abs(a) + np.abs(g)) + 1e-30


def report(what: str, diff: np.ndarray, tol: np.ndarray) -> None:
    ratio = float(np.max(diff / tol)) if diff.size else 0.0
    print(f"{what}: max|diff| {float(np.max(diff, initial=0.0)):.3g}, max diff/tol {ratio:.3g}")


def assert_within(what: str, got, ref, tol) -> None:
    diff = np.abs(np.asarray(got, np.float64) - ref)
    report(what, diff, tol)
    bad = np.flatnonzero(~(diff <= tol))
    assert bad.size == 0, f"{what}: {bad.size} elements out of tolerance, e.g. index {bad[:5]}: " \
                          f"got {np.ravel(got)[bad[:5]]}, ref {np.ravel(ref)[bad[:5]]}, tol {np.ravel(tol)[bad[:5]]}"


def exact_dequant(pq: np.ndarray, ps: np.ndarray) -> np.ndarray:
    """q * scale in float64 (exact: an int8 times a float32), [N, 2, D]."""
    return pq.astype(np.float64) * ps.astype(np.float64)[..., None]


class GLU:
    """act(a . x) * (b . x) in float64 for rows a, b [N, D] and one token x [D], with a bound on a
    float32 evaluation that accumulates in float32 (module docstring)."""

    def __init__(self, a: np.ndarray, b: np.ndarray, x: np.ndarray, act: str):
        D = x.shape[0]
        x = x.astype(np.float64)
        self.g, self.u = a @ x, b @ x
        self.a = act_ref(act, self.g)
        self.h = self.a * self.u
        err_g = D * EPS32 * (np.abs(a) @ np.abs(x))
        err_u = D * EPS32 * (np.abs(b) @ np.abs(x))
        self.err = 2 * (np.abs(self.u) * (ACT_SLOPE * err_g + act_err(self.a, self.g))
                        + np.abs(self.a) * err_u + EPS32 * np.abs(self.h)) + 1e-30


def out_ref(w: np.ndarray, base: np.ndarray, h: np.ndarray, err_h: np.ndarray, keep: np.ndarray, C: int):
    """base + sum over kept neurons of h_i down_i, and its bound: per-chunk float32 sums of up to
    N terms, then C + 1 more additions onto base (tests/test_kernels.py FFNRef.out)."""
    hk = np.where(keep, h, 0.0)
    down = w[:, 2]
    ref = base.astype(np.float64) + hk @ down
    n = w.shape[0] + C + 1
    mag = np.abs(base) + np.abs(hk) @ np.abs(down)
    tol = 2 * (n * EPS32 * mag + np.where(keep, err_h, 0.0) @ np.abs(down)) + 1e-30
    return ref, tol


def make_case(seed: int, N: int, D: int, S: int, dtype: str, predictor: str = "own"):
    """(w handed to the kernel, w exact float64, pq, ps, X [S, D], base [S, D]). The predictor is
    quantized from the same weights ("own", as calibrate builds it) or from unrelated ones
    ("other": then the candidate set has nothing to do with |h| and only the quantized rows decide)."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((N, 3, D)) / math.sqrt(D)).astype(np.float32)
    if dtype == "float16":
        w16 = w.astype(np.float16)
        warg, exact, src = w16.view(np.uint16), w16.astype(np.float64), w16
    else:
        warg, exact, src = w, w.astype(np.float64), w
    if predictor == "other":
        src = (rng.standard_normal((N, 3, D)) / math.sqrt(D)).astype(np.float32)
    pq, ps = P.quantize(src)
    for a in (warg, pq, ps):
        a.setflags(write=False)          # read-only, like the package's mmaps
    X = (rng.standard_normal((S, D)) * 2.0).astype(np.float32)
    base = rng.standard_normal((S, D)).astype(np.float32)
    return warg, exact, pq, ps, X, base


def _scratch(C: int, N: int) -> tuple:
    """The kernels' trailing scratch: kept [C], cand [C] and the per-thread candidate lists
    order [C, >=N] int32; all filled with garbage that must not matter."""
    return np.full(C, -7, np.int64), np.full(C, -7, np.int64), np.full((C, N + 3), -5, np.int32)


def run_batch(w, pq, ps, X, base, t_pred, thr, act, C, out=None):
    N, S, D = w.shape[0], X.shape[0], X.shape[1]
    out = np.full((S, D), np.nan, np.float32) if out is None else out
    h = np.full((S, N), np.nan, np.float32)
    partial = np.full((C, S + 2, D), np.nan, np.float32)   # garbage scratch, and partial [C, >=S, D]
    k, c = K.ffn_predict_batch(w, nos(w), nob(w), pq, ps, X, base, np.float32(t_pred), np.float32(thr), K.ACT_CODES[act],
                               out, h, partial, *_scratch(C, N))
    return out, h, int(k), int(c)


def run_one(w, pq, ps, x, base, t_pred, thr, act, C):
    N, D = w.shape[0], x.shape[0]
    out = np.full(D, np.nan, np.float32)
    h = np.full(N, np.nan, np.float32)
    partial = np.full((C, D), np.nan, np.float32)
    k, c = K.ffn_predict(w, nos(w), nob(w), pq, ps, x, base, np.float32(t_pred), np.float32(thr), K.ACT_CODES[act],
                         out, h, partial, *_scratch(C, N))
    return out, h, int(k), int(c)


def gap_threshold(values: np.ndarray, lo_q: float, hi_q: float) -> tuple[float, float]:
    """A float32 threshold in the widest gap between consecutive sorted values in the lo_q..hi_q
    quantile window, and its distance to the nearest value (so no value sits within rounding)."""
    s = np.sort(np.ravel(values))
    lo, hi = int(lo_q * (s.size - 1)), int(hi_q * (s.size - 1))
    i = lo + int(np.argmax(np.diff(s[lo:hi + 1])))
    t = float(np.float32((s[i] + s[i + 1]) / 2))
    return t, float(min(t - s[i], s[i + 1] - t))


# == 3. the tiny model ===============================================================================
class LlamaRef:
    """A whole Llama forward pass in float64 NumPy (copied from tests/test_tiny_llama.py), with the
    predict rule: neuron i of layer l is a candidate iff |act(gate^.f) * (up^.f)| >= t_pred[l]
    (gate^, up^ the quantized rows, exact), and a candidate contributes iff |h| >= t[l]."""

    def __init__(self, hf):
        c = hf.config
        d = lambda t: t.detach().double().numpy()  # noqa: E731
        self.H, self.Hkv = c.num_attention_heads, c.num_key_value_heads
        self.hd = c.hidden_size // self.H
        self.eps = c.rms_norm_eps
        self.embed = d(hf.model.embed_tokens.weight)
        self.head = d(hf.lm_head.weight)
        self.norm = d(hf.model.norm.weight)
        self.layers = []
        for layer in hf.model.layers:
            a, m = layer.self_attn, layer.mlp
            self.layers.append(dict(
                w_in=d(layer.input_layernorm.weight), w_post=d(layer.post_attention_layernorm.weight),
                q=d(a.q_proj.weight), k=d(a.k_proj.weight), v=d(a.v_proj.weight), o=d(a.o_proj.weight),
                gate=d(m.gate_proj.weight), up=d(m.up_proj.weight), down=d(m.down_proj.weight)))
        self.inv_freq = 1.0 / (c.rope_theta ** (np.arange(0, self.hd, 2) / self.hd))

    def rms(self, x, w):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + self.eps) * w

    def rope(self, x, pos):
        f = np.outer(pos, self.inv_freq)
        f = np.concatenate([f, f], -1)[:, None, :]
        half = x.shape[-1] // 2
        rot = np.concatenate([-x[..., half:], x[..., :half]], -1)
        return x * np.cos(f) + rot * np.sin(f)

    def forward(self, ids, thresholds, pred=None, t_pred=None):
        """-> (logits [S, V], per layer: f [S, D], h [S, N] exact, h^ [S, N] predicted or None).
        pred: per layer [N, 2, D] float64 quantized rows, or None for the plain threshold rule."""
        ids = np.asarray(ids)
        S, H, Hkv, hd = len(ids), self.H, self.Hkv, self.hd
        pos = np.arange(S)
        causal = np.triu(np.full((S, S), -np.inf), 1)
        x = self.embed[ids]
        fs, hs, hps = [], [], []
        for l, Pw in enumerate(self.layers):
            xn = self.rms(x, Pw["w_in"])
            q = self.rope((xn @ Pw["q"].T).reshape(S, H, hd), pos)
            k = self.rope((xn @ Pw["k"].T).reshape(S, Hkv, hd), pos)
            v = (xn @ Pw["v"].T).reshape(S, Hkv, hd)
            att = np.empty((S, H, hd))
            for h in range(H):
                kv = h // (H // Hkv)
                s = q[:, h] @ k[:, kv].T / math.sqrt(hd) + causal
                p = np.exp(s - s.max(-1, keepdims=True))
                att[:, h] = (p / p.sum(-1, keepdims=True)) @ v[:, kv]
            x = x + att.reshape(S, H * hd) @ Pw["o"].T
            f = self.rms(x, Pw["w_post"])
            hh = act_ref("silu", f @ Pw["gate"].T) * (f @ Pw["up"].T)
            keep = np.abs(hh) >= thresholds[l]
            hp = None
            if pred is not None:
                hp = act_ref("silu", f @ pred[l][:, 0].T) * (f @ pred[l][:, 1].T)
                keep &= np.abs(hp) >= t_pred[l]
            fs.append(f)
            hs.append(hh)
            hps.append(hp)
            x = x + np.where(keep, hh, 0.0) @ Pw["down"].T
        return self.rms(x, self.norm) @ self.head.T, fs, hs, hps


def assert_logits(what, got, ref, tol=LOGIT_TOL):
    diff = float(np.abs(np.asarray(got, np.float64) - ref).max())
    print(f"{what}: max|logit diff| {diff:.3g} (tol {tol:g})")
    assert np.shape(got) == np.shape(ref)
    assert diff <= tol, f"{what}: max|logit diff| {diff} > {tol}"


def decode_logits(rt: Model, ids, n_prefill: int) -> np.ndarray:
    rt.reset()
    out = [rt.forward(ids[:n_prefill]).copy()]
    for t in ids[n_prefill:]:
        out.append(rt.forward([int(t)]).copy())
    return np.array(out)


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


def pred_dirs(pkg: Path) -> list[str]:
    return sorted(p.name for p in pkg.iterdir() if p.name.lstrip(".").startswith("pred-"))


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    """Random words w3..w210 of the tiny WordLevel vocabulary: one token each."""
    rng = np.random.default_rng(2024)
    words = [f"w{i}" for i in rng.integers(3, 211, TEXT_WORDS)]
    p = tmp_path_factory.mktemp("text") / "cal.txt"
    p.write_text("\n".join(" ".join(words[i:i + 25]) for i in range(0, len(words), 25)) + "\n")
    return p


@pytest.fixture(scope="module")
def pred_pkg(tiny_llama_pkg, text_file, tmp_path_factory) -> Path:
    """tiny_llama_pkg calibrated with --predictor through the CLI (paper, 0.5). Read-only."""
    dst = tmp_path_factory.mktemp("pred") / "pkg"
    shutil.copytree(tiny_llama_pkg, dst)
    assert main(["calibrate", str(dst), "--text", str(text_file), "--tokens", str(CAL_TOKENS), "--predictor",
                 "-q"]) == 0
    return dst


@pytest.fixture(scope="module")
def ref(tiny_hf):
    return LlamaRef(tiny_hf)


def pred_rows(pkg) -> list[np.ndarray]:
    return [exact_dequant(pq, ps) for pq, ps in P.load(pkg if isinstance(pkg, Package) else Package(pkg))]

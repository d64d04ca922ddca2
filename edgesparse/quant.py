"""Quantized storage: how int8 and int4 weights are encoded, and back (NumPy only; the Numba
kernels in runtime/kernels/ read the same encodings without widening).

int8   symmetric; rows whose length is a multiple of 32 in groups of 32 with one float16 scale
       each, as llama.cpp's Q8_0:
           q [..., D] int8, |q| <= 127;  scale [..., D/32] float16 = max|w| / 127 per group
       other rows with one float32 scale per row (the last axis):
           q [..., D] int8;  scale [...] float32 = max|w| / 127;  w ~ q * scale
       The scale tensor's shape says which (readers check it; kernels dispatch on its dtype).
int4   groups of 32 along the row, one float16 scale per group, llama.cpp's Q4_0 encoding:
           packed [..., D/2] uint8;  scale [..., D/32] float16;  w ~ (nibble - 8) * scale
       Byte j (0..15) of group g holds element 32g + j in its low nibble and 32g + 16 + j in its
       high nibble, so a kernel unpacks 16 bytes into two runs of 16 consecutive values that meet
       16 consecutive x's each (vectorizes; an interleaved even/odd layout would need a shuffle).
       The scale: Q4_0 sets d = m / -8 for the element m of largest magnitude (its sign kept),
       so m maps to -8 and the 16 levels span [-8d, 7d] on the side where the extreme lies. Here
       that is the first of a few candidates: levels are rounded against m / c for c in
       [-9, -6] and, for each, d is the least-squares scale of those levels (sum w q / sum q q);
       the candidate with the smallest squared error wins (llama.cpp's make_qx_quants search).
       Pinning the extreme wastes resolution on one outlier per group; on SmolLM2-135M, WikiText-2
       test 16 x 1024 tokens, the search takes int4 gate/up/down/attention from 29.53 to 28.55
       perplexity (float32 22.75, llama.cpp Q4_0 28.68). Given an importance per input channel
       (export --calibrate TEXT: export/imatrix.py), the error is weighted as llama.cpp weighs it
       with an importance matrix: 26.45 dense, 27.43 at 50 % sparsity (30.02 without).
       Same bytes and decoder: 4.5 bits per weight, like Q4_0.

The manifest names the scale tensor NAME.scale; the logical shape of an int4 tensor is the
unpacked [..., D] (docs/FORMAT.md).

Activations: rows stored in groups of 32 are multiplied with their input rounded to int8 per block
of 32, as llama.cpp multiplies Q4_0 / Q8_0 weights (runtime/kernels/grouped.py says why):
    dx = max|x in block| / 127,  r = 1 / dx  (float32);  qx = rint(x * r) (int8; 0 where dx = 0);  x ~ qx * dx
(llama.cpp's quantize_row_q8_0 multiplies by the reciprocal too). round_activations is that rounding
in NumPy, for the BLAS paths and the tests; the kernels' quantize_activations performs the same
float32 operations. A multiply, not a division: a compiler allowed to turn x / dx into x * (1 / dx)
(fast-math "arcp", which Numba passes down to a function first compiled from a fastmath caller)
would round a value sitting on .5 to the other side, and the kernel and the BLAS path would
disagree on that input.
"""

from __future__ import annotations

import numpy as np

GROUP = 32   # int4 values per scale


def quantize_rows(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """int8: a [..., D] -> (q [..., D] int8, s [...] float32), q = round(w / s), s = max|w| / 127.
    An all-zero row gets scale 0 and q = 0."""
    a = np.asarray(a, np.float32)
    s = np.abs(a).max(axis=-1) / 127.0
    safe = np.where(s > 0, s, 1.0)
    q = np.clip(np.rint(a / safe[..., None]), -127, 127).astype(np.int8)
    return q, s.astype(np.float32)


def quantize_int8_groups(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """int8 in groups of 32: a [..., D] (D a multiple of 32) -> (q [..., D] int8, scale [..., D/32]
    float16), d = max|w| / 127 per group, q = round(w / d) against d as stored in float16."""
    a = np.asarray(a, np.float32)
    D = a.shape[-1]
    if D % GROUP:
        raise ValueError(f"int8 groups need a row length that is a multiple of {GROUP}, got {D}")
    g = a.reshape(*a.shape[:-1], D // GROUP, GROUP)                          # [..., G, 32]
    d = (np.abs(g).max(axis=-1) / 127.0).astype(np.float16)
    df = d.astype(np.float32)
    safe = np.where(df > 0, df, 1.0)[..., None]
    q = np.clip(np.rint(g / safe), -127, 127).astype(np.int8)
    return np.ascontiguousarray(q.reshape(a.shape)), np.ascontiguousarray(d)


def quantize(a: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """Export's encoder: int8 rows in groups of 32 when they divide (else one scale per row),
    int4 in groups of 32. Returns (stored array, scales)."""
    if dtype == "int4":
        return quantize_int4(a)
    if dtype == "int8":
        return quantize_int8_groups(a) if a.shape[-1] % GROUP == 0 else quantize_rows(a)
    raise ValueError(f"not a quantized dtype: {dtype!r}")


def quantize_int4(a: np.ndarray, importance: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """int4: a [..., D] (D a multiple of 32) -> (packed [..., D/2] uint8, scale [..., D/32] float16),
    the scale per group chosen by the squared-error search above. Nibbles are rounded against the
    float16 scale as stored, so dequantizing gives back exactly the values the error was measured
    on. An all-zero group gets scale 0 (every nibble 8).

    importance: None, or the mean square of each input channel on calibration text, broadcastable
    to a ([D] for a matrix; [R, D] for neuron-major blocks [N, R, D], ones on a row whose groups run
    along outputs). Then the error of element j weighs imp_j * sqrt(sigma2 + w_j^2), sigma2 the
    row's mean w^2: llama.cpp's Q4_0 weighting with an importance matrix (quantize_row_q4_0_impl),
    since a weight's error reaches the output scaled by its input, sum_j e_j x_j."""
    a = np.asarray(a, np.float32)
    D = a.shape[-1]
    if D % GROUP:
        raise ValueError(f"int4 rows need a length that is a multiple of {GROUP}, got {D}")
    lead = a.shape[:-1]
    g = a.reshape(-1, GROUP)                                                 # [groups, 32]
    wt = None
    if importance is not None:
        imp = np.broadcast_to(np.asarray(importance, np.float32), a.shape)
        sigma2 = (a * a).mean(axis=-1, keepdims=True)                        # [..., 1]
        wt = (imp * np.sqrt(sigma2 + a * a)).reshape(-1, GROUP)             # [groups, 32]
    q = np.empty(g.shape, np.uint8)
    d = np.empty(g.shape[0], np.float16)
    step = 1 << 16        # groups per block: the search's temporaries stay a few MB
    for i in range(0, g.shape[0], step):
        q[i:i + step], d[i:i + step] = _int4_groups(g[i:i + step], None if wt is None else wt[i:i + step])
    packed = q[:, :16] | (q[:, 16:] << 4)                                    # [groups, 16]
    return (np.ascontiguousarray(packed.reshape(*lead, D // 2)),
            np.ascontiguousarray(d.reshape(*lead, D // GROUP)))


# the grids searched after plain Q4_0: levels rounded against m / c, c in [-9, -6] by 0.1
_INT4_GRIDS = np.round(np.linspace(-9.0, -6.0, 31), 1)


def _int4_groups(g: np.ndarray, wt: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """g [n, 32] float32 -> (nibbles [n, 32] uint8, d [n] float16): plain Q4_0 (d = m / -8), replaced
    per group by a candidate with a smaller error sum wt (g - (nibble - 8) d)^2 (wt [n, 32] >= 0,
    or None: all ones). A group whose weights are all zero is judged unweighted."""
    if wt is None:
        wt = np.ones_like(g)
    else:
        wt = np.where((wt > 0).any(axis=-1, keepdims=True), wt, 1.0).astype(np.float32)
    idx = np.abs(g).argmax(axis=-1)[:, None]
    m = np.take_along_axis(g, idx, axis=-1)[:, 0]                            # [n] signed extreme
    m_safe = np.where(m != 0, m, 1.0).astype(np.float32)
    best_d = (m / -8.0).astype(np.float16)
    best_q, best_err = _int4_round(g, best_d, wt)
    for c in _INT4_GRIDS:
        lv = np.clip(np.rint(g * (np.float32(c) / m_safe)[:, None]), -8, 7)  # levels on this grid
        qq, wq = (wt * lv * lv).sum(-1), (wt * g * lv).sum(-1)
        d = np.where(qq > 0, wq / np.where(qq > 0, qq, 1), 0).astype(np.float16)   # least squares
        q, err = _int4_round(g, d, wt)
        better = (err < best_err) & (d != 0)
        best_err = np.where(better, err, best_err)
        best_d = np.where(better, d, best_d)
        best_q = np.where(better[:, None], q, best_q)
    return best_q, best_d


def _int4_round(g: np.ndarray, d: np.ndarray, wt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nibbles of g [n, 32] against the stored float16 scales d [n] (d = 0: all 8) and the weighted
    squared error [n] of what they decode to."""
    df = d.astype(np.float32)
    lv = np.where(df[:, None] != 0, np.clip(np.rint(g / np.where(df != 0, df, 1)[:, None]), -8, 7), 0)
    return (lv + 8).astype(np.uint8), (wt * (g - lv * df[:, None]) ** 2).sum(-1)


def round_activations(x: np.ndarray) -> np.ndarray:
    """x [..., D] float32 (D a multiple of 32) -> the float32 values qx * dx the grouped kernels
    multiply with (see the module docstring)."""
    x = np.asarray(x, np.float32)
    g = x.reshape(*x.shape[:-1], x.shape[-1] // GROUP, GROUP)              # [..., G, 32]
    d = np.abs(g).max(axis=-1, keepdims=True) / np.float32(127.0)          # float32, as the kernel
    r = np.float32(1.0) / np.where(d > 0, d, np.float32(1.0))
    q = np.where(d > 0, np.rint(g * r), np.float32(0.0))
    return (q * d).reshape(x.shape).astype(np.float32)


def int4_values(packed: np.ndarray) -> np.ndarray:
    """packed [..., D/2] uint8 (the Q4_0 nibble order above) -> the values [..., D] int8, -8..7."""
    b = np.asarray(packed).reshape(*packed.shape[:-1], packed.shape[-1] // 16, 16)
    q = np.concatenate([b & 15, b >> 4], axis=-1).astype(np.int8) - 8          # [..., G, 32]
    return q.reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def dequantize_int4(packed: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """packed [..., D/2] uint8, scale [..., D/32] float16 (or its uint16 bits) -> [..., D] float32."""
    scale = np.asarray(scale)
    if scale.dtype == np.uint16:
        scale = scale.view(np.float16)
    G = scale.shape[-1]
    b = np.asarray(packed).reshape(*packed.shape[:-1], G, 16)
    q = np.concatenate([b & 15, b >> 4], axis=-1).astype(np.float32) - 8.0   # [..., G, 32]
    return (q * scale.astype(np.float32)[..., None]).reshape(*packed.shape[:-1], G * GROUP)


def dequantize(w: np.ndarray, scale: np.ndarray | None) -> np.ndarray:
    """The float32 values a stored weight array stands for: float16 (or its uint16 bits) widened,
    int8 times its row or group scales, int4 (uint8 packed) times its group scales; float32 as is."""
    if w.dtype == np.uint8:
        return dequantize_int4(w, scale)
    if w.dtype == np.int8:
        scale = np.asarray(scale)
        if scale.ndim == w.ndim:                                              # groups of 32
            sc = (scale.view(np.float16) if scale.dtype == np.uint16 else scale).astype(np.float32)
            g = w.reshape(*w.shape[:-1], sc.shape[-1], GROUP).astype(np.float32) * sc[..., None]
            return g.reshape(w.shape)
        return w.astype(np.float32) * scale[..., None]
    if w.dtype == np.uint16:
        return w.view(np.float16).astype(np.float32)
    if w.dtype == np.float16:
        return w.astype(np.float32)
    return w

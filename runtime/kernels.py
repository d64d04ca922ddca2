"""Numba kernels. Plain arrays and scalars in, results written into caller-owned buffers.

Conventions: x is the FFN input of one token [D]; the FFN weights are neuron-major
w [N, R, D] (gated, R = 3: row 0 = gate, row 1 = up, row 2 = the neuron's column of down), so one
neuron's vectors are contiguous (3·D·4 bytes = 6.9 KB for SmolLM2) and a skipped neuron costs no
read at all. int8 weights (--dtype int8) come with float16 scales (uint16 bits) per group of 32
along the row (Q8_0), ws [N, R, D/32] for the FFN ([O, D/32] for a projection, [V, D/32] for an
embedding), or, for rows that are not whole groups, one float32 scale per row, ws [N, R] ([O],
[V]); shape [0, ...] for float weights. A dot product with grouped rows is sum over groups of
dw * dx * sum(q_k qx_k), x rounded to int8 per block of 32 (see "grouped rows meet int8
activations"); with per-row int8 scales, sum(q_k x_k) * scale; a down column adds (h * scale) * q_k. Plain MLPs (OPT, Phi-2) have R = 2: fc1 row in the gate's place, fc2 column, and
h = act(fc1.x + b), i.e. a gated FFN whose up is 1. bias b [N, R-1] holds each neuron's input
biases (shape [0, R-1] when the model has none). A neuron with h == 0 exactly (ReLU's natural
zeros) never reads its down column, whatever the threshold: skipping it changes nothing. float16 weights arrive as their uint16 bit patterns (Numba has no CPU float16)
and are widened to float32 as they are loaded (_h2f: LLVM half -> float, vcvtph2ps / fcvt);
int4 weights (--dtype int4, edgesparse/quant.py) arrive as their packed bytes, uint8 [..., D/2],
with float16 group scales (uint16 bits) [..., D/32] in place of the row scales: ws [N, R, D/32]
for the FFN, [O, D/32] for a projection or embedding. Accumulation is always float32.
The dtype decides the code at compile time: _dot, _dot2, _add_down, _rows4 and _gather_row are
overloaded per weight dtype, so each dtype gets its own specialization of every kernel.

fastmath: lets LLVM reorder the dot-product sums into SIMD lanes; the order differs from
NumPy's, which is why tests compare with a tolerance rather than bitwise.
"""

from __future__ import annotations

import math
import platform

import numba
import numpy as np
from llvmlite import binding as llvm_binding
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

# activation codes (ModelConfig.activation)
ACT_CODES = {"silu": 0, "gelu_tanh": 1, "gelu": 2, "relu": 3}
# What the threshold applies to. paper (arXiv 2412.12178): the neuron output |h|, h = act(gate.x)*(up.x);
# gate (CATS): |act(gate.x)|, so a zeroed neuron's up row is not read either; input (TEAL): the
# FFN input |x_k| -- the model masks x itself and calls the kernels with the paper rule at t = 0.
MODE_CODES = {"paper": 0, "gate": 1, "input": 2}


@njit(inline="always", fastmath=True)
def _act(code, g):
    if code == 0:
        return g / (np.float32(1.0) + math.exp(-g))
    if code == 1:
        return np.float32(0.5) * g * (np.float32(1.0) + math.tanh(
            np.float32(0.7978845608028654) * (g + np.float32(0.044715) * g * g * g)))
    if code == 2:
        return np.float32(0.5) * g * (np.float32(1.0) + math.erf(g * np.float32(0.7071067811865476)))
    return max(g, np.float32(0.0))


@intrinsic
def _h2f(typingctx, v):
    """float16 bit pattern (uint16) -> float32 through LLVM's `half` type: one vcvtph2ps (F16C,
    AVX-512) or fcvt (AArch64) per vector, exact for every value. Numba has no float16 type, so
    the package's float16 weights reach the kernels as uint16 and are widened here, on load."""
    if not (isinstance(v, types.Integer) and v.bitwidth == 16):
        return None

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())
    return types.float32(v), codegen


def _ld1(a, k):
    """a[k] as float32, for float32 weights, float16 bits or int8 (unscaled)."""


@overload(_ld1, inline="always")
def _ld1_impl(a, k):
    if isinstance(a.dtype, types.Integer) and a.dtype.bitwidth == 16:
        return lambda a, k: _h2f(a[k])
    if isinstance(a.dtype, types.Integer):
        return lambda a, k: np.float32(a[k])
    return lambda a, k: a[k]


def _q4(a) -> bool:
    """True for int4 weights: packed nibbles arrive as uint8 (int8 is signed, float16 is uint16)."""
    return isinstance(a.dtype, types.Integer) and a.dtype.bitwidth == 8 and not a.dtype.signed


def _q8(a) -> bool:
    """True for int8 weights."""
    return isinstance(a.dtype, types.Integer) and a.dtype.bitwidth == 8 and a.dtype.signed


def _f16(a) -> bool:
    """True for float16 weights (their uint16 bits)."""
    return isinstance(a.dtype, types.Integer) and a.dtype.bitwidth == 16


def _grouped(ws) -> bool:
    """Scales in groups of 32 (float16 bits) rather than one float32 per row."""
    return isinstance(ws, types.Array) and ws.dtype == types.uint16


# -- quantized and float16 rows: hand-built LLVM vector IR ---------------------------------------
# Written in Numba, the per-group loop is either unrolled by LLVM and vectorized across groups with
# gathers (constant 16), or vectorized with a 64-wide main loop that a 16-byte group never enters
# (runtime 16): 9.5 and 5.4 ms for SmolLM2's 30 layers of int4 gate and up rows on 2 threads. The
# IR below says what is meant: one <16 x i8> load per group, nibbles widened in one vector each, a
# <16 x float> accumulator across groups, one horizontal sum per row: 1.9 ms (13.7 GB/s of packed
# rows). Generic LLVM vectors: AVX-512 takes <16 x float> whole; AArch64 splits it into four NEON
# registers (devices/qemu-arm64/check runs these kernels' tests under qemu).
_V = 16
_f32, _i32, _i8, _i16 = ir.FloatType(), ir.IntType(32), ir.IntType(8), ir.IntType(16)
_vf, _vi, _vb = ir.VectorType(_f32, _V), ir.VectorType(_i32, _V), ir.VectorType(_i8, _V)
_FAST = ("fast",)


def _splat(builder, val):
    undef = ir.Constant(_vf, ir.Undefined)
    v = builder.insert_element(undef, val, ir.Constant(_i32, 0))
    return builder.shuffle_vector(v, undef, ir.Constant(ir.VectorType(_i32, _V), [0] * _V))


def _nibbles(builder, p8):
    """The 16 bytes at p8 -> (low nibbles - 8, high nibbles - 8) as two <16 x float>."""
    w = builder.zext(builder.load(builder.bitcast(p8, _vb.as_pointer()), align=1), _vi)
    eight = ir.Constant(_vi, [8] * _V)
    lo = builder.sub(builder.and_(w, ir.Constant(_vi, [15] * _V)), eight)
    hi = builder.sub(builder.lshr(w, ir.Constant(_vi, [4] * _V)), eight)
    return builder.sitofp(lo, _vf), builder.sitofp(hi, _vf)


def _group_scale(builder, psc, g):
    """float16 scale g (its bits at psc[g]) as float."""
    return builder.fpext(builder.bitcast(builder.load(builder.gep(psc, [g])), ir.HalfType()), _f32)


def _vec_at(builder, p, i):
    return builder.bitcast(builder.gep(p, [i]), _vf.as_pointer())


# Software prefetch, _PREFETCH bytes ahead of the row being read, for rows narrower than float32.
# At one float per 4 bytes the hardware prefetchers keep one core fed (SmolLM2's float32 FFN
# streams ~11 GB/s on one core here, with or without it); float16, int8 and int4 rows carry 2-8x
# more work per cache line, the core falls behind the stream, and the lines arrive late. Measured on
# SmolLM2's 30 FFN layers, same process alternating, 1 / 2 threads: float16 20.1 -> 14.0 / 8.5 ->
# 6.0 ms, int8 in groups 7.0 -> 4.7 / 3.5 -> 2.8 ms, int4 4.5 -> 4.2 / 3.1 -> 3.0 ms; float32
# unchanged or worse (it also pulls in the down columns a threshold skips). Neuron-major blocks are
# 0.9-3.5 KB, so 4 KB ahead is the next neuron or two; a prefetch never faults, even past the end.
_PREFETCH = 4096


def _prefetch(builder, p, offset):
    """Hint the cache line `offset` bytes past pointer p (llvm.prefetch: read, keep in all levels)."""
    i8p = _i8.as_pointer()
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [i8p, _i32, _i32, _i32]),
                                        "llvm.prefetch.p0")
    target = builder.gep(builder.bitcast(p, i8p), [offset])
    builder.call(fn, [target, ir.Constant(_i32, 0), ir.Constant(_i32, 3), ir.Constant(_i32, 1)])


@intrinsic
def _prefetch_line(typingctx, arr, offset):
    """Hint the cache line `offset` bytes past the start of a C-contiguous array's data."""
    def codegen(context, builder, sig, args):
        a = context.make_array(sig.args[0])(context, builder, args[0])
        _prefetch(builder, a.data, args[1])
        return context.get_dummy_value()
    return types.void(arr, types.intp), codegen


def _hsum(builder, v):
    """The sum of a <16 x float>'s lanes: halves added pairwise (16 -> 8 -> 4 -> 2 -> 1)."""
    n = _V
    while n > 1:
        n //= 2
        a = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_i32, n), list(range(n))))
        b = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_i32, n), list(range(n, 2 * n))))
        v = builder.fadd(a, b, flags=_FAST)
    return builder.extract_element(v, ir.Constant(_i32, 0))


def _c_array(a, dtypes, ndim: int = 1) -> bool:
    """A C-contiguous Numba array type of one of dtypes: the IR intrinsics index raw data pointers."""
    return isinstance(a, types.Array) and a.ndim == ndim and a.layout == "C" and a.dtype in dtypes


def _grouped_packing(row, sc, *floats):
    """For rows in groups of 32 with float16 scales: True for int4 (packed uint8), False for int8,
    None when the types do not fit. C-contiguous only: the IR indexes raw data pointers (every
    caller passes rows of C arrays)."""
    if not (_c_array(row, (types.uint8, types.int8)) and _c_array(sc, (types.uint16,))
            and all(_c_array(f, (types.float32,)) for f in floats)):
        return None
    return row.dtype == types.uint8


def _group_values(builder, data, g, packed: bool):
    """Group g's 32 values, unscaled, as two <16 x float> (values 32g .. 32g+15 and 32g+16 ..
    32g+31): int4, the 16 bytes at data + 16g (low nibbles, then high); int8, the 32 at data + 32g."""
    p8 = builder.bitcast(data, _i8.as_pointer())
    if packed:
        return _nibbles(builder, builder.gep(p8, [builder.mul(g, ir.Constant(g.type, 16))]))
    o = builder.mul(g, ir.Constant(g.type, 32))
    return tuple(builder.sitofp(builder.load(builder.bitcast(builder.gep(p8, [builder.add(o, ir.Constant(g.type, h))]),
                                                             _vb.as_pointer()), align=1), _vf) for h in (0, 16))


@intrinsic
def _axpy_g(typingctx, acc, h, row, sc):
    """acc [D] += h * one row in groups of 32 (int4 packed [D/2] uint8, Q4_0, or int8 [D], Q8_0;
    float16 scales sc [D/32]); h float32."""
    packed = _grouped_packing(row, sc, acc)
    if packed is None or h != types.float32:
        return None

    def codegen(context, builder, sig, args):
        aa, ra, sa = (context.make_array(t)(context, builder, a) for t, a in
                      zip((sig.args[0], sig.args[2], sig.args[3]), (args[0], args[2], args[3])))
        G = builder.extract_value(sa.shape, 0)
        psc = builder.bitcast(sa.data, _i16.as_pointer())
        with cgutils.for_range(builder, G) as loop:
            g = loop.index
            lo, hi = _group_values(builder, ra.data, g, packed)
            hs = _splat(builder, builder.fmul(args[1], _group_scale(builder, psc, g), flags=_FAST))
            xo = builder.mul(g, ir.Constant(g.type, 32))
            for half, q in ((0, lo), (16, hi)):
                p = _vec_at(builder, aa.data, builder.add(xo, ir.Constant(g.type, half)))
                builder.store(builder.fadd(builder.load(p, align=4), builder.fmul(hs, q, flags=_FAST), flags=_FAST),
                              p, align=4)
        return context.get_dummy_value()
    return types.void(acc, h, row, sc), codegen


# -- grouped rows meet int8 activations -----------------------------------------------------------
# Rows in groups of 32 (int4, and int8 as Q8_0) are multiplied with the input rounded to int8 per
# block of 32, as llama.cpp multiplies Q4_0 / Q8_0 weights with Q8_0 activations:
#     x_k ~ qx_k * dx_g,  dx_g = max|x in block g| / 127,  qx_k = rint(x_k / dx_g)  (int8)
#     w.x ~ sum_g dw_g * dx_g * sum_{k in g} qw_k * qx_k       (the inner sum exact, in integers)
# The point is the inner sum: with AVX-512 VNNI, vpdpbusd multiplies 64 byte pairs and adds them
# four at a time into 16 int32 lanes in one instruction, where a float32 path spends about two
# dozen vector instructions on the same 64 weights (unpack, widen, convert, multiply, scale per
# group). That matters where instructions, not bytes, set the pace: int4 rows (a 135M model fits
# this machine's L3). SmolLM2 int4 decode at 2 threads, same process, alternating: 11.77 ms per
# token with the float path, 10.24 ms with this one; int8 rows, twice the bytes, 14.58 vs 14.46 ms
# (reading them is the limit). ONNX Runtime's MatMulNBits does the same at accuracy_level 4
# (devices/bench_matmulnbits.py). Rounding the input costs ~1% relative error per projection
# output; on WikiText-2 llama.cpp's Q8_0 (weights and activations rounded) is within 0.5% of
# float16 perplexity. The down projection (a sum of columns scaled by h) keeps float h.
# Without VNNI (ARM, older x86, NUMBA_CPU_NAME set for portable builds) the same integer products
# are formed in float32 (exact: |sum| <= 32 * 127 * 127 < 2^24), so every machine computes the
# same values up to the order of the float additions.
#
# The prepared input of a step, built once per kernel call by _xbuf: xq [S, D] int8, xd8 [S, D/4]
# float32 = dx_g repeated 8 times, xs8 [S, D/4] int32 = sum_{k in g} qx_k repeated 8 times (8
# copies: vpdpbusd leaves block g's sum spread over 8 int32 lanes; the copies line up with them).
# The dots take (X, xp, s): the step's arrays and the token's index; no per-neuron views or
# tuples of the rows, whose reference counting would sit in the innermost loop.
def _host_vnni() -> bool:
    """Whether Numba's code may use AVX-512 VNNI: an x86 host that has it, unless NUMBA_CPU_NAME
    names another CPU (a portable cache) or NUMBA_CPU_FEATURES leaves it out."""
    need = ("avx512f", "avx512bw", "avx512vnni")
    if numba.config.CPU_NAME not in (None, "host") or platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    if numba.config.CPU_FEATURES is not None:
        on = {f.strip()[1:] for f in numba.config.CPU_FEATURES.split(",") if f.strip().startswith("+")}
        return all(k in on for k in need)
    f = llvm_binding.get_host_cpu_features()
    return all(f.get(k, False) for k in need)


_VNNI = _host_vnni()
_v = ir.VectorType


def _prepared(xp) -> bool:
    """xp is the (xq, xd8, xs8) of _xbuf (grouped rows), not None."""
    return isinstance(xp, types.BaseTuple)


def _group_int_dot(builder, ra, packed, px, g):
    """Group g's sum_k qw_k * qx_k (int4: nibble - 8) as a <16 x float> of partial sums, formed in
    float32 (exact)."""
    lo, hi = _group_values(builder, ra.data, g, packed)
    xo = builder.mul(g, ir.Constant(g.type, 32))
    q0, q1 = (builder.sitofp(builder.load(builder.bitcast(builder.gep(px, [builder.add(xo, ir.Constant(g.type, h))]),
                                                          _vb.as_pointer()), align=1), _vf) for h in (0, 16))
    return builder.fadd(builder.fmul(lo, q0, flags=_FAST), builder.fmul(hi, q1, flags=_FAST), flags=_FAST)


def _vnni_pair(builder, ra, packed, px, pc, p):
    """Groups 2p and 2p+1 through one vpdpbusd: <16 x i32>, lanes 0-7 summing to group 2p's
    sum_k qw_k * qx_k, lanes 8-15 to group 2p+1's. vpdpbusd takes unsigned bytes times signed
    bytes, so the weights go in offset to unsigned (int4: the nibble itself, = value + 8; int8:
    value + 128) and the accumulator starts at minus the offset times each lane's share of
    sum qx (xs8 / 8 per lane: 1x for int4, 16x for int8), which makes the lanes exact."""
    i8, i32 = ir.IntType(8), ir.IntType(32)
    c = builder.load(builder.bitcast(builder.gep(pc, [builder.mul(p, ir.Constant(p.type, 16))]), _v(i32, 16).as_pointer()),
                     align=4)
    p8 = builder.bitcast(ra.data, i8.as_pointer())
    if packed:
        b = builder.load(builder.bitcast(builder.gep(p8, [builder.mul(p, ir.Constant(p.type, 32))]), _v(i8, 32).as_pointer()),
                         align=1)
        lo = builder.and_(b, ir.Constant(_v(i8, 32), [15] * 32))
        hi = builder.lshr(b, ir.Constant(_v(i8, 32), [4] * 32))
        # element order of the two groups: [lo 0-15, hi 0-15, lo 16-31, hi 16-31]
        w = builder.shuffle_vector(lo, hi, ir.Constant(_v(i32, 64), list(range(16)) + list(range(32, 48))
                                                       + list(range(16, 32)) + list(range(48, 64))))
        init = builder.neg(c)
    else:
        b = builder.load(builder.bitcast(builder.gep(p8, [builder.mul(p, ir.Constant(p.type, 64))]), _v(i8, 64).as_pointer()),
                         align=1)
        w = builder.xor(b, ir.Constant(_v(i8, 64), [-128] * 64))
        init = builder.neg(builder.shl(c, ir.Constant(_v(i32, 16), [4] * 16)))
    x = builder.load(builder.bitcast(builder.gep(px, [builder.mul(p, ir.Constant(p.type, 64))]), _v(i8, 64).as_pointer()),
                     align=1)
    v16 = _v(i32, 16)
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v16, [v16] * 3), "llvm.x86.avx512.vpdpbusd.512")
    return builder.call(fn, [init, builder.bitcast(w, v16), builder.bitcast(x, v16)])


@intrinsic
def _dot_gq(typingctx, row, sc, xq, xd8, xs8, s):
    """sum_k w_k x_k for one row in groups of 32 (int4 packed [D/2] uint8 or int8 [D], float16
    scales sc [D/32]) and token s of an input prepared as above (xq [S, >=D] int8, xd8 and xs8
    [S, >=D/4])."""
    packed = _grouped_packing(row, sc)
    if packed is None or not (_c_array(xq, (types.int8,), 2) and _c_array(xd8, (types.float32,), 2)
                              and _c_array(xs8, (types.int32,), 2) and isinstance(s, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        ra, sa, qa, da, ca = (context.make_array(t)(context, builder, a) for t, a in zip(sig.args[:5], args[:5]))
        G = builder.extract_value(sa.shape, 0)
        psc = builder.bitcast(sa.data, _i16.as_pointer())
        srow = context.cast(builder, args[5], sig.args[5], types.intp)

        def row_of(arr, t):      # token s's row of a C-contiguous [S, ·] array
            stride = builder.extract_value(arr.strides, 0)
            p8 = builder.gep(builder.bitcast(arr.data, _i8.as_pointer()), [builder.mul(srow, stride)])
            return builder.bitcast(p8, t.as_pointer())
        px = row_of(qa, _i8)
        pd = row_of(da, _f32)
        acc = cgutils.alloca_once_value(builder, ir.Constant(_vf, [0.0] * _V))
        one = ir.Constant(G.type, 1)
        start = ir.Constant(G.type, 0)
        if _VNNI:
            pc = row_of(ca, _i32)
            with cgutils.for_range(builder, builder.lshr(G, one)) as loop:
                p = loop.index
                step = ir.Constant(p.type, 32 if packed else 64)       # weight bytes per pair of groups
                _prefetch(builder, ra.data, builder.add(builder.mul(p, step), ir.Constant(p.type, _PREFETCH)))
                s = builder.sitofp(_vnni_pair(builder, ra, packed, px, pc, p), _vf)
                dx = builder.load(_vec_at(builder, pd, builder.mul(p, ir.Constant(p.type, 16))), align=4)
                dw2 = builder.load(builder.bitcast(builder.gep(psc, [builder.shl(p, one)]),
                                                   _v(_i16, 2).as_pointer()), align=2)
                dw = builder.fpext(builder.bitcast(dw2, _v(ir.HalfType(), 2)), _v(_f32, 2))
                dw16 = builder.shuffle_vector(dw, dw, ir.Constant(_v(_i32, 16), [0] * 8 + [1] * 8))
                d = builder.fmul(dw16, dx, flags=_FAST)
                builder.store(builder.fadd(builder.load(acc), builder.fmul(s, d, flags=_FAST), flags=_FAST), acc)
            start = builder.shl(builder.lshr(G, one), one)      # an odd last group goes below
        with cgutils.for_range(builder, builder.sub(G, start)) as loop:
            g = builder.add(loop.index, start)
            s = _group_int_dot(builder, ra, packed, px, g)
            dx = builder.load(builder.gep(pd, [builder.shl(g, ir.Constant(g.type, 3))]))
            d = _splat(builder, builder.fmul(_group_scale(builder, psc, g), dx, flags=_FAST))
            builder.store(builder.fadd(builder.load(acc), builder.fmul(s, d, flags=_FAST), flags=_FAST), acc)
        return _hsum(builder, builder.load(acc))
    return types.float32(row, sc, xq, xd8, xs8, s), codegen


@njit(cache=True, error_model="numpy")   # no fastmath: the same float32 operations as quant.round_activations
def quantize_activations(X, xq, xd8, xs8):
    """X [S, D] float32 (D a multiple of 32) -> xq [S, >=D] int8, xd8 and xs8 [S, >=D/4] (see above)."""
    S, D = X.shape
    for s in range(S):
        for g in range(D // 32):
            m = np.float32(0.0)
            for k in range(32 * g, 32 * g + 32):
                m = max(m, abs(X[s, k]))
            d = m / np.float32(127.0)
            tot = 0
            for k in range(32 * g, 32 * g + 32):
                q = np.int8(np.rint(X[s, k] / d)) if d > 0 else np.int8(0)
                xq[s, k] = q
                tot += q
            for j in range(8 * g, 8 * g + 8):
                xd8[s, j] = d
                xs8[s, j] = tot


def _xbuf(ws, X, xb):
    """The input X [S, D] prepared for weights with scales ws: for grouped rows, quantized into the
    caller's buffers xb = (xq, xd8, xs8) (or fresh ones when xb is None); otherwise nothing."""


@overload(_xbuf)
def _xbuf_impl(ws, X, xb):
    if not _grouped(ws):
        return lambda ws, X, xb: None
    if isinstance(xb, (types.NoneType, types.Omitted)):
        def fresh(ws, X, xb):
            S, D = X.shape
            b = (np.empty((S, D), np.int8), np.empty((S, D // 4), np.float32), np.empty((S, D // 4), np.int32))
            quantize_activations(X, b[0], b[1], b[2])
            return b
        return fresh

    def given(ws, X, xb):
        quantize_activations(X, xb[0], xb[1], xb[2])
        return xb
    return given


# int8 and float16 rows the same way: sitofp straight from <16 x i8>, fpext from <16 x half>.
# Plain Numba vectorizes these loops 8 wide with a 4x interleave; in 16-lane chunks the int8 gate
# and up rows of SmolLM2's 30 layers take 7-25% less time (noisy machine; same-run A/B).
_ELEM = {types.int8: _i8, types.uint16: _i16}    # int8 weights; float16 weights as their bits


def _w_typed(row, *floats) -> bool:
    return _c_array(row, tuple(_ELEM)) and all(_c_array(f, (types.float32,)) for f in floats)


def _widen_ir(builder, q, signed_int: bool, vt):
    """int8 -> float (sitofp), or float16 bits -> float (bitcast to half, fpext); q scalar or vector."""
    if signed_int:
        return builder.sitofp(q, vt)
    half = ir.VectorType(ir.HalfType(), vt.count) if isinstance(vt, ir.VectorType) else ir.HalfType()
    return builder.fpext(builder.bitcast(q, half), vt)


def _len_split(builder, n):
    """(full 16-lane chunks, index where the scalar tail starts) of a length n."""
    chunks = builder.udiv(n, ir.Constant(n.type, _V))
    return chunks, builder.mul(chunks, ir.Constant(n.type, _V))


@intrinsic
def _dot_w(typingctx, row, x):
    """sum_k w_k x_k, unscaled, for one int8 or float16-bits row w [D] and x [D] float32: 16-lane
    chunks, then a scalar tail (these rows have any length)."""
    if not _w_typed(row, x):
        return None
    el, signed = _ELEM[row.dtype], row.dtype == types.int8

    def codegen(context, builder, sig, args):
        ra, xa = (context.make_array(t)(context, builder, a) for t, a in zip(sig.args, args))
        n = builder.extract_value(ra.shape, 0)
        chunks, tail = _len_split(builder, n)
        acc = cgutils.alloca_once_value(builder, ir.Constant(_vf, [0.0] * _V))
        with cgutils.for_range(builder, chunks) as loop:
            o = builder.mul(loop.index, ir.Constant(n.type, _V))
            _prefetch(builder, ra.data, builder.add(builder.mul(o, ir.Constant(n.type, el.width // 8)),
                                                    ir.Constant(n.type, _PREFETCH)))
            q = builder.load(builder.bitcast(builder.gep(ra.data, [o]), ir.VectorType(el, _V).as_pointer()), align=1)
            xv = builder.load(_vec_at(builder, xa.data, o), align=4)
            builder.store(builder.fadd(builder.load(acc), builder.fmul(_widen_ir(builder, q, signed, _vf), xv,
                                                                       flags=_FAST), flags=_FAST), acc)
        s = cgutils.alloca_once_value(builder, _hsum(builder, builder.load(acc)))
        with cgutils.for_range_slice(builder, tail, n, ir.Constant(n.type, 1)) as (k, _):
            t = builder.fmul(_widen_ir(builder, builder.load(builder.gep(ra.data, [k])), signed, _f32),
                             builder.load(builder.gep(xa.data, [k])), flags=_FAST)
            builder.store(builder.fadd(builder.load(s), t, flags=_FAST), s)
        return builder.load(s)
    return types.float32(row, x), codegen


@intrinsic
def _axpy_w(typingctx, acc, h, row):
    """acc [D] += h * w for one int8 or float16-bits row w [D] (h float32, an int8 row's scale
    folded in by the caller)."""
    if not (_w_typed(row, acc) and h == types.float32):
        return None
    el, signed = _ELEM[row.dtype], row.dtype == types.int8

    def codegen(context, builder, sig, args):
        aa = context.make_array(sig.args[0])(context, builder, args[0])
        ra = context.make_array(sig.args[2])(context, builder, args[2])
        n = builder.extract_value(ra.shape, 0)
        chunks, tail = _len_split(builder, n)
        hv = _splat(builder, args[1])
        with cgutils.for_range(builder, chunks) as loop:
            o = builder.mul(loop.index, ir.Constant(n.type, _V))
            q = builder.load(builder.bitcast(builder.gep(ra.data, [o]), ir.VectorType(el, _V).as_pointer()), align=1)
            p = _vec_at(builder, aa.data, o)
            builder.store(builder.fadd(builder.load(p, align=4),
                                       builder.fmul(hv, _widen_ir(builder, q, signed, _vf), flags=_FAST),
                                       flags=_FAST), p, align=4)
        with cgutils.for_range_slice(builder, tail, n, ir.Constant(n.type, 1)) as (k, _):
            p = builder.gep(aa.data, [k])
            t = builder.fmul(args[1], _widen_ir(builder, builder.load(builder.gep(ra.data, [k])), signed, _f32),
                             flags=_FAST)
            builder.store(builder.fadd(builder.load(p), t, flags=_FAST), p)
        return context.get_dummy_value()
    return types.void(acc, h, row), codegen


@njit(inline="always", fastmath=True)
def _dot_rows(wi, r, x):
    """sum_k wi[r, k] x_k for float32 rows (int8, float16 and int4 rows take the vector IR)."""
    a = np.float32(0.0)
    for k in range(x.shape[0]):
        a += wi[r, k] * x[k]
    return a


def _dot(wi, ws, i, r, X, xp, s):
    """Row r of neuron i's block wi [R, ·] dotted with token s's input X[s] [D] (grouped rows: its
    int8 rounding xp), scaled: the float32 value of gate.x (r = 0) or up.x (r = 1). ws: the FFN's
    scales ([N, R] int8 rows, [N, R, G] groups, [0, R] float)."""


@overload(_dot)
def _dot_impl(wi, ws, i, r, X, xp, s):
    if _prepared(xp):           # int4, or int8 in groups of 32, with int8 activations
        return lambda wi, ws, i, r, X, xp, s: _dot_gq(wi[r], ws[i, r], xp[0], xp[1], xp[2], s)
    if _q8(wi):
        return lambda wi, ws, i, r, X, xp, s: _dot_w(wi[r], X[s]) * ws[i, r]
    if _f16(wi):
        return lambda wi, ws, i, r, X, xp, s: _dot_w(wi[r], X[s])

    return lambda wi, ws, i, r, X, xp, s: _dot_rows(wi, r, X[s])      # float32: no scales


def _dot2(wi, ws, i, X, xp, s):
    """(gate.x, up.x) of neuron i for token s, scaled (arguments as _dot)."""


@njit(inline="always", fastmath=True)
def _dot2_rows(wi, x):
    # One pass for both dot products: two independent accumulator chains over the same x loads.
    g = np.float32(0.0)
    u = np.float32(0.0)
    for k in range(x.shape[0]):
        g += wi[0, k] * x[k]
        u += wi[1, k] * x[k]
    return g, u


@overload(_dot2)
def _dot2_impl(wi, ws, i, X, xp, s):
    # the intrinsics called directly, not through _dot: an overload call per row costs 4-10 % of a
    # dense int4 / int8 FFN layer (same-run A/B)
    if _prepared(xp):           # int4, or int8 in groups of 32, with int8 activations
        return lambda wi, ws, i, X, xp, s: (_dot_gq(wi[0], ws[i, 0], xp[0], xp[1], xp[2], s),
                                            _dot_gq(wi[1], ws[i, 1], xp[0], xp[1], xp[2], s))
    if _q8(wi):
        return lambda wi, ws, i, X, xp, s: (_dot_w(wi[0], X[s]) * ws[i, 0], _dot_w(wi[1], X[s]) * ws[i, 1])
    if _f16(wi):
        return lambda wi, ws, i, X, xp, s: (_dot_w(wi[0], X[s]), _dot_w(wi[1], X[s]))
    return lambda wi, ws, i, X, xp, s: _dot2_rows(wi, X[s])        # float32: one fused pass, no scales


@njit(inline="always", fastmath=True)
def _neuron_h(wi, ws, b, i, X, xp, s, act, thr, mode):
    """(h, keep) for neuron i with rows wi [R, D], scales ws ([N, R] int8 rows, [N, R, G] groups,
    [0, R] float), input biases b [N, R-1] (or [0, ·]) and token s's input x = X[s] (xp: its int8
    rounding for grouped rows, see _xbuf):
    h = act(gate.x) * (up.x) (R = 3) or act(fc1.x) (R = 2), and whether it survives the
    threshold. Decode and small-batch prefill both call this, so for the same input they compute
    the same h and zero the same neurons. In gate mode a neuron whose |act(gate.x)| is below t
    never reads its up row (h is reported as 0)."""
    gated = wi.shape[0] == 3
    if mode == 1 or not gated:
        g = _dot(wi, ws, i, 0, X, xp, s)
        if b.shape[0] > 0:
            g += b[i, 0]
        a = _act(act, g)
        if not gated:
            return a, a != 0.0 and abs(a) >= thr
        if not abs(a) >= thr:
            return np.float32(0.0), False
        u = _dot(wi, ws, i, 1, X, xp, s)
        if b.shape[0] > 0:
            u += b[i, 1]
        h = a * u
        return h, h != 0.0
    g, u = _dot2(wi, ws, i, X, xp, s)
    if b.shape[0] > 0:
        g += b[i, 0]
        u += b[i, 1]
    h = _act(act, g) * u
    return h, h != 0.0 and abs(h) >= thr


def _add_down(acc, s, wi, ws, i, h):
    """acc[s] += h * neuron i's down column wi[R-1] [D]; an int8 column's scale is folded into h,
    an int4 column's group scales into h group by group."""


@njit(inline="always", fastmath=True)
def _add_down_rows(acc, s, wi, h):
    """acc[s] += h * the float32 down column wi[R-1]."""
    R = wi.shape[0]
    for k in range(acc.shape[1]):
        acc[s, k] += h * wi[R - 1, k]


@overload(_add_down)
def _add_down_impl(acc, s, wi, ws, i, h):
    if _grouped(ws):            # int4, or int8 in groups of 32
        return lambda acc, s, wi, ws, i, h: _axpy_g(acc[s], h, wi[wi.shape[0] - 1], ws[i, wi.shape[0] - 1])
    if _q8(wi):
        return lambda acc, s, wi, ws, i, h: _axpy_w(acc[s], h * ws[i, wi.shape[0] - 1], wi[wi.shape[0] - 1])
    if _f16(wi):
        return lambda acc, s, wi, ws, i, h: _axpy_w(acc[s], h, wi[wi.shape[0] - 1])

    def f(acc, s, wi, ws, i, h):
        _add_down_rows(acc, s, wi, h)
    return f


_BLOCK = 16


@njit(inline="always")
def _kept(h, thr, mode, gated):
    """Whether a neuron with output h survives, as _neuron_h decided it: in gate mode a gated FFN's
    dropped neurons already report h = 0; otherwise (paper rule, and plain MLPs, whose h is the
    activation itself in every mode) |h| >= thr. h == 0 never reads its down column."""
    return h != 0.0 and ((mode == 1 and gated) or abs(h) >= thr)


@njit(inline="always")
def _sum_partials(partial, base, out, s):
    """out[s] = base[s] + the per-thread partial sums partial[:, s] (C of them, in order)."""
    for k in range(out.shape[1]):
        v = base[s, k]
        for c in range(partial.shape[0]):
            v += partial[c, s, k]
        out[s, k] = v


@njit(fastmath=True, cache=True)
def ffn_glu(w, ws, b, x, base, thr, act, out, h_out, partial, kept, mode=0, xb=None):
    """Thresholded FFN for one token: out = base + FFN_t(x).

    w:       [N, R, D] float32 (or uint16 float16 bits, or int8; int4: [N, R, D/2] uint8)
             neuron-major weights (mmap'd)
    ws:      [N, R] float32 row scales of int8 weights, [N, R, D/32] float16 bits of int4 ones,
             or shape [0, R]
    b:       [N, R-1] float32 input biases, or shape [0, R-1]
    x:       [D] float32 FFN input (post-attention norm)
    thr:     float32 threshold t: neurons with |h| < t are zeroed and their down column not read
    act:     activation code (ACT_CODES)
    base:    [D] float32 residual stream entering the FFN (may be the same array as out)
    out:     [D] float32; out = base + sum_{|h_i|>=t} h_i * w[i, R-1]
    h_out:   [N] float32, every neuron's h = act(gate.x) * (up.x) before thresholding
    partial: [C, D] float32 per-chunk accumulators (C = thread chunks), scratch
    kept:    [C] int64 scratch; returns the number of neurons kept
    xb:      (xq [>=1, D] int8, xd8 [>=1, D/4] float32, xs8 [>=1, D/4] int32): where x is rounded
             to int8 for grouped weights (see "grouped rows meet int8 activations"); None: allocated
    """
    # One token is the S = 1 case of ffn_glu_batch: one code path for decode and short prefill.
    D = x.shape[0]
    return ffn_glu_batch(w, ws, b, x.reshape((1, D)), base.reshape((1, D)), thr, act, out.reshape((1, D)),
                         h_out.reshape((1, h_out.shape[0])), partial.reshape((partial.shape[0], 1, D)), kept, mode, xb)


@njit(parallel=True, fastmath=True, cache=True)
def ffn_glu_batch(w, ws, b, X, base, thr, act, out, h_out, partial, kept, mode=0, xb=None):
    """ffn_glu for S tokens at once (prompt prefill): each neuron's rows are read once and
    applied to every token, so a short prompt costs about one token's weight traffic.

    w [N, R, D] (int4 [N, R, D/2]), ws [N, R], [N, R, D/32] or [0, R], b [N, R-1] or [0, R-1];
    X, base, out [S, D] (out may alias base); h_out [S, N];
    partial [C, >=S, D], kept [C] scratch; xb as in ffn_glu, >= S rows. Returns neurons kept,
    summed over tokens.
    """
    N = w.shape[0]
    S = X.shape[0]
    C = partial.shape[0]
    xp = _xbuf(ws, X, xb)
    for c in prange(C):
        lo = c * N // C
        hi = (c + 1) * N // C
        acc = partial[c]
        acc[:S] = 0.0
        n = 0
        # Blocks of _BLOCK neurons, two passes: first every h of the block, then the down columns of
        # those kept. One neuron at a time, each down column waited for its own h (two dot products,
        # a horizontal sum, the activation) before it could start; in blocks, the out-of-order core
        # overlaps independent dot products and then streams the columns.
        for i0 in range(lo, hi, _BLOCK):
            i1 = min(i0 + _BLOCK, hi)
            for i in range(i0, i1):
                wi = w[i]  # [R, D]
                for s in range(S):
                    h_out[s, i] = _neuron_h(wi, ws, b, i, X, xp, s, act, thr, mode)[0]
            for i in range(i0, i1):
                wi = w[i]
                for s in range(S):
                    h = h_out[s, i]
                    if _kept(h, thr, mode, w.shape[1] == 3):
                        n += 1
                        _add_down(acc, s, wi, ws, i, h)
        kept[c] = n
    for s in prange(S):
        _sum_partials(partial, base, out, s)
    total = 0
    for c in range(C):
        total += kept[c]
    return total


@njit(inline="always")
def _emit(Y, bias, base, s, i, v):
    if bias.shape[0] > 0:
        v += bias[i]
    if base.shape[0] > 0:
        v += base[s, i]
    Y[s, i] = v


@njit(inline="always", fastmath=True)
def _rows4_plain(w, X, bias, base, Y, b0, b1):
    """Rows 4*b0 .. 4*b1 (clipped to O) of Y = w X (+ bias) (+ base) for float32 rows (the other
    dtypes take _rows4's vector-IR paths)."""
    O, D = w.shape
    S = X.shape[0]
    for b in range(b0, b1):
        i = 4 * b
        if i + 4 <= O:
            for s in range(S):
                # Blocks of 4 rows: four independent accumulator chains share each load of X[s, k]
                # (one chain per row is latency bound on one core: 10.0 vs 8.8 ms for SmolLM2's
                # projections on 1 thread).
                a0 = np.float32(0.0)
                a1 = np.float32(0.0)
                a2 = np.float32(0.0)
                a3 = np.float32(0.0)
                for k in range(D):
                    xk = X[s, k]
                    a0 += w[i, k] * xk
                    a1 += w[i + 1, k] * xk
                    a2 += w[i + 2, k] * xk
                    a3 += w[i + 3, k] * xk
                _emit(Y, bias, base, s, i, a0)
                _emit(Y, bias, base, s, i + 1, a1)
                _emit(Y, bias, base, s, i + 2, a2)
                _emit(Y, bias, base, s, i + 3, a3)
        else:
            for j in range(i, O):
                for s in range(S):
                    a = np.float32(0.0)
                    for k in range(D):
                        a += w[j, k] * X[s, k]
                    _emit(Y, bias, base, s, j, a)


def _rows4(w, ws, X, xp, bias, base, Y, b0, b1):
    """Rows 4*b0 .. 4*b1 (clipped to O) of Y = w X (+ bias) (+ base), w [O, ·] of any dtype."""


def _row_dot(w, ws, j, X, xp, s):
    """Row j of a projection w [O, ·] dotted with token s's input X[s] [D] (grouped rows: its int8
    rounding xp), scaled (ws: [O] per row, [O, G] per group)."""


@overload(_row_dot)
def _row_dot_impl(w, ws, j, X, xp, s):
    if _prepared(xp):           # int4, or int8 in groups of 32, with int8 activations
        return lambda w, ws, j, X, xp, s: _dot_gq(w[j], ws[j], xp[0], xp[1], xp[2], s)
    if _q8(w):
        return lambda w, ws, j, X, xp, s: _dot_w(w[j], X[s]) * ws[j]
    return lambda w, ws, j, X, xp, s: _dot_w(w[j], X[s])                # float16 bits


@overload(_rows4, inline="always")
def _rows4_impl(w, ws, X, xp, bias, base, Y, b0, b1):
    if isinstance(w.dtype, types.Float):
        def f32(w, ws, X, xp, bias, base, Y, b0, b1):
            _rows4_plain(w, X, bias, base, Y, b0, b1)
        return f32

    def f(w, ws, X, xp, bias, base, Y, b0, b1):     # one row at a time: the IR dot shares nothing
        for j in range(4 * b0, min(4 * b1, w.shape[0])):
            for s in range(X.shape[0]):
                _emit(Y, bias, base, s, j, _row_dot(w, ws, j, X, xp, s))
    return f


@njit(parallel=True, fastmath=True, cache=True)
def linear(w, ws, X, bias, base, Y, chunks, xb=None):
    """Y[s] = w @ X[s] (+ bias) (+ base[s]) for a few tokens: the attention projections and the
    lm_head, memory bound, so every weight row is read once and applied to all S tokens.

    w:     [O, D] float32 (or uint16 float16 bits, or int8, or uint8 packed int4 [O, D/2]),
           nn.Linear's [out, in] layout (mmap'd)
    ws:    [O] float32 row scales of int8 weights, [O, D/32] float16 bits of int4 ones, or shape [0]
    X:     [S, D] float32
    bias:  [O] float32, or shape [0] for none
    base:  [S, O] float32 added to the result (the residual stream), or shape [0, O] for none;
           may be the same array as Y
    Y:     [S, O] float32
    chunks: contiguous row ranges, one per thread
    xb:    as in ffn_glu (int8 activations for grouped weights), >= S rows, or None
    """
    nb = (w.shape[0] + 3) // 4
    xp = _xbuf(ws, X, xb)
    for c in prange(chunks):
        _rows4(w, ws, X, xp, bias, base, Y, c * nb // chunks, (c + 1) * nb // chunks)


@njit(fastmath=True, cache=True)
def matvec(w, ws, x, y, chunks, xb=None):
    """y = w @ x for w [V, D] float32 (or uint16 float16 bits, int8 with row scales ws [V], int4
    with group scales ws [V, D/32]); y [V]. The lm_head."""
    D = x.shape[0]
    V = y.shape[0]
    linear(w, ws, x.reshape((1, D)), np.empty(0, np.float32), np.empty((0, V), np.float32),
           y.reshape((1, V)), chunks, xb)


@njit(fastmath=True, cache=True, error_model="numpy")   # NaN weights give NaN, not ZeroDivisionError
def rms_norm(x, weight, eps, out):
    """out = x / sqrt(mean(x^2) + eps) * weight, per row; x, out [S, D], weight [D].
    Sum of squares in float64: one pass over D values, cheap, and keeps the norm exact enough
    that tokens stay identical to transformers' float32."""
    S, D = x.shape
    for s in range(S):
        ss = 0.0
        for k in range(D):
            ss += np.float64(x[s, k]) * x[s, k]
        inv = np.float32(1.0 / math.sqrt(ss / D + eps))
        for k in range(D):
            out[s, k] = x[s, k] * inv * weight[k]


@njit(fastmath=True, cache=True, error_model="numpy")
def layer_norm(x, weight, bias, eps, out):
    """out = (x - mean) / sqrt(var + eps) * weight + bias, per row; x, out [S, D] (may alias),
    weight [D], bias [D] or [0]. Mean and (biased) variance in float64 over two passes, as exact as torch's
    float32 LayerNorm needs for identical tokens."""
    S, D = x.shape
    for s in range(S):
        m = 0.0
        for k in range(D):
            m += x[s, k]
        m /= D
        v = 0.0
        for k in range(D):
            d = x[s, k] - m
            v += d * d
        inv = 1.0 / math.sqrt(v / D + eps)
        for k in range(D):
            v = np.float32((x[s, k] - m) * inv) * weight[k]
            out[s, k] = v + bias[k] if bias.shape[0] > 0 else v


@njit(fastmath=True, cache=True, error_model="numpy")
def head_rms_norm(qkv, wq, wk, n_heads, n_kv_heads, head_dim, eps):
    """Gemma-3's q/k norms, in place on the packed projection qkv [S, (H+2Hkv)·hd]: each query
    head's hd values are RMS-normed and scaled by wq [hd], each key head's by wk [hd]; v is left
    alone. Before GroupQueryAttention, which applies the rotary embedding after them, as
    transformers does."""
    S = qkv.shape[0]
    for s in range(S):
        for h in range(n_heads + n_kv_heads):
            w = wq if h < n_heads else wk
            o = h * head_dim
            ss = 0.0
            for k in range(head_dim):
                ss += np.float64(qkv[s, o + k]) * qkv[s, o + k]
            inv = np.float32(1.0 / math.sqrt(ss / head_dim + eps))
            for k in range(head_dim):
                qkv[s, o + k] = qkv[s, o + k] * inv * w[k]


def _gather_row(table, ts, t, scale, out):
    """out [D] = table[t] * scale, dequantized."""


@overload(_gather_row, inline="always")
def _gather_row_impl(table, ts, t, scale, out):
    if _q4(table):
        def f(table, ts, t, scale, out):
            row, sc = table[t], ts[t]
            for g in range(sc.shape[0]):
                d = scale * _h2f(sc[g])
                for j in range(16):
                    b = np.int32(row[16 * g + j])
                    out[32 * g + j] = np.float32((b & 15) - 8) * d
                    out[32 * g + 16 + j] = np.float32((b >> 4) - 8) * d
        return f

    if _q8(table) and _grouped(ts):
        def f8(table, ts, t, scale, out):
            row, sc = table[t], ts[t]
            for k in range(out.shape[0]):
                out[k] = np.float32(row[k]) * (scale * _h2f(sc[k // 32]))
        return f8

    def f(table, ts, t, scale, out):
        row = table[t]  # [D]
        sc = scale * ts[t] if ts.shape[0] > 0 else scale
        for k in range(out.shape[0]):
            out[k] = _ld1(row, k) * sc
    return f


@njit(cache=True)
def gather_rows(table, ts, ids, scale, out):
    """out[s] = table[ids[s]] * scale; table [V, D] float32, uint16 float16 bits or int8 with row
    scales ts [V] (shape [0] otherwise), or int4 [V, D/2] uint8 with group scales ts [V, D/32];
    out [S, D]."""
    for s in range(ids.shape[0]):
        _gather_row(table, ts, ids[s], scale, out[s])


@njit(parallel=True, fastmath=True, cache=True)
def glu_threshold(g, u, thr, act, kept, mode=0):
    """Prefill: g <- act(g) * u, then zero what the threshold rule drops, in place;
    kept[s] = neurons kept for token s. g, u: [S, N] float32 (gate and up projections of S
    tokens, from BLAS, biases added; u = 1 for plain MLPs); kept: [S] int64."""
    S, N = g.shape
    for s in prange(S):
        n = 0
        for i in range(N):
            a = _act(act, g[s, i])
            h = a * u[s, i]
            if h != 0.0 and ((abs(a) >= thr) if mode == 1 else (abs(h) >= thr)):
                n += 1
            else:
                h = np.float32(0.0)
            g[s, i] = h
        kept[s] = n


@njit(parallel=True, fastmath=True, cache=True)
def mask_small(x, thr, out, kept):
    """TEAL-style input sparsity: out = x where |x| >= thr else 0; x, out [S, D];
    kept[s] = entries kept in row s."""
    S, D = x.shape
    for s in prange(S):
        n = 0
        for k in range(D):
            v = x[s, k]
            keep = abs(v) >= thr
            out[s, k] = v if keep else np.float32(0.0)
            n += keep
        kept[s] = n


@njit(parallel=True, fastmath=True, cache=True)
def activation(g, act, out):
    """out = act(g) elementwise; g, out [S, N] (calibration statistics)."""
    S, N = g.shape
    for s in prange(S):
        for i in range(N):
            out[s, i] = _act(act, g[s, i])


@njit(parallel=True, fastmath=True, cache=True)
def nll_rows(logits, targets, out):
    """out[s] = logsumexp(logits[s]) - logits[s, targets[s]]; logits [S, V] float32, targets [S].
    exp in float32 after subtracting the row max (every term <= 1), the sum in float64."""
    S, V = logits.shape
    for s in prange(S):
        m = logits[s, 0]
        for v in range(V):
            m = max(m, logits[s, v])
        acc = 0.0
        for v in range(V):
            acc += math.exp(logits[s, v] - m)
        out[s] = math.log(acc) + m - logits[s, targets[s]]


# -- the activation predictor ------------------------------------------------------------------
# Per neuron, int8 copies of its gate and up rows (fc1 for plain MLPs; runtime/predictor.py):
# pq [N, R-1, D] int8 and ps [N, R-1] float32, w ≈ q * scale per row. The predicted output
# h^ = act(gate^.x + b) * (up^.x + b) costs 1/4 of the float32 rows' bytes; a neuron is a
# candidate when |h^| >= t_pred, and only candidates' float32 rows are read.

@njit(inline="always", fastmath=True)
def _pred_h(pq, ps, b, i, x, act):
    """h^ for neuron i: pq [R-1, D] int8, ps [R-1], b [N, R-1] exact input biases (or [0, ·]), x [D]."""
    g = _dot_w(pq[0], x) * ps[0]
    if b.shape[0] > 0:
        g += b[i, 0]
    if pq.shape[0] == 1:
        return _act(act, g)
    u = _dot_w(pq[1], x) * ps[1]
    if b.shape[0] > 0:
        u += b[i, 1]
    return _act(act, g) * u


_KICK, _KICK_AHEAD = 512, 4      # see ffn_predict_batch


@njit(parallel=True, fastmath=True, cache=True)
def ffn_predict_batch(w, ws, b, pq, ps, X, base, t_pred, thr, act, out, h_out, partial, kept, cand, order, xb=None):
    """Predicted sparse FFN for S tokens: out = base + sum over neurons i that are candidates
    (|h^_i| >= t_pred) and survive the threshold (|h_i| >= thr) of h_i * w[i, R-1].

    w [N, R, D] neuron-major float32 (or uint16 float16 bits, or int8 with row scales ws [N, R],
    or int4 [N, R, D/2] with group scales ws [N, R, D/32]; ws is [0, R] otherwise), b [N, R-1] or [0, R-1] input
    biases; pq [N, R-1, D] int8, ps [N, R-1] float32 (the int8 predictor); X, base, out [S, D] (out may alias base); h_out [S, N]: exact h
    of candidates, 0 for the rest; partial [C, >=S, D], kept [C], cand [C], order [C, >=N] int32
    scratch. Returns (neuron-token pairs kept, candidate pairs). A non-candidate's three rows are
    not read; a candidate's gate and up rows are, and its down row only if it survives thr.

    Two passes per thread: the predictor rows (one sequential stream) give the list of
    candidates, then the candidates' blocks are read. Candidates are a random subset, so every
    block starts a new stream that the hardware prefetchers must first detect; the first _KICK
    bytes of the candidate _KICK_AHEAD places ahead are hinted (llvm.prefetch) so that stream is
    under way when its turn comes. Measured on a random half of the float32 blocks, 30 layers,
    1 / 2 threads: SmolLM2 (6.9 KB blocks) 14.0 -> 13.2 / 6.8 -> 6.4 ms, Qwen2.5-0.5B (10.8 KB)
    51.3 -> 50.8 / 28.7 -> 28.2 ms; kicks of 128 B-2 KB and 1-8 candidates ahead were measured, and
    prefetching whole blocks ahead made it slower (17.4 -> 14.0 GB/s). In the decode step (SmolLM2
    at 50 %, FFN ms per token, medians of alternating runs, 1 / 2 threads): float32 18.2 -> 17.7 /
    9.9 -> 9.8, float16 15.4 -> 14.9 / 8.2 -> 8.0. Narrower rows also prefetch a fixed distance
    ahead inside their dot products (_PREFETCH): float16 at 50 %, 1 / 2 threads, whole decode
    step 32.4 -> 30.4 / 18.6 -> 15.8 ms (same process, alternating).
    """
    N = w.shape[0]
    S = X.shape[0]
    C = partial.shape[0]
    xp = _xbuf(ws, X, xb)
    for c in prange(C):
        lo = c * N // C
        hi = (c + 1) * N // C
        acc = partial[c]
        acc[:S] = 0.0
        lst = order[c]
        m = 0
        nc = 0
        for i in range(lo, hi):
            qi = pq[i]  # [R-1, D]
            si = ps[i]
            any_s = False
            for s in range(S):
                hp = _pred_h(qi, si, b, i, X[s], act)
                flag = abs(hp) >= t_pred
                h_out[s, i] = 1.0 if flag else 0.0     # candidate flag, replaced by h below
                any_s |= flag
            if any_s:
                lst[m] = i
                m += 1
        n = 0
        for j0 in range(0, m, _BLOCK):        # blocks of candidates, two passes (see ffn_glu_batch)
            j1 = min(j0 + _BLOCK, m)
            for j in range(j0, j1):
                i = lst[j]
                if j + _KICK_AHEAD < m:
                    ahead = w[lst[j + _KICK_AHEAD]]
                    for o in range(0, _KICK, 64):
                        _prefetch_line(ahead, o)
                wi = w[i]
                for s in range(S):
                    if h_out[s, i] == 0.0:
                        continue
                    nc += 1
                    h_out[s, i] = _neuron_h(wi, ws, b, i, X, xp, s, act, thr, 0)[0]
            for j in range(j0, j1):
                i = lst[j]
                wi = w[i]
                for s in range(S):
                    h = h_out[s, i]
                    if _kept(h, thr, 0, w.shape[1] == 3):
                        n += 1
                        _add_down(acc, s, wi, ws, i, h)
        kept[c] = n
        cand[c] = nc
    for s in prange(S):
        _sum_partials(partial, base, out, s)
    tk = 0
    tc = 0
    for c in range(C):
        tk += kept[c]
        tc += cand[c]
    return tk, tc


@njit(fastmath=True, cache=True)
def ffn_predict(w, ws, b, pq, ps, x, base, t_pred, thr, act, out, h_out, partial, kept, cand, order, xb=None):
    """ffn_predict_batch for one token (decode): x, base, out [D]; h_out [N]; partial [C, D]."""
    D = x.shape[0]
    return ffn_predict_batch(w, ws, b, pq, ps, x.reshape((1, D)), base.reshape((1, D)), t_pred, thr, act,
                             out.reshape((1, D)), h_out.reshape((1, h_out.shape[0])),
                             partial.reshape((partial.shape[0], 1, D)), kept, cand, order, xb)


@njit(parallel=True, cache=True)
def dequant_pred(pq, ps, out):
    """out[i, r, k] = q * scale: the predictor's rows as float32 [N, R-1, D] (BLAS prefill)."""
    N, Rp, D = pq.shape
    for i in prange(N):
        for r in range(Rp):
            sc = ps[i, r]
            for k in range(D):
                out[i, r, k] = np.float32(pq[i, r, k]) * sc


@njit(parallel=True, fastmath=True, cache=True)
def predict_mask(h, gp, up, t_pred, act, cand):
    """Prefill: h <- 0 where the predicted |act(gp) * up| < t_pred, in place; cand[s] = candidates
    of token s. h, gp, up: [S, N] (exact h after glu_threshold; predicted gate and up, biases
    included; up = 1 for plain MLPs)."""
    S, N = h.shape
    for s in prange(S):
        n = 0
        for i in range(N):
            if abs(_act(act, gp[s, i]) * up[s, i]) >= t_pred:
                n += 1
            else:
                h[s, i] = 0.0
        cand[s] = n

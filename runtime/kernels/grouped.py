"""Grouped rows (int4, and int8 as Q8_0) meet int8 activations: the input rounded to int8 per block
of 32 (quantize_activations, _xbuf) and the grouped dot product in integers (_dot_gq: AVX-512 VNNI
where the CPU has it, exact float32 products elsewhere).
"""

from __future__ import annotations

import platform

import numba
import numpy as np
from llvmlite import binding as llvm_binding
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from .ir import (_FAST, _PREFETCH, _V, _c_array, _f32, _group_scale, _group_values, _grouped, _grouped_packing,
                 _hsum, _i16, _i32, _i8, _prefetch, _splat, _vb, _vec_at, _vf)


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


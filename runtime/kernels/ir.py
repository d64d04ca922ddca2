"""LLVM IR building blocks for the kernels, and the dispatch on weight dtypes.

Weights reach the kernels as float32, float16 bits (uint16), int8, or packed int4 (uint8); the
predicates below tell them apart at compile time, so that every kernel is specialized per dtype
(the overloads in rows.py, grouped.py, dense.py and ffn.py choose their code with them). The IR
helpers are used by the hand-written vector intrinsics of rows.py and grouped.py.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, overload


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


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


def _q8(a) -> bool:
    """True for int8 weights."""
    return isinstance(a.dtype, types.Integer) and a.dtype.bitwidth == 8 and a.dtype.signed


def _f16(a) -> bool:
    """True for float16 weights (their uint16 bits)."""
    return isinstance(a.dtype, types.Integer) and a.dtype.bitwidth == 16



# -- narrow rows and tiles: hand-built LLVM vector IR --------------------------------------------
# The IR says what is meant (one vector load per chunk, widened in one instruction, a <16 x float>
# accumulator) where Numba's loops vectorize badly for short rows. Generic LLVM vectors: AVX-512
# takes <16 x float> whole; AArch64 splits it into four NEON registers (devices/qemu-arm64/check
# runs these kernels' tests under qemu).
_V = 16
_f32, _i32, _i8, _i16 = ir.FloatType(), ir.IntType(32), ir.IntType(8), ir.IntType(16)
_vf, _vi, _vb = ir.VectorType(_f32, _V), ir.VectorType(_i32, _V), ir.VectorType(_i8, _V)
_FAST = ("fast",)


def _splat(builder, val):
    undef = ir.Constant(_vf, ir.Undefined)
    v = builder.insert_element(undef, val, ir.Constant(_i32, 0))
    return builder.shuffle_vector(v, undef, ir.Constant(ir.VectorType(_i32, _V), [0] * _V))


def _vec_at(builder, p, i):
    return builder.bitcast(builder.gep(p, [i]), _vf.as_pointer())


# Software prefetch, _PREFETCH bytes ahead of the row being read, for rows narrower than float32.
# At one float per 4 bytes the hardware prefetchers keep one core fed (SmolLM2's float32 FFN
# streams ~11 GB/s on one core here, with or without it); float16, int8 and int4 rows carry 2-8x
# more work per cache line, the core falls behind the stream, and the lines arrive late. Measured on
# SmolLM2's 30 FFN layers, same process alternating, 1 / 2 threads: float16 20.1 -> 14.0 / 8.5 ->
# 6.0 ms, int8 rows 7.0 -> 4.7 / 3.5 -> 2.8 ms; float32
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


"""One weight row of a narrow dtype against a float32 vector, in hand-built LLVM vector IR: the
dot product and the axpy of int8 and float16 rows (_dot_w, _axpy_w). Weights in groups of 32 (int4,
Q8_0-style int8) are tiled instead (tiles.py).
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from .ir import (_ELEM, _FAST, _PREFETCH, _V, _f32, _hsum, _len_split, _prefetch, _splat, _vec_at, _vf,
                 _w_typed, _widen_ir)


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


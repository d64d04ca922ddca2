"""The thresholded FFN over neuron blocks (edgesparse/tiles.py): 16 neurons' gate and up rows in tiles
(tiles.py's tile_row: 16 dot products in the lanes of one vector), then the down columns of the
neurons the threshold keeps, each added scaled by its float h, exactly as the row kernels add them.

The down columns could meet h in integers too (h * scale rounded to int8 per block and group, four
columns transposed into one vpdpbusd: llama.cpp rounds h to Q8_0 as well). Measured and not kept:
one SmolLM2 layer hot in L2 took 75 instead of 123 us, but a whole decode step streaming from DRAM
took the same time (9.2 vs 9.0 ms per token at 1 thread, 7 rounds alternating), and the extra
rounding turned the runtime's exact agreement with a float reference into rounding-step flips.
Measured on one SmolLM2 layer (1536 x 576, int4, one thread): 88 us hot in L2 for the whole FFN,
against 182-237 us for the row-at-a-time kernel it replaces.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from .activations import _act
from .grouped import _VNNI, quantize_activations
from .ir import _FAST, _f32, _i8, _i32, _splat
from .tiles import bits_of, tiles16

_v = ir.VectorType


def _col_ptr(builder, ca, n):
    """Column n of cols [NB, 16, bytes] (any strides), as i8*."""
    c16 = ir.Constant(n.type, 16)
    off = builder.add(builder.mul(builder.udiv(n, c16), builder.extract_value(ca.strides, 0)),
                      builder.mul(builder.urem(n, c16), builder.extract_value(ca.strides, 1)))
    return builder.gep(builder.bitcast(ca.data, _i8.as_pointer()), [off])


@intrinsic
def col_scales(typingctx, cols, n, h, hs, r):
    """hs[r, :G] <- h * the float16 group scales of down column n (they follow its values)."""
    bits = bits_of(cols)
    if bits is None or cols.ndim != 3:
        return None

    def codegen(context, builder, sig, args):
        ca, ha = (context.make_array(sig.args[i])(context, builder, args[i]) for i in (0, 3))
        n, r = (context.cast(builder, args[i], sig.args[i], types.intp) for i in (1, 4))
        size = builder.extract_value(ca.shape, 2)
        G = builder.udiv(size, ir.Constant(size.type, 18 if bits == 4 else 34))      # bytes per group + scale
        p = builder.gep(_col_ptr(builder, ca, n), [builder.mul(G, ir.Constant(G.type, 16 if bits == 4 else 32))])
        ph = builder.bitcast(builder.gep(builder.bitcast(ha.data, _i8.as_pointer()),
                                         [builder.mul(r, builder.extract_value(ha.strides, 0))]), _f32.as_pointer())
        hv = _splat(builder, args[2])
        c16 = ir.Constant(G.type, 16)
        nv = builder.udiv(G, c16)
        with cgutils.for_range(builder, nv) as loop:
            o = builder.mul(loop.index, c16)
            sc = builder.load(builder.bitcast(builder.gep(p, [builder.shl(o, ir.Constant(G.type, 1))]),
                                              _v(ir.HalfType(), 16).as_pointer()), align=1)
            builder.store(builder.fmul(builder.fpext(sc, _v(_f32, 16)), hv, flags=_FAST),
                          builder.bitcast(builder.gep(ph, [o]), _v(_f32, 16).as_pointer()), align=4)
        with cgutils.for_range_slice(builder, builder.mul(nv, c16), G, ir.Constant(G.type, 1)) as (g, _):
            sc = builder.load(builder.bitcast(builder.gep(p, [builder.shl(g, ir.Constant(G.type, 1))]),
                                              ir.HalfType().as_pointer()), align=1)
            builder.store(builder.fmul(builder.fpext(sc, _f32), args[2], flags=_FAST), builder.gep(ph, [g]))
        return context.get_dummy_value()
    return types.void(cols, n, h, hs, r), codegen


# Widening 16 nibbles to floats through a 16-entry table: vpermps reads only the low 4 bits of each
# index lane, so the table lookup is also the mask (AVX-512; elsewhere: and, subtract, convert).
_LUT = ir.Constant(_v(_f32, 16), [float(i - 8) for i in range(16)])


@intrinsic
def down_columns(typingctx, acc, a_row, cols, idx, j0, m, hs):
    """acc[a_row, :D] += sum over j < m of down column idx[j0 + j] times hs[j0 + j] (h_j times the
    column's group scales: col_scales). acc [rows, D] float32; cols [NB, 16, bytes] (any strides);
    idx flat int64; hs [rows, Gp] float32. Each group of 32 outputs stays in registers while every
    kept column adds to it, in two accumulator pairs (even and odd columns: one chain would wait on
    its own FMA's latency)."""
    bits = bits_of(cols)
    if bits is None or cols.ndim != 3:
        return None

    def codegen(context, builder, sig, args):
        aa, ca, ia, ha = (context.make_array(sig.args[i])(context, builder, args[i]) for i in (0, 2, 3, 6))
        a_row, j0, m = (context.cast(builder, args[i], sig.args[i], types.intp) for i in (1, 4, 5))
        c_ = lambda v: ir.Constant(a_row.type, v)   # noqa: E731
        G = builder.udiv(builder.extract_value(aa.shape, 1), c_(32))
        hstride = builder.extract_value(ha.strides, 0)
        ph = builder.gep(builder.bitcast(ha.data, _i8.as_pointer()), [builder.mul(j0, hstride)])
        pidx = builder.gep(ia.data, [j0])
        pacc = builder.bitcast(builder.gep(builder.bitcast(aa.data, _i8.as_pointer()),
                                           [builder.mul(a_row, builder.extract_value(aa.strides, 0))]), _f32.as_pointer())
        vf, vi = _v(_f32, 16), _v(_i32, 16)
        perm = (cgutils.get_or_insert_function(builder.module, ir.FunctionType(vf, [vf, vi]), "llvm.x86.avx512.permvar.sf.512")
                if _VNNI and bits == 4 else None)

        def values(col, g):       # group g of a column: (values 32g..32g+15, 32g+16..32g+31) as floats
            if bits == 8:
                return tuple(builder.sitofp(builder.load(builder.bitcast(builder.gep(col, [builder.add(builder.mul(g, c_(32)), c_(16 * k))]),
                                                                         _v(_i8, 16).as_pointer()), align=1), vf) for k in range(2))
            b = builder.zext(builder.load(builder.bitcast(builder.gep(col, [builder.mul(g, c_(16))]), _v(_i8, 16).as_pointer()),
                                          align=1), vi)
            hi = builder.lshr(b, ir.Constant(vi, [4] * 16))
            if perm is not None:
                return builder.call(perm, [_LUT, b]), builder.call(perm, [_LUT, hi])
            eight = ir.Constant(vi, [8] * 16)
            lo = builder.sub(builder.and_(b, ir.Constant(vi, [15] * 16)), eight)
            return builder.sitofp(lo, vf), builder.sitofp(builder.sub(hi, eight), vf)

        with cgutils.for_range(builder, G) as gl:
            g = gl.index
            pa = [builder.bitcast(builder.gep(pacc, [builder.add(builder.mul(g, c_(32)), c_(16 * k))]), vf.as_pointer())
                  for k in range(2)]
            even = [cgutils.alloca_once_value(builder, builder.load(p, align=4)) for p in pa]
            odd = [cgutils.alloca_once_value(builder, ir.Constant(vf, [0.0] * 16)) for _ in range(2)]

            def add(j, dst):
                col = _col_ptr(builder, ca, builder.load(builder.gep(pidx, [j])))
                hv = builder.load(builder.bitcast(builder.gep(ph, [builder.add(builder.mul(j, hstride), builder.mul(g, c_(4)))]),
                                                  _f32.as_pointer()))
                sv = _splat(builder, hv)
                for k, v in enumerate(values(col, g)):
                    builder.store(builder.fadd(builder.load(dst[k]), builder.fmul(v, sv, flags=_FAST), flags=_FAST), dst[k])

            half = builder.lshr(m, c_(1))
            with cgutils.for_range(builder, half) as jl:
                j = builder.shl(jl.index, c_(1))
                add(j, even)
                add(builder.add(j, c_(1)), odd)
            with builder.if_then(builder.icmp_unsigned("!=", builder.shl(half, c_(1)), m)):
                add(builder.sub(m, c_(1)), even)
            for k in range(2):
                builder.store(builder.fadd(builder.load(even[k]), builder.load(odd[k]), flags=_FAST), pa[k], align=4)
        return context.get_dummy_value()
    return types.void(acc, a_row, cols, idx, j0, m, hs), codegen


@njit(parallel=True, fastmath=True, cache=True)
def ffn_tiles(t, cols, n, b, X, base, thr, act, out, h_out, partial, kept, mode, xb, sc):
    """Thresholded FFN of S tokens over neuron blocks: out[s] = base[s] + the sum over the neurons i
    kept for token s of h_i(s) * down column i. Returns the neurons kept, summed over tokens.

    t       [NB, R-1, G, tile] the blocks' gate and up (plain MLP: fc1) tiles (a strided view)
    cols    [NB, 16, bytes] the blocks' down (fc2) columns (a strided view); n: real neurons
    b       [n, R-1] input biases, or [0, R-1]
    X, base, out [S, D] (out may alias base); h_out [S, n]: every neuron's h before the threshold
            (0 where gate mode drops it); thr, act, mode: as kernels/ffn.py's ffn_glu_batch
    partial [C, >=S, D], kept [C] int64: per thread chunk (C of them)
    sc      scratch (gu [C, 32] f32, idx [C, >=S, 16] int64, hs [C, >=S, 16, Gp] f32), rows per
            thread on their own cache lines"""
    gu, idx, hs = sc
    NB, R1 = t.shape[0], t.shape[1]
    S = X.shape[0]
    C = partial.shape[0]
    Sx = idx.shape[1]
    quantize_activations(X, xb[0], xb[1], xb[2])
    gated = R1 == 2
    # flat views made once (the loops index them: a view made in a loop costs atomic refcounts)
    acc2 = partial.reshape((-1, partial.shape[2]))           # [C * S', D]
    hs2 = hs.reshape((-1, hs.shape[3]))                      # [C * S' * 16, Gp]
    idx1 = idx.reshape(-1)                                   # [C * S' * 16]
    for c in prange(C):
        for s in range(S):
            acc2[c * partial.shape[1] + s] = 0.0
        n_kept = 0
        for blk in range(c * NB // C, (c + 1) * NB // C):
            for s in range(S):
                tiles16(t, blk, 0, xb[0], xb[1], xb[2], s, gu, 32 * c)
                if gated:
                    tiles16(t, blk, 1, xb[0], xb[1], xb[2], s, gu, 32 * c + 16)
                row0 = (c * Sx + s) * 16
                m = 0
                for k in range(min(16, n - 16 * blk)):
                    i = 16 * blk + k
                    g = gu[c, k]
                    if b.shape[0] > 0:
                        g += b[i, 0]
                    a = _act(act, g)
                    if gated:
                        u = gu[c, 16 + k]
                        if b.shape[0] > 0:
                            u += b[i, 1]
                        h = a * u
                        keep = h != 0.0 and ((abs(a) >= thr) if mode == 1 else (abs(h) >= thr))
                        if mode == 1 and not keep:
                            h = np.float32(0.0)      # gate mode: a dropped neuron reports h = 0
                    else:
                        h = a                        # a plain MLP's h is the activation itself
                        keep = h != 0.0 and abs(h) >= thr
                    h_out[s, i] = h
                    # without a branch: a kept / dropped decision is a coin flip at 50 %, and a
                    # mispredicted branch here cost more than the scales of a dropped column
                    idx1[row0 + m] = i
                    col_scales(cols, i, h, hs2, row0 + m)
                    m += keep
                down_columns(acc2, c * partial.shape[1] + s, cols, idx1, row0, m, hs2)
                n_kept += m
        kept[c] = n_kept
    for s in prange(S):
        for k in range(out.shape[1]):
            y = base[s, k]
            for c in range(C):
                y += partial[c, s, k]
            out[s, k] = y
    total = 0
    for c in range(C):
        total += kept[c]
    return total

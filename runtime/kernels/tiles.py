"""16-row tiles (edgesparse/tiles.py) against int8-rounded activations: the attention projections,
the lm_head and, through tile_row, the FFN's gate and up rows (ffn_tiles.py). The embedding gather.

A tile holds 16 rows x 32 values (one group), interleaved so that one vpdpbusd multiplies an input
quad (4 int8 values, broadcast from memory) with 4 weights of each of the 16 rows:

    acc_i  = -off * sum(qx_g) + sum over quads of vpdpbusd(tile bytes, x quad)   (int32, exact)
    out_i += float(acc_i) * (d_i * dx_g)                                          (once per group)

The tile's bytes are unsigned (q + off, off = 8 for int4, 128 for int8) because vpdpbusd takes
unsigned times signed bytes; the offset times the input group's sum is taken back once per group.
The 16 outputs are the 16 lanes: no horizontal sum, one scale multiply per group for 16 rows. Why
tiles: edgesparse/tiles.py. Without VNNI (AArch64, older x86, NUMBA_CPU_NAME set for a portable
cache) the same integer products come from generic vector IR (widen, multiply, add lanes in fours):
the same values on any machine.

Measured (this project's 2-core Zen 4, one thread, SmolLM2-sized int4 matrices of 1.5 MB, 30 of
them in turn so that they stream from DRAM): 22 GB/s, the machine's single-core streaming rate
(a NumPy int64 sum: 21-25 GB/s); hot in L2, 33 GB/s. The row-at-a-time kernel it replaces: 9.9 /
13 GB/s. Software prefetch 2-8 KB ahead made it slower (12-17 GB/s): the tiles are one sequential
stream and the hardware prefetchers keep up with it.

Arrays: tiles arrive as uint8 (int4) or int8 (int8) views of the stored bytes, the view's dtype
saying which (the bytes are the offset values either way). The input is prepared once per kernel
call by quantize_activations into xb = (xq [S, >=D] int8, xd8 [S, >=D/4], xs8 [S, >=D/4]): group
g's scale and sum at [s, 8g] (kernels/grouped.py).
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from .grouped import _VNNI, quantize_activations
from .ir import _FAST, _f32, _h2f, _i8, _i32, _splat

_v = ir.VectorType
TILE = {4: 288, 8: 544}            # bytes per tile (edgesparse/tiles.py)
BODY = {4: 256, 8: 512}            # of which weights; then 16 float16 scales
OFFSET = {4: 8, 8: 128}


def bits_of(a) -> int | None:
    """4 for int4 tiles / columns (a uint8 view), 8 for int8 ones (an int8 view), else None."""
    if isinstance(a, types.Array) and isinstance(a.dtype, types.Integer) and a.dtype.bitwidth == 8:
        return 8 if a.dtype.signed else 4
    return None


def splat_i32(builder, v):
    undef = ir.Constant(_v(_i32, 16), ir.Undefined)
    e = builder.insert_element(undef, v, ir.Constant(_i32, 0))
    return builder.shuffle_vector(e, undef, ir.Constant(_v(_i32, 16), [0] * 16))


def quad_dot(builder, acc, w, xq32):
    """acc <16 x i32> + sum_j w[4i + j] * x[j] (w unsigned <64 x i8>, x the signed bytes of the
    i32 xq32): vpdpbusd, or the same sums in generic IR."""
    if _VNNI:
        v16 = _v(_i32, 16)
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v16, [v16] * 3),
                                            "llvm.x86.avx512.vpdpbusd.512")
        return builder.call(fn, [acc, builder.bitcast(w, v16), splat_i32(builder, xq32)])
    x64 = builder.bitcast(splat_i32(builder, xq32), _v(_i8, 64))
    prod = builder.mul(builder.zext(w, _v(_i32, 64)), builder.sext(x64, _v(_i32, 64)))
    for j in range(4):
        acc = builder.add(acc, builder.shuffle_vector(prod, prod, ir.Constant(_v(_i32, 16), [4 * i + j for i in range(16)])))
    return acc


def tile_row(builder, base, G, bits, px, pd8, ps8):
    """<16 x float>: the 16 rows of the G consecutive tiles at base (i8*) dotted with one token's
    prepared input (px: its int8 values as i32 quads; pd8, ps8: its dx and sum(qx) rows)."""
    T = TILE[bits]
    m4 = ir.Constant(_v(_i8, 64), [15] * 64)
    facc = cgutils.alloca_once_value(builder, ir.Constant(_v(_f32, 16), [0.0] * 16))
    with cgutils.for_range(builder, G) as loop:
        g = loop.index
        t = builder.gep(base, [builder.mul(g, ir.Constant(g.type, T))])
        g8 = builder.mul(g, ir.Constant(g.type, 8))
        acc = splat_i32(builder, builder.mul(builder.load(builder.gep(ps8, [g8])), ir.Constant(_i32, -OFFSET[bits])))
        for p in range(BODY[bits] // 64):
            w = builder.load(builder.bitcast(builder.gep(t, [ir.Constant(g.type, 64 * p)]), _v(_i8, 64).as_pointer()),
                             align=1)
            # int4: the low nibbles are quad p of the group, the high ones quad 4 + p
            pairs = ([(builder.and_(w, m4), p), (builder.and_(builder.lshr(w, ir.Constant(_v(_i8, 64), [4] * 64)), m4), 4 + p)]
                     if bits == 4 else [(w, p)])
            for wq, q in pairs:
                xq = builder.load(builder.gep(px, [builder.add(g8, ir.Constant(g.type, q))]))
                acc = quad_dot(builder, acc, wq, xq)
        sc = builder.load(builder.bitcast(builder.gep(t, [ir.Constant(g.type, BODY[bits])]),
                                          _v(ir.HalfType(), 16).as_pointer()), align=2)
        d = builder.fmul(builder.fpext(sc, _v(_f32, 16)), _splat(builder, builder.load(builder.gep(pd8, [g8]))),
                         flags=_FAST)
        builder.store(builder.fadd(builder.load(facc), builder.fmul(builder.sitofp(acc, _v(_f32, 16)), d, flags=_FAST),
                                   flags=_FAST), facc)
    return builder.load(facc)


def row_ptr(builder, arr, s, ty):
    """Row s of a [S, .] array (a make_array struct), as ty*."""
    p = builder.gep(builder.bitcast(arr.data, _i8.as_pointer()), [builder.mul(s, builder.extract_value(arr.strides, 0))])
    return builder.bitcast(p, ty.as_pointer())


@intrinsic
def tiles16(typingctx, tiles, blk, r, xq, xd8, xs8, s, out, o):
    """out[o : o+16] (a flat index into out's data) <- the 16 rows of tiles[blk, r] ([NB, R, G, tile],
    any strides) dotted with token s of the prepared input. Indices rather than views: a view made in
    a loop costs two atomic reference-count updates (and the threads share the parent's count)."""
    bits = bits_of(tiles)
    if bits is None or tiles.ndim != 4:
        return None

    def codegen(context, builder, sig, args):
        ta, qa, da, sa, oa = (context.make_array(sig.args[i])(context, builder, args[i]) for i in (0, 3, 4, 5, 7))
        blk, r, s, o = (context.cast(builder, args[i], sig.args[i], types.intp) for i in (1, 2, 6, 8))
        off = builder.add(builder.mul(blk, builder.extract_value(ta.strides, 0)),
                          builder.mul(r, builder.extract_value(ta.strides, 1)))
        base = builder.gep(builder.bitcast(ta.data, _i8.as_pointer()), [off])
        v = tile_row(builder, base, builder.extract_value(ta.shape, 2), bits, row_ptr(builder, qa, s, _i32),
                     row_ptr(builder, da, s, _f32), row_ptr(builder, sa, s, _i32))
        builder.store(v, builder.bitcast(builder.gep(builder.bitcast(oa.data, _f32.as_pointer()), [o]),
                                         _v(_f32, 16).as_pointer()), align=4)
        return context.get_dummy_value()
    return types.void(tiles, blk, r, xq, xd8, xs8, s, out, o), codegen


@njit(parallel=True, fastmath=True, cache=True)
def linear_tiles(t, X, bias, base, Y, chunks, xb, scratch):
    """Y[s] = W X[s] (+ bias) (+ base[s]) for a few tokens, W [O, D] stored as tiles t [B, G, tile]
    (B = ceil(O/16)): the attention projections and the lm_head.

    X [S, D] float32; bias [O] float32 or [0]; base [S, O] or [0, O] (may be the same array as Y);
    Y [S, O]; chunks: contiguous row-block ranges, one per thread; xb = (xq, xd8, xs8) with >= S
    rows; scratch [chunks, 16] float32 (64-byte rows: threads write their own)."""
    B = t.shape[0]
    S, O = Y.shape
    t4 = t.reshape((B, 1, t.shape[1], t.shape[2]))
    quantize_activations(X, xb[0], xb[1], xb[2])
    for c in prange(chunks):
        for b in range(c * B // chunks, (c + 1) * B // chunks):
            n = min(16, O - 16 * b)
            for s in range(S):
                tiles16(t4, b, 0, xb[0], xb[1], xb[2], s, scratch, 16 * c)
                for i in range(n):
                    o = 16 * b + i
                    y = scratch[c, i]
                    if bias.shape[0] > 0:
                        y += bias[o]
                    if base.shape[0] > 0:
                        y += base[s, o]
                    Y[s, o] = y


@njit(inline="always")
def _tile_scale(tile, i, nb):
    """Row i's float16 scale in a tile (uint8 or int8 bytes), as float32."""
    lo = np.int32(tile[nb + 2 * i]) & 255
    hi = np.int32(tile[nb + 2 * i + 1]) & 255
    return _h2f(np.uint16(lo | (hi << 8)))


@njit(cache=True)
def gather_tiles(t, ids, scale, out):
    """out[s] = W[ids[s]] * scale for W [V, D] stored as tiles t [B, G, tile] (the embedding)."""
    G = t.shape[1]
    int4 = t.shape[2] == 288
    nb = 256 if int4 else 512
    for s in range(ids.shape[0]):
        b, i = ids[s] // 16, ids[s] % 16
        for g in range(G):
            tile = t[b, g]
            d = scale * _tile_scale(tile, i, nb)
            for p in range(nb // 64):
                for j in range(4):
                    v = np.int32(tile[64 * p + 4 * i + j]) & 255
                    if int4:
                        out[s, 32 * g + 4 * p + j] = np.float32((v & 15) - 8) * d
                        out[s, 32 * g + 16 + 4 * p + j] = np.float32((v >> 4) - 8) * d
                    else:
                        out[s, 32 * g + 4 * p + j] = np.float32(v - 128) * d

"""ONNX Runtime's quantized MatMul vs edgesparse's Numba projections, on a package's own weights.

Issue 6 asked whether the attention projections (q|k|v and o, the weights around the ORT attention
core) should run through ORT's MatMulNBits instead of the Numba kernels: keep what is faster,
measured. This measures it, one token (a [1, D] input), every layer's qkv and o of an int4 or int8
package:

    edgesparse   runtime.kernels.linear_tiles on the package's mmap'd tiles (what decode runs): the
                 input rounded to int8 per block of 32, integer dot products (AVX-512 VNNI where
                 the CPU has it), each group's sum scaled
    ORT fp32     one MatMulNBits node per projection (com.microsoft, block_size 32; bits 4 for an
                 int4 package, 8 for int8), weights as initializers, accuracy_level 0 (float32
                 compute), run with IOBinding into preallocated outputs
    ORT int8     the same with accuracy_level 4: MLAS quantizes the input to int8 per block and
                 multiplies in integers, as llama.cpp and edgesparse do

The same values on both sides: the package's tiles (edgesparse/tiles.py) decoded to their Q4_0 /
Q8_0 values and re-packed into MatMulNBits' order (int4: element 2j in the low nibble of byte j,
zero point 8; int8: offset by 128, zero point 128), the float16 group scales as float32. Error columns, relative to the output's largest value: each
engine against the dequantized weights times the float32 input ("vs x"), which shows the input
rounding of the int8-compute engines (~1%), and edgesparse also against its own arithmetic, the
input rounded by quant.round_activations ("vs rounded x"), which must be float32 noise.
Rounds alternate between the engines; medians are reported, per thread count.

    python devices/bench_matmulnbits.py PKG [--threads 1,2] [--rounds 30]

Builds the graphs with the onnx package (installed with the [export] extra; on a board,
`pip install onnx`).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np


def mnb_model(q: np.ndarray, scale: np.ndarray, bits: int, accuracy: int):
    """One MatMulNBits node Y [1, N] = A [1, K] @ W.T for a package matrix: its values q [N, K]
    (int4: -8..7, int8: -127..127) and float16 group scales [N, K/32]."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from edgesparse.quant import GROUP
    N, G = scale.shape
    K = G * GROUP
    if bits == 4:
        vals = (q.reshape(N, G, GROUP).astype(np.int16) + 8).astype(np.uint8)      # [N, G, 32] in element order
        blob = (vals[..., 0::2] | (vals[..., 1::2] << 4)).astype(np.uint8)  # [N, G, 16]
    else:
        blob = (q.reshape(N, G, GROUP).astype(np.int16) + 128).astype(np.uint8)  # [N, G, 32]
    sc = scale.view(np.float16).astype(np.float32).reshape(-1)             # [N * G]
    node = helper.make_node("MatMulNBits", ["A", "B", "S"], ["Y"], domain="com.microsoft",
                            K=K, N=N, bits=bits, block_size=GROUP, accuracy_level=accuracy)
    g = helper.make_graph([node], "mnb", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [1, K])],
                          [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, N])],
                          [numpy_helper.from_array(blob, "B"), numpy_helper.from_array(sc, "S")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m.SerializeToString()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("package")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--rounds", type=int, default=30)
    a = p.parse_args(argv)

    import numba
    import onnxruntime as ort
    from edgesparse import tiles
    from edgesparse.format import TILED
    from edgesparse.quant import round_activations
    from edgesparse.runtime import kernels as K
    from edgesparse.runtime.core.model import Model
    from edgesparse.runtime.core.attention import session_options
    from edgesparse.runtime.core.state import zeros64

    m = Model(a.package, threads=1, ctx=8)
    dtype = m.pkg.manifest.exporter.get("dtype")
    entries = [m.pkg.manifest.tensor(e.qkv) for e in m.pkg.manifest.layers] + \
              [m.pkg.manifest.tensor(e.o) for e in m.pkg.manifest.layers]
    if any(t.dtype not in TILED for t in entries):
        print(f"{a.package}: needs an int4 or int8 package (projections in tiles), this one is {dtype}", file=sys.stderr)
        return 2
    bits = TILED[entries[0].dtype]
    tile = [lw.qkv for lw in m.layers] + [lw.o for lw in m.layers]                     # [B, G, tile] each
    mats = [tiles.from_tiles(t.view(np.uint8), e.shape[0], bits) for t, e in zip(tile, entries)]   # ([O, K], [O, G])
    rng = np.random.default_rng(0)
    L = len(m.layers)
    D = mats[0][1].shape[1] * 32
    xo = [rng.standard_normal((1, s.shape[1] * 32)).astype(np.float32) for _, s in mats]   # each its own K
    engines = ("ORT fp32", "ORT int8", "edgesparse")
    rows = []
    for th in [int(t) for t in a.threads.split(",")]:
        numba.set_num_threads(th)
        outs = {e: [np.zeros((1, s.shape[0]), np.float32) for _, s in mats] for e in engines}
        sessions = {}
        for e, acc in (("ORT fp32", 0), ("ORT int8", 4)):
            sessions[e] = []
            for (q, s), xi, y in zip(mats, xo, outs[e]):
                sess = ort.InferenceSession(mnb_model(np.asarray(q), np.asarray(s), bits, acc), session_options(th),
                                            providers=["CPUExecutionProvider"])
                io = sess.io_binding()
                io.bind_input("A", "cpu", 0, np.float32, list(xi.shape), xi.ctypes.data)
                io.bind_output("Y", "cpu", 0, np.float32, list(y.shape), y.ctypes.data)
                sessions[e].append((sess, io))
        none = np.zeros(0, np.float32)
        nobase = [np.zeros((0, s.shape[0]), np.float32) for _, s in mats]

        def run_ort(e):
            for sess, io in sessions[e]:
                sess.run_with_iobinding(io)

        xb = m.s.xb
        scratch = zeros64((th, 16))

        def run_nb():
            for t, xi, y, b in zip(tile, xo, outs["edgesparse"], nobase):
                K.linear_tiles(t, xi, none, b, y, th, xb, scratch)

        run = {"ORT fp32": lambda: run_ort("ORT fp32"), "ORT int8": lambda: run_ort("ORT int8"), "edgesparse": run_nb}
        for f in run.values():
            f()
        # relative to the output's scale: max |y - x W^T| / max |x W^T| over the first qkv and o
        first = list(zip(mats[:L + 1:L], xo[:L + 1:L]))
        wd = [(q.reshape(q.shape[0], -1, 32) * s.astype(np.float32)[..., None]).reshape(q.shape) for (q, s), _ in first]
        ref = [xi @ w.T for (_, xi), w in zip(first, wd)]
        ref_r = [round_activations(xi) @ w.T for (_, xi), w in zip(first, wd)]
        rel = lambda ys, rs: max(float(np.abs(y - r).max() / np.abs(r).max()) for y, r in zip(ys, rs))  # noqa: E731
        err = {e: rel(outs[e][:L + 1:L], ref) for e in engines}
        err["edgesparse vs rounded x"] = rel(outs["edgesparse"][:L + 1:L], ref_r)
        times = {e: [] for e in engines}
        for _ in range(a.rounds):
            for e in engines:
                t = time.perf_counter()
                run[e]()
                times[e].append(time.perf_counter() - t)
        rows.append((th, {e: statistics.median(v) * 1e3 for e, v in times.items()}, err))
    print(f"{a.package}: {dtype}, {L} layers of qkv {(mats[0][0].shape[0], D)} and o "
          f"{(mats[L][0].shape[0], mats[L][1].shape[1] * 32)}, one token; MatMulNBits bits={bits} block 32; "
          f"medians over {a.rounds} alternating rounds")
    cols = [f"{e} vs x" for e in engines] + ["edgesparse vs rounded x"]
    print("| threads | " + " | ".join(f"{e} ms" for e in engines) + " | " + " | ".join(cols) + " |")
    print("|---|" + "---|" * (len(engines) + len(cols)))
    for th, med, err in rows:
        print(f"| {th} | " + " | ".join(f"{med[e]:.2f}" for e in engines) + " | " +
              " | ".join(f"{err[e]:.1e}" for e in engines) + f" | {err['edgesparse vs rounded x']:.1e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

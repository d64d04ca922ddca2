"""Numba kernels. Plain arrays and scalars in, results written into caller-owned buffers.

Conventions: x is the FFN input of one token [D]. Weights come in two layouts.
Rows (float32, float16, and int8 rows that are not whole groups of 32): the FFN is neuron-major
w [N, R, D] (gated, R = 3: row 0 = gate, row 1 = up, row 2 = the neuron's column of down), so one
neuron's vectors are contiguous (3·D·4 bytes = 6.9 KB for SmolLM2 in float32) and a skipped neuron
costs no read at all; int8 rows come with one float32 scale per row, ws [N, R] ([O] for a
projection, [V] for an embedding), shape [0, ...] for float weights; a down column adds
(h * scale) * q_k. float16 weights arrive as their uint16 bit patterns (Numba has no CPU float16) and
are widened to float32 as they are loaded (_h2f: LLVM half -> float, vcvtph2ps / fcvt).
Tiles (int4 and int8 in groups of 32, edgesparse/tiles.py): matrices in 16-row tiles and the FFN in
blocks of 16 neurons, multiplied with the input rounded to int8 per group (grouped.py, tiles.py,
ffn_tiles.py). Plain MLPs (OPT, Phi-2) have R = 2: fc1 row in the gate's place, fc2 column, and
h = act(fc1.x + b), i.e. a gated FFN whose up is 1. bias b [N, R-1] holds each neuron's input
biases (shape [0, R-1] when the model has none). A neuron with h == 0 exactly (ReLU's natural
zeros) never reads its down column, whatever the threshold: skipping it changes nothing.
Accumulation is always float32. The dtype decides the code at compile time: _dot, _dot2,
_add_down, _rows4 and _gather_row are overloaded per weight dtype, so each dtype gets its own
specialization of every kernel.

fastmath: lets LLVM reorder the dot-product sums into SIMD lanes; the order differs from
NumPy's, which is why tests compare with a tolerance rather than bitwise.

Modules, by concern (the forward pass and the tests use the names re-exported here):
    ir.py           LLVM IR building blocks, float16 widening, dispatch on the weight dtype
    rows.py         one int8 / float16 row against a float32 vector (dot, axpy) in vector IR
    grouped.py      weights in groups of 32 meet int8 activations: the input rounding, VNNI or not
    activations.py  the FFN activations by code; the elementwise kernel
    dense.py        linear / matvec: the attention projections and the lm_head
    tiles.py        16-row tiles (int4 / int8, edgesparse/tiles.py): projections, lm_head, embedding gather
    ffn_tiles.py    the thresholded FFN over blocks of 16 neurons (tiled gate/up, the kept down columns)
    ffn.py          the thresholded FFN over neuron-major rows; the BLAS prefill's threshold rule
    predict.py      the activation predictor's kernels (predict mode)
    norms.py        RMSNorm, LayerNorm, Gemma-3's head norms, the embedding gather, NLL rows

Numba's on-disk cache (cache=True) is keyed on the source file of each cached kernel, not on the
helpers it inlines from the other files here: after editing ir.py, rows.py, grouped.py, tiles.py or
activations.py, empty the cache (runtime/kernels/__pycache__/*.nbi and *.nbc, or a fresh
NUMBA_CACHE_DIR) so that the kernels that inline them are compiled again.
"""

from .activations import ACT_CODES, activation
from .dense import linear, matvec
from .ffn import MODE_CODES, ffn_glu, ffn_glu_batch, glu_threshold, mask_small
from .ffn_tiles import ffn_tiles
from .grouped import quantize_activations
from .norms import gather_rows, head_rms_norm, layer_norm, nll_rows, rms_norm
from .tiles import gather_tiles, linear_tiles
from .predict import dequant_pred, ffn_predict, ffn_predict_batch, predict_mask, predicted_gate_up

__all__ = ["ACT_CODES", "MODE_CODES", "activation", "dequant_pred", "ffn_glu", "ffn_glu_batch", "ffn_predict",
           "ffn_predict_batch", "ffn_tiles", "gather_rows", "gather_tiles", "glu_threshold", "head_rms_norm",
           "layer_norm", "linear", "linear_tiles", "mask_small", "matvec", "nll_rows", "predict_mask",
           "predicted_gate_up", "quantize_activations", "rms_norm"]

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

Modules, by concern (the forward pass and the tests use the names re-exported here):
    ir.py           LLVM IR building blocks, float16 widening, dispatch on the weight dtype
    rows.py         one int8 / float16 / grouped row against a float32 vector (dot, axpy) in vector IR
    grouped.py      grouped rows (int4, Q8_0-style int8) meet int8 activations (VNNI)
    activations.py  the FFN activations by code; the elementwise kernel
    dense.py        linear / matvec: the attention projections and the lm_head
    ffn.py          the thresholded FFN over neuron-major rows; the BLAS prefill's threshold rule
    predict.py      the activation predictor's kernels (predict mode)
    norms.py        RMSNorm, LayerNorm, Gemma-3's head norms, the embedding gather, NLL rows

Numba's on-disk cache (cache=True) is keyed on the source file of each cached kernel, not on the
helpers it inlines from the other files here: after editing ir.py, rows.py, grouped.py or
activations.py, empty the cache (runtime/kernels/__pycache__/*.nbi and *.nbc, or a fresh
NUMBA_CACHE_DIR) so that the kernels that inline them are compiled again.
"""

from .activations import ACT_CODES, activation
from .dense import linear, matvec
from .ffn import MODE_CODES, ffn_glu, ffn_glu_batch, glu_threshold, mask_small
from .grouped import quantize_activations
from .norms import gather_rows, head_rms_norm, layer_norm, nll_rows, rms_norm
from .predict import dequant_pred, ffn_predict, ffn_predict_batch, predict_mask, predicted_gate_up

__all__ = ["ACT_CODES", "MODE_CODES", "activation", "dequant_pred", "ffn_glu", "ffn_glu_batch", "ffn_predict",
           "ffn_predict_batch", "gather_rows", "glu_threshold", "head_rms_norm", "layer_norm", "linear",
           "mask_small", "matvec", "nll_rows", "predict_mask", "predicted_gate_up", "quantize_activations",
           "rms_norm"]

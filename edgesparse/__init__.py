"""edgesparse: FFN activation sparsity for LLMs on small CPUs.

The device side (this package and edgesparse.runtime) needs numpy, numba, onnxruntime and
tokenizers only; edgesparse.export (torch, transformers) runs on the workstation.
"""

__version__ = "0.1.0"

"""Device side: load a package, run attention through ONNX Runtime and the FFNs through Numba.

Imports only numpy, numba, onnxruntime and tokenizers (and small pure-Python libraries)."""

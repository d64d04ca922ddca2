"""Device side: load a package and run it; calibrate, study and measure it.

    core/      what runs a token: package loader (mmap), weights, the forward pass, ORT attention,
               generation, sampling, tokenizer and chat template
    kernels/   the Numba kernels the forward pass calls (plain arrays and scalars in)
    sparsity/  the science: calibration, the predictor, evaluation, analysis, pruning
    measure/   the instruments: bench, latency vs position, RAM budgets, roofline, boards, figures

Imports go down only: sparsity and measure -> core -> kernels; sparsity and measure never import
each other, and nothing here imports edgesparse.export (docs/ARCHITECTURE.md).
Imports only numpy, numba, onnxruntime and tokenizers (and small pure-Python libraries)."""

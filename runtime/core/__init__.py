"""What runs a token on the device: the package (mmap'd tensors), the weights as the kernels take
them, the forward pass (model.py), the ORT attention stack, generation, sampling and text."""

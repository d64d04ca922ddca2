"""The sparsity science: per-layer thresholds from calibration text (calibrate.py) and read back as
data for the model (levels.py), the activation predictor, perplexity vs sparsity, the
predictability study, pruning of never-active neurons, and the text they run on."""

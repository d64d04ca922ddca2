"""The Hugging Face comparison engines of `edgesparse bench --against` (transformers, and ONNX
Runtime through optimum's export of the same model). They need torch/transformers/optimum, so they
live on the workstation side; runtime/against.py dispatches to them and keeps llama.cpp."""

from __future__ import annotations

import time
from pathlib import Path


def save_ort(hf_dir: Path, out: Path) -> None:
    """optimum's ONNX export (with KV cache) of the saved float32 HF model in hf_dir, into out."""
    from optimum.onnxruntime import ORTModelForCausalLM
    ORTModelForCausalLM.from_pretrained(hf_dir, export=True, use_cache=True).save_pretrained(out)


def measure(engine: str, path: str, threads: int, n_prompt: int, n_gen: int) -> dict:
    return {"ort": _ort, "transformers": _transformers}[engine](path, threads, n_prompt, n_gen)


def _hf_generate(model, vocab: int, n_prompt: int, n_gen: int, t_load: float, weight_bytes: int) -> dict:
    """Time transformers' generate loop (used by both HF engines) token by token: a stopping
    criterion is called once per generated token, right after its logits are computed."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    from edgesparse.runtime.bench import latency_stats, prompt_ids, rss_split_mb

    after_load = rss_split_mb()

    class Stamps(StoppingCriteria):
        def __init__(self):
            self.t: list[float] = []

        def __call__(self, input_ids, scores, **kw):
            self.t.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    x = torch.tensor([prompt_ids(n_prompt, vocab).tolist()])
    kw = dict(do_sample=False, attention_mask=torch.ones_like(x), pad_token_id=0)
    with torch.no_grad():
        model.generate(x, max_new_tokens=2, min_new_tokens=2, **kw)          # warm-up
        st = Stamps()
        t0 = time.perf_counter()
        model.generate(x, max_new_tokens=n_gen, min_new_tokens=n_gen,       # min: EOS ignored
                       stopping_criteria=StoppingCriteriaList([st]), **kw)
    lat = [b - a for a, b in zip(st.t, st.t[1:])]
    return {"load_s": t_load, **latency_stats(st.t[0] - t0, lat), "bytes_per_token": float(weight_bytes),
            "after_load": after_load, "end": rss_split_mb()}


def _transformers(path: str, threads: int, n_prompt: int, n_gen: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    t_load = time.perf_counter() - t0
    # every parameter is read once per token (tied embeddings counted once)
    wb = sum(p.numel() * p.element_size() for p in model.parameters())
    return _hf_generate(model, model.config.vocab_size, n_prompt, n_gen, t_load, wb)


def _ort(path: str, threads: int, n_prompt: int, n_gen: int) -> dict:
    import onnxruntime as ort
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM
    torch.set_num_threads(threads)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    t0 = time.perf_counter()
    model = ORTModelForCausalLM.from_pretrained(path, use_cache=True, session_options=so,
                                                provider="CPUExecutionProvider")
    t_load = time.perf_counter() - t0
    # the ONNX graph and its external weights: all read once per token
    wb = sum(f.stat().st_size for f in Path(path).iterdir() if ".onnx" in f.name)
    return _hf_generate(model, model.config.vocab_size, n_prompt, n_gen, t_load, wb)

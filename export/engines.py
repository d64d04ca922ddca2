"""The Hugging Face engines of `edgesparse bench --against`: transformers, and ONNX Runtime through
optimum's export of the same model. They need torch/transformers/optimum, so they live on the
workstation side and import down into the runtime, never the reverse: the CLI calls prepare(),
which makes (once, cached) the model each engine loads and names this module as the worker that
bench runs for it, `python -m edgesparse.export.engines SPEC_JSON`, one fresh process per
measurement, measured as bench measures edgesparse (runtime/measure/metrics.py). llama.cpp, which
needs no torch (its own llama-bench), is runtime/measure/llama_bench.py's."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

from edgesparse.errors import EdgesparseError
from edgesparse.runtime.measure.against import EMBEDDED, check_installed
from edgesparse.runtime.measure.bench import engine_row
from edgesparse.runtime.measure.metrics import latency_stats, prompt_ids, rss_split_mb


def source_ref(manifest) -> str | None:
    """The manifest's source as the MODEL argument of `edgesparse export` (None = the default)."""
    ref = str(manifest.source.get("model", ""))
    if not ref:
        raise EdgesparseError("the package's manifest names no source model ('source.model'); "
                              "--against needs it to build the same model for the other engine")
    return None if EMBEDDED.fullmatch(ref) and not Path(ref).exists() else ref


def _cache_dir(cache: Path, manifest) -> Path:
    key = json.dumps(manifest.source, sort_keys=True)
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(manifest.source.get("model", "model")))[-48:]
    return cache / f"{slug}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"


def _atomic_dir(final: Path, make) -> Path:
    """make(tmp_dir) writes a directory; it appears at `final` only when complete, so an interrupted
    export is never taken for a cached one."""
    if final.is_dir():
        return final
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    make(tmp)
    os.replace(tmp, final)
    return final


def prepare(engine: str, pkg, cache: Path, log=None) -> dict:
    """What bench needs to measure `engine` (ort or transformers) on package pkg's source model: the
    saved float32 HF model (transformers) or optimum's ONNX export of it (ort), made once under
    `cache` and keyed by the package's source, and the worker command that measures it."""
    check_installed(engine)
    base = _cache_dir(Path(cache), pkg.manifest)
    ref = source_ref(pkg.manifest)

    def save_hf(tmp: Path) -> None:
        from . import source
        if log:
            log(f"--against: saving {ref or 'the default model'} as a float32 Hugging Face model in {base}")
        src = source.resolve(ref)
        source.load_model(src, source.load_config(src)).save_pretrained(tmp)

    hf = _atomic_dir(base / "hf", save_hf)
    path = hf
    if engine == "ort":
        def save_ort(tmp: Path) -> None:
            if log:
                log(f"--against ort: exporting it with optimum to {base / 'ort'} (once)")
            from optimum.onnxruntime import ORTModelForCausalLM
            ORTModelForCausalLM.from_pretrained(hf, export=True, use_cache=True).save_pretrained(tmp)
        path = _atomic_dir(base / "ort", save_ort)
    return {"path": str(path), "worker": [sys.executable, "-m", "edgesparse.export.engines"]}


def measure(engine: str, path: str, threads: int, n_prompt: int, n_gen: int) -> dict:
    return {"ort": _ort, "transformers": _transformers}[engine](path, threads, n_prompt, n_gen)


def _hf_generate(model, vocab: int, n_prompt: int, n_gen: int, t_load: float, weight_bytes: int) -> dict:
    """Time transformers' generate loop (used by both HF engines) token by token: a stopping
    criterion is called once per generated token, right after its logits are computed."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList


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


if __name__ == "__main__":
    # worker: python -m edgesparse.export.engines SPEC_JSON (one measurement; result JSON on stdout)
    spec = json.loads(sys.argv[1])
    r = measure(spec["engine"], spec["path"], spec["threads"], spec["prompt_tokens"], spec["gen_tokens"])
    print(json.dumps(engine_row(spec, r)))

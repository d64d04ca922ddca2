"""Where llama.cpp's own tools are (llama-bench, llama-perplexity, llama-tokenize, llama-quantize):
bench, eval and the tests all find them here, the same way.

    1. an explicit path (bench --llama-bench PATH),
    2. EDGESPARSE_LLAMA_CPP_BIN, a directory holding the tools (another build of llama.cpp),
    3. devices/llama.cpp/build's cache for this CPU:
       ${EDGESPARSE_CACHE:-~/.cache/edgesparse}/llama.cpp/<version>-<cpu key>/bin.

The cache key is computed exactly as the build script does (sha256 of the CPU's first flags /
Features line and the machine name): a build made for another CPU (GGML_NATIVE) is not used.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from edgesparse.errors import EdgesparseError

TOOLS = ("llama-bench", "llama-perplexity", "llama-tokenize", "llama-quantize")
ENV_BIN = "EDGESPARSE_LLAMA_CPP_BIN"
BUILD = "devices/llama.cpp/build"


def cpu_key() -> str:
    """devices/llama.cpp/build's key: `(grep -m1 -E '^(flags|Features)' /proc/cpuinfo; uname -m) |
    sha256sum | cut -c1-12`, or the bare machine name without /proc/cpuinfo."""
    machine = os.uname().machine
    try:
        with open("/proc/cpuinfo") as fh:
            line = next((ln for ln in fh if re.match(r"(flags|Features)", ln)), "")
    except OSError:
        return machine
    if line and not line.endswith("\n"):
        line += "\n"
    return hashlib.sha256((line + machine + "\n").encode()).hexdigest()[:12]


def cache_root() -> Path:
    return Path(os.environ.get("EDGESPARSE_CACHE") or Path.home() / ".cache" / "edgesparse") / "llama.cpp"


def cached_bin() -> Path | None:
    """The newest cached build for this CPU (any llama-cpp-python version) with every tool, or None."""
    found = [d for d in cache_root().glob(f"*-{cpu_key()}/bin") if all(_runnable(d / t) for t in TOOLS)]
    return max(found, key=lambda d: d.stat().st_mtime) if found else None


def _runnable(p: Path) -> bool:
    return p.is_file() and os.access(p, os.X_OK)


def find(name: str, given: str | None = None, flag: str | None = None) -> Path:
    """The path of llama.cpp's tool `name`; a one-line error saying how to get it when absent.
    given: a path the user passed with `flag` (it must be that tool, runnable)."""
    if name not in TOOLS:
        raise ValueError(f"not a llama.cpp tool of ours: {name}")
    if given:
        p = Path(given)
        if not _runnable(p):
            raise EdgesparseError(f"{flag or name} {given}: not an executable file")
        return p
    env = os.environ.get(ENV_BIN)
    if env:
        p = Path(env) / name
        if not _runnable(p):
            raise EdgesparseError(f"{ENV_BIN}={env}: no executable {name} there")
        return p
    d = cached_bin()
    if d is None:
        how = f"pass {flag} PATH, " if flag else ""
        raise EdgesparseError(f"llama.cpp's {name} not found (no {ENV_BIN}, no build cached in {cache_root()} "
                              f"for this CPU): run {BUILD} (from an edgesparse checkout), {how}or set {ENV_BIN}=DIR")
    return d / name

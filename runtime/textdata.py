"""Text for calibration and evaluation: a text file, `wikitext2`, or a hub dataset id (online).

`wikitext2` means the raw WikiText-2 files kept beside the project during development
(../shared/data/wikitext-2-raw/wiki.{valid,test}.raw): calibrate reads the validation split,
eval the test split, so thresholds are never fitted on the text they are judged on.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from edgesparse.errors import EdgesparseError

WIKITEXT_FILES = {"valid": "wiki.valid.raw", "test": "wiki.test.raw"}


def wikitext_dir() -> Path:
    env = os.environ.get("EDGESPARSE_WIKITEXT_DIR")
    candidates = [Path(env)] if env else []
    here = Path(__file__).resolve()
    # the checkout's sibling `shared/` (editable install: runtime/ sits in the repo root)
    candidates += [p / "shared" / "data" / "wikitext-2-raw" for p in here.parents[:3]]
    candidates += [Path.cwd().parent / "shared" / "data" / "wikitext-2-raw",
                   Path.cwd() / "shared" / "data" / "wikitext-2-raw"]
    for c in candidates:
        if (c / WIKITEXT_FILES["test"]).is_file():
            return c
    raise EdgesparseError("wikitext2: WikiText-2 raw files not found (looked beside the checkout in "
                          "../shared/data/wikitext-2-raw; set EDGESPARSE_WIKITEXT_DIR to the folder)")


def load_text(spec: str, split: str) -> tuple[str, str]:
    """(text, description). split is 'valid' (calibration) or 'test' (evaluation)."""
    if spec == "wikitext2":
        p = wikitext_dir() / WIKITEXT_FILES[split]
        return _read(p), f"wikitext2:{split} ({p.name})"
    p = Path(spec)
    if p.exists():
        if not p.is_file():
            raise EdgesparseError(f"--text {spec}: not a file")
        return _read(p), str(p)
    if spec.count("/") == 1 and not spec.startswith((".", "/")):
        return _hub_text(spec, split), f"hub:{spec}:{split}"
    raise EdgesparseError(f"--text {spec}: no such file (expected a text file, 'wikitext2', or a hub dataset id)")


def _read(p: Path) -> str:
    data = p.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise EdgesparseError(f"{p}: not UTF-8 text (byte {e.start}: {data[e.start:e.start + 1]!r})") from None
    if not text.strip():
        raise EdgesparseError(f"{p}: the file is empty")
    return text


def _hub_text(dataset_id: str, split: str) -> str:
    # Online only; `datasets` is not a dependency of the device side.
    try:
        import datasets  # type: ignore
    except ImportError:
        raise EdgesparseError(f"--text {dataset_id}: a hub dataset needs `pip install datasets` and network") from None
    hf_split = {"valid": "validation", "test": "test"}[split]
    name = "wikitext-2-raw-v1" if dataset_id.endswith("wikitext") else None
    try:
        ds = datasets.load_dataset(dataset_id, name, split=hf_split)
    except Exception as e:  # network, missing dataset: all one message for the user
        raise EdgesparseError(f"--text {dataset_id}: cannot load from the hub ({str(e)[:200]})") from None
    col = "text" if "text" in ds.column_names else ds.column_names[0]
    return "".join(ds[col])


def token_windows(ids: list[int], window: int, count: int | None, what: str = "the text") -> np.ndarray:
    """Non-overlapping windows [n, window] from the start of the token stream."""
    n = len(ids) // window
    if count is not None:
        n = min(n, count)
    if n < 1:
        raise EdgesparseError(f"{what}: {len(ids)} tokens, fewer than one window of {window}")
    return np.asarray(ids[: n * window], np.int64).reshape(n, window)

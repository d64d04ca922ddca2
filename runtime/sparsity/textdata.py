"""Text for calibration and evaluation: a text file, `wikitext2`, or a hub dataset id (online).

`wikitext2` is the raw WikiText-2 validation and test text shipped inside the distribution
(edgesparse/data/wikitext-2-raw/, gzip, CC BY-SA 3.0: see the README there): calibrate reads the
validation split, eval the test split, so thresholds are never fitted on the text they are judged on.
"""

from __future__ import annotations

import gzip
import hashlib
from importlib import resources
from pathlib import Path

import numpy as np

from edgesparse.errors import EdgesparseError

# split -> (file, sha256 of the uncompressed text). The hash is checked on every read: a damaged
# copy must be an error, not a quietly different perplexity.
WIKITEXT = {"valid": ("wiki.valid.raw.gz", "4cd0f6876d07a413aa911261ff6d363c72d757d47f0fdd6015702014c89cb9c7"),
            "test": ("wiki.test.raw.gz", "173c87a53759e0201f33e0ccf978e510c2042d7f2cb78229d9a50d79b9e7dd08")}


def wikitext(split: str) -> str:
    """The shipped WikiText-2 raw text of split 'valid' or 'test'."""
    name, sha = WIKITEXT[split]
    res = resources.files("edgesparse") / "data" / "wikitext-2-raw" / name
    try:
        data = gzip.decompress(res.read_bytes())
    except (OSError, EOFError) as e:    # missing file, or not a whole gzip stream
        raise EdgesparseError(f"{res}: cannot read the shipped WikiText-2 {split} text ({e}); "
                              "reinstall edgesparse") from None
    if hashlib.sha256(data).hexdigest() != sha:
        raise EdgesparseError(f"{res}: sha256 mismatch: the shipped WikiText-2 {split} text is damaged; "
                              "reinstall edgesparse")
    return data.decode("utf-8")


def load_text(spec: str, split: str) -> tuple[str, str]:
    """(text, description). split is 'valid' (calibration) or 'test' (evaluation)."""
    if spec == "wikitext2":
        return wikitext(split), f"wikitext2:{split} ({WIKITEXT[split][0].removesuffix('.gz')})"
    p = Path(spec)
    if p.exists():
        if not p.is_file():
            raise EdgesparseError(f"--text {spec}: not a file")
        return _read(p), str(p)
    if p.suffix or spec.startswith((".", "/")) or p.parent.is_dir():
        # a path (data/calib.txt, ./x, a file in an existing directory): not a dataset id
        raise EdgesparseError(f"--text {spec}: no such file")
    if spec.count("/") == 1:
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

"""The data the default commands need ships inside the distribution, not beside the checkout:
`--text wikitext2` must work after a plain `pip install`, from any directory, offline."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from edgesparse.errors import EdgesparseError
from edgesparse.runtime.sparsity.textdata import WIKITEXT, load_text

ROOT = Path(__file__).resolve().parents[1]
# The published raw files (sizes and hashes from the WikiText-2 raw release, LF line endings).
PUBLISHED = {"valid": (1146846, " = Homarus gammarus = "), "test": (1290590, " = Robert Boulter = ")}


@pytest.mark.parametrize("split", ["valid", "test"])
def test_wikitext2_loads_from_any_directory(split, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)          # nothing beside the working directory
    text, desc = load_text("wikitext2", split)
    size, first = PUBLISHED[split]
    data = text.encode("utf-8")
    print(f"{desc}: {len(data)} bytes, sha256 {hashlib.sha256(data).hexdigest()[:16]}")
    assert len(data) == size
    assert hashlib.sha256(data).hexdigest() == WIKITEXT[split][1]
    assert next(line for line in text.splitlines() if line.strip()) == first
    assert desc == f"wikitext2:{split} (wiki.{split}.raw)"


def test_wheel_ships_wikitext2(tmp_path):
    """The built wheel (what `pip install` installs) holds both splits and their credit."""
    pytest.importorskip("setuptools")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path), str(ROOT)], check=True, capture_output=True, timeout=300)
    wheel, = tmp_path.glob("edgesparse-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    want = {f"edgesparse/data/wikitext-2-raw/{f}" for f in ("wiki.valid.raw.gz", "wiki.test.raw.gz", "README.md")}
    print(wheel.name, sorted(n for n in names if "/data/" in n))
    assert want <= names
    readme = zipfile.ZipFile(wheel).read("edgesparse/data/wikitext-2-raw/README.md").decode()
    assert "CC BY-SA 3.0" in readme and "Merity" in readme
    # and the chat instructions eval and calibrate use (edgesparse's own, Apache-2.0)
    assert {f"edgesparse/data/chat/{f}" for f in ("instructions.jsonl", "calibration.jsonl", "README.md")} <= names
    assert "Apache-2.0" in zipfile.ZipFile(wheel).read("edgesparse/data/chat/README.md").decode()


def test_missing_text_names_the_argument(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(EdgesparseError, match=r"--text missing\.txt: no such file"):
        load_text("missing.txt", "valid")

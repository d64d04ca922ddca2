"""The chat instruction sets shipped with edgesparse (edgesparse/data/chat/, written for the
project, Apache-2.0: see the README there), as one-turn chat prompts for a package.

    instructions.jsonl  the evaluation set (`eval`): {"id", "kind", "instruction"} per line
    calibration.jsonl   a separate set for `calibrate` (never the evaluation set): also a "split",
                        "fit" (chat transcripts for the thresholds) or "check" (the quality budget)
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from edgesparse.errors import EdgesparseError

SETS = {"eval": "instructions.jsonl", "calibration": "calibration.jsonl"}
SPLITS = ("fit", "check")


@dataclass(frozen=True)
class Instruction:
    id: str
    kind: str            # fact, arithmetic, code, summary, translate, refusal, ...
    text: str
    split: str = ""      # calibration set only: fit | check


@dataclass(frozen=True)
class InstructionSet:
    name: str                       # where it came from, for messages and eval.json
    items: tuple[Instruction, ...]
    sha256: str                     # of the file's bytes: part of the dense answers' cache key


def shipped(which: str) -> InstructionSet:
    """The shipped set 'eval' or 'calibration'."""
    res = resources.files("edgesparse") / "data" / "chat" / SETS[which]
    try:
        data = res.read_bytes()
    except OSError as e:
        raise EdgesparseError(f"{res}: cannot read the shipped chat instructions ({e}); reinstall edgesparse") from None
    return parse(data, f"{which}:{SETS[which]}")


def load(spec: str) -> InstructionSet:
    """'eval', 'calibration', or a JSONL file of the same shape."""
    if spec in SETS:
        return shipped(spec)
    p = Path(spec)
    if not p.is_file():
        raise EdgesparseError(f"--instructions {spec}: no such file (expected a JSONL file, 'eval' or 'calibration')")
    return parse(p.read_bytes(), str(p))


def parse(data: bytes, name: str) -> InstructionSet:
    items, seen = [], set()
    for n, line in enumerate(data.decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
        except json.JSONDecodeError as e:
            raise EdgesparseError(f"{name} line {n}: not JSON ({e.msg})") from None
        if not isinstance(d, dict) or not isinstance(d.get("instruction"), str) or not d["instruction"].strip():
            raise EdgesparseError(f"{name} line {n}: expected an object with a non-empty \"instruction\" string")
        split = d.get("split", "")
        if split and split not in SPLITS:
            raise EdgesparseError(f"{name} line {n}: split {split!r}: expected one of {', '.join(SPLITS)}")
        iid = str(d.get("id", f"line-{n}"))
        if iid in seen:
            raise EdgesparseError(f"{name} line {n}: id {iid!r} appears twice")
        seen.add(iid)
        items.append(Instruction(iid, str(d.get("kind", "")), d["instruction"], split))
    if not items:
        raise EdgesparseError(f"{name}: no instructions")
    return InstructionSet(name, tuple(items), hashlib.sha256(data).hexdigest())


def subset(s: InstructionSet, split: str | None = None, count: int | None = None) -> InstructionSet:
    """The items of one split (None: all), the first `count` of them (None: all)."""
    items = [i for i in s.items if split is None or i.split == split]
    if count is not None:
        if count < 0:
            raise EdgesparseError(f"instruction count {count}: expected a number >= 0")
        items = items[:count]
    tag = f"{s.name}[{split or 'all'}:{len(items)}]"
    key = hashlib.sha256(f"{s.sha256} {split} {[i.id for i in items]}".encode()).hexdigest()
    return InstructionSet(tag, tuple(items), key)

"""The target boards as data: profiles (devices/profiles/BOARD.json), measured results
(devices/results/BOARD-DATE.json, written by devices/measure) and which board this is.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from edgesparse.errors import EdgesparseError

# /proc/device-tree/model substrings -> profile name; Orin first: "Jetson Orin Nano" contains "Nano"
_MODELS = (("Raspberry Pi 4", "pi4"), ("Raspberry Pi 5", "pi5"), ("Jetson Orin Nano", "orin-nano"),
           ("Jetson Nano", "jetson-nano"))


def devices_dirs() -> list[Path]:
    """Where devices/ may be: the current directory, then the source checkout this module runs
    from (an editable install). A wheel install has no devices/: pass profile paths then."""
    here = Path(__file__).resolve().parents[2] / "devices"     # runtime/measure/boards.py -> the checkout
    return list(dict.fromkeys([Path.cwd() / "devices", here]))


def profile_path(board: str, arg: str = "--project") -> Path:
    """BOARD is a profile's name (devices/profiles/BOARD.json) or a path to a profile JSON."""
    p = Path(board)
    if p.suffix == ".json":
        if not p.is_file():
            raise EdgesparseError(f"{arg} {board}: no such profile file")
        return p
    known: set[str] = set()
    for d in devices_dirs():
        f = d / "profiles" / f"{board}.json"
        if f.is_file():
            return f
        known.update(x.stem for x in (d / "profiles").glob("*.json"))
    raise EdgesparseError(f"{arg} {board}: no profile devices/profiles/{board}.json; expected one of "
                          f"{', '.join(sorted(known)) or '(no devices/ directory found here)'} or a path to a "
                          "profile .json")


def load_profile(board: str, arg: str = "--project") -> dict:
    path = profile_path(board, arg)
    try:
        prof = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise EdgesparseError(f"{path}: not a readable profile ({e})") from None
    for key in ("name", "mem_bandwidth_gbs", "bandwidth_source", "recommended_threads"):
        if key not in prof:
            raise EdgesparseError(f"{path}: profile has no {key!r}")
    prof["board"] = path.stem
    prof["path"] = str(path)
    return prof


def results_for(board: str, profile: dict) -> list[dict]:
    """Board results (devices/results/BOARD-*.json next to the profile's directory), oldest first."""
    d = Path(profile["path"]).resolve().parent.parent / "results"
    out = []
    for f in sorted(d.glob(f"{board}-*.json")):
        try:
            out.append(json.loads(f.read_text()) | {"file": str(f)})
        except (OSError, ValueError):
            continue
    return sorted(out, key=lambda r: (str(r.get("date", "")), r["file"]))


def detect(model: str | None = None) -> str:
    """The profile name of the board this runs on, from the device tree's model string."""
    if model is None:
        try:
            model = Path("/proc/device-tree/model").read_text().rstrip("\x00\n")
        except OSError:
            raise EdgesparseError("cannot tell which board this is (no /proc/device-tree/model); "
                                  "pass --board") from None
    for key, name in _MODELS:
        if key in model:
            return name
    raise EdgesparseError(f"no profile for the board {model!r}; expected one of "
                          f"{', '.join(n for _, n in _MODELS)} (pass --board)")


def new_result_path(board: str, profile: dict, date: str | None = None) -> Path:
    """devices/results/BOARD-DATE.json, with -2, -3, ... when that day already has one."""
    d = Path(profile["path"]).resolve().parent.parent / "results"
    d.mkdir(parents=True, exist_ok=True)
    stem = f"{board}-{date or time.strftime('%Y-%m-%d')}"
    p, n = d / f"{stem}.json", 1
    while p.exists():
        n += 1
        p = d / f"{stem}-{n}.json"
    return p

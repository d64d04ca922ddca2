"""The layout holds: imports go down only (cli -> sparsity / measure -> core -> kernels; the
workstation side, edgesparse.export, may import the runtime, never the reverse), no room imports a
room that imports it back, no source file is over 500 lines, and the wheel has every sub-package.
Every import counts, module level or inside a function: a lazy import is still a dependency."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# source directory -> the package it is installed as (pyproject's [tool.setuptools.package-dir])
PACKAGE_DIRS = {"edgesparse": "edgesparse", "export": "edgesparse.export", "runtime": "edgesparse.runtime"}
MAX_LINES = 500

# The rooms, and which rooms each may import (docs/ARCHITECTURE.md). "base" is edgesparse's own
# foundation: format, config, errors, quant, progress.
ALLOWED = {
    "base": {"base"},
    "kernels": {"kernels", "base"},
    "core": {"core", "kernels", "base"},
    "sparsity": {"sparsity", "core", "kernels", "base"},
    "measure": {"measure", "core", "kernels", "base"},
    "cli": {"cli", "sparsity", "measure", "core", "kernels", "base", "export"},
    "export": {"export", "sparsity", "measure", "core", "kernels", "base"},
}


def modules() -> dict[str, Path]:
    """Every edgesparse module of the source tree by its installed name."""
    out = {}
    for d, pkg in PACKAGE_DIRS.items():
        for p in sorted((ROOT / d).rglob("*.py")):
            parts = list(p.relative_to(ROOT / d).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([pkg] + parts)] = p
    return out


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The edgesparse modules `name` imports anywhere in its file (functions included). `from X
    import y` counts as X.y when that is a module, else X."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module
            subs = {f"{mod}.{a.name}" for a in node.names} & known
            found.update(subs or {mod})
    return {m for m in found if m == "edgesparse" or m.startswith("edgesparse.")}


def room(module: str) -> str:
    parts = module.split(".")
    if parts[:2] == ["edgesparse", "runtime"] and len(parts) > 2:
        return parts[2]
    if parts[:2] in (["edgesparse", "cli"], ["edgesparse", "__main__"]):
        return "cli"
    if parts[:2] == ["edgesparse", "export"]:
        return "export"
    if module == "edgesparse.runtime":
        return "core"           # the runtime package's own __init__ (a docstring) sits with the core
    return "base"


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports(name, path, set(mods)) for name, path in mods.items()}


def test_helpers_resolve_imports(tmp_path):
    f = tmp_path / "x.py"
    f.write_text("from .. import kernels as K\nfrom ..core.model import Model\nimport numpy\n"
                 "def f():\n    from edgesparse.export import engines\n")
    known = {"edgesparse.runtime.kernels", "edgesparse.runtime.core.model", "edgesparse.export.engines"}
    assert imports("edgesparse.runtime.sparsity.x", f, known) == known
    assert [room(m) for m in sorted(known)] == ["export", "core", "kernels"]
    assert room("edgesparse.format") == room("edgesparse.progress") == "base"
    assert room("edgesparse.__main__") == room("edgesparse.cli.bench") == "cli"


def test_nothing_under_runtime_imports_the_workstation_side(graph):
    bad = {m: sorted(d for d in deps if room(d) == "export") for m, deps in graph.items()
           if m.startswith("edgesparse.runtime")}
    bad = {m: d for m, d in bad.items() if d}
    assert bad == {}, f"device-side modules import edgesparse.export: {bad}"


def test_imports_go_down_only(graph):
    """Every import between rooms follows ALLOWED: kernels know nothing of the model, the core
    nothing of calibration or benchmarks, sparsity and measure nothing of each other."""
    bad = sorted(f"{m} ({room(m)}) imports {d} ({room(d)})" for m, deps in graph.items() for d in deps
                 if room(d) not in ALLOWED[room(m)])
    assert bad == [], "\n".join(bad)


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """A cycle of the directed graph as [a, b, ..., a], or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(edges.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (c := visit(m)):
                return c
        stack.pop()
        state[n] = 2
        return None
    for n in sorted(edges):
        if n not in state and (c := visit(n)):
            return c
    return None


def test_find_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_import_cycles_between_rooms(graph):
    rooms: dict[str, set[str]] = {}
    for m, deps in graph.items():
        rooms.setdefault(room(m), set()).update(room(d) for d in deps if room(d) != room(m))
    assert find_cycle(rooms) is None, f"rooms import each other: {' -> '.join(find_cycle(rooms))}"


def test_no_import_cycles_between_modules(graph):
    """Within a room too: no two modules need each other (bench and against once did)."""
    edges = {m: {d for d in deps if d != m} for m, deps in graph.items()}
    cycle = find_cycle(edges)
    assert cycle is None, f"modules import each other: {' -> '.join(cycle)}"


def source_files() -> list[Path]:
    skip = {"__pycache__", "build", "dist", ".venv", "venv"}
    return sorted(p for d in ("edgesparse", "export", "runtime", "tests", "devices") for p in (ROOT / d).rglob("*.py")
                  if not skip & set(p.relative_to(ROOT).parts))


@pytest.mark.parametrize("path", [p.relative_to(ROOT).as_posix() for p in source_files()])
def test_source_file_is_at_most_500_lines(path):
    n = len((ROOT / path).read_text().splitlines())
    assert n <= MAX_LINES, f"{path}: {n} lines; split it by subject (at most {MAX_LINES})"


def test_wheel_has_every_sub_package(tmp_path):
    """`pip wheel` of the sources (a copy: the build writes build/ and *.egg-info beside them) holds
    every directory with an __init__.py as the package pyproject maps it to."""
    pytest.importorskip("setuptools")
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for d in PACKAGE_DIRS:
        shutil.copytree(ROOT / d, src / d, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    wheel, = (tmp_path / "dist").glob("edgesparse-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    want = {m.replace(".", "/") + "/__init__.py" for m, p in modules().items() if p.name == "__init__.py"}
    assert len(want) >= 8 and want <= names, f"missing from the wheel: {sorted(want - names)}"
    assert {m.replace(".", "/") + ".py" for m, p in modules().items() if p.name != "__init__.py"} <= names

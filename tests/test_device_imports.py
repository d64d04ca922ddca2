"""The device side (edgesparse, edgesparse.runtime, the `run` CLI) must work without the workstation
stack: torch, transformers, optimum (and the other [export] extras) are never imported."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The [export] extra of pyproject.toml, as top-level module names, plus edgesparse's own export side.
FORBIDDEN = ("torch", "transformers", "optimum", "onnx", "gguf", "accelerate")
FORBIDDEN_EDGESPARSE = "edgesparse.export"

DEVICE_SCRIPT = r"""
import importlib, json, pkgutil, sys
import edgesparse, edgesparse.runtime, edgesparse.cli
from edgesparse.runtime.core.model import Model
# every device-side module, imported: the rooms (core, kernels, sparsity, measure) and the CLI
for pkg in (edgesparse.runtime, edgesparse.cli):
    for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
        importlib.import_module(info.name)
pkg = sys.argv[1]
m = Model(pkg, ctx=32)
m.forward([5, 6, 7])
for t in (8, 9, 10):
    m.forward([t])
assert m.pos == 6, m.pos
rc = edgesparse.cli.main(["run", pkg, "-p", "w5 w6", "-n", "3"])
assert rc == 0, rc
print(json.dumps(sorted(sys.modules)))
"""


def forbidden_modules(names) -> list[str]:
    return sorted(n for n in names
                  if n.split(".")[0] in FORBIDDEN
                  or n == FORBIDDEN_EDGESPARSE or n.startswith(FORBIDDEN_EDGESPARSE + "."))


def test_forbidden_modules_helper():
    assert forbidden_modules(["torch.nn", "onnxruntime", "onnx", "edgesparse.export.archs", "edgesparse.exporter",
                              "transformers", "numpy", "optimum.onnxruntime"]) == \
        ["edgesparse.export.archs", "onnx", "optimum.onnxruntime", "torch.nn", "transformers"]


def test_runtime_and_cli_run_without_workstation_modules(tiny_llama_pkg, tmp_path):
    p = subprocess.run([sys.executable, "-c", DEVICE_SCRIPT, str(tiny_llama_pkg)], capture_output=True,
                       text=True, timeout=300, cwd=tmp_path)  # cwd: the installed package, not ./
    assert p.returncode == 0, p.stderr
    lines = p.stdout.strip().splitlines()
    assert len(lines) == 2, p.stdout
    generated = lines[0].split()
    assert len(generated) == 3 and all(w.startswith("w") for w in generated), lines[0]
    mods = json.loads(lines[1])
    assert "edgesparse.runtime.core.model" in mods and "onnxruntime" in mods and "numba" in mods
    assert {"edgesparse.runtime.sparsity.calibrate", "edgesparse.runtime.measure.bench",
            "edgesparse.runtime.kernels.ffn", "edgesparse.cli.bench"} <= set(mods)
    bad = forbidden_modules(mods)
    assert bad == [], f"device side imported {bad}"


# -- static check ------------------------------------------------------------------------------
def module_level_imports(source: str, package: str) -> list[str]:
    """Absolute names imported when the module is imported: everything outside function bodies
    (class bodies, if/try blocks at module level included). `from X import y` yields X and X.y."""
    found = []

    def visit(node):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            return
        if isinstance(node, ast.Import):
            found.extend(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module
            found.append(mod)
            found.extend(f"{mod}.{a.name}" for a in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(source))
    return found


def test_module_level_imports_helper():
    src = ("import numpy\nfrom ..export import archs\nfrom edgesparse import export\n"
           "try:\n    import torch.nn\nexcept ImportError:\n    pass\n"
           "class A:\n    import optimum\n"
           "def f():\n    import transformers\n")
    got = module_level_imports(src, "edgesparse.runtime")
    assert forbidden_modules(got) == ["edgesparse.export", "edgesparse.export", "edgesparse.export.archs",
                                      "optimum", "torch.nn"]
    assert "transformers" not in got


DEVICE_DIRS = {"edgesparse": "edgesparse", "runtime": "edgesparse.runtime"}


def package_of(path: str) -> str:
    """The package a device-side file's relative imports start from: runtime/core/model.py ->
    edgesparse.runtime.core (an __init__.py is its own package)."""
    top, *rest = path.split("/")
    return ".".join([DEVICE_DIRS[top]] + rest[:-1])


@pytest.mark.parametrize("path", sorted(p.relative_to(ROOT).as_posix() for d in DEVICE_DIRS
                                        for p in (ROOT / d).rglob("*.py")))
def test_no_module_level_workstation_imports(path):
    bad = forbidden_modules(module_level_imports((ROOT / path).read_text(), package_of(path)))
    assert bad == [], f"{path} imports {bad} at module level"


def test_package_of():
    assert package_of("runtime/core/model.py") == "edgesparse.runtime.core"
    assert package_of("runtime/kernels/__init__.py") == "edgesparse.runtime.kernels"
    assert package_of("edgesparse/cli/bench.py") == "edgesparse.cli"
    assert package_of("edgesparse/format.py") == "edgesparse"

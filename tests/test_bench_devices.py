"""devices/: measure (bench on a board -> devices/results/BOARD-DATE.json), the setup and wheelhouse
scripts' argument checks, and the thin bench_positions.py wrapper. The scripts run as a user runs
them, in subprocesses; measure runs from a copy of devices/ so that its results land in tmp."""

from __future__ import annotations

import json
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--gen-tokens", "3", "--prompt-tokens", "3", "--rounds", "1", "-q"]


def sh(*argv, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=600, cwd=cwd)


@pytest.fixture
def devices(tmp_path) -> Path:
    d = tmp_path / "devices"
    (d / "profiles").mkdir(parents=True)
    shutil.copy(ROOT / "devices" / "measure", d / "measure")
    for p in (ROOT / "devices" / "profiles").glob("*.json"):
        shutil.copy(p, d / "profiles")
    # a one-thread board, so that its recommended threads run on any machine
    prof = json.loads((d / "profiles" / "pi4.json").read_text()) | {"name": "test board", "recommended_threads": 1}
    (d / "profiles" / "one-core.json").write_text(json.dumps(prof))
    return d


def test_measure_writes_board_results(devices, tiny_llama_pkg, tmp_path):
    r = sh(sys.executable, devices / "measure", tiny_llama_pkg, "--board", "one-core", *SMALL, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    day = time.strftime("%Y-%m-%d")
    first = devices / "results" / f"one-core-{day}.json"
    res = json.loads(first.read_text())
    assert res["board"] == "one-core" and res["python"] == platform.python_version()
    assert [row["threads"] for row in res["summary"]] == [1]          # the profile's recommended threads
    assert res["summary"][0]["tok_s"] > 0 and "-o" not in res["command"]
    assert res["projection"]["rows"][0]["measured_on_board"] is None
    # a second run the same day: a new file, and the projection shows the first run's figure
    r = sh(sys.executable, devices / "measure", tiny_llama_pkg, "--board", "one-core", *SMALL, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    second = json.loads((devices / "results" / f"one-core-{day}-2.json").read_text())
    seen = second["projection"]["rows"][0]["measured_on_board"]
    assert seen["tok_s"] == res["summary"][0]["tok_s"] and seen["file"] == str(first)


def test_measure_errors(devices, tiny_llama_pkg, tmp_path):
    r = sh(sys.executable, devices / "measure", tiny_llama_pkg, "--board", "pi9", cwd=tmp_path)
    assert r.returncode == 1 and "--board pi9" in r.stderr and "pi4" in r.stderr
    r = sh(sys.executable, devices / "measure", tiny_llama_pkg, "--board", "pi4", "-o", tmp_path / "x", cwd=tmp_path)
    assert r.returncode == 1 and "-o/--output" in r.stderr
    if not Path("/proc/device-tree/model").exists():
        r = sh(sys.executable, devices / "measure", tiny_llama_pkg, cwd=tmp_path)
        assert r.returncode == 1 and "pass --board" in r.stderr
    assert not (devices / "results").exists()


def test_setup_script_checks_its_arguments(tmp_path):
    setup = ROOT / "devices" / "setup"
    r = sh("bash", setup / "install.sh")
    assert r.returncode == 2 and "usage" in r.stderr
    r = sh("bash", setup / "install.sh", "pi6", tmp_path)
    assert r.returncode == 1 and "BOARD: expected pi4, pi5, jetson-nano or orin-nano" in r.stderr
    for board in ("pi4", "pi5", "jetson-nano", "orin-nano"):
        assert f"install.sh\" {board} " in (setup / f"{board}.sh").read_text()
    if platform.machine() != "aarch64":
        r = sh("bash", setup / "pi4.sh", tmp_path)
        assert r.returncode == 1 and "the wheelhouse is for aarch64" in r.stderr


def test_wheelhouse_rejects_old_pythons(tmp_path):
    r = sh("bash", ROOT / "devices" / "wheelhouse", "3.6", tmp_path / "w")
    assert r.returncode == 2 and "Python >= 3.10" in r.stderr
    assert not (tmp_path / "w").exists()


def test_bench_positions_wrapper(tiny_llama_pkg, tmp_path):
    r = sh(sys.executable, ROOT / "devices" / "bench_positions.py", tiny_llama_pkg, "--positions", "4,8", "--steps", 2,
           "--rounds", 1, "--threads", 1, "-o", tmp_path / "p", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "p" / "positions.json").read_text())
    assert [row["position"] for row in res["configs"][0]["rows"]] == [4, 8]


@pytest.mark.parametrize("dtype", ["int4", "int8"])
def test_bench_matmulnbits(tiny_llama_dir, tmp_path, dtype):
    """devices/bench_matmulnbits.py feeds ORT's MatMulNBits the package's exact values (Q4_0 nibbles
    re-packed in MatMulNBits' order, Q8_0 bytes with zero point 128): with float compute ORT gives
    the dequantized product to float32 rounding; with int8 compute ORT, like the Numba kernels,
    rounds the input (about 1 %), and the Numba kernels match their own reference (the input
    rounded by quant.round_activations) to float32 rounding. A float package is refused."""
    from edgesparse.export import export
    pkg = export(str(tiny_llama_dir), tmp_path / f"{dtype}.esp", dtype=dtype, progress=False)
    r = sh(sys.executable, ROOT / "devices" / "bench_matmulnbits.py", pkg, "--threads", "1", "--rounds", "2", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    print(r.stdout)
    row = r.stdout.strip().splitlines()[-1].strip("|").split("|")     # threads, 3 times, 4 errors
    err_fp32, err_int8, err_nb, err_nb_rounded = (float(v) for v in row[4:8])
    # float32 dots of a few hundred terms: well under 1e-5 of the output's scale
    assert err_fp32 < 1e-5 and err_nb_rounded < 1e-5
    # the input rounded to int8 per block of 32 (relative step 1/127 of the block's max)
    assert 1e-5 < err_int8 < 0.05 and 1e-5 < err_nb < 0.05


def test_bench_matmulnbits_refuses_float(tiny_llama_pkg, tmp_path):
    r = sh(sys.executable, ROOT / "devices" / "bench_matmulnbits.py", tiny_llama_pkg, "--rounds", "1", cwd=tmp_path)
    assert r.returncode == 2 and "needs an int4 or int8" in r.stderr


def test_bench_stream(tiny_llama_pkg, tmp_path):
    """devices/bench_stream.py streams exactly the bytes a dense token reads (bench.bytes_per_token
    without its one embedding row), for both loads and each thread count, and reports the
    tok/s as 1 / the time; its reader really reads: the sum equals NumPy's wrapping sum."""
    import importlib.util

    import numpy as np

    from edgesparse.runtime.measure.bench import bytes_per_token
    from edgesparse.runtime.core.model import Model
    r = sh(sys.executable, ROOT / "devices" / "bench_stream.py", tiny_llama_pkg, "--threads", "1,2", "--rounds", "2",
           "-o", tmp_path / "s.json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    rows = json.loads((tmp_path / "s.json").read_text())["rows"]
    assert [(x["load"], x["threads"]) for x in rows] == [("mmap", 1), ("mmap", 2), ("ram", 1), ("ram", 2)]
    m = Model(tiny_llama_pkg)
    m.configure("dense")
    m.forward([5, 6, 7])
    m.forward([8])                                   # a dense step reads every row of every layer
    assert m.stats.ffn_rows[-1] == sum(lw.ffn.shape[0] * lw.ffn.shape[1] for lw in m.layers)
    m.stats.ffn_rows = m.stats.ffn_rows[-1:]
    want = bytes_per_token(m) - m.embed[0].nbytes
    for x in rows:
        assert want - 8 * x["calls"] < x["bytes"] <= want        # each array's last < 8 bytes left out
        assert x["stream_tok_s"] == pytest.approx(1e3 / x["median_ms"])
    spec = importlib.util.spec_from_file_location("bench_stream", ROOT / "devices" / "bench_stream.py")
    bs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bs)
    for a in bs.token_arrays(m)[:4]:
        for chunks in (1, 3):
            assert bs.stream_sum(a, chunks) == a.sum(dtype=np.int64)
    assert "| ram | 2 |" in r.stdout

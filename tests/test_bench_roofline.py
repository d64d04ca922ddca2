"""bench --project BOARD: board profiles, results and detection (runtime/boards.py) and the roofline
projection (runtime/roofline.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgesparse.errors import EdgesparseError
from edgesparse.runtime.measure import boards, roofline

ROOT = Path(__file__).resolve().parents[1]
PROFILES = sorted(p.stem for p in (ROOT / "devices" / "profiles").glob("*.json"))
# name: (cores, peak bandwidth GB/s, recommended threads, QEMU_CPU), from devices/README.md
EXPECTED = {"pi4": (4, 12.8, 4, "cortex-a72"), "pi5": (4, 17.1, 4, "cortex-a76"),
            "jetson-nano": (4, 25.6, 4, "cortex-a57"), "orin-nano": (6, 68, 6, "max")}


def test_the_four_boards_have_profiles():
    assert PROFILES == sorted(EXPECTED)


@pytest.mark.parametrize("board", sorted(EXPECTED))
def test_profile_fields(board):
    p = boards.load_profile(str(ROOT / "devices" / "profiles" / f"{board}.json"))
    cores, bw, threads, qemu = EXPECTED[board]
    assert (p["cores"], p["mem_bandwidth_gbs"], p["recommended_threads"], p["qemu_cpu"]) == (cores, bw, threads, qemu)
    assert p["board"] == board and p["bandwidth_source"] and p["ram_gb"]
    # the bandwidth source shows the arithmetic: transfers/s x bus bytes
    assert "*" in p["bandwidth_source"] and "GB/s" in p["bandwidth_source"]


def bench_result(mb_per_token: dict, dtype="float32") -> dict:
    rows = [{"engine": "edgesparse", "ffn": f, "sparsity": s, "threads": 2, "budget_mb": None, "tok_s": 30.0,
             "mb_read_per_token": mb} for (f, s), mb in mb_per_token.items()]
    rows.append({"engine": "ort", "ffn": None, "sparsity": None, "threads": 2, "budget_mb": None, "tok_s": 25.0,
                 "mb_read_per_token": 600.0})
    rows.append({"engine": "edgesparse", "ffn": "dense", "sparsity": 0.0, "threads": 2, "budget_mb": 300.0,
                 "tok_s": 3.0, "mb_read_per_token": 538.0})
    return {"summary": rows, "date": "2025-01-01 00:00",
            "package_info": {"source": {"kind": "gguf", "model": "m.gguf"}, "dtype": dtype, "arch": "llama"}}


def test_projection_is_bandwidth_over_bytes_per_token():
    prof = boards.load_profile("pi4")
    res = bench_result({("dense", 0.0): 538.0, ("predict", 0.5): 423.0})
    proj = roofline.project(res, prof, [])
    # only edgesparse rows without a budget are projected
    assert [(r["ffn"], r["sparsity"]) for r in proj["rows"]] == [("dense", 0.0), ("predict", 0.5)]
    assert proj["rows"][0]["projected_tok_s"] == pytest.approx(12.8e9 / 538e6)      # 23.8 tok/s
    assert proj["rows"][1]["projected_tok_s"] == pytest.approx(12.8e9 / 423e6)      # 30.3 tok/s
    assert proj["mem_bandwidth_gbs"] == 12.8
    text = roofline.table(proj)
    assert "23.8" in text and "30.3" in text and "upper bound" in text and "Raspberry Pi 4" in text
    orin = roofline.project(res, boards.load_profile("orin-nano"), [])
    assert orin["rows"][0]["projected_tok_s"] == pytest.approx(68e9 / 538e6)


def test_measured_board_results_beside_the_projection(tmp_path):
    (tmp_path / "profiles").mkdir()
    (tmp_path / "results").mkdir()
    prof = json.loads((ROOT / "devices" / "profiles" / "pi5.json").read_text())
    (tmp_path / "profiles" / "pi5.json").write_text(json.dumps(prof))
    res = bench_result({("dense", 0.0): 538.0, ("threshold", 0.5): 500.0})
    old = bench_result({("dense", 0.0): 538.0}) | {"date": "2025-01-01 10:00"}
    old["summary"][0].update(tok_s=9.0, threads=4)
    new = bench_result({("dense", 0.0): 538.0}) | {"date": "2025-02-01 10:00"}
    new["summary"][0].update(tok_s=11.0, threads=4)
    f16 = bench_result({("threshold", 0.5): 250.0}, dtype="float16")      # other weights: not matched
    (tmp_path / "results" / "pi5-2025-01-01.json").write_text(json.dumps(old))
    (tmp_path / "results" / "pi5-2025-02-01.json").write_text(json.dumps(new))
    (tmp_path / "results" / "pi5-2025-03-01.json").write_text(json.dumps(f16))
    (tmp_path / "results" / "pi4-2025-01-01.json").write_text(json.dumps(new))   # another board
    p = boards.load_profile(str(tmp_path / "profiles" / "pi5.json"))
    measured = boards.results_for("pi5", p)
    assert len(measured) == 3
    proj = roofline.project(res, p, measured)
    dense, thr = proj["rows"]
    assert dense["measured_on_board"]["tok_s"] == 11.0 and dense["measured_on_board"]["threads"] == 4
    assert thr["measured_on_board"] is None
    assert dense["projected_tok_s"] == pytest.approx(17.1e9 / 538e6)
    assert "11.00 (4 threads, 2025-02-01 10:00)" in roofline.table(proj)


def test_unknown_board_names_the_known_ones(tmp_path):
    with pytest.raises(EdgesparseError, match=r"--project pi9.*pi4.*pi5"):
        boards.load_profile("pi9")
    with pytest.raises(EdgesparseError, match="no such profile file"):
        boards.load_profile(str(tmp_path / "x.json"))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"name": "x"}))
    with pytest.raises(EdgesparseError, match="mem_bandwidth_gbs"):
        boards.load_profile(str(bad))


def test_detect_board():
    assert boards.detect("Raspberry Pi 4 Model B Rev 1.5") == "pi4"
    assert boards.detect("Raspberry Pi 5 Model B Rev 1.0") == "pi5"
    assert boards.detect("NVIDIA Jetson Nano Developer Kit") == "jetson-nano"
    assert boards.detect("NVIDIA Jetson Orin Nano Developer Kit") == "orin-nano"
    with pytest.raises(EdgesparseError, match="no profile for the board 'Rock 5B'.*--board"):
        boards.detect("Rock 5B")


def test_new_result_path_never_overwrites(tmp_path):
    (tmp_path / "profiles").mkdir()
    prof = {"path": str(tmp_path / "profiles" / "pi4.json")}
    p1 = boards.new_result_path("pi4", prof, "2025-03-04")
    assert p1 == tmp_path / "results" / "pi4-2025-03-04.json"
    p1.write_text("{}")
    p2 = boards.new_result_path("pi4", prof, "2025-03-04")
    assert p2.name == "pi4-2025-03-04-2.json"

"""`edgesparse bench` end to end on the tiny exported model: JSON, markdown and PNG of a real (small)
run, the RAM budget beside the unbudgeted run, the roofline projection, latency vs position, and
the argument errors. No timing is asserted."""

from __future__ import annotations

import json
import shutil

import pytest

from edgesparse.cli import main
from edgesparse.runtime.measure import residency, roofline
from edgesparse.runtime.core.package import Package

SMALL = ["--threads", "1", "--gen-tokens", "4", "--prompt-tokens", "4", "--rounds", "1", "-q"]


def run(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


@pytest.fixture(scope="module")
def budget_mb(tiny_llama_pkg) -> float:
    """A budget above what every step reads but below the whole package: the FFN rows cannot all stay."""
    man = Package(tiny_llama_pkg).manifest
    ffn = sum(man.tensor(e.ffn).nbytes for e in man.layers)
    floor = residency.hot_bytes(man, False)
    return round((floor + ffn / 3) / 2**20, 3)


def test_bench_table_json_png_budget_and_projection(tiny_llama_pkg, tmp_path, capsys, budget_mb):
    pkg = tmp_path / "pkg"               # a private copy: its pages are this test's alone
    shutil.copytree(tiny_llama_pkg, pkg)
    out = tmp_path / "b"
    rc, stdout, err = run(capsys, "bench", pkg, *SMALL, "--ram-budget", budget_mb, "--project", "pi4", "-o", out)
    assert rc == 0, err
    res = json.loads((out / "bench.json").read_text())
    free, budgeted = res["summary"]
    assert free["budget_mb"] is None and budgeted["budget_mb"] == budget_mb
    for r in (free, budgeted):
        assert (r["engine"], r["ffn"], r["sparsity"], r["threads"]) == ("edgesparse", "dense", 0.0, 1)
        assert r["tok_s"] > 0 and r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"] and r["prefill_ms"] > 0
        assert r["peak_rss_mb"] >= r["rss_after_load_mb"] > 0
        assert 0 < r["decode_peak_rss_mb"] <= r["peak_rss_mb"]
        assert r["rss_file_mb"] > 0 and r["rss_anon_mb"] > 0
        (run_,) = r["runs"]
        assert run_["bytes_per_token"] == pytest.approx(r["mb_read_per_token"] * 1e6)
    # the same model reads the same bytes with or without a budget
    assert budgeted["mb_read_per_token"] == pytest.approx(free["mb_read_per_token"])
    man = Package(pkg).manifest
    total = sum((pkg / f).stat().st_size for f in {man.tensor(n).file for n in man.tensors})
    # dense: every FFN row, attention, lm_head and one embedding row per token
    ffn = sum(man.tensor(e.ffn).nbytes for e in man.layers)
    attn = sum(man.tensor(n).nbytes for e in man.layers for n in (e.qkv, e.o))
    row = man.tensor("embed").nbytes / man.config.vocab_size
    assert free["mb_read_per_token"] * 1e6 == pytest.approx(ffn + attn + man.tensor("lm_head").nbytes + row)
    # without a budget the whole package stays in memory; with one, the resident weights stay under it
    assert free["weights_resident_mb"] * 2**20 == pytest.approx(total, rel=0.05)
    assert budgeted["weights_resident_mb"] <= budget_mb
    assert budgeted["released_mb_per_token"] > 0 and budgeted["over_budget_steps"] == 0
    md = (out / "bench.md").read_text()
    assert md.strip() in stdout
    assert "| budget MB | weights resident MB | decode peak RSS MB | major faults/token |" in md
    assert f"| {budget_mb:g} |" in md
    # the projection: Pi 4's 12.8 GB/s over the measured bytes
    proj = res["projection"]
    assert proj["board"] == "pi4" and len(proj["rows"]) == 1
    assert proj["rows"][0]["projected_tok_s"] == pytest.approx(
        roofline.projected_tok_s(12.8, free["mb_read_per_token"] * 1e6))
    assert "Projection for Raspberry Pi 4 Model B" in md and "upper bound" in md
    png = (out / "bench.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_positions(tiny_llama_pkg, tmp_path, capsys):
    out = tmp_path / "p"
    rc, stdout, err = run(capsys, "bench", tiny_llama_pkg, "--positions", "64,4,16", "--gen-tokens", 3,
                          "--threads", 1, "--rounds", 2, "-q", "-o", out)
    assert rc == 0, err
    res = json.loads((out / "positions.json").read_text())
    assert res["positions"] == [4, 16, 64] and res["steps"] == 3
    (c,) = res["configs"]
    assert [r["position"] for r in c["rows"]] == [4, 16, 64]
    assert c["rows"][0]["vs_first"] == 1.0
    assert all(r["median_ms"] > 0 and r["p90_ms"] >= r["median_ms"] * 0.999 for r in c["rows"])
    assert len(c["runs"]) == 2 and all(len(run_["positions"]["64"]) == 3 for run_ in c["runs"])
    b = c["buffer"]
    assert (b["position"], b["ctx_small"], b["ctx_big"]) == (4, 4 + 3 + 1, 64 + 3 + 1)
    md = (out / "positions.md").read_text()
    assert "| dense | 0.0 | 1 | 64 |" in md and "buffer check" in md
    assert md.strip() in stdout
    assert (out / "positions.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("argv, words", [
    (["--positions", "8,300"], ["--positions", "context of 256"]),
    (["--positions", "8,x"], ["--positions", "integers"]),
    (["--positions", "8", "--against", "ort"], ["--positions", "--against"]),
    (["--positions", "8", "--ram-budget", "10"], ["--positions", "--ram-budget"]),
    (["--ram-budget", "0"], ["--ram-budget", "positive"]),
    (["--ram-budget", "0.1"], ["--ram-budget", "every decode step reads"]),
    (["--project", "pi9"], ["--project pi9", "pi4", "orin-nano"]),
    (["--sparsity", "0.5"], ["not calibrated"]),
    (["--ffn", "predict", "--sparsity", "0,0.5"], ["needs a predictor"]),
    (["--gen-tokens", "1"], ["--gen-tokens"]),
    (["--load", "disk"], ["--load", "mmap, ram"]),
    (["--load", "ram", "--ram-budget", "10"], ["--ram-budget", "--load mmap"]),
    (["--positions", "8", "--load", "ram"], ["--positions", "--load"]),
])
def test_bench_argument_errors(tiny_llama_pkg, tmp_path, capsys, argv, words):
    out = tmp_path / "b"
    rc, _, err = run(capsys, "bench", tiny_llama_pkg, *argv, "-o", out, "-q")
    assert rc == 1
    for w in words:
        assert w in err, err
    assert not out.exists()


def test_bench_load_mmap_and_ram_side_by_side(tiny_llama_pkg, tmp_path, capsys):
    """--load mmap,ram runs every configuration both ways in one run: a load column, the same bytes
    read per token, and "vs dense" taken against the dense run of the same load."""
    out = tmp_path / "b"
    rc, stdout, err = run(capsys, "bench", tiny_llama_pkg, *SMALL, "--load", "mmap,ram", "-o", out)
    assert rc == 0, err
    rows = json.loads((out / "bench.json").read_text())["summary"]
    assert [r["load"] for r in rows] == ["mmap", "ram"]
    assert rows[0]["mb_read_per_token"] == pytest.approx(rows[1]["mb_read_per_token"])
    # weights read into anonymous memory are not file-backed: the file share of RSS drops
    assert rows[1]["rss_file_mb"] < rows[0]["rss_file_mb"]
    md = (out / "bench.md").read_text()
    assert "| threads | load | tok/s | vs dense |" in md
    assert "| 1 | ram |" in md and "| 1 | mmap |" in md and md.count("| 1.00x |") == 2

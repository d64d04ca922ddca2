"""Issue 21's CLI findings, each pinned: help a newcomer can read, one-line errors instead of
tracebacks, bad output paths refused before the long work (export's -o before the model loads, and
--force never replacing a directory that is not a package or empty), missing text files named as
such, the context-full stop said on stderr, .venv/ ignored, `export -q` quiet, a one-level bench
figure that shows something. (SIGTERM during export: tests/test_atomic_export.py.)"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from edgesparse.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]


def subparsers(p: argparse.ArgumentParser):
    yield "edgesparse", p
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            for name, sp in a.choices.items():
                yield name, sp


def test_every_option_has_help():
    missing = [f"{name} {a.option_strings or a.dest}" for name, p in subparsers(build_parser()) for a in p._actions
               if not isinstance(a, argparse._SubParsersAction) and not a.help]
    assert missing == []


def test_help_shows_defaults_and_the_flow(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "Raspberry Pi" in out and "export" in out and "calibrate" in out and "thin layer" not in out
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "(default: 32)" in out and "(default: 3)" in out and "(default: edgesparse-bench)" in out


def test_export_help_names_the_embedded_models(capsys):
    with pytest.raises(SystemExit):
        main(["export", "--help"])
    out = capsys.readouterr().out
    assert "smollm2-135m" in out and "qwen2.5-coder-0.5b" in out


def test_bare_command_prints_usage_and_commands(capsys):
    assert main([]) == 2
    err = capsys.readouterr().err
    assert "usage: edgesparse" in err and "run" in err and "bench" in err and "Typical flow" in err


def one_line(capsys, argv, needle) -> str:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert rc == 1 and "Traceback" not in err, err
    assert len(err.splitlines()) == 1 and needle in err, err
    return err


def test_non_utf8_prompt_is_one_line(capsys, tiny_llama_pkg):
    bad = b"w5 \xff w6".decode("utf-8", "surrogateescape")       # what the shell hands over
    one_line(capsys, ["run", tiny_llama_pkg, "-p", bad], "-p/--prompt: not valid UTF-8")


def test_stats_json_in_a_missing_directory_fails_before_generating(capsys, tiny_llama_pkg, tmp_path):
    err = one_line(capsys, ["run", tiny_llama_pkg, "-p", "w5", "--stats-json", tmp_path / "no" / "s.json"],
                   "does not exist")
    assert "--stats-json" in err


@pytest.mark.parametrize("cmd", ["eval", "analyze", "bench"])
def test_output_that_is_a_file_fails_first(capsys, tiny_llama_pkg, tmp_path, cmd):
    f = tmp_path / "taken"
    f.write_text("x")
    extra = ["--text", "wikitext2"] if cmd != "bench" else []
    one_line(capsys, [cmd, tiny_llama_pkg, *extra, "-o", f], "exists and is not a directory")


def test_missing_text_path_is_a_missing_file(tmp_path, monkeypatch):
    from edgesparse.errors import EdgesparseError
    from edgesparse.runtime.sparsity.textdata import load_text
    monkeypatch.chdir(tmp_path)
    for spec in ("data/calib.txt", "./calib", "/nope/calib"):
        with pytest.raises(EdgesparseError, match=f"--text {spec}: no such file"):
            load_text(spec, "valid")


def test_full_context_is_said_on_stderr(capsys, tiny_llama_pkg, tmp_path):
    js = tmp_path / "s.json"
    rc = main(["run", str(tiny_llama_pkg), "-p", "w5 w6 w7", "-n", "50", "--ctx", "10", "--stats-json", str(js)])
    out, err = capsys.readouterr()
    assert rc == 0
    assert "context of 10 tokens is full (raise --ctx" in err
    s = json.loads(js.read_text())
    assert s["stop"] == "context" and s["generated_tokens"] == 10 - 3 + 1   # the last one from position 10's logits


def test_stop_reasons_in_stats(capsys, tiny_llama_pkg, tmp_path):
    js = tmp_path / "s.json"
    assert main(["run", str(tiny_llama_pkg), "-p", "w5 w6", "-n", "2", "--stats", "--stats-json", str(js)]) == 0
    err = capsys.readouterr().err
    assert json.loads(js.read_text())["stop"] in ("tokens", "eos") and "-n tokens generated" in err


def test_venv_is_ignored():
    """A virtual environment beside the checkout (.venv/, venv/) is not offered for committing."""
    lines = (ROOT / ".gitignore").read_text().splitlines()
    assert ".venv/" in lines and "venv/" in lines


def test_python_dash_m_bare_exits_2(tmp_path):
    p = subprocess.run([sys.executable, "-m", "edgesparse"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert p.returncode == 2 and "commands:" in p.stderr


# -- export -o: checked before the model loads; --force replaces a package or an empty directory only --
def test_export_output_is_checked_before_the_model_loads(capsys, tiny_llama_pkg, tmp_path, monkeypatch):
    """Every -o that export must not write is refused with one line naming it, before the model is
    even looked up (resolving, loading: 5-20 s), with or without --force; nothing is touched."""
    import shutil

    from edgesparse.export import source

    def never(model):
        raise AssertionError(f"the model {model!r} was looked up before -o was checked")
    monkeypatch.setattr(source, "resolve", never)
    precious = tmp_path / "precious"                    # a user's directory: never replaced
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    webapp = tmp_path / "webapp"                        # a manifest.json that is not a package's
    webapp.mkdir()
    (webapp / "manifest.json").write_text('{"name": "my web app"}')
    afile = tmp_path / "afile"
    afile.write_text("x")
    pkg, empty = tmp_path / "pkg.esp", tmp_path / "empty"
    shutil.copytree(tiny_llama_pkg, pkg)
    empty.mkdir()
    before = {p: sorted(x.name for x in p.iterdir()) for p in (precious, webapp, pkg, empty)}
    cases = [(precious, True, "is not an edgesparse package and is not empty; refusing to replace it, even with"),
             (precious, False, "is not an edgesparse package and is not empty"),
             (webapp, True, "is not an edgesparse package"),
             (afile, True, "exists and is not a directory"),
             (pkg, False, "already exists (package); pass --force"),
             (empty, False, "already exists (empty directory); pass --force"),
             (tmp_path / "no" / "x.esp", True, f"the directory {tmp_path / 'no'} does not exist")]
    for out, force, needle in cases:
        err = one_line(capsys, ["export", "smollm2-135m", "-o", out, "-q"] + ["--force"] * force, needle)
        assert f"-o {out}:" in err
    assert {p: sorted(x.name for x in p.iterdir()) for p in before} == before
    assert (precious / "notes.txt").read_text() == "keep me" and afile.read_text() == "x"


def test_export_force_fills_an_empty_directory(capsys, tiny_llama_dir, tmp_path):
    out = tmp_path / "out.esp"
    out.mkdir()
    assert main(["export", str(tiny_llama_dir), "-o", str(out), "--force", "-q"]) == 0
    assert capsys.readouterr().err.splitlines() == [f"wrote {out}"]
    assert main(["verify", str(out)]) == 0
    assert [p.name for p in tmp_path.iterdir()] == ["out.esp"]     # no partial directory left


# -- export -q: transformers says nothing ------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    from conftest import TINY
    from helpers.tiny_gguf import write_tiny_gguf
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", TINY)


def test_quiet_export_says_only_what_it_wrote(tiny_gguf, tmp_path):
    """The CLI: `export -q` of a GGUF prints one line, `wrote OUT`. The same export without -q shows
    what -q silences (transformers' warnings, its merges bar, the GGUF conversion bar)."""
    outs = {q: tmp_path / f"{q}.esp" for q in ("quiet", "loud")}
    procs = {q: subprocess.Popen([sys.executable, "-m", "edgesparse", "export", str(tiny_gguf), "-o", str(out)]
                                 + (["-q"] if q == "quiet" else []), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True) for q, out in outs.items()}
    res = {q: (*p.communicate(timeout=600), p.returncode) for q, p in procs.items()}
    loud = res["loud"][1]
    assert res["loud"][2] == 0, loud
    assert "legacy" in loud and "building merges" in loud and "Converting and de-quantizing GGUF tensors" in loud
    _, err, rc = res["quiet"]
    assert rc == 0 and err.splitlines() == [f"wrote {outs['quiet']}"], err


def test_quiet_export_restores_transformers(tiny_gguf, tmp_path, capfd):
    """In a program: a quiet export prints nothing, and transformers' verbosity, its progress bars and
    sys.stderr are what they were before (here a verbosity that is not the default)."""
    from transformers.utils import logging as hf_logging

    from edgesparse.export import export
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_info()
    try:
        before = (hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled(), sys.stderr)
        export(str(tiny_gguf), tmp_path / "q.esp", progress=False)
        assert (hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled(), sys.stderr) == before
    finally:
        hf_logging.set_verbosity(verbosity)
    assert capfd.readouterr().err == ""


# -- bench with one configuration: a distribution, not a dot -----------------------------------
def test_one_level_bench_draws_latency_distribution_and_memory(capsys, tiny_llama_pkg, tmp_path):
    """One configuration: bench.png shows every decode step's latency (all rounds) as a distribution
    and the memory split as bars, not one dot on a sparsity axis. Over two levels it stays tok/s and
    peak RSS against sparsity."""
    from edgesparse.runtime.measure.plots import bench_figure
    out = tmp_path / "b"
    assert main(["bench", str(tiny_llama_pkg), "--threads", "1", "--gen-tokens", "9", "--prompt-tokens", "4",
                 "--rounds", "2", "-q", "-o", str(out)]) == 0
    capsys.readouterr()
    assert (out / "bench.png").read_bytes()[:4] == b"\x89PNG"
    res = json.loads((out / "bench.json").read_text())
    (row,) = res["summary"]
    lat = sorted(x for run in row["runs"] for x in run["latency_ms"])
    assert len(lat) == 2 * 8 and all(x > 0 for x in lat)           # 9 tokens: 8 decode steps per round
    lat_ax, mem_ax = bench_figure(res).axes
    (curve,) = [ln for ln in lat_ax.get_lines() if not ln.get_label().startswith("_")]   # not the p50/p90/p99 guides
    assert list(curve.get_xdata()) == lat
    assert list(curve.get_ydata()) == pytest.approx([(i + 1) / 16 for i in range(16)])
    assert "dense 0, 1 threads" in curve.get_label() and "tok/s" in curve.get_label()
    assert [b.get_width() for b in mem_ax.patches] == pytest.approx([row["rss_file_mb"], row["rss_anon_mb"]])
    (peak,) = [ln for ln in mem_ax.get_lines() if ln.get_label() == "peak RSS"]
    assert list(peak.get_xdata()) == [row["peak_rss_mb"]]

    half = dict(row, sparsity=0.5, ffn="threshold", tok_s=row["tok_s"] * 1.2)
    tok_ax = bench_figure(dict(res, summary=[row, half])).axes[0]
    (line,) = tok_ax.get_lines()
    assert list(line.get_xdata()) == [0.0, 0.5] and list(line.get_ydata()) == [row["tok_s"], half["tok_s"]]

"""The command line on the tiny package: entry points, greedy and sampled runs, --chat, stats,
export --force."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from importlib.metadata import version

from edgesparse.cli import main
from edgesparse.format import read_manifest

PROMPT = "w5 w6 w7"


def run_ok(capsys, *args) -> tuple[str, str]:
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    assert rc == 0, err
    return out, err


def test_python_dash_m_version(tmp_path):
    p = subprocess.run([sys.executable, "-m", "edgesparse", "--version"], capture_output=True, text=True,
                       timeout=120, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == f"edgesparse {version('edgesparse')}"


def test_python_dash_m_without_command(tmp_path):
    p = subprocess.run([sys.executable, "-m", "edgesparse"], capture_output=True, text=True, timeout=120,
                       cwd=tmp_path)
    assert p.returncode == 2                       # argparse usage error
    assert "usage: edgesparse" in p.stderr and "Traceback" not in p.stderr


def test_greedy_run_prints_transformers_greedy_text(capsys, tiny_llama_pkg, tiny_llama_dir, tiny_hf):
    import torch
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    ids = tok(PROMPT, return_tensors="pt").input_ids
    assert ids[0].tolist() == [5, 6, 7]
    new = tiny_hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False,
                           pad_token_id=0)[0, 3:].tolist()
    want = tok.decode(new, skip_special_tokens=True)
    out, err = run_ok(capsys, "run", tiny_llama_pkg, "-p", PROMPT, "-n", 10)
    print(repr(out))
    assert out == want + "\n" and err == ""


def test_sampling_is_reproducible_with_a_seed(capsys, tiny_llama_pkg):
    args = ["run", tiny_llama_pkg, "-p", PROMPT, "-n", 12, "--temperature", "1.5"]
    a, _ = run_ok(capsys, *args, "--seed", 1)
    b, _ = run_ok(capsys, *args, "--seed", 1)
    c, _ = run_ok(capsys, *args, "--seed", 2)
    greedy, _ = run_ok(capsys, "run", tiny_llama_pkg, "-p", PROMPT, "-n", 12)
    print(repr(a), repr(c), repr(greedy))
    assert a == b
    assert a != c                # a near-uniform random model at T=1.5: 12 equal draws would be a fluke
    assert a != greedy
    assert all(w.startswith("w") for w in a.split())


def test_tiny_top_p_is_greedy(capsys, tiny_llama_pkg):
    """top-p keeps the smallest set of tokens with mass >= p: for a tiny p that is the argmax alone."""
    greedy, _ = run_ok(capsys, "run", tiny_llama_pkg, "-p", PROMPT, "-n", 8)
    nucleus, _ = run_ok(capsys, "run", tiny_llama_pkg, "-p", PROMPT, "-n", 8, "--temperature", "2",
                        "--top-p", "1e-6", "--seed", 3)
    assert nucleus == greedy


def test_chat_without_template_is_an_error(capsys, tiny_llama_pkg):
    assert read_manifest(tiny_llama_pkg).chat_template is None
    rc = main(["run", str(tiny_llama_pkg), "-p", PROMPT, "--chat"])
    out, err = capsys.readouterr()
    assert rc == 1 and out == ""
    assert err.splitlines() == ["edgesparse: error: --chat: this package has no chat template"]


TEMPLATE = ("{% for m in messages %}{{ bos_token }} w3 {{ m['content'] }} {{ eos_token }}\n{% endfor %}"
            "{% if add_generation_prompt %} w4{% endif %}")


def test_chat_template_renders_like_transformers(capsys, tiny_llama_pkg, tiny_llama_dir, tmp_path):
    import dataclasses
    from transformers import AutoTokenizer

    from edgesparse.format_write import write_manifest_atomic
    from edgesparse.runtime.core.package import Package
    from edgesparse.runtime.core.text import TextCodec
    pkg = tmp_path / "chat.esp"
    shutil.copytree(tiny_llama_pkg, pkg)
    write_manifest_atomic(pkg, dataclasses.replace(read_manifest(pkg), chat_template=TEMPLATE))
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    tok.chat_template = TEMPLATE
    want = tok.apply_chat_template([{"role": "user", "content": "w9 w10"}], add_generation_prompt=True,
                                   tokenize=True)
    if not isinstance(want, list):
        want = want["input_ids"]
    got = TextCodec(Package(pkg)).chat_prompt("w9 w10")
    assert got == want == [1, 3, 9, 10, 2, 4]
    out, err = run_ok(capsys, "run", pkg, "-p", "w9 w10", "--chat", "-n", 3)
    assert len(out.split()) == 3 and err == ""


def test_stats_and_stats_json(capsys, tiny_llama_pkg, tmp_path):
    js = tmp_path / "s.json"
    out, err = run_ok(capsys, "run", tiny_llama_pkg, "-p", PROMPT, "-n", 5, "--threads", 1, "--stats",
                      "--stats-json", js)
    assert len(out.split()) == 5
    assert len(err.splitlines()) == 4 and "threads 1" in err
    s = json.loads(js.read_text())
    assert s["prompt_tokens"] == 3 and s["generated_tokens"] == 5 and s["threads"] == 1
    cfg = read_manifest(tiny_llama_pkg).config
    assert s["ffn_rows_total"] == 3 * cfg.ffn_dim * cfg.n_layers and s["ffn_rows_read_fraction"] == 1.0


def test_stats_json_is_strict_json_without_decode_steps(capsys, tiny_llama_pkg, tmp_path):
    """-n 1: no decode step, so no tokens/s or latency; the file must still be standard JSON."""
    js = tmp_path / "s.json"
    run_ok(capsys, "run", tiny_llama_pkg, "-p", PROMPT, "-n", 1, "--stats-json", js)

    def reject(name):
        raise ValueError(f"{name} is not JSON")
    s = json.loads(js.read_text(), parse_constant=reject)
    assert s["generated_tokens"] == 1
    assert s["decode_tokens_per_s"] is None and s["latency_p50_ms"] is None


def test_export_force_replaces_a_package(capsys, tiny_llama_pkg, tiny_tied_dir, tmp_path):
    pkg = tmp_path / "pkg"
    shutil.copytree(tiny_llama_pkg, pkg)
    assert not read_manifest(pkg).config.tie_embeddings
    out, err = run_ok(capsys, "export", tiny_tied_dir, "-o", pkg, "--force", "-q")
    assert err.splitlines() == [f"wrote {pkg}"]
    m = read_manifest(pkg)
    assert m.config.tie_embeddings and not (pkg / "head.bin").exists()
    assert m.source == {"kind": "hf-dir", "model": str(tiny_tied_dir)}
    assert [p.name for p in tmp_path.iterdir()] == ["pkg"]     # no .partial / .old left behind
    out, _ = run_ok(capsys, "verify", pkg)
    assert "ok" in out

"""Bad input through the CLI: a non-zero exit, exactly one line `edgesparse: error: ...` on stderr
naming the file / argument / architecture at fault, and no traceback. Every case works on a copy
of the session's package."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from edgesparse.cli import main
from edgesparse.errors import EdgesparseError
from edgesparse.format import FORMAT_VERSION

PROMPT = ["-p", "w5 w6"]


def cli_error(capsys, argv, *needles) -> str:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert rc != 0, err
    assert "Traceback" not in out + err
    lines = err.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {lines}"
    assert lines[0].startswith("edgesparse: error: ")
    for n in needles:
        assert str(n) in lines[0], f"{n!r} not named in {lines[0]!r}"
    return lines[0]


def tree_digest(d: Path) -> dict[str, str]:
    return {p.relative_to(d).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture
def pkg(tiny_llama_pkg, tmp_path) -> Path:
    """A private copy of the tiny package, free to break."""
    d = tmp_path / "pkg"
    shutil.copytree(tiny_llama_pkg, d)
    return d


def edit_manifest(pkg: Path, fn) -> Path:
    m = pkg / "manifest.json"
    doc = json.loads(m.read_text())
    fn(doc)
    m.write_text(json.dumps(doc))
    return m


# -- the package directory ---------------------------------------------------------------------
def test_nonexistent_package(capsys, tmp_path):
    missing = tmp_path / "no-such.esp"
    cli_error(capsys, ["run", missing, *PROMPT], missing, "no such package")


def test_package_is_a_file(capsys, tmp_path):
    f = tmp_path / "file.esp"
    f.write_text("x")
    cli_error(capsys, ["run", f, *PROMPT], f, "not a directory")


def test_missing_weight_file(capsys, pkg):
    (pkg / "ffn" / "001.bin").unlink()
    cli_error(capsys, ["run", pkg, *PROMPT], pkg / "ffn" / "001.bin", "missing")


def test_missing_manifest(capsys, pkg):
    (pkg / "manifest.json").unlink()
    cli_error(capsys, ["run", pkg, *PROMPT], pkg / "manifest.json", "missing")


def test_truncated_weight_file(capsys, pkg):
    f = pkg / "ffn" / "002.bin"
    data = f.read_bytes()
    f.write_bytes(data[:-100])
    cli_error(capsys, ["run", pkg, *PROMPT], f, "truncated", len(data) - 100, len(data))


def test_empty_weight_file(capsys, pkg):
    f = pkg / "ffn" / "000.bin"
    size = f.stat().st_size
    f.write_bytes(b"")
    cli_error(capsys, ["run", pkg, *PROMPT], f, "truncated", "0 bytes", size)


def test_oversized_weight_file(capsys, pkg):
    f = pkg / "embed.bin"
    data = f.read_bytes()
    f.write_bytes(data + b"\0" * 4096)
    cli_error(capsys, ["run", pkg, *PROMPT], f, "larger than listed", len(data) + 4096, len(data))


def test_corrupted_onnx_graph(capsys, pkg):
    # Graphs are tiny, so their hashes are checked on every load, not only by `verify`.
    f = pkg / "attn" / "001.onnx"
    f.write_bytes(b"\xff" * f.stat().st_size)          # same size
    cli_error(capsys, ["run", pkg, *PROMPT], f, "sha256 mismatch")


def test_unloadable_onnx_graph(capsys, pkg):
    # A graph whose manifest hash matches but that ONNX Runtime cannot parse.
    f = pkg / "attn" / "001.onnx"
    bad = b"\xff" * f.stat().st_size
    f.write_bytes(bad)
    sha = hashlib.sha256(bad).hexdigest()
    edit_manifest(pkg, lambda d: [e.update(sha256=sha) for e in d["files"] if e["path"] == "attn/001.onnx"])
    cli_error(capsys, ["run", pkg, *PROMPT], f, "ONNX Runtime")


def test_corrupted_tokenizer(capsys, pkg):
    f = pkg / "tokenizer.json"
    f.write_bytes(b"{" * f.stat().st_size)
    cli_error(capsys, ["run", pkg, *PROMPT], f, "tokenizers")


# -- the manifest ------------------------------------------------------------------------------
def test_unknown_format_version(capsys, pkg):
    m = edit_manifest(pkg, lambda d: d.update(format_version=FORMAT_VERSION + 1))
    cli_error(capsys, ["run", pkg, *PROMPT], m, f"version {FORMAT_VERSION + 1}")


def test_old_format_version(capsys, pkg):
    m = edit_manifest(pkg, lambda d: d.update(format_version=FORMAT_VERSION - 1))
    cli_error(capsys, ["run", pkg, *PROMPT], m, f"version {FORMAT_VERSION - 1}", "re-export")


def test_manifest_not_json(capsys, pkg):
    m = pkg / "manifest.json"
    m.write_text(m.read_text()[:-40])
    cli_error(capsys, ["run", pkg, *PROMPT], m, "JSON")


def test_empty_manifest(capsys, pkg):
    m = pkg / "manifest.json"
    m.write_bytes(b"")
    cli_error(capsys, ["run", pkg, *PROMPT], m, "JSON")


def test_manifest_not_utf8(capsys, pkg):
    m = pkg / "manifest.json"
    m.write_bytes(b"\xff\xfe" + m.read_bytes())
    cli_error(capsys, ["run", pkg, *PROMPT], m)


@pytest.mark.parametrize("key", ["tensors", "layers", "config", "files", "sparsity"])
def test_manifest_missing_key(capsys, pkg, key):
    m = edit_manifest(pkg, lambda d: d.pop(key))
    cli_error(capsys, ["run", pkg, *PROMPT], m, repr(key))


def test_manifest_config_missing_key(capsys, pkg):
    edit_manifest(pkg, lambda d: d["config"].pop("head_dim"))
    cli_error(capsys, ["run", pkg, *PROMPT], "manifest", "config", "head_dim")


def test_negative_shape(capsys, pkg):
    m = edit_manifest(pkg, lambda d: d["tensors"]["embed"].update(shape=[-211, 96]))
    cli_error(capsys, ["run", pkg, *PROMPT], m, "'embed'", "shape", "-211")


def test_shape_past_end_of_file(capsys, pkg):
    m = edit_manifest(pkg, lambda d: d["tensors"]["embed"].update(shape=[212, 96]))
    cli_error(capsys, ["run", pkg, *PROMPT], m, "'embed'", "embed.bin")


@pytest.mark.parametrize("offset", [4096, 1 << 40])
def test_offset_past_end_of_file(capsys, pkg, offset):
    m = edit_manifest(pkg, lambda d: d["tensors"]["lm_head"].update(offset=offset))
    cli_error(capsys, ["run", pkg, *PROMPT], m, "'lm_head'", offset, "past the end of head.bin")


def test_config_inconsistent(capsys, pkg):
    edit_manifest(pkg, lambda d: d["config"].update(n_kv_heads=4))
    cli_error(capsys, ["run", pkg, *PROMPT], "n_heads=6", "n_kv_heads=4")


def test_path_outside_package(capsys, pkg):
    m = edit_manifest(pkg, lambda d: d["files"][0].update(path="../outside.bin"))
    cli_error(capsys, ["run", pkg, *PROMPT], m, "../outside.bin")


def test_nan_threshold(capsys, pkg):
    """A bare NaN (Python's json would accept it) is rejected as a corrupted manifest."""
    m = pkg / "manifest.json"
    text = m.read_text()
    assert '"threshold": 0.0' in text
    m.write_text(text.replace('"threshold": 0.0', '"threshold": NaN', 1))
    cli_error(capsys, ["run", pkg, *PROMPT], m, "NaN")


@pytest.mark.parametrize("value", [-1.0, "0.5", None])
def test_bad_threshold(capsys, pkg, value):
    m = edit_manifest(pkg, lambda d: d["layers"][1].update(threshold=value))
    cli_error(capsys, ["run", pkg, *PROMPT], m, "layers[1]", "threshold")


# -- arguments ---------------------------------------------------------------------------------
@pytest.mark.parametrize("args,needle", [
    (["--threads", "0"], "--threads"),
    (["--threads", "-2"], "--threads"),
    (["--ctx", "0"], "--ctx"),
    (["-n", "0"], "-n/--tokens"),
    (["--temperature", "-1"], "--temperature"),
    (["--temperature", "nan"], "--temperature"),
    (["--top-p", "0"], "--top-p"),
    (["--top-p", "1.5"], "--top-p"),
    (["--sparsity", "1.5"], "--sparsity"),
    (["--sparsity", "nan"], "--sparsity"),
])
def test_bad_run_arguments(capsys, tiny_llama_pkg, args, needle):
    cli_error(capsys, ["run", tiny_llama_pkg, *PROMPT, *args], needle)


def test_empty_prompt(capsys, tiny_llama_pkg):
    cli_error(capsys, ["run", tiny_llama_pkg, "-p", ""], "-p/--prompt", "empty")


def test_prompt_longer_than_context(capsys, tiny_llama_pkg):
    cli_error(capsys, ["run", tiny_llama_pkg, "-p", "w5 w6 w7 w8", "--ctx", "4"], "-p/--prompt", "4 tokens", "--ctx")


# -- export ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory) -> Path:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("gpt2") / "model"
    GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=32, n_embd=16, n_layer=1, n_head=2)).save_pretrained(d)
    return d


def test_export_unsupported_architecture(capsys, gpt2_dir, tmp_path):
    from edgesparse.export.archs import REGISTRY
    out = tmp_path / "gpt2.esp"
    line = cli_error(capsys, ["export", gpt2_dir, "-o", out, "-q"], "'gpt2'", "supported")
    for name in REGISTRY:
        assert name in line
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []           # no partial directory left behind


def test_export_missing_model(capsys, tmp_path):
    cli_error(capsys, ["export", tmp_path / "nothing.gguf", "-o", tmp_path / "o.esp", "-q"], "nothing.gguf")
    empty = tmp_path / "empty"
    empty.mkdir()
    cli_error(capsys, ["export", empty, "-o", tmp_path / "o.esp", "-q"], empty, "config.json")


def test_export_hub_id_offline(capsys, tmp_path):
    # conftest sets HF_HUB_OFFLINE=1: a hub id is refused without touching the network
    cli_error(capsys, ["export", "someone/some-model", "-o", tmp_path / "o.esp", "-q"], "someone/some-model",
              "HF_HUB_OFFLINE")


def test_export_refuses_existing_dir(capsys, pkg, tiny_llama_dir):
    before = tree_digest(pkg)
    cli_error(capsys, ["export", tiny_llama_dir, "-o", pkg, "-q"], pkg, "--force")
    assert tree_digest(pkg) == before
    assert [p.name for p in pkg.parent.iterdir()] == ["pkg"]


def test_export_force_refuses_non_package_dir(capsys, tmp_path, tiny_llama_dir):
    d = tmp_path / "precious"
    d.mkdir()
    (d / "notes.txt").write_text("keep me")
    cli_error(capsys, ["export", tiny_llama_dir, "-o", d, "--force", "-q"], d, "not an edgesparse package")
    assert (d / "notes.txt").read_text() == "keep me"
    assert [p.name for p in tmp_path.iterdir()] == ["precious"]


# -- verify ------------------------------------------------------------------------------------
def test_verify_good_and_flipped_byte(capsys, pkg):
    assert main(["verify", str(pkg)]) == 0
    out, err = capsys.readouterr()
    assert out.startswith(f"{pkg}: ok") and err == ""
    f = pkg / "ffn" / "001.bin"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))
    cli_error(capsys, ["verify", pkg], f, "sha256")
    cli_error(capsys, ["run", pkg, *PROMPT, "--verify"], f, "sha256")


def test_verify_nonexistent_package(capsys, tmp_path):
    missing = tmp_path / "no-such.esp"
    cli_error(capsys, ["verify", missing], missing, "no such package")


def test_debug_reraises(capsys, tmp_path):
    with pytest.raises(EdgesparseError, match="no such package"):
        main(["--debug", "run", str(tmp_path / "missing.esp"), *PROMPT])

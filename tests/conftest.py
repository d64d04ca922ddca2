"""Shared fixtures: tiny random Llama models (HF directories + exported packages) and the real
SmolLM2 package for the `slow` tests.

torch/transformers are imported inside the fixtures only, so test modules that never request
them (and the subprocesses of test_device_imports) stay free of them.
"""

from __future__ import annotations

import os

# No test may reach the Hugging Face hub; set before anything imports huggingface_hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

# Tiny model: small and odd-ish on purpose. head_dim = 96/6 = 16 (ORT's GroupQueryAttention wants a
# multiple of 8), GQA with 3 query heads per kv head, intermediate 136 is not a power of two.
TINY = dict(vocab_size=211, hidden_size=96, intermediate_size=136, num_hidden_layers=3,
            num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=256,
            rope_theta=10000.0, bos_token_id=1, eos_token_id=2)
UNK, BOS, EOS = "w0", "w1", "w2"


def _save_tokenizer(path: Path, vocab_size: int) -> None:
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {f"w{i}": i for i in range(vocab_size)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    # single_word: the special tokens w0/w1/w2 must not match inside w10, w109, ...
    special = {k: AddedToken(v, single_word=True, special=True) for k, v in
               (("eos_token", EOS), ("bos_token", BOS), ("unk_token", UNK))}
    PreTrainedTokenizerFast(tokenizer_object=tk, **special).save_pretrained(path)


def _make_tiny(path: Path, seed: int, **over) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(**(TINY | over))
    LlamaForCausalLM(cfg).eval().save_pretrained(path)
    _save_tokenizer(path, cfg.vocab_size)
    return path


def _hf_greedy(hf, prompt: list[int], n: int) -> list[int]:
    """transformers' greedy continuation of prompt, n new tokens, cut after EOS (HF pads past
    EOS; the runtime stops at it). Shared with devices/qemu-arm64/host_reference.py."""
    import torch
    t = torch.tensor([prompt])
    out = hf.generate(t, attention_mask=torch.ones_like(t), max_new_tokens=n, do_sample=False,
                      pad_token_id=0)[0, len(prompt):].tolist()
    eos = hf.generation_config.eos_token_id
    return out[:out.index(eos) + 1] if eos in out else out


@pytest.fixture(scope="session")
def hf_greedy():
    return _hf_greedy


def _export(src: Path, out: Path, **kw) -> Path:
    from edgesparse.export import export
    return export(str(src), out, progress=False, **kw)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """HF directory of a random Llama (untied lm_head) with a WordLevel tokenizer w0..w210."""
    return _make_tiny(tmp_path_factory.mktemp("tiny_hf") / "model", seed=0, tie_word_embeddings=False)


@pytest.fixture(scope="session")
def tiny_llama_pkg(tiny_llama_dir, tmp_path_factory) -> Path:
    """tiny_llama_dir exported as a float32 package. Read-only: tests copy it before changing it."""
    return _export(tiny_llama_dir, tmp_path_factory.mktemp("tiny_pkg") / "tiny.esp")


@pytest.fixture(scope="session")
def tiny_llama_pkg_f16(tiny_llama_dir, tmp_path_factory) -> Path:
    """The same model stored as float16 weights."""
    return _export(tiny_llama_dir, tmp_path_factory.mktemp("tiny_pkg16") / "tiny16.esp", dtype="float16")


@pytest.fixture(scope="session")
def tiny_tied_dir(tmp_path_factory) -> Path:
    """A second random Llama with tie_word_embeddings=True (lm_head = embedding)."""
    return _make_tiny(tmp_path_factory.mktemp("tied_hf") / "model", seed=1, tie_word_embeddings=True)


@pytest.fixture(scope="session")
def tiny_tied_pkg(tiny_tied_dir, tmp_path_factory) -> Path:
    return _export(tiny_tied_dir, tmp_path_factory.mktemp("tied_pkg") / "tied.esp")


@pytest.fixture(scope="session")
def tiny_hf(tiny_llama_dir):
    """The transformers model behind tiny_llama_pkg, float32, eval mode."""
    import torch
    from transformers import LlamaForCausalLM
    torch.set_grad_enabled(False)
    return LlamaForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def smollm2_pkg(tmp_path_factory) -> Path:
    """The embedded default (SmolLM2-135M-Instruct, Q4_1 GGUF dequantised to float32), exported.
    ~30 s: request it from tests marked `slow` only."""
    from edgesparse.export import export
    return export(None, tmp_path_factory.mktemp("smollm2") / "smol.esp", progress=False)


@pytest.fixture(scope="session")
def smollm2_hf():
    """(transformers' tokenizer, float32 transformers model) of the same default source the package
    came from. The tokenizer is transformers' GGUF conversion: right for decoding and for rendering
    the chat template, but its encoding prepends a BOS SmolLM2 does not have (its GGUF says
    add_bos_token = false); token ids to compare with come from llama.cpp (`llama_tokenize`)."""
    from transformers import AutoTokenizer

    from edgesparse.export import source
    src = source.resolve(None)
    cfg = source.load_config(src)
    return AutoTokenizer.from_pretrained(src.directory, gguf_file=src.gguf_file), source.load_model(src, cfg)


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory):
    """make(config_class_name, model_class_name, seed, init=None, **overrides) -> HF directory of a
    tiny random model of that architecture (same sizes as TINY) with the WordLevel tokenizer.
    init(model), if given, runs before saving (e.g. to make zero-initialised biases random)."""
    def make(config_cls: str, model_cls: str, seed: int = 0, init=None, **over) -> Path:
        import torch
        import transformers
        torch.manual_seed(seed)
        cfg = getattr(transformers, config_cls)(**(TINY | over))
        path = tmp_path_factory.mktemp(config_cls.lower()) / "model"
        model = getattr(transformers, model_cls)(cfg).eval()
        if init is not None:
            init(model)
        model.save_pretrained(path)
        _save_tokenizer(path, cfg.vocab_size)
        return path
    return make


@pytest.fixture(scope="session")
def randomize():
    """init for tiny_model_factory: random biases and norm weights. transformers initialises them to
    zeros and ones (Gemma's 1 + w: zeros), which would hide a dropped bias or a swapped norm."""
    def init(model) -> None:
        import torch
        g = torch.Generator().manual_seed(7)
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.data = torch.randn(p.shape, generator=g) * 0.5
            elif "norm" in name and name.endswith(".weight"):
                p.data = p.data + torch.randn(p.shape, generator=g) * 0.2
    return init


@pytest.fixture(scope="session")
def prefill_diff():
    """prefill_diff(hf, pkg, S) -> max |logit difference| between transformers' model hf and the
    runtime on package pkg, all S positions of one prefill of pseudo-random tokens (S <= 64: the
    Numba kernels; S > 64: the BLAS path)."""
    def diff(hf, pkg, S: int) -> float:
        import numpy as np
        import torch
        from edgesparse.runtime.core.model import Model
        ids = np.random.default_rng(0).integers(3, 211, S)
        ref = hf(torch.tensor(ids[None])).logits[0].numpy()
        return float(np.abs(Model(pkg, ctx=128).forward(ids, all_logits=True) - ref).max())
    return diff


def _need_llama_cpp(msg: str) -> None:
    """A test that compares with llama.cpp's own tools skips without them, and fails when
    EDGESPARSE_REQUIRE_LLAMA_CPP=1 (CI builds them first: .ci/run)."""
    if os.environ.get("EDGESPARSE_REQUIRE_LLAMA_CPP") == "1":
        pytest.fail(msg)
    pytest.skip(msg)


@pytest.fixture(scope="session")
def llama_cpp_bin() -> Path:
    """The directory of llama.cpp's tools (llama-bench, llama-perplexity, llama-tokenize,
    llama-quantize), found as bench and eval find them (runtime/measure/llama_cpp.py):
    EDGESPARSE_LLAMA_CPP_BIN, else devices/llama.cpp/build's cache for this CPU."""
    from edgesparse.errors import EdgesparseError
    from edgesparse.runtime.measure import llama_cpp
    try:
        return Path(llama_cpp.find("llama-bench")).parent
    except EdgesparseError as e:
        _need_llama_cpp(str(e))


@pytest.fixture(scope="session")
def smol_gguf() -> Path:
    """The embedded SmolLM2-135M-Instruct GGUF (Q4_1), the source of the smollm2_pkg fixture."""
    from edgesparse.export.source import resolve
    src = resolve(None)
    return Path(src.directory) / src.gguf_file


@pytest.fixture(scope="session")
def smol_gguf_as(llama_cpp_bin, smol_gguf, tmp_path_factory):
    """as_type("Q4_0") -> the embedded GGUF requantized by llama.cpp's own llama-quantize
    (--allow-requantize), made once per session: llama.cpp's files of a given width."""
    import subprocess
    made: dict[str, Path] = {}

    def make(ftype: str) -> Path:
        if ftype not in made:
            out = tmp_path_factory.mktemp("gguf") / f"smol-{ftype}.gguf"
            p = subprocess.run([str(llama_cpp_bin / "llama-quantize"), "--allow-requantize", str(smol_gguf), str(out),
                                ftype], capture_output=True, text=True, timeout=1800)
            assert p.returncode == 0, p.stderr[-2000:]
            made[ftype] = out
        return made[ftype]
    return make


@pytest.fixture(scope="session")
def llama_tokenize():
    """llama.cpp's own tokenizer (its llama-tokenize, a helpers.llama_cpp.LlamaTokenize), the
    reference for the package tokenizer: found, skipped or failed as llama_cpp_bin is. Imported
    here, not at the top: devices/qemu-arm64/host_reference.py loads this module by path, where
    tests/ (pytest's `pythonpath`) is not importable."""
    from helpers.llama_cpp import LlamaTokenize

    from edgesparse.errors import EdgesparseError
    from edgesparse.runtime.measure import llama_cpp
    try:
        return LlamaTokenize(llama_cpp.find("llama-tokenize"))
    except EdgesparseError as e:
        _need_llama_cpp(str(e))

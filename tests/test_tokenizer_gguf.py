"""The package tokenizer of a GGUF source (export/gguf_tokenizer.py) against llama.cpp's own tokenizer
(`llama-tokenize`, vocabulary only) on the same GGUF: token ids exactly equal, with and without the
BOS llama.cpp adds, with special-token parsing on and off; decoding against llama.cpp's pieces; the
BOS / end-of-generation ids against what llama.cpp's loader reports.

The GGUFs are vocab-only files written here with gguf-py from real tokenizer data that exists
offline: the embedded SmolLM2 GGUF's BPE vocabulary, under every gpt2 pre-tokenizer edgesparse
supports (llama.cpp picks its regexes by tokenizer.ggml.pre, so the same vocabulary must still match
under each), Qwen2.5-Coder's when its packages are installed, and sentencepiece's test models
(tests/data) as `llama`-model (SentencePiece) vocabularies in Llama-2, Gemma-3 and Phi-3 styles.
"""

from __future__ import annotations

import functools
import os
import struct
from pathlib import Path

import pytest

from edgesparse.errors import EdgesparseError
from edgesparse.export import embedded, gguf_tokenizer
from edgesparse.export.gguf_tokenizer import BYTE, CONTROL, USER_DEFINED

DATA = Path(__file__).parent / "data"
K = "tokenizer.ggml."

# Strings that stress a tokenizer: spaces, newlines, tabs, \r\n, digits, code, accents and combining
# marks, CJK, emoji (ZWJ sequences), characters outside an SPM vocabulary (byte fallback),
# contractions in several cases, empty and whitespace-only text.
STRESS = [
    "The capital of France is", "", " ", "   ", "\n", "\n\n\n", "\t", " \t \n ", "\r\n", "a\r\nb\r\n\r\nc",
    " leading space", "  two leading spaces", "trailing spaces  ", "several     spaces   between words",
    "line one\nline two\n\nline four\n", "tabs\tand\t\tmore\ttabs",
    "12 345 6789 1234567890123 3.14159 -42 1,000,000 2024-01-22 0x1F",
    "def f(x):\n    if x > 0:\n        return x * 2  # double\n\treturn None\n",
    "for (int i = 0; i < n; ++i) { s += a[i]; }\n",
    'print("hello, world!")\nx = {"a": [1, 2], \'b\': None}\n',
    "café naïve résumé Ångström façade", "e\u0301 o\u0308 n\u0303 combining marks", "Ελληνικά и русский",
    "東京は日本の首都です。", "中文测试，标点！", "한국어 텍스트",
    "emoji 😀 🎉 👍🏽 👩‍👩‍👧 🏳️‍🌈 ❤️", "mixed🙂text東京123abc",
    "It's I'M you'll We'RE they'Ve he'D she's 'll 'S 'sOK O'Neil",
    "\"quotes\" and 'single' — dashes – … ellipsis",
    "Hello .  , ! ? ' s 're 've",
    "\u00a0non-breaking\u2003em space\u3000ideographic \u200bzero width",
    "\x01\x04\x7f control \x1b[0m",
    "<html><body class='x'>y</body></html>", "ÿ Ġ Ċ ▁ ▁▁ <0x41>",
]
# Special-token texts of the vocabularies below, inside text (split out with parse_special; the
# user-defined ones always).
SPECIAL = [
    "<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n", "a<|endoftext|>b", "<|im_end|><|im_end|>",
    "x<|im_start|", "<|im_start|><|im_start", "</s> and <s> and <unk>", "<s>hello</s>",
    "<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n",
    "<|user|>\n  hi<|end|>\n<|assistant|> ok<|end|>  \n",
    "<mask> <table>\t\t▁▁x\t\t", "<reponame>edgesparse<file_sep>x.py\n", "<|endoftext|> <|endoftext|>",
]


# == GGUF files ========================================================================================
def write_vocab_gguf(path: Path, kv: dict) -> Path:
    """A GGUF holding metadata only: llama_model_load with vocab_only reads general.architecture and
    the tokenizer keys (load_hparams returns right after general.name)."""
    import gguf
    w = gguf.GGUFWriter(str(path), "llama")
    for k, v in kv.items():
        if isinstance(v, bool):
            w.add_bool(k, v)
        elif isinstance(v, int):
            w.add_uint32(k, v)
        elif isinstance(v, str):
            w.add_string(k, v)
        elif k == K + "scores":
            w.add_array(k, [float(x) for x in v])      # FLOAT32
        else:
            w.add_array(k, list(v))                    # strings, or INT32 token types
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    return path


def gguf_tokenizer_kv(path: Path) -> dict:
    """The tokenizer keys (and general.name) of a real GGUF, as values."""
    import gguf
    fields = gguf.GGUFReader(str(path)).fields
    return {k: f.contents() for k, f in fields.items() if k.startswith("tokenizer.") or k == "general.name"}


def spm_pieces(path: Path) -> list[tuple[str, float, int]]:
    """(piece, score, type) of a SentencePiece ModelProto: field 1, repeated SentencePiece
    {piece = 1 string, score = 2 float, type = 3 enum (1 normal, 2 unknown, 3 control, 4 user
    defined, 5 unused, 6 byte)}; proto2 defaults (score 0, type normal) when a field is absent."""
    def varint(b: bytes, i: int) -> tuple[int, int]:
        x = s = 0
        while True:
            x |= (b[i] & 0x7F) << s
            s += 7
            i += 1
            if b[i - 1] < 0x80:
                return x, i

    def fields(b: bytes):
        i = 0
        while i < len(b):
            key, i = varint(b, i)
            wire = key & 7
            if wire == 0:
                v, i = varint(b, i)
            elif wire == 1:
                v, i = b[i:i + 8], i + 8
            elif wire == 2:
                n, i = varint(b, i)
                v, i = b[i:i + n], i + n
            elif wire == 5:
                v, i = b[i:i + 4], i + 4
            else:
                raise ValueError(f"{path}: protobuf wire type {wire} at byte {i}")
            yield key >> 3, v

    out = []
    for num, v in fields(path.read_bytes()):
        if num == 1:
            p = dict(fields(v))
            out.append((p[1].decode("utf-8"), struct.unpack("<f", p[2])[0] if 2 in p else 0.0, p.get(3, 1)))
    return out


def spm_kv(model: str, byte_tokens: bool = True, extra: tuple = (), **keys) -> dict:
    """A llama-model vocabulary from a sentencepiece test model: <unk> <s> </s>, then (as Llama-2)
    the 256 <0xXX> byte tokens, then the model's pieces, then `extra` (text, type) tokens."""
    pieces = spm_pieces(DATA / model)
    assert [p for p, _, _ in pieces[:3]] == ["<unk>", "<s>", "</s>"]
    byte = [(f"<0x{b:02X}>", 0.0, BYTE) for b in range(256)] if byte_tokens else []
    vocab = pieces[:3] + byte + pieces[3:] + [(t, 0.0, ty) for t, ty in extra]
    kv = {K + "model": "llama", K + "tokens": [t for t, _, _ in vocab], K + "scores": [s for _, s, _ in vocab],
          K + "token_type": [ty for _, _, ty in vocab], K + "bos_token_id": 1, K + "eos_token_id": 2,
          K + "unknown_token_id": 0}
    return kv | {K + k: v for k, v in keys.items()}


# Every case is one GGUF; the gpt2 ones are SmolLM2's vocabulary under another tokenizer.ggml.pre
# (llama-bpe without add_bos_token: llama.cpp's default for it is true).
BPE_CASES = {
    "smollm": {},
    "gpt-2": {K + "pre": "gpt-2", K + "add_bos_token": None},
    "phi-2": {K + "pre": "phi-2", K + "add_bos_token": True, K + "add_eos_token": True},
    "llama-bpe": {K + "pre": "llama-bpe", K + "add_bos_token": None},
    "qwen2": {K + "pre": "qwen2"},
    "default": {K + "pre": None},
}
GEMMA_EXTRA = (("<start_of_turn>", USER_DEFINED), ("<end_of_turn>", USER_DEFINED), ("<mask>", CONTROL),
               ("\t\t", USER_DEFINED), ("▁▁", USER_DEFINED), ("<table>", USER_DEFINED))
PHI3_EXTRA = (("<|endoftext|>", CONTROL), ("<|assistant|>", USER_DEFINED), ("<|user|>", USER_DEFINED),
              ("<|end|>", USER_DEFINED), ("<|placeholder1|>", USER_DEFINED))
SPM_CASES = {
    # Llama-2 / Mistral: byte tokens, llama.cpp's defaults (BOS, space prefix)
    "llama-2": dict(model="botchan_en_bpe_1000.model"),
    # Gemma-3: no space prefix, user-defined and control tokens, <end_of_turn> typed user-defined
    # (llama.cpp makes it a control token by its text)
    "gemma-3": dict(model="botchan_en_bpe_1000.model", extra=GEMMA_EXTRA, add_space_prefix=False, add_bos_token=True),
    "bos-eos": dict(model="botchan_en_bpe_1000.model", add_bos_token=True, add_eos_token=True),
    "no-bos": dict(model="botchan_en_bpe_1000.model", add_bos_token=False, add_space_prefix=True),
    # Phi-3: llama.cpp strips the whitespace after its special tokens (by general.name)
    "phi-3": dict(model="botchan_en_bpe_1000.model", extra=PHI3_EXTRA),
    "unigram": dict(model="botchan_en_unigram_1000.model"),
}
# llama.cpp's own vocab-only Phi-3 GGUF (tests/data/README.md): Llama-2's real pieces and scores
REAL_CASES = {"phi-3-real": DATA / "ggml-vocab-phi-3.gguf"}
CASES = [*BPE_CASES, *SPM_CASES, *REAL_CASES]


@functools.lru_cache(maxsize=None)
def smollm2_kv() -> dict:
    return gguf_tokenizer_kv(embedded.gguf_path("smollm2-135m"))


@pytest.fixture(scope="module")
def gguf_case(tmp_path_factory):
    """case name -> path of its vocab-only GGUF (written once)."""
    made: dict[str, Path] = {}
    root = tmp_path_factory.mktemp("gguf_vocab")

    def make(case: str) -> Path:
        if case in REAL_CASES:
            return REAL_CASES[case]
        if case not in made:
            if case in BPE_CASES:
                kv = {k: v for k, v in (smollm2_kv() | BPE_CASES[case]).items() if v is not None}
            else:
                spec = dict(SPM_CASES[case])
                kv = spm_kv(spec.pop("model"), extra=spec.pop("extra", ()), **spec)
                if case == "phi-3":
                    kv["general.name"] = "Phi 3 Mini 4k Instruct (phi3)"
            made[case] = write_vocab_gguf(root / f"{case}.gguf", kv)
        return made[case]
    return make


@functools.lru_cache(maxsize=None)
def load(path: Path) -> gguf_tokenizer.GGUFTokenizer:
    """gguf_tokenizer.load, once per file (gguf-py reads SmolLM2's 98k strings in ~3 s)."""
    return gguf_tokenizer.load(path)


def tokenizer(path: Path, parse_special: bool = True):
    """The tokenizer of GGUF `path`, splitting special tokens out of the text or not (llama.cpp's
    parse_special; tokenizers' encode_special_tokens is its negation)."""
    tk = load(path).tokenizer
    tk.encode_special_tokens = not parse_special
    return tk


# == comparing with llama.cpp ==========================================================================
def assert_same_ids(got: list[int], want: list[int], what: str) -> None:
    if got != want:
        first = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
        raise AssertionError(f"{what}: first difference at position {first}\n  llama.cpp {want}\n  ours      {got}")


def check_against_llama_cpp(path: Path, llama_tokenize, texts: list[str], bos: bool, special: bool) -> None:
    """Our encoding of each text equals llama-tokenize's, one call per text: bos = llama.cpp adds
    BOS/EOS as the GGUF says (add_special_tokens), special = parse_special."""
    want = llama_tokenize.many(path, texts, bos=bos, special=special)
    tk = tokenizer(path, special)
    for text, w in zip(texts, want):
        assert_same_ids(tk.encode(text, add_special_tokens=bos).ids, w,
                        f"{path.name} {text!r} (BOS {bos}, parse_special {special})")
    print(f"{path.name}: {len(texts)} texts, BOS {bos}, parse_special {special}: "
          f"{sum(map(len, want))} ids equal to llama.cpp's")


def separator(path: Path) -> tuple[str, int]:
    """A control token of the vocabulary that strips no whitespace, to join texts for
    LlamaTokenize.batch."""
    added = tokenizer(path).get_added_tokens_decoder()
    return next((a.content, i) for i, a in sorted(added.items())
                if a.special and not (a.rstrip or a.lstrip) and a.content in ("<|endoftext|>", "<s>"))


def check_batch_against_llama_cpp(path: Path, llama_tokenize, texts: list[str]) -> None:
    """As check_against_llama_cpp with special tokens parsed and no BOS, from one llama.cpp process."""
    want = llama_tokenize.batch(path, texts, separator(path))
    tk = tokenizer(path)
    for text, w in zip(texts, want):
        assert_same_ids(tk.encode(text, add_special_tokens=False).ids, w, f"{path.name} {text!r}")
    print(f"{path.name}: {len(texts)} texts: {sum(map(len, want))} ids equal to llama.cpp's")


def llama_cpp_test_strings(path: Path) -> list[str]:
    """llama.cpp's own test strings for a vocabulary (models/ggml-vocab-*.gguf.inp), if shipped."""
    inp = path.with_name(path.name + ".inp")
    return inp.read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n") if inp.is_file() else []


# BOS / EOS as llama.cpp adds them (or not, as the GGUF says)
BOS_TEXTS = ["", " ", "Hello world", "\n x", "<s>hello</s>", "<|endoftext|>"]


@pytest.mark.parametrize("case", CASES)
def test_encoding_matches_llama_cpp(case, gguf_case, llama_tokenize):
    """Every stress text with special tokens parsed; those with special tokens also without; a few
    with the BOS / EOS llama.cpp adds. Splitting out special tokens does not depend on the
    pre-tokenizer: the SmolLM2 vocabulary under another pre type gets the plain texts only."""
    path = gguf_case(case)
    native = case not in BPE_CASES or case == "smollm"
    check_batch_against_llama_cpp(path, llama_tokenize, STRESS + llama_cpp_test_strings(path) + SPECIAL * native)
    if native:
        check_against_llama_cpp(path, llama_tokenize, SPECIAL, bos=False, special=False)
    check_against_llama_cpp(path, llama_tokenize, BOS_TEXTS, bos=True, special=True)
    assert load(path).spm_unreachable == 0


# What llama_detokenize does on top of the pieces (llama-vocab.cpp), per case: drop one leading space
# when add_space_prefix (all SentencePiece cases but gemma-3), and the clean-up of the gpt2 pre
# types that keep clean_spaces (all but smollm and qwen2).
STRIPS_SPACE = set(SPM_CASES) - {"gemma-3"} | set(REAL_CASES)
CLEANS_SPACES = set(BPE_CASES) - {"smollm", "qwen2"}


def llama_detokenize(pieces: bytes, strip_space: bool, clean_spaces: bool) -> bytes:
    """llama_vocab::impl::detokenize's text handling, written as its loops are."""
    t = bytearray(pieces[1:] if strip_space and pieces[:1] == b" " else pieces)
    if not clean_spaces or not t:
        return bytes(t)
    out = bytearray(t[:1])                       # pass 1: " ?", " !", " .", " ,"
    for i in range(1, len(t)):
        if t[i - 1:i] == b" " and t[i:i + 1] in (b"?", b"!", b".", b","):
            out.pop()
        out.append(t[i])
    t, out, i = out, bytearray(out[:1]), 1       # pass 2: " ' " -> "'"
    while i < len(t):
        if t[i:i + 1] == b"'" and i + 1 < len(t) and t[i - 1:i] == b" " and t[i + 1:i + 2] == b" ":
            out.pop()
            out.append(t[i])
            i += 2
            continue
        out.append(t[i])
        i += 1
    t, out = out, bytearray(out[:1])             # pass 3: " 's", " 'm", " 're", " 've"
    for i in range(1, len(t)):
        if t[i - 1:i] == b" " and t[i:i + 1] == b"'" and i + 1 < len(t):
            if t[i + 1:i + 2] in (b"s", b"m") or (i + 2 < len(t) and t[i + 1:i + 3] in (b"re", b"ve")):
                out.pop()
        out.append(t[i])
    return bytes(out)


# one case per decoding path: byte-level with and without clean-up, SentencePiece with and without
# the leading space, user-defined tokens, real scores
@pytest.mark.parametrize("case", ["smollm", "llama-bpe", "llama-2", "gemma-3", "phi-3-real"])
def test_decoding_matches_llama_cpp(case, gguf_case, llama_tokenize):
    """decode(ids) is llama.cpp's detokenization of the same ids: its pieces, joined, with its
    leading-space and clean-up rules; so decode(encode(s)) gives s back exactly where llama.cpp's does.
    One documented difference: llama.cpp prints a user-defined token's text raw ("▁▁"), this
    tokenizer through the decoder like any other ("  ")."""
    path = gguf_case(case)
    tk = tokenizer(path, parse_special=False)
    types = gguf_tokenizer_kv(path).get(K + "token_type", [])
    raw = {i for i, ty in enumerate(types) if ty == USER_DEFINED}
    round_trips = raw_seen = 0
    for text, pieces in zip(STRESS, llama_tokenize.batch(path, STRESS, separator(path), pieces=True)):
        ids = tk.encode(text, add_special_tokens=False).ids
        assert_same_ids(ids, [i for i, _ in pieces], f"{path.name} {text!r}")
        raw_seen += any(i in raw and "▁".encode() in p for i, p in pieces)
        joined = b"".join(p.replace("▁".encode(), b" ") if i in raw else p for i, p in pieces)
        want = llama_detokenize(joined, case in STRIPS_SPACE, case in CLEANS_SPACES)
        got = tk.decode(ids, skip_special_tokens=True)
        assert got == want.decode("utf-8"), f"{path.name} {text!r}: llama.cpp {want!r}, ours {got!r}"
        round_trips += got == text
    print(f"{path.name}: decode equals llama.cpp's on {len(STRESS)} texts ({raw_seen} with a user-defined token "
          f"holding '▁'); {round_trips} round-trip exactly")


@pytest.mark.parametrize("case", CASES)
def test_bos_and_end_of_generation_ids_match_llama_cpp(case, gguf_case, llama_tokenize):
    """The package config's bos_token_id and eos_token_ids: llama.cpp's BOS, and every token it ends
    generation on (llama_vocab::is_eog), its EOS first."""
    path = gguf_case(case)
    tok = load(path)
    ref = llama_tokenize.vocab(path)
    print(f"{path.name}: llama.cpp {ref}, ours bos {tok.bos_token_id} eos {tok.eos_token_ids}")
    assert [tok.bos_token_id] == ref["bos"]
    assert tok.eos_token_ids[:1] == tuple(ref["eos"])
    assert sorted(tok.eos_token_ids) == ref["eog"]


def test_spm_without_byte_tokens(tmp_path, llama_tokenize):
    """Without <0xXX> tokens llama.cpp spells every character that is not a token with byte tokens it
    does not have and aborts (std::out_of_range in byte_to_token); text made of the vocabulary's
    characters tokenizes as with them. This tokenizer gives the unknown token instead of aborting."""
    path = write_vocab_gguf(tmp_path / "nobytes.gguf", spm_kv("botchan_en_bpe_1000.model", byte_tokens=False))
    tk = tokenizer(path)
    chars = set(gguf_tokenizer_kv(path)[K + "tokens"])
    known = [t for t in STRESS if all(c in chars or c == " " for c in t)]
    assert len(known) >= 8
    check_against_llama_cpp(path, llama_tokenize, known, bos=True, special=True)
    with pytest.raises(llama_tokenize.Failed):
        llama_tokenize.ids(path, "東京")
    ids = tk.encode("東京 x").ids
    vocab = tk.get_vocab()
    print(ids)
    assert ids == [1, vocab["▁"], 0, vocab["▁"], vocab["x"]]    # BOS, "▁", one unknown for 東京, "▁", "x"


# == real text ==========================================================================================
def _paragraphs(text: str, size: int) -> list[str]:
    """text cut at blank lines into pieces of about `size` characters (llama.cpp's SentencePiece
    tokenizer slows down on one huge fragment)."""
    out, cur = [], ""
    for par in text.split("\n \n"):
        cur = cur + "\n \n" + par if cur else par
        if len(cur) >= size:
            out.append(cur)
            cur = ""
    return out + ([cur] if cur else [])


@pytest.mark.parametrize("case", ["smollm", "llama-bpe", "phi-3-real"])
def test_wikitext2_matches_llama_cpp(case, gguf_case, llama_tokenize):
    """Real text tokenized identically, every id: the first 300k characters of the WikiText-2 test
    split (the whole split, and the other cases, were measured equal too: the module docstring)."""
    from edgesparse.runtime.sparsity.textdata import load_text
    path = gguf_case(case)
    text, desc = load_text("wikitext2", "test")
    tk = tokenizer(path)
    chunks = _paragraphs(text[:300_000], 20_000)
    want = llama_tokenize.many(path, chunks, bos=False)
    n = 0
    for k, (chunk, w) in enumerate(zip(chunks, want)):
        assert_same_ids(tk.encode(chunk, add_special_tokens=False).ids, w, f"{path.name} {desc} chunk {k}")
        n += len(w)
    print(f"{path.name}: {desc}, {len(chunks)} chunks, {n} ids equal to llama.cpp's")


# == refused ============================================================================================
TINY_BPE = {K + "model": "gpt2", K + "pre": "smollm", K + "tokens": ["a", "b", "ab"], K + "merges": ["a b"]}


@pytest.mark.parametrize("key, value", [("model", "bert"), ("model", "t5"), ("pre", "deepseek-llm"),
                                        ("pre", "starcoder")])
def test_unsupported_tokenizer_is_refused(key, value, tmp_path):
    path = write_vocab_gguf(tmp_path / "x.gguf", TINY_BPE | {K + key: value})
    with pytest.raises(EdgesparseError) as e:
        gguf_tokenizer.load(path)
    msg = str(e.value)
    print(msg)
    assert str(path) in msg and f"tokenizer.ggml.{key} {value!r}" in msg and "\n" not in msg


def test_export_refuses_an_unsupported_tokenizer_before_loading_weights(tmp_path, capsys):
    """The CLI's one-line error, from the metadata alone: the file has no weights (and no config
    transformers could read), so anything past the tokenizer would fail differently."""
    from edgesparse.cli import main
    path = write_vocab_gguf(tmp_path / "odd.gguf", TINY_BPE | {K + "pre": "deepseek-llm"})
    out = tmp_path / "out.esp"
    assert main(["export", str(path), "-o", str(out)]) == 1
    err = capsys.readouterr().err
    print(err)
    assert err.splitlines() == [f"edgesparse: error: {path}: tokenizer.ggml.pre 'deepseek-llm' is not supported "
                                f"(supported: {', '.join(gguf_tokenizer.PRE_TYPES)})"]
    assert not out.exists()


def test_duplicate_tokens_are_refused(tmp_path):
    path = write_vocab_gguf(tmp_path / "dup.gguf", TINY_BPE | {K + "tokens": ["a", "b", "ab", "b"]})
    with pytest.raises(EdgesparseError, match=r"token 'b' appears twice \(ids 1 and 3\)"):
        gguf_tokenizer.load(path)


# == Qwen2.5-Coder (slow: the second embedded model, when installed) =====================================
@pytest.mark.slow
def test_qwen25_coder_vocabulary_matches_llama_cpp(llama_tokenize):
    """The real Qwen2.5-Coder GGUF (llama.cpp reads its metadata only): 152k tokens, user-defined
    and unused tokens, a normal "</s>" that llama.cpp makes an end-of-generation control token."""
    try:
        path = embedded.gguf_path("qwen2.5-coder-0.5b")
    except EdgesparseError as e:
        pytest.skip(str(e))
    extra = ["</s> x", "<tool_call>{}</tool_call>", "[PAD151665]"]
    check_batch_against_llama_cpp(path, llama_tokenize, STRESS + SPECIAL + extra)
    check_against_llama_cpp(path, llama_tokenize, SPECIAL + extra, bos=False, special=False)
    check_against_llama_cpp(path, llama_tokenize, BOS_TEXTS, bos=True, special=True)
    tok, ref = load(path), llama_tokenize.vocab(path)
    print(ref, tok.bos_token_id, tok.eos_token_ids)
    assert ([tok.bos_token_id], tok.eos_token_ids[:1], sorted(tok.eos_token_ids)) == (ref["bos"], tuple(ref["eos"]),
                                                                                       ref["eog"])


# == Unicode tables (long: ~2 minutes per pre-tokenizer; EDGESPARSE_LONG=1) ==================================================
@pytest.mark.long
@pytest.mark.skipif(os.environ.get("EDGESPARSE_LONG") != "1", reason="long run: set EDGESPARSE_LONG=1 to run it")
@pytest.mark.parametrize("case", ["smollm", "llama-bpe", "qwen2", "default"])
def test_every_code_point_splits_like_llama_cpp(case, gguf_case, llama_tokenize):
    """Each code point below U+30000 as a letter, digit, punctuation and space neighbour: llama.cpp's
    Unicode tables (unicode-data.cpp) against Oniguruma's behind the HF regexes. The known
    differences: U+1B4E, U+1B4F, U+1B7F (unassigned for llama.cpp, Balinese punctuation for
    Oniguruma) under `default`, whose first regex isolates punctuation."""
    path = gguf_case(case)
    tk = tokenizer(path, parse_special=False)
    known = {"default": {0x1B4E, 0x1B4F, 0x1B7F}}.get(case, set())
    points = [c for c in range(0x30000) if not 0xD800 <= c < 0xE000 and c not in known]
    texts = ["".join(f"a{chr(c)}{chr(c)}b {chr(c)}1'{chr(c)} {chr(c)}\n" for c in points[i:i + 400])
             for i in range(0, len(points), 400)]
    want = llama_tokenize.many(path, texts, bos=False, special=False)
    for text, w in zip(texts, want):
        assert_same_ids(tk.encode(text, add_special_tokens=False).ids, w, f"{path.name} U+{ord(text[1]):04X}..")

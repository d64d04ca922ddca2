"""tokenizer.json from a GGUF's own tokenizer fields, tokenizing the way llama.cpp does.

The reference is llama.cpp itself (src/llama-vocab.cpp and src/unicode.cpp as vendored in
llama-cpp-python 0.3.36), not transformers' GGUF loader: that one prepends a BOS SmolLM2's GGUF
does not ask for (tokenizer.ggml.add_bos_token = false) and turns SentencePiece vocabularies into
fragments (Gemma-3 "The capital of France is" -> 11 ids instead of 6).

Each llama.cpp step and what expresses it in HF `tokenizers` (the device decodes with
`tokenizers.Tokenizer.from_file`):

  special tokens   tokenizer_st_partition splits control and unknown tokens out of the text only with
                   parse_special, user-defined ones always -> AddedToken(normalized=False) with
                   special=True for control/unknown, False for user-defined; parse_special off is
                   `Tokenizer.encode_special_tokens = True`.
  gpt2 (BPE)       the regex list of tokenizer.ggml.pre, each splitting the pieces of the one before
                   -> one Split(Regex, "isolated") per regex, then ByteLevel(use_regex=False); merges
                   ranked by their order in tokenizer.ggml.merges; ignore_merges where llama.cpp sets it.
  llama (SPM)      " " before each text piece (add_space_prefix), " " -> "▁", then llm_tokenizer_spm
                   repeatedly merges the adjacent pair whose concatenation is the best-scoring token,
                   and spells what is left as <0xXX> byte tokens -> Prepend + Replace normalizers and a
                   BPE whose merges are every (a, b) with a, b and a+b tokens, ranked by a+b's score,
                   with byte_fallback.
  BOS / EOS        add_bos_token / add_eos_token, or llama.cpp's default when a key is absent
                   -> TemplateProcessing.
  decoding         llama_detokenize(remove_special=false, unparse_special=false): control tokens
                   print nothing (skip_special_tokens), "▁" -> " ", one leading space dropped with
                   add_space_prefix, and the gpt2 pre types' clean-up of " ." / " 's" / ...
                   -> Replace / ByteFallback / Fuse / Strip / ByteLevel decoders.

Measured against llama.cpp's llama-tokenize on the same GGUFs (tests/test_tokenizer_gguf.py): token ids
equal on every stress text (spaces, tabs, \r\n, digits, code, accents, combining marks, CJK, emoji
ZWJ sequences, special tokens in text, contractions) for SmolLM2's vocabulary under each supported
pre type, Qwen2.5-Coder's, llama.cpp's own Phi-3 (Llama-2 pieces), Llama-3, Qwen2 and GPT-2 test
vocabularies and sentencepiece's BPE and unigram test models; and on real text, every id of
WikiText-2's test split (1.29 M characters, in 59 pieces cut at paragraphs) and of sentencepiece's
botchan.txt (279 KB): SmolLM2 under smollm, gpt-2, llama-bpe and qwen2 (303,357 ids on WikiText-2)
and default (339,760), llama.cpp's Llama-2 and Phi-3 (335,570), Llama-3 (289,076), Qwen2 (299,078)
and GPT-2 (286,047), the sentencepiece BPE and unigram models (579,882; 824,053). What HF
tokenizers cannot say the way llama.cpp does it:
  - SPM pieces of equal score: llama.cpp merges the leftmost pair, a BPE model the lower rank.
    _leftmost_first orders them so that the left one wins wherever two overlap, and on a run of
    spaces (Llama-2's "▁▁" ... "▁" x 16 share one score) grows the leftmost piece as llama.cpp does;
    a tie that order cannot settle would differ (none found in the text above).
  - llama.cpp can merge a character that is not itself a token into a token containing it; a BPE
    model cannot (the character becomes byte tokens). No vocabulary here has such a token
    (`spm_unreachable` counts them).
  - without <0xXX> byte tokens llama.cpp aborts on a character that is not a token (std::out_of_range
    in byte_to_token); this tokenizer gives the unknown token instead.
  - Unicode tables: llama.cpp's own (unicode-data.cpp) against Oniguruma's behind HF's regexes. Every
    code point below U+30000, as a letter / digit / punctuation / space neighbour, splits the same
    under smollm, llama-bpe and qwen2; under `default` all but U+1B4E, U+1B4F and U+1B7F,
    unassigned in llama.cpp's tables and punctuation (Balinese, Unicode 16) in Oniguruma's, which
    that pre type's first regex isolates.
  - overlapping special tokens: llama.cpp splits out the longest first, HF the leftmost-longest
    match; they differ only where two special tokens overlap in the text.
  - rstrip (Phi-3's special tokens): llama.cpp strips ASCII whitespace, HF any Unicode whitespace.
  - decoding a user-defined token: llama.cpp prints its text raw, HF through the decoders (a "▁" in
    it becomes " "); an unused token (Qwen2's [PAD...]): llama.cpp prints nothing, HF its text; a
    BOS first: llama.cpp keeps the next token's leading space, HF strips it.

Needs only `gguf` (gguf-py) and `tokenizers`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edgesparse.errors import EdgesparseError

# GGUF tokenizer fields (gguf-py names them in gguf.Keys.Tokenizer). The arrays are indexed by token id:
#   tokenizer.ggml.tokens      [n_vocab]  string   token text: GPT-2 byte-level characters (gpt2), "▁" for
#                                                  a space and <0xXX> for byte tokens (llama)
#   tokenizer.ggml.token_type  [n_vocab]  int32    gguf.TokenType: 1 normal, 2 unknown, 3 control,
#                                                  4 user_defined, 5 unused, 6 byte (absent: all normal)
#   tokenizer.ggml.scores      [n_vocab]  float32  llama: merge priority, higher merges first
#   tokenizer.ggml.merges      [n_merges] string   gpt2: "left right", rank = index
# Scalars: tokenizer.ggml.model / .pre (string), *_token_id (uint32), add_bos_token / add_eos_token /
# add_space_prefix (bool), tokenizer.chat_template (string).
K = "tokenizer.ggml."
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


@dataclass(frozen=True)
class PreType:
    """One of llama.cpp's BPE pre-tokenizers (llm_tokenizer_bpe's regex_exprs) and the flags
    llama_vocab::impl::load sets with it."""
    regexes: tuple[str, ...]    # applied in order, each one splitting the pieces of the one before
    ignore_merges: bool = False  # a pre-token that is itself a token is taken whole
    add_bos: bool = False        # default when the GGUF has no tokenizer.ggml.add_bos_token
    clean_spaces: bool = True    # detokenize drops the space in " ." " ," " !" " ?", " 's" ...


# The regexes as llama.cpp writes them; unicode.cpp runs the first three through hand-written
# splitters said to be equivalent (unicode_regex_split_custom_*), checked here against llama-tokenize.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = _LLAMA3.replace(r"\p{N}{1,3}", r"\p{N}")
_DEFAULT = PreType((r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", "[0-9][0-9][0-9]"))

# tokenizer.ggml.pre -> pre-tokenizer, for the BPE vocabularies of the families edgesparse exports;
# names in one row are the ones llama.cpp treats identically. A missing key is llama.cpp's default.
PRE_TYPES: dict[str, PreType] = {
    "default": _DEFAULT,
    **dict.fromkeys(("gpt-2", "phi-2"), PreType((_GPT2,))),
    **dict.fromkeys(("llama-bpe", "llama3", "llama-v3"), PreType((_LLAMA3,), ignore_merges=True, add_bos=True)),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen"), PreType((_QWEN2,), clean_spaces=False)),
    "smollm": PreType((r"\p{N}", _GPT2), clean_spaces=False),
}


@dataclass(frozen=True)
class ModelDefaults:
    """What llama.cpp assumes for a tokenizer.ggml.model when the GGUF leaves a key out."""
    bos: int | None
    eos: int | None
    unk: int | None
    add_bos: bool
    add_space_prefix: bool


MODELS = {
    "gpt2": ModelDefaults(bos=11, eos=11, unk=None, add_bos=False, add_space_prefix=False),
    "llama": ModelDefaults(bos=1, eos=2, unk=0, add_bos=True, add_space_prefix=True),
}

# Token texts llama.cpp recognises whatever the GGUF says (llama_vocab::impl::load). An end-of-
# generation text makes the token a control token and an EOG id; a FIM text does the same for
# fim_pad / fim_rep / fim_sep when the GGUF has no id key for them (the first one found; here the
# lowest id), and makes the token a control token for every FIM kind. EOT / EOM texts are EOG texts.
EOG_TEXTS = frozenset((
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>", "<end_of_turn>",
    "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]", "<|end_of_text|>",
    "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>", "<｜end▁of▁sentence｜>", "[e~[",
))
FIM_TEXTS = {   # key suffix -> texts; only pad, rep and sep end generation
    "fim_pre": ("<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<｜fim▁begin｜>", "<PRE>", "▁<PRE>",
                "<|code_prefix|>", "<|prefix|>"),
    "fim_suf": ("<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<｜fim▁hole｜>", "<SUF>", "▁<SUF>",
                "<|code_suffix|>", "<|suffix|>"),
    "fim_mid": ("<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<｜fim▁end｜>", "<MID>", "▁<MID>",
                "<|code_middle|>", "<|middle|>"),
    "fim_pad": ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"),
    "fim_rep": ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"),
    "fim_sep": ("<|file_sep|>",),
}
FIM_EOG = ("fim_pad", "fim_rep", "fim_sep")
FIM_DEPRECATED_KEYS = {"fim_pre": "prefix", "fim_suf": "suffix", "fim_mid": "middle"}
# (llama.cpp also rewrites a few tokens of gpt-oss, solar-open, gemma4 and plamo vocabularies;
# their tokenizer models / pre types are refused here, so those rules never apply.)

# Phi-3 (general.name containing phi-3 / phi3): llama.cpp strips the whitespace after every special
# token (control, unknown, user-defined) except these. (It also sets the flag on </s>, which only
# matters when </s> is one of them.)
PHI3_NO_RSTRIP = ("<unk>", "<s>", "<|endoftext|>")

SPACE = "▁"     # U+2581, SentencePiece's escaped space


@dataclass(frozen=True)
class GGUFTokenizer:
    tokenizer: object               # tokenizers.Tokenizer
    bos_token_id: int | None        # llama.cpp's BOS (prepended only when add_bos)
    eos_token_ids: tuple[int, ...]  # llama.cpp's end-of-generation tokens (is_eog), EOS first
    chat_template: str | None
    spm_unreachable: int = 0        # SPM tokens llama.cpp can form but this BPE cannot (see docstring)


class _Fields:
    def __init__(self, path: Path):
        import gguf
        self.path = path
        try:
            self.fields = gguf.GGUFReader(str(path)).fields
        except (OSError, ValueError) as e:
            raise EdgesparseError(f"{path}: not a readable GGUF file ({e})") from None

    def get(self, key: str, default=None):
        f = self.fields.get(key)
        return default if f is None else f.contents()

    def need(self, key: str):
        f = self.fields.get(key)
        if f is None:
            raise EdgesparseError(f"{self.path}: GGUF has no {key}; cannot build its tokenizer")
        return f.contents()


def load(path: Path) -> GGUFTokenizer:
    """The tokenizer of GGUF file `path`. Reads the metadata only (no weights)."""
    path = Path(path)
    f = _Fields(path)
    model = f.need(K + "model")
    defaults = MODELS.get(model)
    if defaults is None:
        raise EdgesparseError(f"{path}: tokenizer.ggml.model {model!r} is not supported "
                              f"(supported: {', '.join(MODELS)})")
    pre = None
    if model == "gpt2":
        pre_name = f.get(K + "pre", "default")
        pre = PRE_TYPES.get(pre_name)
        if pre is None:
            raise EdgesparseError(f"{path}: tokenizer.ggml.pre {pre_name!r} is not supported "
                                  f"(supported: {', '.join(PRE_TYPES)})")

    tokens = [t or f"[EMPTY_{i}]" for i, t in enumerate(f.need(K + "tokens"))]   # llama.cpp's name for ""
    n = len(tokens)
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != n:
        seen: dict[str, int] = {}
        dup = next((t, seen[t], i) for i, t in enumerate(tokens) if seen.setdefault(t, i) != i)
        raise EdgesparseError(f"{path}: token {dup[0]!r} appears twice (ids {dup[1]} and {dup[2]}); "
                              "a tokenizer.json vocabulary needs distinct tokens")
    types = list(f.get(K + "token_type", [NORMAL] * n))
    if len(types) < n:
        raise EdgesparseError(f"{path}: tokenizer.ggml.token_type has {len(types)} entries for {n} tokens")

    def special_id(kind: str, default: int | None) -> int | None:
        # as llama.cpp: a default outside the vocabulary is dropped, a key outside it is ignored
        default = default if default is not None and default < n else None
        v = f.get(K + f"{kind}_token_id")
        return v if v is not None and v < n else default

    bos, eos = special_id("bos", defaults.bos), special_id("eos", defaults.eos)
    unk = special_id("unknown", defaults.unk)
    eot, eom = special_id("eot", None), special_id("eom", None)
    add_bos = f.get(K + "add_bos_token", pre.add_bos if pre else defaults.add_bos)
    add_eos = f.get(K + "add_eos_token", False)
    add_space_prefix = f.get(K + "add_space_prefix", defaults.add_space_prefix)
    for flag, tid, what in ((add_bos, bos, "add_bos_token"), (add_eos, eos, "add_eos_token")):
        if flag and tid is None:
            raise EdgesparseError(f"{path}: {K}{what} is true but the GGUF has no such token")

    # Token attributes as llama.cpp ends up with them: texts it treats as end-of-generation or FIM
    # become control tokens whatever the GGUF's token_type says.
    eog = {i for i in (eos, eot, eom) if i is not None}
    for kind, texts in FIM_TEXTS.items():
        tid = special_id(kind, None)
        if tid is None and kind in FIM_DEPRECATED_KEYS:
            tid = special_id(FIM_DEPRECATED_KEYS[kind], None)
        found = [vocab[t] for t in texts if t in vocab]
        if tid is None and found:
            tid = min(found)
            types[tid] = CONTROL
        if tid is not None and kind in FIM_EOG:
            eog.add(tid)
    for t in EOG_TEXTS & vocab.keys():
        eog.add(vocab[t])
        types[vocab[t]] = CONTROL

    if model == "gpt2":
        tk, unreachable = _bpe(path, f, tokens, vocab, pre), 0
    else:
        tk, unreachable = _spm(path, f, tokens, vocab, types, unk, add_space_prefix)
    _add_special_tokens(tk, f, tokens, types)
    _post_processor(tk, tokens, bos if add_bos else None, eos if add_eos else None)
    tk.decoder = _decoder(model, add_space_prefix, pre.clean_spaces if pre else False)
    eos_ids = ([eos] if eos is not None else []) + sorted(eog - {eos})
    return GGUFTokenizer(tk, bos, tuple(eos_ids), f.get("tokenizer.chat_template"), unreachable)


def _bpe(path: Path, f: _Fields, tokens: list[str], vocab: dict[str, int], pre: PreType):
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    merges = []
    for m in f.need(K + "merges"):
        k = m.find(" ", 1)         # as llama.cpp: the first space after the first character
        a, b = (m[:k], m[k + 1:]) if k > 0 else ("", "")
        if a not in vocab or b not in vocab or a + b not in vocab:
            # llama.cpp would still merge and spell an out-of-vocabulary result as bytes; a
            # tokenizers BPE refuses such a merge, and no real vocabulary has one.
            raise EdgesparseError(f"{path}: tokenizer.ggml.merges entry {m!r} does not join two tokens into a token")
        merges.append((a, b))
    tk = Tokenizer(models.BPE(vocab, merges, ignore_merges=pre.ignore_merges))
    steps = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in pre.regexes]
    steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False))
    # A byte whose character is not a token (SmolLM2 has 21: bytes that never occur in UTF-8 and a
    # few control bytes) stays a symbol in llama.cpp that nothing merges with and that is dropped at
    # the end; a BPE model drops it first, letting its neighbours merge (" \x04\n" -> "ĠĊ" instead of
    # "Ġ", "Ċ"). Removing it in the pre-tokenizer splits the word there, as llama.cpp's barrier does.
    missing = [c for c in pre_tokenizers.ByteLevel.alphabet() if c not in vocab]
    if missing:
        bad = next((t for t in tokens if any(c in t for c in missing)), None)
        if bad is not None:
            raise EdgesparseError(f"{path}: token {bad!r} contains a byte that is not itself a token; "
                                  "llama.cpp's tokenization of it cannot be reproduced")
        steps.append(pre_tokenizers.Split(Regex("[" + "".join(f"\\x{{{ord(c):x}}}" for c in sorted(missing)) + "]"),
                                          behavior="removed"))
    tk.pre_tokenizer = pre_tokenizers.Sequence(steps)
    return tk


def _spm(path: Path, f: _Fields, tokens: list[str], vocab: dict[str, int], types: list[int],
         unk: int | None, add_space_prefix: bool):
    from tokenizers import Tokenizer, models, normalizers
    scores = f.need(K + "scores")
    if len(scores) < len(tokens):
        raise EdgesparseError(f"{path}: tokenizer.ggml.scores has {len(scores)} entries for {len(tokens)} tokens")
    # llm_tokenizer_spm merges two adjacent pieces whenever their concatenation is a token, best
    # score first, the leftmost pair among equal scores. As a BPE: one merge per way of cutting a
    # token into two tokens, ranked by the token's score, equal scores ordered by _leftmost_first.
    groups: dict[float, list[tuple[str, str, int]]] = {}
    # which tokens merging can build: here from tokens only, in llama.cpp also from characters that
    # are not tokens themselves (counted, see the module docstring)
    here: dict[str, bool] = {}
    there: dict[str, bool] = {}
    for t in sorted(vocab, key=len):
        i = vocab[t]
        if len(t) == 1:
            here[t] = there[t] = True
            continue
        cuts = [(t[:k], t[k:]) for k in range(1, len(t))]
        groups.setdefault(scores[i], []).extend((a, b, i) for a, b in cuts if a in vocab and b in vocab)
        here[t] = any(here.get(a, False) and here.get(b, False) for a, b in cuts)
        there[t] = any((len(a) == 1 or there.get(a, False)) and (len(b) == 1 or there.get(b, False)) for a, b in cuts)
    # (a user-defined token is always split out of the text before merging: never built by it)
    unreachable = sum(there[t] and not here[t] and types[i] != USER_DEFINED for t, i in vocab.items())
    merges = [(a, b) for score in sorted(groups, reverse=True) for a, b, _ in _leftmost_first(groups[score])]
    has_bytes = all(f"<0x{b:02X}>" in vocab for b in range(256))
    unk_text = tokens[unk] if unk is not None else None
    tk = Tokenizer(models.BPE(vocab, merges, unk_token=unk_text,
                              byte_fallback=has_bytes, fuse_unk=True))
    tk.normalizer = normalizers.Sequence(
        ([normalizers.Prepend(SPACE)] if add_space_prefix else []) + [normalizers.Replace(" ", SPACE)])
    return tk, unreachable


def _leftmost_first(group: list[tuple[str, str, int]]) -> list[tuple[str, str, int]]:
    """Merges (left, right, token id) of one score in a BPE rank order that picks what llama.cpp's
    leftmost rule picks. Two candidates of equal score compete only where they overlap, as (a, b)
    and (b, c) over the symbols a b c, and llama.cpp then takes the left one: so a merge ranks before
    every merge whose left part is its right part. Where those constraints form a cycle (runs of
    spaces: ("▁", "▁▁") and ("▁▁", "▁")), the merge with the longer left part goes first: on a run
    of single "▁", llama.cpp starts at the left and grows that piece one "▁" at a time ("▁▁", "▁▁▁",
    ... up to the longest run that is a token), which that order does too. (Kahn's topological
    sort, breaking cycles by that preference.)"""
    if len(group) < 2:
        return group
    import heapq
    key = lambda m: (-len(m[0]), len(m[1]), m[2], m[0])  # noqa: E731
    order = sorted(range(len(group)), key=lambda j: key(group[j]))    # preference, for cycles
    starting: dict[str, list[int]] = {}     # left part -> merges
    for j, m in enumerate(group):
        starting.setdefault(m[0], []).append(j)
    indegree = [0] * len(group)
    for j, m in enumerate(group):
        for k in starting.get(m[1], ()):
            indegree[k] += k != j
    rank = {j: r for r, j in enumerate(order)}
    ready = [rank[j] for j in range(len(group)) if indegree[j] == 0]
    heapq.heapify(ready)
    done = [False] * len(group)
    out, nxt = [], 0
    while len(out) < len(group):
        if not ready:           # a cycle: take the preferred merge left
            while done[order[nxt]]:
                nxt += 1
            heapq.heappush(ready, nxt)
        j = order[heapq.heappop(ready)]
        if done[j]:
            continue
        done[j] = True
        out.append(group[j])
        for k in starting.get(group[j][1], ()):
            if not done[k] and k != j:
                indegree[k] -= 1
                if indegree[k] == 0:
                    heapq.heappush(ready, rank[k])
    return out


def _add_special_tokens(tk, f: _Fields, tokens: list[str], types: list[int]) -> None:
    from tokenizers import AddedToken
    name = str(f.get("general.name", "")).lower()
    phi3 = "phi-3" in name or "phi3" in name
    special, user = [], []
    for t, ty in zip(tokens, types):
        if ty in (CONTROL, UNKNOWN, USER_DEFINED):
            added = AddedToken(t, special=ty != USER_DEFINED, normalized=False, rstrip=phi3 and t not in PHI3_NO_RSTRIP)
            (user if ty == USER_DEFINED else special).append(added)
    # every text is already in the model's vocabulary, so the added tokens keep their GGUF ids
    tk.add_special_tokens(special)
    tk.add_tokens(user)


def _post_processor(tk, tokens: list[str], bos: int | None, eos: int | None) -> None:
    from tokenizers import processors
    if bos is None and eos is None:
        return
    def seq(s: str) -> list[str]:
        return ([tokens[bos]] if bos is not None else []) + [s] + ([tokens[eos]] if eos is not None else [])
    tk.post_processor = processors.TemplateProcessing(
        single=seq("$A"), pair=seq("$A") + seq("$B:1"),
        special_tokens=[(tokens[i], i) for i in dict.fromkeys(x for x in (bos, eos) if x is not None)])


# llama_detokenize's clean_spaces passes, in order (each a plain replace: a removed space never
# creates a new match for a later pattern of the same pass).
_CLEAN_SPACES = ((" ?", "?"), (" !", "!"), (" .", "."), (" ,", ","),     # pass 1
                 (" ' ", "'"),                                           # pass 2
                 (" 's", "'s"), (" 'm", "'m"), (" 're", "'re"), (" 've", "'ve"))   # pass 3


def _decoder(model: str, add_space_prefix: bool, clean_spaces: bool):
    from tokenizers import decoders
    if model == "gpt2":
        steps = [decoders.ByteLevel()]      # joins every token into one string first
    else:
        steps = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:                    # the first piece's leading space, once
        steps.append(decoders.Strip(" ", 1, 0))
    if clean_spaces:
        steps += [decoders.Replace(a, b) for a, b in _CLEAN_SPACES]
    return decoders.Sequence(steps)

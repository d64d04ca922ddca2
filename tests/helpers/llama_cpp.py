"""llama.cpp's own tokenizer, the reference the package tokenizer is tested against
(tests/test_tokenizer_gguf.py, tests/test_smollm2.py); conftest's `llama_tokenize` fixture finds the
binary."""

from __future__ import annotations

import os
from pathlib import Path


class LlamaTokenize:
    """llama.cpp's `llama-tokenize` (tools/tokenize in the vendored llama.cpp source): loads a GGUF's
    vocabulary only and tokenizes as llama.cpp does. One process per call (~0.01 s for a small
    SentencePiece vocabulary, ~0.1 s for SmolLM2's 49k tokens, ~0.3 s for Qwen2's 152k); many()
    runs calls on every core."""

    class Failed(Exception):
        """llama-tokenize exited with an error (e.g. aborted on a character it cannot spell)."""

    def __init__(self, exe: Path):
        self.exe = exe

    def _run(self, gguf, text: str, *flags: str):
        import subprocess
        # --stdin --no-escape: the text's bytes exactly (-p / escapes would turn "\\n" into a newline)
        p = subprocess.run([str(self.exe), "-m", str(gguf), "--stdin", "--no-escape", *flags],
                           input=text.encode("utf-8"), capture_output=True, timeout=300)
        if p.returncode != 0:
            raise self.Failed(f"llama-tokenize exited with {p.returncode} on {text[:60]!r}: "
                              f"{p.stderr.decode(errors='replace').strip()[-300:]}")
        return p.stdout

    @staticmethod
    def _flags(bos: bool, special: bool) -> tuple[str, ...]:
        # llama-tokenize adds BOS (and, with it, EOS) as the GGUF's add_bos_token says, unless --no-bos
        return (() if bos else ("--no-bos",)) + (() if special else ("--no-parse-special",))

    def ids(self, gguf, text: str, bos: bool = True, special: bool = True) -> list[int]:
        """llama.cpp's token ids for text: llama_tokenize(add_special=bos and the GGUF's add_bos,
        parse_special=special)."""
        import json
        out = self._run(gguf, text, "--ids", "--log-disable", *self._flags(bos, special))
        return json.loads(out.decode().strip().splitlines()[-1])

    def many(self, gguf, texts, bos: bool = True, special: bool = True) -> list[list[int]]:
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(os.cpu_count() or 1) as ex:
            return list(ex.map(lambda t: self.ids(gguf, t, bos, special), texts))

    def pieces(self, gguf, text: str, bos: bool = False, special: bool = False) -> list[tuple[int, bytes]]:
        """(id, bytes) per token of text: llama_token_to_piece (control tokens as their text), the
        bytes llama-tokenize prints for each token as `%6d -> '<piece>'` lines. Pieces with a NUL
        byte come out cut (printf %s), and a piece containing `'` + a newline + such a header would
        be misread: test texts have neither."""
        import re
        out = self._run(gguf, text, "--log-disable", *self._flags(bos, special))
        head = re.compile(rb" *(\d+) -> '")
        res, pos = [], 0
        while pos < len(out):
            m = head.match(out, pos)
            assert m, out[pos:pos + 40]
            nxt = re.compile(rb"'\n(?= *\d+ -> ')").search(out, m.end())
            end = nxt.start() if nxt else len(out) - 2
            assert out[end:end + 2] == b"'\n", out[end - 20:]
            res.append((int(m.group(1)), out[m.end():end]))
            pos = end + 2
        return res

    def batch(self, gguf, texts, sep: tuple[str, int], pieces: bool = False) -> list:
        """ids (or pieces) of each text without BOS, special tokens parsed, from one process: the
        texts joined by the control token sep = (text, id), the output cut at it. llama.cpp splits
        special tokens out first and tokenizes every piece of text between them on its own (with
        its own space prefix), so each part is what a call on that text alone gives. Texts that
        contain sep's text go one call each."""
        from concurrent.futures import ThreadPoolExecutor
        run = (lambda t: self.pieces(gguf, t, special=True)) if pieces else (lambda t: self.ids(gguf, t, False))
        joinable = [t for t in texts if sep[0] not in t]
        calls = ([sep[0].join(joinable)] if joinable else []) + [t for t in texts if sep[0] in t]
        with ThreadPoolExecutor(os.cpu_count() or 1) as ex:
            results = list(ex.map(run, calls))
        parts: list[list] = [[]]
        for x in results[0] if joinable else ():
            if (x[0] if pieces else x) == sep[1]:
                parts.append([])
            else:
                parts[-1].append(x)
        assert not joinable or len(parts) == len(joinable), (len(parts), len(joinable))
        joined, alone = iter(parts), iter(results[1:] if joinable else results)
        return [next(alone) if sep[0] in t else next(joined) for t in texts]

    def vocab(self, gguf) -> dict:
        """What llama.cpp's loader reports (print_info): vocab type, BOS and EOS ids, the
        end-of-generation ids (llama_vocab::is_eog)."""
        import re
        import subprocess
        # llama.cpp logs from a worker thread and can exit before it has written everything (seen
        # under load: the log cut inside the metadata dump). "vocab only - skipping tensors" comes
        # after every print_info line read here, so a log that has it is whole; otherwise run again.
        for _ in range(5):
            p = subprocess.run([str(self.exe), "-m", str(gguf), "--stdin", "--ids", "-v"], input=b"",
                               capture_output=True, timeout=300)
            log = p.stderr.decode(errors="replace")
            if p.returncode != 0 or "vocab only - skipping tensors" in log:
                break
        kind = re.search(r"print_info: vocab type\s+= (\S+)", log)
        if p.returncode != 0 or kind is None or "vocab only - skipping tensors" not in log:
            raise self.Failed(f"llama-tokenize -v exited with {p.returncode} on {gguf}: {log.strip()[-1500:]}")
        one = lambda what: [int(x) for x in re.findall(rf"print_info: {what} token\s+= (\d+) ", log)]  # noqa: E731
        return {"type": kind.group(1), "bos": one("BOS"), "eos": one("EOS"), "eog": sorted(one("EOG"))}

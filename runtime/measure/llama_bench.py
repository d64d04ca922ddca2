"""bench's llama.cpp engines: llama.cpp's own llama-bench, run the way its users run it.

    llama.cpp           llama-bench with its defaults: CPU weight repacking on (Q4_0 / Q8_0 into
                        interleaved blocks, how llama.cpp gets its speed), flash attention auto,
                        load mode auto (mmap)
    llama.cpp-norepack  the same with `--repack 0`: an extra, labelled row, never the headline

One bench round of a thread count is one worker process that runs llama-bench twice, `-r 1` each
(a repetition per round, so the engines alternate with edgesparse's configurations as every other
engine does; llama-bench's own warm-up run comes first in each):

    decode   -p 0 -n GEN-1 -d PROMPT   the GEN-1 decode steps after a PROMPT-token prompt (`-d`: the
                                       prompt is processed before the timer starts), exactly the
                                       steps bench times for edgesparse (its first generated token
                                       comes from the prompt's logits); tok/s = llama-bench's t/s
    prefill  -p PROMPT -n 0            the prompt alone; prefill ms = its mean time

Memory: the decode process's peak RSS (the kernel's maxrss of the finished child). llama-bench
reports neither per-token latencies nor RSS after load: those cells stay empty. Bytes read per
token are the GGUF's (gguf_info.py).
"""

from __future__ import annotations

import json
import resource
import subprocess

from edgesparse.errors import EdgesparseError

from . import gguf_info

ENGINES = {"llama.cpp": True, "llama.cpp-norepack": False}       # engine -> weight repacking on
# what bench.json keeps of each llama-bench record
KEEP = ("build_commit", "model_type", "model_size", "model_n_params", "n_threads", "repack", "flash_attn",
        "load_mode", "type_k", "type_v", "n_batch", "n_ubatch", "n_prompt", "n_gen", "n_depth", "avg_ns",
        "avg_ts", "samples_ts")


def commands(exe: str, gguf: str, threads: int, n_prompt: int, n_gen: int, load: str = "mmap",
             repack: bool = True) -> tuple[list[str], list[str]]:
    """(decode, prefill) llama-bench command lines. load "ram" = `-lm none` (llama.cpp's --no-mmap:
    the weights read into its own buffers), bench --load ram's counterpart."""
    base = [str(exe), "-m", str(gguf), "-t", str(threads), "-r", "1", "-o", "json"]
    if load != "mmap":
        base += ["-lm", "none"]
    if not repack:
        base += ["--repack", "0"]
    return (base + ["-p", "0", "-n", str(n_gen - 1), "-d", str(n_prompt)],
            base + ["-p", str(n_prompt), "-n", "0"])


def _run(cmd: list[str]) -> dict:
    """The one test record of a llama-bench run with -o json."""
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode:
        last = (p.stderr.strip().splitlines() or ["no output"])[-1]
        raise EdgesparseError(f"llama-bench failed (exit {p.returncode}): {last}; command: {' '.join(cmd)}")
    try:
        (rec,) = json.loads(p.stdout)
    except ValueError:
        raise EdgesparseError(f"llama-bench printed no single JSON test record; command: {' '.join(cmd)}") from None
    return rec


def measure(exe: str, gguf: str, threads: int, n_prompt: int, n_gen: int, load: str = "mmap",
            repack: bool = True) -> dict:
    """One round of llama.cpp on a GGUF, in a worker process of its own (see the module doc)."""
    decode_cmd, prefill_cmd = commands(exe, gguf, threads, n_prompt, n_gen, load, repack)
    dec = _run(decode_cmd)
    # maxrss of the waited-for children (KB on Linux): this worker's only child so far is the decode run
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0
    pre = _run(prefill_cmd)
    if bool(dec.get("repack")) != repack:
        raise EdgesparseError(f"llama-bench reports repack={dec.get('repack')}, asked for {repack}")
    info = gguf_info.read(gguf)
    none = {"rss_mb": None, "rss_anon_mb": None, "rss_file_mb": None, "peak_rss_mb": None}
    return {"tok_s": float(dec["avg_ts"]), "prefill_ms": float(pre["avg_ns"]) / 1e6,
            "p50_ms": None, "p90_ms": None, "p99_ms": None, "load_s": None,
            "bytes_per_token": float(info.bytes_per_token()), "gguf_type": info.file_type, "repack": repack,
            "after_load": none, "end": none | {"peak_rss_mb": peak},
            "llama_bench": {"decode": {k: dec.get(k) for k in KEEP}, "prefill": {k: pre.get(k) for k in KEEP},
                            "commands": [decode_cmd, prefill_cmd]}}


def width_warning(gguf: str, dtype: str) -> str | None:
    """A warning line when the GGUF is not the package's width (e.g. a Q4_1 GGUF against a float32
    package): the speed comparison is then between different numbers of bytes per weight."""
    want = gguf_info.SAME_WIDTH.get(dtype)
    have = gguf_info.read(gguf).file_type
    if want is None or have == want:
        return None
    return (f"warning: {gguf} is llama.cpp {have or 'of unknown file type'}, the package is {dtype}: not the "
            f"same width; for a like-for-like comparison pass --gguf with a {want} GGUF "
            f"(llama-quantize --allow-requantize SRC.gguf DST.gguf {want})")

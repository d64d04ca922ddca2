"""bench.md from a bench result (bench.py's run_bench): the table of every configuration and engine,
what the columns mean for the engines that report less, and the roofline projection."""

from __future__ import annotations

from pathlib import Path

from .against import LLAMA_CPP


def load_of(r: dict) -> str:
    """A summary row's weight load (rows written before --load existed have none: mmap)."""
    return r.get("load") or "mmap"


def engine_label(r: dict) -> str:
    """The engine cell: llama.cpp rows name the GGUF's file type, and the no-repack row says so."""
    e = r.get("engine", "edgesparse")
    if e in LLAMA_CPP:
        return f"llama.cpp {r.get('gguf_type') or '?'}" + ("" if r.get("repack", True) else ", repack off")
    return e


def _f(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def report(res: dict) -> str:
    """The markdown written to bench.md: the table, what its columns are, and the projection."""
    text = table(res) + "\n\n" + "\n".join(notes(res))
    if res.get("projection"):
        from . import roofline
        text += "\n\n" + roofline.table(res["projection"])
    return text


def table(res: dict) -> str:
    rows = res["summary"]
    # "vs dense": against the dense run at the same thread count and load (other engines: mmap's)
    base = {(r["threads"], load_of(r)): r["tok_s"] for r in rows
            if r.get("engine", "edgesparse") == "edgesparse" and r["sparsity"] == 0 and not r.get("budget_mb")}
    budget = any(r.get("budget_mb") for r in rows)
    loads = any(load_of(r) != "mmap" for r in rows)
    head = ["engine", "ffn", "sparsity", "threads"] + (["load"] if loads else []) + [
            "tok/s", "vs dense", "p50 ms", "p90 ms", "p99 ms", "prefill ms",
            "RSS load MB", "peak RSS MB", "file / anon MB", "MB read/token", "GB/s"]
    if budget:
        head += ["budget MB", "weights resident MB", "decode peak RSS MB", "major faults/token"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        b = base.get((r["threads"], load_of(r)))
        es = r.get("engine", "edgesparse") == "edgesparse"
        split = ("-" if r["rss_file_mb"] is None else
                 f"{r['rss_file_mb']:.0f} / {r['rss_anon_mb']:.0f}")
        cells = [engine_label(r), r["ffn"] if es else "-", f"{r['sparsity']:.1f}" if es else "-",
                 str(r["threads"])] + ([load_of(r) if es or r["engine"] in LLAMA_CPP else "-"] if loads else []) + [
                 f"{r['tok_s']:.2f}", f"{(r['tok_s'] / b) if b else float('nan'):.2f}x",
                 _f(r["p50_ms"], ".1f"), _f(r["p90_ms"], ".1f"), _f(r["p99_ms"], ".1f"), _f(r["prefill_ms"], ".0f"),
                 _f(r["rss_after_load_mb"], ".0f"), _f(r["peak_rss_mb"], ".0f"), split,
                 f"{r['mb_read_per_token']:.0f}", _f(r.get("gb_s"), ".1f")]
        if budget:
            cells += [f"{r['budget_mb']:g}" if r.get("budget_mb") else "-",
                      f"{r['weights_resident_mb']:.0f}" if es else "-",
                      f"{r['decode_peak_rss_mb']:.0f}" if es else "-",
                      f"{r['major_faults_per_token']:.0f}" if es else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def notes(res: dict) -> list[str]:
    """What the columns are: bytes and bandwidth for every row, and how llama.cpp was run."""
    out = [f"Medians over {res['rounds']} rounds, every measurement a fresh process, configurations and engines "
           f"alternating within each round; decode: {res['gen_tokens'] - 1} steps after a {res['prompt_tokens']}-"
           "token prompt. MB read/token: the weight bytes one decode step reads (edgesparse: attention "
           "projections, the FFN rows its kernel touched, the predictor in predict mode, lm_head, one embedding "
           "row); GB/s: MB read/token x tok/s, the effective weight bandwidth."]
    llama = [r for r in res["summary"] if r.get("engine") in LLAMA_CPP]
    if llama:
        r = llama[0]
        lb = r["llama_bench"]["decode"]
        dec, pre = (" ".join(c[c.index("-t"):]) for c in r["llama_bench"]["commands"])
        out.append("")
        out.append(f"llama.cpp: its own llama-bench (build {lb.get('build_commit')}) on {Path(r['gguf']).name} "
                   f"({lb.get('model_type')}, {lb.get('model_size', 0) / 1e6:.1f} MB of tensors), one process per "
                   f"test and round: decode `{dec}`, prefill `{pre}`. Its defaults: weight repacking "
                   f"{'on' if lb.get('repack') else 'off'}, flash attention {_fa(lb.get('flash_attn'))}, load mode "
                   f"{lb.get('load_mode')}, KV cache {lb.get('type_k')}; a `repack off` row adds `--repack 0`, "
                   "`--load ram` adds `-lm none`. tok/s: llama-bench's t/s of those decode steps; prefill ms: "
                   "its prompt test; peak RSS: the decode process's maxrss. llama-bench reports no per-token "
                   "latencies and no RSS after load (-). MB read/token: the GGUF's tensor bytes, the token "
                   "embedding counted as one row unless it is also the output matrix.")
        dtype = res.get("package_info", {}).get("dtype")
        from .gguf_info import SAME_WIDTH
        if dtype in SAME_WIDTH and r.get("gguf_type") != SAME_WIDTH[dtype]:
            out.append(f"Not the same width: the package is {dtype}, the GGUF {r.get('gguf_type')} (the same width "
                       f"is {SAME_WIDTH[dtype]}).")
    return out


def _fa(v) -> str:
    return {-1: "auto", 0: "off", 1: "on"}.get(v, str(v))

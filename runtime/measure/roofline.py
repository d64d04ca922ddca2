"""`bench --project BOARD`: the roofline projection of decode speed on a board.

Decoding one token is memory-bound on these boards: every weight byte read crosses the DRAM bus
once. So the board's peak bandwidth divided by the bytes a configuration reads per token is an
upper bound on its tokens/s. Bytes per token depend on the package and the configuration, not on
the machine, so they are measured here and projected there. Measured board results
(devices/results/BOARD-DATE.json, written by devices/measure) are shown beside the projection.
"""

from __future__ import annotations


def projected_tok_s(bandwidth_gbs: float, bytes_per_token: float) -> float:
    """Upper bound on decode tokens/s: bandwidth (10^9 B/s) / bytes read per token."""
    return bandwidth_gbs * 1e9 / bytes_per_token


def _key(r: dict, info: dict) -> tuple:
    return (info.get("source", {}).get("model"), info.get("dtype"), r.get("engine", "edgesparse"), r.get("ffn"),
            r.get("sparsity"), r.get("budget_mb"))


def project(res: dict, profile: dict, measured: list[dict]) -> dict:
    """Projection rows for every edgesparse configuration of a bench result, each with the newest
    measured board figure for the same model, dtype and configuration (any thread count)."""
    on_board: dict[tuple, dict] = {}
    for m in measured:                      # oldest first: newer files overwrite
        for r in m.get("summary", []):
            on_board[_key(r, m.get("package_info", {}))] = {"tok_s": r["tok_s"], "threads": r["threads"],
                                                            "date": m.get("date"), "file": m["file"]}
    bw = float(profile["mem_bandwidth_gbs"])
    rows = []
    for r in res["summary"]:
        if r.get("engine", "edgesparse") != "edgesparse" or r.get("budget_mb"):
            continue
        b = r["mb_read_per_token"] * 1e6
        rows.append({"ffn": r["ffn"], "sparsity": r["sparsity"], "threads": r["threads"],
                     "mb_read_per_token": r["mb_read_per_token"], "tok_s_here": r["tok_s"],
                     "projected_tok_s": projected_tok_s(bw, b),
                     "measured_on_board": on_board.get(_key(r, res.get("package_info", {})))})
    return {"board": profile["board"], "name": profile["name"], "mem_bandwidth_gbs": bw,
            "bandwidth_source": profile["bandwidth_source"], "recommended_threads": profile["recommended_threads"],
            "rows": rows}


def table(proj: dict) -> str:
    lines = [f"Projection for {proj['name']} ({proj['mem_bandwidth_gbs']:g} GB/s peak: "
             f"{proj['bandwidth_source']}). Projected tok/s = bandwidth / bytes read per token, an upper "
             "bound: measured bandwidth is lower and the bus is shared with the GPU.", "",
             "| ffn | sparsity | MB read/token | tok/s here (threads) | projected tok/s (upper bound) | "
             "measured on board |", "|" + "---|" * 6]
    for r in proj["rows"]:
        m = r["measured_on_board"]
        meas = f"{m['tok_s']:.2f} ({m['threads']} threads, {m['date']})" if m else "-"
        lines.append(f"| {r['ffn']} | {r['sparsity']:.1f} | {r['mb_read_per_token']:.0f} | "
                     f"{r['tok_s_here']:.2f} ({r['threads']}) | {r['projected_tok_s']:.1f} | {meas} |")
    return "\n".join(lines)

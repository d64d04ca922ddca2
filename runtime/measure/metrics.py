"""What every engine's decode measurement reports, computed the same way for all of them: the
fixed prompt, per-token latency figures, resident memory split as the kernel accounts it."""

from __future__ import annotations

import numpy as np


def rss_split_mb() -> dict:
    """Resident memory now, split as the kernel accounts it: file-backed (the mmap'd weights,
    reclaimable) vs anonymous (heaps, ORT's copies of the attention weights, the KV cache)."""
    out = {}
    try:
        for line in open("/proc/self/status"):
            k, _, v = line.partition(":")
            if k in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                out[k] = int(v.split()[0]) / 1024.0
    except OSError:
        pass
    return {"rss_mb": out.get("VmRSS"), "rss_anon_mb": out.get("RssAnon"), "rss_file_mb": out.get("RssFile"),
            "peak_rss_mb": out.get("VmHWM")}


def prompt_ids(n: int, vocab: int) -> np.ndarray:
    """The fixed pseudo-random prompt every engine and configuration gets: [n] int64."""
    return np.random.default_rng(1234).integers(100, vocab - 1, n)


def latency_stats(prefill_s: float, lat: list[float]) -> dict:
    """Prefill time and per-token decode latencies (seconds) -> the reported figures, and the
    latencies themselves in ms (bench draws their distribution when it has a single level)."""
    a = np.asarray(lat, np.float64)
    return {"prefill_ms": prefill_s * 1e3, "tok_s": float(a.size / a.sum()),
            "p50_ms": float(np.percentile(a, 50) * 1e3), "p90_ms": float(np.percentile(a, 90) * 1e3),
            "p99_ms": float(np.percentile(a, 99) * 1e3), "latency_ms": [round(x * 1e3, 4) for x in lat]}

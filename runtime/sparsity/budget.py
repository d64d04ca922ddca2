"""calibrate's quality budget: activate the highest calibrated level whose chat quality stays
within it, instead of a fixed level.

Quality is the mean KL divergence from the dense model over the answer tokens of the calibration
set's "check" instructions (chatdata.py; never the evaluation set, and never the transcripts the
thresholds were fitted on), measured as chat_eval.py measures it, in the package's FFN mode and
prefill policy. A budget is either

    an absolute KLD in nats   `--budget 0.02`
    a multiple of a yardstick `--budget 3x --yardstick int8.esp`: k times the dense KLD of the
                              same model at another width (int8), measured on the same answers

DEFAULT 0.02 nats: about 3.5x what int8 weights cost and a tenth of what int4 weights cost, in
the same measure. SmolLM2-135M float32, the 115 evaluation instructions (chat_eval.py, 32 answer
tokens, dense prefill): int8 dense 0.0058, int4 dense (imatrix) 0.222; paper 0.3 0.0032, 0.5
0.0259, 0.7 0.133. A level within 0.02 costs chat quality a user of int8 would hardly notice and
an int4 user not at all, and on SmolLM2 it lands between 0.4 and 0.5, where the README's chat
example still answers as dense does. A relative budget (`4x --yardstick int8.esp`) ties it to the
model at hand instead.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgesparse.errors import EdgesparseError

DEFAULT = "0.02"


@dataclass(frozen=True)
class Budget:
    value: float
    relative: bool          # value x the yardstick's KLD, else an absolute KLD

    def limit(self, yardstick_kld: float | None) -> float:
        if not self.relative:
            return self.value
        if yardstick_kld is None:
            raise EdgesparseError(f"--budget {self.value:g}x: a multiple needs --yardstick PKG (the same model "
                                  "at another width, e.g. int8)")
        return self.value * yardstick_kld

    def __str__(self) -> str:
        return f"{self.value:g}x the yardstick's chat KLD" if self.relative else f"chat KLD {self.value:g}"


def parse(spec: str) -> Budget:
    """'0.02' (an absolute mean chat KLD in nats) or '3x' (3 times the yardstick's)."""
    s = spec.strip().lower()
    relative = s.endswith("x")
    try:
        v = float(s[:-1] if relative else s)
    except ValueError:
        raise EdgesparseError(f"--budget {spec}: expected a KLD in nats (0.02) or a multiple of the yardstick's "
                              "(3x)") from None
    if not v > 0 or v != v or v == float("inf"):
        raise EdgesparseError(f"--budget {spec}: expected a positive finite number")
    return Budget(v, relative)


def choose(levels, measure, limit: float) -> tuple[float, list[dict]]:
    """The highest of `levels` (ascending) whose measure(level)["kld_mean"] <= limit, trying them
    in order and stopping at the first over the limit (quality only worsens with the level; the
    levels past it are not worth their time). Returns (level, every measurement made), level 0.0
    when even the lowest is over."""
    chosen, tried = 0.0, []
    for q in sorted(levels):
        if q == 0.0:
            continue
        r = dict(measure(q), level=q)
        r["within"] = bool(r["kld_mean"] <= limit)
        tried.append(r)
        if not r["within"]:
            break
        chosen = q
    return chosen, tried


def report(tried: list[dict], limit: float, budget: Budget, chosen: float) -> list[str]:
    """The lines calibrate prints: each level tried, and why the chosen one."""
    lines = [f"  level {r['level']:.1f}: chat KLD {r['kld_mean']:.4f}, same top-1 {100 * r['same_top1']:.1f}% "
             f"{'<=' if r['within'] else '>'} {limit:.4f}" for r in tried]
    why = (f"the highest level within the budget ({budget}: {limit:.4f})" if chosen > 0 else
           f"no level is within the budget ({budget}: {limit:.4f}); dense")
    return lines + [f"active level {chosen:.1f}: {why}"]

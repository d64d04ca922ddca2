"""The decode thread count chosen while decoding (core/threads.py ThreadTuner): it keeps the count
whose steps were fastest, probes again when the steps slow down, and never changes what is computed."""

from __future__ import annotations

import numpy as np

from edgesparse.runtime.core.threads import ThreadTuner


class _Counts:
    """What the tuner drives: a thread count it sets (the model's set_threads)."""

    def __init__(self, threads):
        self.threads = threads
        self.history = []

    def set_threads(self, t):
        self.threads = t
        self.history.append(t)


def _drive(tuner, model, ms_of, steps):
    for i in range(steps):
        tuner.step(ms_of(i, model.threads) / 1e3)


def test_tuner_keeps_the_fastest_count_and_probes_again_when_steps_slow():
    m = _Counts(4)
    tuner = ThreadTuner(m, 4)
    assert tuner.candidates == [4, 2, 1]
    # an idle machine: 4 threads fastest
    _drive(tuner, m, lambda i, t: {4: 5.0, 2: 7.0, 1: 11.0}[t], 2 * 3 * ThreadTuner.PROBE)
    assert m.threads == 4 and tuner.best == 4
    # load arrives: every step on 4 threads now takes 40 ms, on 1 thread 12 ms
    _drive(tuner, m, lambda i, t: {4: 40.0, 2: 30.0, 1: 12.0}[t], 2 * ThreadTuner.PROBE + 3 * ThreadTuner.PROBE)
    assert tuner.best == 1 and m.threads == 1, tuner.times
    # and it looks again after EVERY steps even when nothing slows down
    before = len(m.history)
    _drive(tuner, m, lambda i, t: {4: 5.0, 2: 7.0, 1: 12.0}[t], ThreadTuner.EVERY + 3 * ThreadTuner.PROBE)
    assert len(m.history) > before and tuner.best == 4
    assert tuner.summary().startswith(str(max(tuner.used, key=tuner.used.get)))


def test_tuner_with_one_thread_does_nothing():
    m = _Counts(1)
    tuner = ThreadTuner(m, 1)
    _drive(tuner, m, lambda i, t: 3.0, 50)
    assert m.history == [1] and tuner.summary() == "1"


def test_tuned_generation_computes_what_a_fixed_count_computes(tiny_llama_pkg):
    """Changing the thread count between steps changes which thread computes a row, not its value:
    the same greedy tokens and the same logits, bit for bit."""
    from edgesparse.runtime.core.generate import generate
    from edgesparse.runtime.core.model import Model
    from edgesparse.runtime.core.sampling import Sampler
    fixed = Model(tiny_llama_pkg, ctx=64, threads=2)
    out_f, _ = generate(fixed, [5, 6, 7], 20, Sampler(0.0))
    logits_f = fixed.logits.copy()
    tuned = Model(tiny_llama_pkg, ctx=64, threads=2)
    tuner = ThreadTuner(tuned, 2)
    out_t, stats = generate(tuned, [5, 6, 7], 20, Sampler(0.0), tuner=tuner)
    print("thread choice:", stats.thread_choice, "steps per count", tuner.used)
    assert out_t == out_f
    assert np.array_equal(tuned.logits, logits_f)
    assert sum(tuner.used.values()) == len(out_t) - 1 and tuner.used[1] > 0 and tuner.used[2] > 0

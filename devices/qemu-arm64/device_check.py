"""Device side of devices/qemu-arm64/check: runs inside the emulated arm64 chroot, with the device
dependencies only (no torch, no transformers).

    python3 device_check.py probe CPU      # is the emulated CPU the one asked for?
    python3 device_check.py logits REF_DIR # the runtime against host_reference.py's output

probe: QEMU_CPU reaches each process through its environment (binfmt_misc starts a new qemu per
exec), and LLVM picks its target from /proc/cpuinfo, which the check replaces per CPU model. probe
checks both: the hardware capabilities QEMU reports (AT_HWCAP) must match CPU's, and LLVM's host
CPU must be CPU itself.

logits: checks the runtime's logits against transformers' (computed on the x86 host) for the float32
package (24-token prefill: the Numba prefill kernel; 100-token prefill: the BLAS path; 7-token
prefill then 17 decode steps: the decode kernels) and the float16 package (prefill and decode,
against transformers with the weights rounded to float16), and that greedy generation picks
transformers' tokens. Exit status 1 on any mismatch.

Tolerance: LOGIT_TOL = 2e-5 absolute, the one tests/test_tiny_llama.py derives for this model.
The logits are at most ~0.7 in magnitude; the last step alone, the lm_head's float32 dot product
of length D = 96, is within D * eps32 * sum|terms| ~ 96 * 1.2e-7 * 1.5 ~ 1.7e-5 of the exact
value in any summation order, so the bound also covers NEON lanes, FMA contraction (fastmath)
and ORT's aarch64 attention kernels, none of which the x86 reference shares. Observed on x86:
~3e-7. A wrong kernel (a dropped neuron, a misread float16 row) is orders of magnitude outside.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

LOGIT_TOL = 2e-5

# arm64 AT_HWCAP bits (linux/arch/arm64/include/uapi/asm/hwcap.h)
HWCAP = ["fp", "asimd", "evtstrm", "aes", "pmull", "sha1", "sha2", "crc32", "atomics", "fphp", "asimdhp",
         "cpuid", "asimdrdm", "jscvt", "fcma", "lrcpc", "dcpop", "sha3", "sm3", "sm4", "asimddp", "sha512",
         "sve", "asimdfhm", "dit", "uscat", "ilrcpc", "flagm", "ssbs", "sb", "paca", "pacg"]
# What QEMU's model of each core must and must not report: ARMv8.0 (A57, A72) has no LSE atomics,
# fp16 arithmetic or dot product; ARMv8.2 (A76) has all three; none of them has SVE (`-cpu max` has).
EXPECT = {
    "cortex-a57": ({"fp", "asimd", "crc32"}, {"atomics", "fphp", "asimddp", "sve"}),
    "cortex-a72": ({"fp", "asimd", "crc32"}, {"atomics", "fphp", "asimddp", "sve"}),
    "cortex-a76": ({"fp", "asimd", "crc32", "atomics", "fphp", "asimdhp", "asimdrdm", "lrcpc", "dcpop", "asimddp"},
                   {"sve"}),
}


def probe(cpu: str) -> int:
    import ctypes

    import llvmlite.binding as llvm
    libc = ctypes.CDLL(None)
    libc.getauxval.restype = ctypes.c_ulong
    bits = libc.getauxval(16)                    # AT_HWCAP
    caps = {name for i, name in enumerate(HWCAP) if bits >> i & 1}
    llvm_cpu = llvm.get_host_cpu_name()
    feats = " ".join(sorted(f[1:] for f in llvm.get_host_cpu_features().flatten().split(",") if f.startswith("+")))
    print(f"machine {platform.machine()}, QEMU_CPU={os.environ.get('QEMU_CPU', '(unset)')}")
    print(f"QEMU hwcaps: {' '.join(n for n in HWCAP if n in caps)}")
    print(f"LLVM (Numba) compiles for: {llvm_cpu} (+{' +'.join(feats.split())})")
    need, forbid = EXPECT.get(cpu, (set(), set()))
    errors = []
    if platform.machine() != "aarch64":
        errors.append(f"machine is {platform.machine()}")
    if os.environ.get("QEMU_CPU") != cpu:
        errors.append("QEMU_CPU did not reach this process")
    if need - caps:
        errors.append(f"{cpu} should have {' '.join(sorted(need - caps))}")
    if caps & forbid:
        errors.append(f"{cpu} should not have {' '.join(sorted(caps & forbid))}")
    if llvm_cpu != cpu:
        errors.append(f"LLVM sees {llvm_cpu}, not {cpu} (is the fake /proc/cpuinfo mounted?)")
    print(("FAIL: " + "; ".join(errors)) if errors else f"PASS: emulated CPU is {cpu}")
    return 1 if errors else 0


def logits(ref_dir: Path) -> int:
    import numba
    import onnxruntime

    from edgesparse.runtime.core.generate import generate
    from edgesparse.runtime.core.model import SMALL_BATCH, Model
    from edgesparse.runtime.core.sampling import Sampler

    print(f"numba {numba.__version__} ({numba.config.NUMBA_NUM_THREADS} threads), onnxruntime "
          f"{onnxruntime.__version__}, numpy {np.__version__}", flush=True)

    ref = np.load(ref_dir / "reference.npz")
    ids, long_ids = ref["ids"], ref["long_ids"]
    assert len(ids) <= SMALL_BATCH < len(long_ids)
    failures = []

    def check(what, got, want):
        got = np.asarray(got, np.float64)
        diff = float(np.abs(got - want).max()) if got.shape == want.shape else float("inf")
        ok = diff <= LOGIT_TOL
        print(f"  {'ok  ' if ok else 'FAIL'} {what}: max|logit diff| {diff:.3g} (tol {LOGIT_TOL:g})", flush=True)
        if not ok:
            failures.append(what)

    def decode_logits(rt, x, n_prefill):
        rt.reset()
        out = [rt.forward(x[:n_prefill]).copy()]
        for t in x[n_prefill:]:
            out.append(rt.forward([int(t)]).copy())
        return np.array(out)

    t0 = time.perf_counter()
    rt = Model(ref_dir / "tiny.esp", ctx=128)
    check("float32 prefill, 24 tokens (Numba prefill kernels)", rt.forward(ids, all_logits=True), ref["logits"])
    print(f"  (first forward, with any JIT compilation: {time.perf_counter() - t0:.0f} s)", flush=True)
    rt.reset()
    check("float32 prefill, 100 tokens (BLAS path)", rt.forward(long_ids, all_logits=True), ref["long_logits"])
    check("float32 prefill 7 + 17 decode steps", decode_logits(rt, ids, 7), ref["logits"][6:])

    rt16 = Model(ref_dir / "tiny16.esp", ctx=64)
    check("float16 prefill, 24 tokens", rt16.forward(ids, all_logits=True), ref["logits_f16w"])
    check("float16 prefill 10 + 14 decode steps", decode_logits(rt16, ids, 10), ref["logits_f16w"][9:])

    prompt, want = [int(t) for t in ref["prompt_ids"]], [int(t) for t in ref["greedy"]]
    got, _ = generate(Model(ref_dir / "tiny.esp", ctx=64), prompt, len(want), Sampler(0.0))
    ok = got == want
    print(f"  {'ok  ' if ok else 'FAIL'} greedy tokens vs transformers ({len(want)} tokens, "
          f"min top-1/top-2 margin {float(ref['greedy_margin']):.3g})", flush=True)
    if not ok:
        print(f"    transformers {want}\n    runtime      {got}")
        failures.append("greedy tokens")
    print(f"Numba threading layer: {numba.threading_layer()}")
    print(f"{'FAIL' if failures else 'PASS'}: logits check, {time.perf_counter() - t0:.0f} s"
          + (f" ({', '.join(failures)})" if failures else ""))
    return 1 if failures else 0


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("probe", "logits"):
        sys.exit(__doc__)
    sys.exit(probe(sys.argv[2]) if sys.argv[1] == "probe" else logits(Path(sys.argv[2])))

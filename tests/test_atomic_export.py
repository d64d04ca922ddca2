"""A package you can trust: export is atomic, nothing in a package is executed, and two processes
can run one package at once.

Atomic export, two ways:
- real SIGKILLs of `python -m edgesparse export TINY -o OUT -q` at points spread over its measured
  runtime (fixed seed): one at a fraction of the time before files are written (imports, model
  load), the others at fractions of the writing phase, timed from when `.OUT.partial-*` appears;
- checkpoints: the export runs in a child with an audit hook that stops before *every* file-system
  change under OUT's parent (mkdir, open for writing, rename, remove, rmtree, and the lookup of
  renameat2 just before an atomic exchange) until the test has checked the directory. A SIGKILL
  runs no handlers, so the state at a checkpoint is exactly what a kill at that moment would leave.

SIGTERM, at checkpoints and at random points of the writing phase: the export removes its partial
directory and ends as killed by SIGTERM. A SIGKILL's leftover is removed by the next export into the
same directory, once its process is gone.

After a kill / at a checkpoint: OUT does not exist, or it verifies and is byte-identical to a
complete export (with --force: OUT always verifies and is the old or the new package). A leftover
`.OUT.*` directory does not load as a package, unless it is a complete package that verifies (the
tmp directory just before its final rename necessarily is one; no half-written one ever loads).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from edgesparse.cli import main
from edgesparse.errors import EdgesparseError
from edgesparse.format import MANIFEST, PAGE

SEED = 20261128
KILL_TIMEOUT = 120   # no export of the tiny model takes this long: a hung child is killed


def tree_digest(d: Path) -> dict[str, str]:
    return {p.relative_to(d).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file()}


def export_cmd(src: Path, out: Path, force: bool = False) -> list[str]:
    return [sys.executable, "-m", "edgesparse", "export", str(src), "-o", str(out), "-q"] + (
        ["--force"] if force else [])


def verifies(d: Path) -> bool:
    """`edgesparse verify d` (manifest, sizes, every sha256), in-process and quietly."""
    from edgesparse.format import read_manifest, verify_hashes
    try:
        verify_hashes(d, read_manifest(d))
    except EdgesparseError:
        return False
    return True


def loads(d: Path) -> bool:
    from edgesparse.runtime.core.package import Package
    try:
        Package(d)
    except EdgesparseError:
        return False
    return True


def check_state(out: Path, allowed: list[dict], must_exist: bool) -> str:
    """The invariant after a kill; returns a short description of the state (for messages)."""
    if out.exists():
        assert verifies(out), f"{out} exists but does not verify: {sorted(tree_digest(out))}"
        assert tree_digest(out) in allowed, f"{out} verifies but is neither the old nor the new package"
        state = "out=" + str(allowed.index(tree_digest(out)))
    else:
        assert not must_exist, f"{out} (the existing package) is gone"
        state = "out=absent"
    for d in sorted(out.parent.glob(f".{out.name}.*")):
        if loads(d):
            assert verifies(d) and tree_digest(d) in allowed, f"leftover {d.name} loads but is not a complete package"
            state += f" {d.name.split('-')[0]}=complete"
        else:
            state += f" {d.name.split('-')[0]}=unloadable"
    return state


@pytest.fixture(scope="module")
def measured(tiny_llama_dir, tmp_path_factory):
    """One uninterrupted export: its runtime T, when its .partial- directory appeared (files start
    being written), when OUT appeared (the rename), and the digest of the complete package."""
    d = tmp_path_factory.mktemp("measure")
    out = d / "ref.esp"
    t0 = time.monotonic()
    p = subprocess.Popen(export_cmd(tiny_llama_dir, out), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    t_partial = t_done = None
    while p.poll() is None:
        now = time.monotonic() - t0
        if t_partial is None and any(d.glob(".ref.esp.partial-*")):
            t_partial = now
        if t_done is None and out.exists():
            t_done = now
        time.sleep(0.002)
    T = time.monotonic() - t0
    assert p.returncode == 0, p.stderr.read().decode()
    assert main(["verify", str(out)]) == 0
    assert [x.name for x in d.iterdir()] == ["ref.esp"]      # the tmp dir was renamed, nothing left
    t_done = t_done or T
    t_partial = t_partial or 0.8 * t_done
    return {"T": T, "t_partial": t_partial, "t_done": t_done, "digest": tree_digest(out)}


def kill_at(cmd: list[str], out: Path, delay: float, after_partial: bool,
            sig: int = signal.SIGKILL) -> tuple[bool, int]:
    """Run cmd and send it sig `delay` seconds after it started, or (after_partial) after its
    `.OUT.partial-*` directory appeared. (whether the signal was sent before it finished, its exit
    status)."""
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.monotonic()
    start = None if after_partial else t0
    sent = False
    try:
        while p.poll() is None and not sent:
            now = time.monotonic()
            if start is None and any(out.parent.glob(f".{out.name}.partial-*")):
                start = now
            if start is not None and now - start >= delay:
                p.send_signal(sig)
                sent = True
            assert now - t0 < KILL_TIMEOUT, "export hung"
            time.sleep(0.002)
        return sent, p.wait(timeout=KILL_TIMEOUT)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def kill_points(measured, n_early: int, n_late: int, rng: random.Random) -> list[tuple[float, bool]]:
    """(delay, after_partial): n_early points at fractions of the time before files are written,
    n_late at fractions of the writing phase, from the partial dir appearing to the rename that
    publishes the package (up to 1.2x its length, so some runs also get past it)."""
    tp, td = measured["t_partial"], measured["t_done"]
    return ([(rng.uniform(0.1, 1.0) * tp, False) for _ in range(n_early)]
            + [(rng.uniform(0.0, 1.2) * (td - tp), True) for _ in range(n_late)])


def _kill_and_check(tiny_llama_dir, root: Path, i: int, point, allowed, old: Path | None):
    d = root / f"k{i}"
    d.mkdir()
    out = d / "out.esp"
    if old is not None:
        shutil.copytree(old, out)
    delay, after_partial = point
    killed, _ = kill_at(export_cmd(tiny_llama_dir, out, force=old is not None), out, delay, after_partial)
    state = check_state(out, allowed, must_exist=old is not None)
    when = f"{delay:.2f}s after {'the partial dir appeared' if after_partial else 'start'}"
    return f"{when}, {'killed' if killed else 'finished'}: {state}", out


def test_killed_exports(tiny_llama_dir, tiny_tied_pkg, measured, tmp_path, capsys):
    """SIGKILL a fresh export at 3 points and a --force export (over a different model, so old and
    new are told apart) at 2 points. Two exports run at a time (2 cores; each is single-threaded).
    Afterwards every OUT that exists passes `edgesparse verify` and loads as a Model."""
    from edgesparse.runtime.core.model import Model
    rng = random.Random(SEED)
    new, old = measured["digest"], tree_digest(tiny_tied_pkg)
    jobs = ([(p, [new], None) for p in kill_points(measured, 1, 2, rng)]
            + [(p, [old, new], tiny_tied_pkg) for p in kill_points(measured, 0, 2, rng)])
    with ThreadPoolExecutor(2) as ex:
        results = list(ex.map(lambda a: _kill_and_check(tiny_llama_dir, tmp_path, a[0], *a[1]), enumerate(jobs)))
    for state, out in results:
        if out.exists():
            assert main(["verify", str(out)]) == 0
            Model(out, ctx=16, threads=1)     # loads (ORT graphs, mmaps), not just verifies
    capsys.readouterr()      # verify's "ok" lines
    print(f"export: {measured['T']:.2f}s, files written from {measured['t_partial']:.2f}s, "
          f"published at {measured['t_done']:.2f}s")
    print("\n".join(s for s, _ in results))


# -- checkpoints -------------------------------------------------------------------------------
CHILD = r"""
import os, sys, runpy
watch = os.path.abspath(sys.argv[1]) + os.sep
EVENTS = {"open", "os.rename", "os.replace", "os.remove", "os.rmdir", "os.mkdir", "shutil.rmtree",
          "ctypes.dlsym"}

def under(p):
    try:
        return os.path.abspath(os.fsdecode(p)).startswith(watch)
    except TypeError:
        return False

def hook(event, args):
    if event not in EVENTS:
        return
    if event == "open":
        path, mode, flags = args
        if isinstance(path, int) or path is None or not under(path):
            return
        if not (any(c in mode for c in "wax+") if mode else flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)):
            return
    elif event == "ctypes.dlsym":      # ctypes calls raise no event: stop at the lookup of renameat2
        if args[1] != "renameat2":
            return
    elif not under(args[0]):
        return
    sys.__stdout__.write("CHECKPOINT " + event + "\n")
    sys.__stdout__.flush()
    if sys.stdin.readline() != "go\n":
        os._exit(99)

sys.addaudithook(hook)
sys.argv = ["edgesparse"] + sys.argv[2:]
runpy.run_module("edgesparse", run_name="__main__", alter_sys=True)
"""


def run_with_checkpoints(src: Path, out: Path, allowed, force: bool, log: Path) -> list[str]:
    cmd = [sys.executable, "-c", CHILD, str(out.parent)] + export_cmd(src, out, force)[3:]
    with open(log, "wb") as err:
        p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True)
        watchdog = threading.Timer(KILL_TIMEOUT, p.kill)
        watchdog.start()
        seen = []
        try:
            for line in p.stdout:
                if not line.startswith("CHECKPOINT "):
                    continue
                ev = line.split()[1]
                seen.append(f"{ev}: {check_state(out, allowed, must_exist=force)}")
                p.stdin.write("go\n")
                p.stdin.flush()
            rc = p.wait()
        finally:
            watchdog.cancel()
            if p.poll() is None:
                p.kill()
                p.wait()
    assert rc == 0, log.read_text()[-2000:]
    seen.append(f"exit: {check_state(out, allowed, must_exist=True)}")
    assert tree_digest(out) == allowed[-1]
    assert [x.name for x in out.parent.iterdir()] == [out.name], "the export left something behind"
    return seen


def test_export_checkpoints(tiny_llama_dir, tiny_tied_pkg, measured, tmp_path):
    """Stop before every file-system change of a fresh export and of a --force export; at each
    stop the state is what a SIGKILL there would leave, and it must satisfy the invariant."""
    fresh, forced = tmp_path / "fresh" / "out.esp", tmp_path / "force" / "out.esp"
    fresh.parent.mkdir()
    shutil.copytree(tiny_tied_pkg, forced)
    new, old = measured["digest"], tree_digest(tiny_tied_pkg)
    with ThreadPoolExecutor(2) as ex:
        f1 = ex.submit(run_with_checkpoints, tiny_llama_dir, fresh, [new], False, tmp_path / "fresh.log")
        f2 = ex.submit(run_with_checkpoints, tiny_llama_dir, forced, [old, new], True, tmp_path / "force.log")
        seen_fresh, seen_force = f1.result(), f2.result()
    print("fresh:", *seen_fresh, "force:", *seen_force, sep="\n  ")
    n_files = len(new)     # listed files + manifest.json
    for seen in (seen_fresh, seen_force):
        assert sum(s.startswith("open:") for s in seen) >= n_files, seen   # the hook saw every file
    # the stops saw the --force export go from the old package to the new one (and OUT verified
    # at every stop in between: check_state with must_exist)
    outs = [s.split()[1] for s in seen_force]
    assert outs[0] == "out=0" and outs[-1] == "out=1" and set(outs) == {"out=0", "out=1"}, seen_force


# -- SIGTERM removes the partial directory; the next export removes a killed one's -------------
# The child as on a platform without renameat2: --force replaces OUT with two renames
NO_EXCHANGE = "import edgesparse.export.writer as W\nW._exchange = lambda a, b: False\n"


def signal_at_checkpoint(src: Path, out: Path, force: bool, event: str, nth: int, sig: int, log: Path,
                         prelude: str = "") -> tuple[int, int]:
    """Run the checkpointed export (CHILD, after prelude) and send it sig at its nth stop before
    `event`, answering 'go' to every stop (after a SIGTERM the export removes its partial directory:
    more stops). A SIGKILL ends it there. Returns (the child's pid, its exit status)."""
    cmd = [sys.executable, "-c", prelude + CHILD, str(out.parent)] + export_cmd(src, out, force)[3:]
    with open(log, "wb") as err:
        p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True)
        watchdog = threading.Timer(KILL_TIMEOUT, p.kill)
        watchdog.start()
        seen, sent = 0, False
        try:
            for line in p.stdout:
                if not line.startswith("CHECKPOINT "):
                    continue
                if not sent and line.split()[1] == event:
                    seen += 1
                    if seen == nth:
                        p.send_signal(sig)
                        sent = True
                try:
                    p.stdin.write("go\n")
                    p.stdin.flush()
                except BrokenPipeError:        # it has ended
                    break
            rc = p.wait()
        finally:
            watchdog.cancel()
            if p.poll() is None:
                p.kill()
                p.wait()
    assert sent, f"the export made fewer than {nth} {event} stops: {log.read_text()[-2000:]}"
    return p.pid, rc


def test_sigterm_removes_the_partial_directory(tiny_llama_dir, tiny_tied_pkg, measured, tmp_path):
    """SIGTERM a fresh export in the middle of its writes and just before it publishes, and a --force
    export just before its exchange: each ends as killed by SIGTERM, leaving nothing beside OUT, and
    OUT absent (fresh) or the old package (--force). Without renameat2, a SIGTERM between the two
    renames of a --force export waits for the second: OUT is the new package, the old one is gone
    (it does not leave OUT missing and the new package deleted). Then SIGTERM two fresh exports at random points
    of their writing phase (fixed seed): whatever the moment, no partial directory remains, and OUT
    is absent or the complete package."""
    old = tree_digest(tiny_tied_pkg)
    staged = [("mid", "open", 6, False, ""), ("publish", "os.rename", 1, False, ""),
              ("exchange", "ctypes.dlsym", 1, True, ""), ("renames", "os.rename", 2, True, NO_EXCHANGE)]
    for name, *_ in staged:
        (tmp_path / name).mkdir()
    for name in ("exchange", "renames"):
        shutil.copytree(tiny_tied_pkg, tmp_path / name / "out.esp")
    rng = random.Random(SEED + 1)
    timed = [(tmp_path / f"t{i}", delay) for i, (delay, _) in enumerate(kill_points(measured, 0, 2, rng))]

    def staged_run(a):
        name, event, nth, force, prelude = a
        return signal_at_checkpoint(tiny_llama_dir, tmp_path / name / "out.esp", force, event, nth, signal.SIGTERM,
                                    tmp_path / f"{name}.log", prelude)[1]

    def timed_run(a):
        d, delay = a
        d.mkdir()
        return kill_at(export_cmd(tiny_llama_dir, d / "out.esp"), d / "out.esp", delay, True, signal.SIGTERM)

    with ThreadPoolExecutor(2) as ex:
        rcs = list(ex.map(staged_run, staged))
        times = list(ex.map(timed_run, timed))
    assert rcs == [-signal.SIGTERM] * 4, [(tmp_path / f"{n}.log").read_text()[-1000:] for n, *_ in staged]
    assert [p.name for p in (tmp_path / "mid").iterdir()] == []
    assert [p.name for p in (tmp_path / "publish").iterdir()] == []
    assert [p.name for p in (tmp_path / "exchange").iterdir()] == ["out.esp"]
    assert tree_digest(tmp_path / "exchange" / "out.esp") == old
    assert [p.name for p in (tmp_path / "renames").iterdir()] == ["out.esp"]
    assert tree_digest(tmp_path / "renames" / "out.esp") == measured["digest"]
    for (d, delay), (sent, rc) in zip(timed, times):
        assert rc == (-signal.SIGTERM if sent else 0), (delay, sent, rc)
        left = [p.name for p in d.iterdir()]
        assert left in ([], ["out.esp"]), (delay, left)
        if left:
            assert tree_digest(d / "out.esp") == measured["digest"]


def test_next_export_removes_a_killed_exports_partial(tiny_llama_dir, tmp_path, capsys):
    """A SIGKILL runs no handler: the partial directory stays, named with the process. The next
    export into that directory removes it (and any other partial of a process that is gone here),
    and leaves alone the partials of a live process, of another host and of an unknown writer."""
    d = tmp_path / "d"
    d.mkdir()
    pid, rc = signal_at_checkpoint(tiny_llama_dir, d / "a.esp", False, "open", 6, signal.SIGKILL, tmp_path / "a.log")
    assert rc == -signal.SIGKILL
    (left,) = d.iterdir()
    assert left.name.startswith(f".a.esp.partial-{pid}@"), left.name
    host = left.name.split("@", 1)[1].rsplit("-", 1)[0]
    gone = d / f".b.esp.partial-{pid}@{host}-zz_9zz9z"              # another name, same dead writer
    alive = d / f".c.esp.partial-{os.getpid()}@{host}-abcd1234"    # this test: alive
    other_host = d / f".d.esp.partial-{pid}@{host}x-abcd1234"       # cannot be checked from here
    unknown = d / ".e.esp.partial-abcd1234"                          # no writer recorded
    for p in (gone, alive, other_host, unknown):
        p.mkdir()
        (p / "x.bin").write_bytes(b"x")
    assert main(["export", str(tiny_llama_dir), "-o", str(d / "out.esp"), "-q"]) == 0
    assert main(["verify", str(d / "out.esp")]) == 0
    capsys.readouterr()
    assert sorted(p.name for p in d.iterdir()) == sorted(["out.esp", alive.name, other_host.name, unknown.name])


# -- nothing in a package is executed ----------------------------------------------------------
class _Payload:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('unpickled')",))


def _prepend_page(pkg: Path, rel: str, blob: bytes) -> None:
    """Put blob in a new first page of raw file rel and move its tensors one page on; fix the
    manifest's sizes, offsets and sha256 so the package is still valid (and verifies)."""
    assert len(blob) <= PAGE
    f = pkg / rel
    data = blob.ljust(PAGE, b"\0") + f.read_bytes()
    f.write_bytes(data)
    doc = json.loads((pkg / MANIFEST).read_text())
    for e in doc["files"]:
        if e["path"] == rel:
            e["size"], e["sha256"] = len(data), hashlib.sha256(data).hexdigest()
    for t in doc["tensors"].values():
        if t["file"] == rel:
            t["offset"] += PAGE
    (pkg / MANIFEST).write_text(json.dumps(doc))


RUN = ["-p", "w5 w6 w7", "-n", "12"]


def run_cli(pkg: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgesparse", "run", str(pkg), *RUN, *extra],
                          capture_output=True, text=True, timeout=KILL_TIMEOUT)


def test_no_pickle_is_ever_loaded(tiny_llama_pkg, tmp_path):
    """Every raw file starts with a pickle that writes a marker file when unpickled (np.load with
    allow_pickle, pickle.load, torch.load would all run it). `run --verify` works, gives the same
    text as the clean package, and the marker never appears."""
    marker = tmp_path / "UNPICKLED"
    blob = pickle.dumps(_Payload(marker), protocol=2)
    pickle.loads(blob)                  # the payload works: this test can fail
    assert marker.read_text() == "unpickled"
    marker.unlink()
    pkg = tmp_path / "evil.esp"
    shutil.copytree(tiny_llama_pkg, pkg)
    raw = [e["path"] for e in json.loads((pkg / MANIFEST).read_text())["files"] if e["kind"] == "raw"]
    for rel in raw:
        _prepend_page(pkg, rel, blob)
    assert all((pkg / rel).read_bytes().startswith(b"\x80\x02") for rel in raw)
    with ThreadPoolExecutor(2) as ex:
        clean, evil = ex.map(lambda a: run_cli(*a), [(tiny_llama_pkg,), (pkg, "--verify")])
    assert clean.returncode == 0 and evil.returncode == 0, evil.stderr
    assert evil.stdout == clean.stdout and clean.stdout.strip()
    assert not marker.exists()


def test_exported_package_has_no_pickles(tiny_llama_pkg):
    """Every file in the package is listed in the manifest (or is the manifest), and none is a
    pickle (protocol 2+ pickles start with 0x80 and the protocol number)."""
    listed = {e["path"] for e in json.loads((tiny_llama_pkg / MANIFEST).read_text())["files"]}
    on_disk = {p.relative_to(tiny_llama_pkg).as_posix() for p in tiny_llama_pkg.rglob("*") if p.is_file()}
    assert on_disk == listed | {MANIFEST}
    for rel in on_disk:
        head = (tiny_llama_pkg / rel).read_bytes()[:2]
        assert not (len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5), rel
        assert not rel.endswith((".pkl", ".pickle", ".pt", ".pth", ".npy", ".npz")), rel


def test_chat_template_cannot_escape_the_sandbox(tiny_llama_pkg, tmp_path, capsys):
    """A template that reaches for os.system through Python internals: outside a sandbox it runs
    the command; in `run --chat` it is refused with one line and runs nothing."""
    from jinja2 import Environment
    marker = tmp_path / "ESCAPED"
    tmpl = "{{ cycler.__init__.__globals__.os.system('touch " + str(marker) + "') }}"
    Environment().from_string(tmpl).render()        # unsandboxed: the escape works
    assert marker.exists()
    marker.unlink()
    pkg = tmp_path / "tmpl.esp"
    shutil.copytree(tiny_llama_pkg, pkg)
    doc = json.loads((pkg / MANIFEST).read_text())
    doc["chat_template"] = tmpl
    (pkg / MANIFEST).write_text(json.dumps(doc))
    rc = main(["run", str(pkg), "--chat", *RUN])
    out, err = capsys.readouterr()
    assert rc == 1 and "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith("edgesparse: error: manifest chat_template: SecurityError")
    assert not marker.exists()


# -- sharing -----------------------------------------------------------------------------------
def test_two_runs_share_one_package(tiny_llama_pkg):
    """Two `edgesparse run` processes on one package at the same time (read-only mmaps): both
    succeed with the same greedy text, and the package is unchanged."""
    before = tree_digest(tiny_llama_pkg)
    cmd = [sys.executable, "-m", "edgesparse", "run", str(tiny_llama_pkg), *RUN, "--threads", "1"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [p.communicate(timeout=KILL_TIMEOUT) + (p.returncode,) for p in procs]
    for out, err, rc in results:
        assert rc == 0, err
    assert results[0][0] == results[1][0] and results[0][0].strip()
    assert tree_digest(tiny_llama_pkg) == before

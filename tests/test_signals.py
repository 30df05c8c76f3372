"""Stopping cleanly: Ctrl-C, SIGTERM and SIGKILL of ``chaos run`` and ``chaos suite``.

Real harness processes, real signals, real redis-server. Every process a harness starts
inherits a mark in its environment, so what outlived it is found in the process table
(other tests may run beside these).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import psutil
import pytest
from govtools import small_scenario

MARK_VAR = "CHAOS_TEST_SIGNALS_MARK"


def marked(mark: str) -> list[psutil.Process]:
    """Live processes (not zombies) whose environment holds the mark."""
    found = []
    for p in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if p.pid != os.getpid() and p.status() != psutil.STATUS_ZOMBIE and \
                    p.environ().get(MARK_VAR) == mark:
                found.append(p)
    return found


def wait_until(pred: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def descendants(pid: int) -> list[psutil.Process]:
    """Everything the harness started and has not reaped, whatever its session. (A
    redis-server overwrites its environment with its process title, so the mark alone
    does not find it.)"""
    with contextlib.suppress(psutil.Error):
        return psutil.Process(pid).children(recursive=True)
    return []


def alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    out = []
    for p in procs:
        with contextlib.suppress(psutil.Error):
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:  # same process
                out.append(p)
    return out


def gone_within(mark: str, timeout: float, before: Sequence[psutil.Process] = ()) -> list[str]:
    """What of the mark, or of ``before`` (the harness's descendants just before the
    signal), is still alive after ``timeout`` (empty: everything went)."""
    deadline = time.monotonic() + timeout
    while True:
        left = {p.pid: p for p in [*marked(mark), *alive(list(before))]}.values()
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    out = []
    for p in left:
        with contextlib.suppress(psutil.Error):
            out.append(f"{p.pid} {p.status()} {' '.join(p.cmdline())[:120]}")
    return out


class Harness:
    """A ``python -m chaos ...`` in its own session (as a terminal's foreground job is),
    output to files (a pipe held by a leftover child would hang the reader)."""

    def __init__(self, tmp: Path, *args: str) -> None:
        self.mark = uuid.uuid4().hex
        self.out, self.err = tmp / "stdout.txt", tmp / "stderr.txt"
        self.started: list[psutil.Process] = []  # descendants seen, for the cleanup
        with open(self.out, "wb") as o, open(self.err, "wb") as e:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "chaos", *args], stdout=o, stderr=e,
                stdin=subprocess.DEVNULL, start_new_session=True,
                env={**os.environ, MARK_VAR: self.mark, "PYTHONUNBUFFERED": "1"})

    def snapshot(self) -> list[psutil.Process]:
        """The harness's descendants now (kept for the cleanup too)."""
        procs = descendants(self.proc.pid)
        self.started.extend(procs)
        return procs

    def output(self) -> str:
        return self.out.read_text(errors="replace") + self.err.read_text(errors="replace")

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout=timeout)

    def cleanup(self) -> None:
        """Whatever the test did: nothing of this harness survives it."""
        self.started.extend(descendants(self.proc.pid))
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        for p in [*marked(self.mark), *alive(self.started)]:
            with contextlib.suppress(psutil.Error):
                p.resume()
                p.kill()


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Callable[..., Harness]]:
    started: list[Harness] = []

    def start(*args: str) -> Harness:
        h = Harness(tmp_path, *args)
        started.append(h)
        return h

    yield start
    for h in started:
        h.cleanup()


def producing(run_dir: Path, min_bytes: int = 20_000) -> bool:
    """The workload is under way: the producers' histories hold a few hundred ops."""
    hist = run_dir / "history"
    if not hist.is_dir():
        return False
    return sum(p.stat().st_size for p in hist.glob("open_storm*.jsonl")) >= min_bytes


def run_args(out: Path, scenario: str = "open-storm", duration: float = 8) -> list[str]:
    return ["run", "--scenario", scenario, "--duration", str(duration), "--out", str(out),
            "--no-report", "--no-probe", "--quiet"]


def test_ctrl_c_at_the_terminal_gives_unknown_with_no_violation_and_leaves_nothing(
        tmp_path: Path, harness: Callable[..., Harness]) -> None:
    out = tmp_path / "run"
    h = harness(*run_args(out))
    wait_until(lambda: producing(out) or h.proc.poll() is not None, 60, "the workload")
    assert h.proc.poll() is None, h.output()
    before = h.snapshot()
    t0 = time.monotonic()
    os.killpg(h.proc.pid, signal.SIGINT)  # what a terminal does: the whole foreground group
    rc = h.wait(60)
    stopped_s = time.monotonic() - t0
    assert rc == 2, h.output()
    meta = json.loads((out / "run.json").read_text())
    assert meta["status"] == "interrupted"
    results = json.loads((out / "results.json").read_text())
    assert results["valid"] == "unknown", results.get("violations")
    assert results["violations"] == [], "the interruption itself caused violations"
    # Redis was never shut down under the run: no plan was lost or left undecided by it.
    assert "Received SIGINT" not in (out / "logs" / "redis.log").read_text(), \
        "redis-server got the terminal's SIGINT"
    assert gone_within(h.mark, 10, before) == []
    print(f"SIGINT to exit: {stopped_s:.1f}s")


def test_sigterm_tears_down_like_ctrl_c(tmp_path: Path,
                                        harness: Callable[..., Harness]) -> None:
    out = tmp_path / "run"
    h = harness(*run_args(out))
    wait_until(lambda: producing(out) or h.proc.poll() is not None, 60, "the workload")
    assert h.proc.poll() is None, h.output()
    before = h.snapshot()
    t0 = time.monotonic()
    h.proc.send_signal(signal.SIGTERM)  # the harness alone, as a service manager would
    rc = h.wait(60)
    stopped_s = time.monotonic() - t0
    assert rc == 2, h.output()
    assert json.loads((out / "run.json").read_text())["status"] == "interrupted"
    assert gone_within(h.mark, 10, before) == []
    print(f"SIGTERM to exit: {stopped_s:.1f}s")


def test_sigkill_of_the_harness_leaves_no_process_and_no_temp_dir(
        tmp_path: Path, harness: Callable[..., Harness]) -> None:
    out = tmp_path / "run"
    h = harness(*run_args(out, "governor-pause", 12))

    def paused() -> list[psutil.Process]:
        return [p for p in marked(h.mark) if p.status() == psutil.STATUS_STOPPED]

    # The pause fault is active (a governor SIGSTOPped) while the load runs.
    wait_until(lambda: (producing(out, 5_000) and paused()) or h.proc.poll() is not None,
               60, "a paused governor")
    assert h.proc.poll() is None, h.output()
    procs = h.snapshot()
    names = {" ".join(p.cmdline()) for p in procs}
    assert any("redis-server" in n for n in names) and any("governor_ref" in n for n in names)
    redis_dirs = [Path(p.cwd()) for p in procs if "redis-server" in " ".join(p.cmdline())]
    t0 = time.monotonic()
    h.proc.kill()
    h.proc.wait(10)
    left = gone_within(h.mark, 10, procs)
    assert left == [], f"alive 10 s after the harness was SIGKILLed: {left}"
    print(f"SIGKILL to the last process gone: {time.monotonic() - t0:.1f}s "
          f"({len(procs)} processes)")
    assert redis_dirs and not any(d.exists() for d in redis_dirs), "temp dir left behind"


def test_one_ctrl_c_stops_the_whole_suite_with_a_summary(
        tmp_path: Path, harness: Callable[..., Harness]) -> None:
    # Legacy governor: the first scenario is invalid, so its report is being written by the
    # suite's report process while the second runs (that process used to die of the Ctrl-C).
    names = []
    for n in ("a", "b", "c"):
        p = tmp_path / f"{n}.toml"
        p.write_text(small_scenario(n, 4))
        names += ["--scenario", str(p)]
    out = tmp_path / "suite"
    h = harness("suite", "--quick", "--governor", "legacy", "--out", str(out), *names)
    wait_until(lambda: producing(out / "small-b", 5_000) or h.proc.poll() is not None, 120,
               "the second scenario's workload")
    assert h.proc.poll() is None, h.output()
    before = h.snapshot()
    t0 = time.monotonic()
    os.killpg(h.proc.pid, signal.SIGINT)
    rc = h.wait(30)
    stopped_s = time.monotonic() - t0
    assert rc == 2, h.output()
    assert stopped_s < 15, f"the suite took {stopped_s:.1f}s to stop"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["interrupted"] is True
    rows = {s["name"]: s for s in summary["scenarios"]}
    assert list(rows) == ["small-a", "small-b"], "only what ran is listed"
    assert rows["small-a"]["valid"] is False and rows["small-a"]["interrupted"] is False
    assert rows["small-b"]["valid"] == "unknown" and rows["small-b"]["interrupted"] is True
    md = (out / "summary.md").read_text()
    assert "Interrupted" in md and "small-c" not in md
    assert not (out / "small-c").exists()
    assert "BrokenProcessPool" not in h.output()
    assert gone_within(h.mark, 10, before) == []
    print(f"suite SIGINT to exit: {stopped_s:.1f}s")


# -- the reaper itself ---------------------------------------------------------------------
OWNER = """
import os, signal, subprocess, sys, threading, time
from chaos import reaper

def spawn():
    # A wrapper with grandchildren, started (and registered) from a thread that then exits:
    # PR_SET_PDEATHSIG would miss both.
    p = subprocess.Popen(["sh", "-c", "sleep 300 & sleep 300 & wait"], start_new_session=True)
    reaper.watch(p.pid, group=True)
    print(p.pid, flush=True)

t = threading.Thread(target=spawn)
t.start()
t.join()
time.sleep(300)
"""


def test_the_reaper_kills_a_stopped_group_with_grandchildren_when_its_owner_is_killed(
        tmp_path: Path) -> None:
    owner = subprocess.Popen([sys.executable, "-c", OWNER], stdout=subprocess.PIPE, text=True,
                             start_new_session=True)
    group: list[psutil.Process] = []
    try:
        assert owner.stdout is not None
        pgid = int(owner.stdout.readline())

        def members() -> list[psutil.Process]:
            return [p for p in psutil.process_iter() if _pgid(p) == pgid]

        group = wait_until(lambda: m if len(m := members()) >= 3 else None, 10,
                           "the wrapper and its two children")
        os.killpg(pgid, signal.SIGSTOP)  # as a pause fault leaves a governor
        owner.kill()
        owner.wait(10)
        wait_until(lambda: not alive(group), 5, "the stopped group to be killed")
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait(10)
        for p in alive(group):
            with contextlib.suppress(psutil.Error):
                p.kill()


def _pgid(p: psutil.Process) -> int | None:
    with contextlib.suppress(psutil.Error, OSError):
        return os.getpgid(p.pid)
    return None


def test_the_reaper_does_not_kill_a_reused_pid() -> None:
    """An entry whose start time is not the process's own (the pid was reused) is spared;
    the same entry with the right start time is not."""
    from chaos import reaper

    victim = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        start = reaper.start_time(victim.pid)
        assert start is not None
        for given, survives in ((start + 1, True), (start, False)):
            r, w = os.pipe()
            rp = subprocess.Popen([sys.executable, "-m", "chaos.reaper", str(r)],
                                  pass_fds=(r,), start_new_session=True)
            os.close(r)
            os.write(w, (json.dumps({"op": "watch", "pid": victim.pid, "group": True,
                                     "start": given}) + "\n").encode())
            os.close(w)  # EOF: the "harness" died
            assert rp.wait(10) == 0
            time.sleep(0.2)
            assert (victim.poll() is None) is survives
    finally:
        if victim.poll() is None:
            victim.kill()
        victim.wait(10)

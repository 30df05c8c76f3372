"""The pass/fail suite: every non-exposure scenario, checked, summarised.

Writes into the suite directory one run directory per scenario (and seed),
``summary.json`` (``{"valid": ..., "scenarios": [{"name", "valid",
"violations": {invariant: count}}]}``), ``summary.md`` and ``junit.xml``.
``--quick`` shortens every scenario so the whole suite fits in a few minutes
on a 2-core machine.
"""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing
import os
import time
import xml.etree.ElementTree as ET
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures import wait as futures_wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chaos import reaper
from chaos import scenario as scn
from chaos.checkers import INVARIANTS, Verdict, check_run, combine
from chaos.runner import HarnessError, RunOptions, hold_stop_signals, run

log = logging.getLogger(__name__)

QUICK_DURATION_S = 6.0
# The sequential-model check's budget, --quick or not: a partition that fails stops the
# check at once (chaos/checkers/model.py), so an invalid run no longer costs the budget.
MODEL_TIMEOUT_S = 10.0
REPORT_GRACE_S = 5.0  # on Ctrl-C, what the report being written gets to finish


@dataclass
class ScenarioOutcome:
    name: str
    seed: int
    run_dir: Path
    valid: bool | None
    violations: dict[str, int] = field(default_factory=dict)
    first_violation_s: float | None = None
    seconds: float = 0.0
    error: str | None = None
    messages: list[str] = field(default_factory=list)
    interrupted: bool = False  # Ctrl-C / SIGTERM during this scenario: its verdict is unknown
    # What the run exercised (results.json ``coverage``), and why it is unknown when it is
    coverage: dict[str, Any] = field(default_factory=dict)
    unknown_because: list[str] = field(default_factory=list)

    @property
    def exercised(self) -> str:
        """``sent/decided/executed, faults`` in a few characters, for the table."""
        c = self.coverage
        if not c:
            return ""
        return (f"{c.get('plans_sent', 0)}/{c.get('plans_decided', 0)}/"
                f"{c.get('permits_executed', 0)} f{c.get('faults_applied', 0)}")

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "seed": self.seed,
                "valid": "unknown" if self.valid is None else self.valid,
                "violations": self.violations, "time_to_first_violation_s":
                self.first_violation_s, "seconds": round(self.seconds, 1),
                "run_dir": str(self.run_dir), "error": self.error,
                "interrupted": self.interrupted, "unknown_because": self.unknown_because,
                "coverage": {k: v for k, v in self.coverage.items()
                             if k in _COVERAGE_FIGURES}}


# The coverage figures a suite summary carries per run (results.json has them all).
_COVERAGE_FIGURES = ("plans_expected", "plans_sent", "plans_decided", "permits",
                     "permits_executed", "faults_scheduled", "faults_applied", "exercised")


class SuiteInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped the suite; the summary of what ran is written (marked
    interrupted) before this is raised. A KeyboardInterrupt, so that code that does not
    know the suite still treats it as an interruption."""

    def __init__(self, out_dir: Path, outcomes: list[ScenarioOutcome]) -> None:
        super().__init__(f"suite interrupted; summary in {out_dir}")
        self.out_dir = out_dir
        self.outcomes = outcomes


class _ScenarioInterrupted(KeyboardInterrupt):
    """The run of a scenario came back ``interrupted``: the suite stops there."""


def suite_scenarios(names: list[str] | None = None) -> list[scn.Scenario]:
    out = []
    for name in names or scn.builtin_names():
        s = scn.load(name)
        if not s.exposure or names:
            out.append(s)
    return out


def run_suite(out_dir: Path, *, governor: str = "reference", governor_cmd: str | None = None,
              quick: bool = False, seeds: int = 1, first_seed: int | None = None,
              names: list[str] | None = None,
              progress: bool = True, redis_kind: str | None = None,
              redis_url: str | None = None) -> tuple[bool | None, list[ScenarioOutcome]]:
    out_dir.mkdir(parents=True, exist_ok=True)
    outcomes: list[ScenarioOutcome] = []
    reports = _ReportWriter()
    try:
        _run_all(out_dir, outcomes, reports, governor=governor, governor_cmd=governor_cmd,
                 quick=quick, seeds=seeds, first_seed=first_seed, names=names,
                 progress=progress, redis_kind=redis_kind, redis_url=redis_url)
        reports.close()
    except KeyboardInterrupt:
        # One Ctrl-C (or SIGTERM) stops the whole suite: the queued reports are dropped,
        # the summary says what ran and that it was cut short.
        with hold_stop_signals():
            reports.close(cancel=True)
            write_summary(out_dir, combine(o.valid for o in outcomes), outcomes,
                          governor_cmd or governor, interrupted=True)
        raise SuiteInterrupted(out_dir, outcomes) from None
    except BaseException:
        reports.close(cancel=True)  # failed: the queued reports are dropped
        raise
    for oc in outcomes:
        err = reports.errors.get(oc.run_dir)
        if err:
            log.warning("report for %s not written: %s", oc.run_dir, err)
    valid = combine(o.valid for o in outcomes)
    write_summary(out_dir, valid, outcomes, governor_cmd or governor)
    return valid, outcomes


def _run_all(out_dir: Path, outcomes: list[ScenarioOutcome], reports: _ReportWriter, *,
             governor: str, governor_cmd: str | None, quick: bool, seeds: int,
             first_seed: int | None, names: list[str] | None, progress: bool,
             redis_kind: str | None, redis_url: str | None) -> None:
    for s in scenario_runs(names, quick=quick, seeds=seeds, first_seed=first_seed):
        run_dir = out_dir / (s.name if seeds == 1 and first_seed is None
                             else f"{s.name}-seed{s.seed}")
        t0 = time.monotonic()
        oc = ScenarioOutcome(s.name, s.seed, run_dir, None)
        try:
            v = run_scenario(s, run_dir, oc, governor=governor, governor_cmd=governor_cmd,
                             quick=quick, redis_kind=redis_kind, redis_url=redis_url)
            if oc.valid is not True:  # reports where there is something to look at
                reports.submit(oc.run_dir, v)
        except KeyboardInterrupt:
            # In the run (which tore itself down) or around it: its row is unknown, and
            # the suite stops (run_suite writes the summary).
            oc.valid, oc.violations, oc.first_violation_s = None, {}, None
            oc.interrupted = True
            oc.seconds = time.monotonic() - t0
            outcomes.append(oc)
            if progress:
                print(_row(oc), flush=True)
            raise
        except HarnessError as exc:
            oc.error = str(exc)
            raise
        except Exception as exc:  # noqa: BLE001 - one broken scenario must not stop the suite
            log.exception("scenario %s failed in the harness", s.name)
            oc.error = f"{type(exc).__name__}: {exc}"
        oc.seconds = time.monotonic() - t0
        outcomes.append(oc)
        if progress:
            print(_row(oc), flush=True)


def run_scenario(s: scn.Scenario, run_dir: Path, oc: ScenarioOutcome, *, governor: str,
                 governor_cmd: str | None, quick: bool, redis_kind: str | None = None,
                 redis_url: str | None = None) -> Verdict:
    """Run one scenario (with its seed and duration already set) into ``run_dir``, judge
    it, and fill ``oc`` in: verdict, violations by invariant, coverage. Shared by the
    suite and the pytest plugin. Raises ``_ScenarioInterrupted`` on Ctrl-C / SIGTERM and
    HarnessError when the harness cannot do its job."""
    res = run(RunOptions(scenario=s, governor=governor, governor_cmd=governor_cmd,
                         out=run_dir, progress=False, redis_kind=redis_kind,
                         redis_url=redis_url, probe_max_wait_s=30.0 if quick else 120.0))
    if res.status == "interrupted":
        raise _ScenarioInterrupted
    oc.run_dir = res.run_dir
    v: Verdict = check_run(res.run_dir, model_timeout_s=MODEL_TIMEOUT_S)
    oc.valid = v.valid if res.status == "complete" else None
    for name, r in v.results.items():
        if r.violations:
            oc.violations[name] = len(r.violations)
    first = v.to_dict()["time_to_first_violation_s"]
    if first is not None:
        oc.first_violation_s = round(first, 2)
    oc.messages = [x.message for x in v.violations[:3]]
    oc.coverage = dict(v.coverage)
    if oc.valid is None:
        oc.unknown_because = _unknown_because(v, res.status)
    return v


def scenario_runs(names: list[str] | None = None, *, quick: bool = False, seeds: int = 1,
                  first_seed: int | None = None,
                  scenarios: list[scn.Scenario] | None = None) -> list[scn.Scenario]:
    """Every (scenario, seed) the suite runs, in order, with --quick's duration applied."""
    out = []
    for sc in scenarios if scenarios is not None else suite_scenarios(names):
        base = sc.seed if first_seed is None else first_seed
        for k in range(seeds):
            out.append(sc.with_overrides(seed=base + k, duration_s=min(
                sc.duration_s, QUICK_DURATION_S) if quick else None))
    return out


class _ReportWriter:
    """Writes the reports of the suite's runs in one background process, at low priority,
    while the next scenarios run: a report is a few seconds of plotting, and a run spends
    most of its time waiting (for the load's duration, for TTLs before its probe).
    Closing waits for every report, and stops the process."""

    def __init__(self) -> None:
        self._pool: ProcessPoolExecutor | None = None
        self._jobs: list[tuple[Path, Future[None]]] = []
        self.errors: dict[Path, str] = {}

    def submit(self, run_dir: Path, verdict: Verdict) -> None:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(
                max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                initializer=_report_worker_init)
        with reaper.sigint_ignored_while_spawning():  # the first submit starts the process
            self._jobs.append((run_dir, self._pool.submit(_write_report, run_dir, verdict)))
        for pid in self._worker_pids():  # started by the first submit
            reaper.watch(pid, group=True)

    def _worker_pids(self) -> list[int]:
        procs = getattr(self._pool, "_processes", None) or {}  # no public accessor
        return [p.pid for p in procs.values() if p.pid is not None]

    def close(self, cancel: bool = False) -> None:
        """Wait for every report (``cancel``: drop those not started, give the one being
        written a few seconds, then stop the process), then stop."""
        if self._pool is None:
            return
        pids = self._worker_pids()
        try:
            if cancel:
                self._cancel()
            for run_dir, job in [] if cancel else self._jobs:
                try:
                    job.result()
                except Exception as exc:  # noqa: BLE001 - a report must not sink the suite
                    self.errors[run_dir] = f"{type(exc).__name__}: {exc}"
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
            for pid in pids:
                reaper.forget(pid)

    def _cancel(self) -> None:
        assert self._pool is not None
        running = [job for _, job in self._jobs if not job.cancel() and not job.done()]
        if running:
            futures_wait(running, timeout=REPORT_GRACE_S)
        for run_dir, job in self._jobs:
            if job.cancelled():
                self.errors[run_dir] = "cancelled: the suite was interrupted"
        procs = list((getattr(self._pool, "_processes", None) or {}).values())
        self._pool.shutdown(wait=False, cancel_futures=True)
        for p in procs:  # a report still being written after the grace: stopped
            if p.is_alive():
                log.info("stopping the report process (pid %s)", p.pid)
                p.terminate()
                p.join(5)
            if p.is_alive():
                p.kill()
                p.join(5)


def _report_worker_init() -> None:
    # Out of the terminal's process group: Ctrl-C is the suite's to handle. When the
    # report process got it too, it died and every later report failed (BrokenProcessPool).
    with contextlib.suppress(OSError):
        os.setsid()
    with contextlib.suppress(OSError):
        os.nice(10)  # the scenario running meanwhile comes first


def _write_report(run_dir: Path, verdict: Verdict) -> None:
    from chaos.report import write_report

    write_report(run_dir, verdict)


def _unknown_because(v: Verdict, status: str) -> list[str]:
    """Why a run came out unknown, in the words the verdict has for it."""
    why = [f"run {status}"] if status != "complete" else []
    why += [f"not exercised: {w}" for w in v.coverage.get("not_exercised") or ()]
    why += [f"{n}: {r.note or 'unknown'}" for n, r in v.results.items()
            if r.valid is None and not (r.note or "").startswith("skipped")]
    return why


HEADER = (f"{'scenario':<22} {'seed':>4} {'verdict':<8} {'first':>6}  "
          f"{'sent/decided/executed faults':<29} violations")


def _row(o: ScenarioOutcome) -> str:
    word = {True: "valid", False: "INVALID", None: "unknown"}[o.valid]
    if o.error:
        word = "ERROR"
    first = f"{o.first_violation_s:.1f}s" if o.first_violation_s is not None else "-"
    viol = ", ".join(f"{k} {v}" for k, v in o.violations.items()) or (o.error or "")
    if o.interrupted:
        viol = "interrupted"
    elif o.valid is None and not o.error and not viol:
        viol = "; ".join(o.unknown_because)
    return f"{o.name:<22} {o.seed:>4} {word:<8} {first:>6}  {o.exercised:<29} {viol}"


def write_summary(out_dir: Path, valid: bool | None, outcomes: list[ScenarioOutcome],
                  governor: str, interrupted: bool = False) -> None:
    data = {"valid": "unknown" if valid is None else valid, "governor": governor,
            "interrupted": interrupted, "scenarios": [o.to_dict() for o in outcomes]}
    _atomic(out_dir / "summary.json", json.dumps(data, indent=2))
    lines = [f"# Chaos suite: {governor}", "",
             f"Verdict: **{ {True: 'valid', False: 'INVALID', None: 'unknown'}[valid] }**", "",
             "| scenario | seed | verdict | time to first violation | plans sent / decided, "
             "permits executed, faults applied | violations by invariant |",
             "|---|---|---|---|---|---|"]
    if interrupted:
        cut = ("the last was cut short" if any(o.interrupted for o in outcomes)
               else "reports still being written were dropped")
        lines[3:3] = [f"**Interrupted** (Ctrl-C or SIGTERM) after {len(outcomes)} scenario "
                      f"run(s): only these ran, and {cut}.", ""]
    for o in outcomes:
        word = "ERROR" if o.error else {True: "valid", False: "INVALID", None: "unknown"}[o.valid]
        if o.interrupted:
            word = "unknown (interrupted)"
        first = f"{o.first_violation_s:.1f} s" if o.first_violation_s is not None else ""
        viol = ", ".join(f"{k}: {v}" for k, v in o.violations.items()) or (o.error or "")
        if o.valid is None and not o.error and not o.interrupted and not viol:
            viol = "; ".join(o.unknown_because)
        c = o.coverage
        cov = (f"{c.get('plans_sent', 0)} / {c.get('plans_decided', 0)}, "
               f"{c.get('permits_executed', 0)}, {c.get('faults_applied', 0)}" if c else "")
        lines.append(f"| {o.name} | {o.seed} | {word} | {first} | {cov} | {viol} |")
    _atomic(out_dir / "summary.md", "\n".join(lines) + "\n")
    write_junit(out_dir / "junit.xml", outcomes)


def write_junit(path: Path, outcomes: list[ScenarioOutcome]) -> None:
    """One test suite per scenario run, one test case per invariant."""
    root = ET.Element("testsuites", name="chaos")
    for o in outcomes:
        unknown = o.valid is None and not o.error
        ts = ET.SubElement(root, "testsuite", name=f"{o.name}[seed={o.seed}]",
                           tests=str(len(INVARIANTS) + unknown), time=f"{o.seconds:.1f}")
        for inv in INVARIANTS:
            tc = ET.SubElement(ts, "testcase", classname=o.name, name=inv)
            if o.error:
                ET.SubElement(tc, "error", message=o.error)
            elif inv in o.violations:
                ET.SubElement(tc, "failure", message=f"{o.violations[inv]} violations of {inv}")
        if unknown:
            # An unknown run is no pass: a CI's JUnit view must not show it green.
            tc = ET.SubElement(ts, "testcase", classname=o.name, name="verdict")
            ET.SubElement(tc, "skipped", message="unknown: " + (
                "interrupted" if o.interrupted else "; ".join(o.unknown_because) or "unknown"))
    ET.ElementTree(root).write(path, encoding="utf-8", xml_declaration=True)


def _atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)

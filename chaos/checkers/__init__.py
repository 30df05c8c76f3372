"""Verdicts over a run directory: one checker per invariant, written to results.json.

Exit codes follow the verdict: 0 valid, 1 invalid, 2 unknown.
"""

from __future__ import annotations

import json
import os
import pickle
import time
from collections.abc import Iterable
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chaos.checkers.coverage import coverage
from chaos.checkers.facts import Facts, Forked, ForkError, _can_fork, gather, gc_paused
from chaos.checkers.invariants import CHECKERS, INVARIANTS, CheckResult, Violation
from chaos.governor_findings import describe as describe_finding
from chaos.governor_findings import governor_findings

__all__ = ["CHECKERS", "INVARIANTS", "CheckResult", "Facts", "Verdict", "Violation",
           "check_run", "combine", "gather", "judge", "run_checkers"]


@dataclass
class Verdict:
    run_dir: Path
    valid: bool | None
    results: dict[str, CheckResult] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)
    # The linearizability check against a sequential model (slots, exit locks): a
    # second opinion; it must agree with the invariant checkers (see ``agreement``).
    models: dict[str, CheckResult] = field(default_factory=dict)
    # The facts the verdict was reached on, for the report (which would otherwise gather
    # them again). Not serialised, not pickled: a verdict sent to another process leaves
    # them behind.
    facts: Facts | None = field(default=None, repr=False, compare=False)
    # What the run exercised (chaos.checkers.coverage): plans, permits, faults, and the
    # reasons a run that passed every checker is still not VALID.
    coverage: dict[str, Any] = field(default_factory=dict)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["facts"] = None
        return state

    @property
    def agreement(self) -> bool | None:
        """Whether the models agree with the slots / single_close invariant checkers."""
        pairs = [("slots_model", "slots"), ("exit_lock_model", "single_close")]
        verdicts = [(self.models[m].valid, self.results[i].valid) for m, i in pairs
                    if m in self.models and i in self.results]
        if not verdicts or any(m is None for m, _ in verdicts):
            return None
        return all(m == i for m, i in verdicts)

    @property
    def exit_code(self) -> int:
        return 0 if self.valid is True else (1 if self.valid is False else 2)

    @property
    def violations(self) -> list[Violation]:
        return sorted((v for r in self.results.values() for v in r.violations),
                      key=lambda v: v.wall_ms)

    def to_dict(self) -> dict[str, Any]:
        first = self.violations[0].wall_ms if self.violations else None
        start = self.stats.get("workload_start_ms") or self.stats.get("first_ms")
        return {
            "valid": "unknown" if self.valid is None else self.valid,
            "invariants": {n: r.to_dict() for n, r in self.results.items()},
            "violations": [v.to_dict() for v in self.violations],
            "time_to_first_violation_s": (first - start) / 1000 if first and start else None,
            "models": {n: r.to_dict() for n, r in self.models.items()},
            "models_agree": self.agreement,
            "coverage": self.coverage,
            "stats": self.stats,
        }

    def summary(self) -> str:
        word = {True: "VALID", False: "INVALID", None: "UNKNOWN"}[self.valid]
        lines = [f"verdict: {word}"]
        for n, r in self.results.items():
            v = {True: "ok", False: "VIOLATED", None: "unknown"}[r.valid]
            extra = f" ({len(r.violations)} violations)" if r.violations else (
                f" ({r.note})" if r.note else "")
            lines.append(f"  {n:<24} {v}{extra}")
        for why in self.coverage.get("not_exercised") or ():
            lines.append(f"  not exercised: {why}")
        for finding in self.stats.get("governor_findings") or ():
            lines.append(f"  governor {describe_finding(finding)}")
        for v in self.violations[:5]:
            lines.append(f"  - [{v.invariant}] {v.message}")
        if len(self.violations) > 5:
            lines.append(f"  ... {len(self.violations) - 5} more in results.json")
        mw = self.stats.get("minimal_witnesses") or {}
        if mw.get("per_invariant"):
            done = sum(s["minimised"] for s in mw["per_invariant"].values())
            sizes = [len(v.minimal_witness.get("ops") or ()) for v in self.violations
                     if v.minimal_witness and v.minimal_witness.get("reproduced")]
            lines.append(f"  minimal witnesses: {done} violations searched"
                         f" ({len(sizes)} found, {min(sizes, default=0)}-"
                         f"{max(sizes, default=0)} operations each; results.json)"
                         + (f"; {mw['stopped']}" if mw.get("stopped") else ""))
        return "\n".join(lines)


# The checkers run in two processes when the history is at least this long: a forked
# child takes these (it shares the facts with this process, copy-on-write) and sends its
# results back; this process runs the others meanwhile.
PARALLEL_OPS = 50_000
FORKED_CHECKERS = ("single_close", "one_decision")


def combine(verdicts: Iterable[bool | None]) -> bool | None:
    """One verdict of several: invalid if any is, else unknown if any is, else valid."""
    values = list(verdicts)
    return False if False in values else (None if None in values else True)


def run_checkers(facts: Facts, parallel: bool | None = None) -> dict[str, CheckResult]:
    """Every checker's result, in ``CHECKERS`` order (``parallel``: default by size)."""
    if parallel is None:
        parallel = facts.ops >= PARALLEL_OPS
    child = None
    if parallel and _can_fork():
        child = Forked(lambda: pickle.dumps({n: CHECKERS[n](facts) for n in FORKED_CHECKERS},
                                            protocol=pickle.HIGHEST_PROTOCOL))
    out: dict[str, CheckResult] = {}
    try:
        for name, fn in CHECKERS.items():
            if child is None or name not in FORKED_CHECKERS:
                out[name] = fn(facts)
        if child is not None:
            with suppress(ForkError):  # the child failed: its checkers run here instead
                out.update(pickle.loads(child.result()))
    finally:
        if child is not None:
            child.stop()
    return {name: out[name] if name in out else CHECKERS[name](facts) for name in CHECKERS}


def check_run(run_dir: str | Path, write: bool = True, models: bool = True,
              model_timeout_s: float = 10.0, minimize: bool | Any = True) -> Verdict:
    """Judge a run directory and write results.json. ``minimize``: search each violation's
    minimal witness (chaos.checkers.minimize; True: the default bounds, or a
    ``MinimizeOptions``; False: none)."""
    run_dir = Path(run_dir)
    t0 = time.perf_counter()
    with gc_paused():
        facts = gather(run_dir)
    verdict = judge(facts, models=models, model_timeout_s=model_timeout_s, started=t0)
    if minimize is not False and verdict.violations:
        from chaos.checkers.minimize import MinimizeOptions, minimize_verdict

        minimize_verdict(verdict, minimize if isinstance(minimize, MinimizeOptions)
                         else MinimizeOptions())
    if write:
        tmp = run_dir / "results.json.tmp"
        tmp.write_text(json.dumps(verdict.to_dict(), indent=2, default=str))
        os.replace(tmp, run_dir / "results.json")
    return verdict


def judge(facts: Facts, models: bool = True, model_timeout_s: float = 10.0,
          started: float | None = None) -> Verdict:
    """The verdict on facts already gathered (``check_run`` without the reading and the
    writing: chaos.analysis judges a run it has read once this way)."""
    t0 = time.perf_counter() if started is None else started
    run_dir = facts.run_dir
    with gc_paused():
        results = run_checkers(facts)
    # Checks the run cannot support (an import has no liveness probe) stay listed, unknown,
    # and out of the verdict.
    skipped = set(facts.meta.get("checks_skipped") or ())
    for name in skipped & results.keys():
        r = results[name]
        results[name] = CheckResult(name, None, [], r.stats, "skipped for this run (run.json "
                                    "checks_skipped)" + (f": {r.note}" if r.note else ""))
    valid = combine(r.valid for name, r in results.items() if name not in skipped)
    status = facts.meta.get("status")
    if status not in (None, "complete") and valid is True:
        valid = None  # an interrupted run cannot be declared valid
    cov = coverage(facts)
    if valid is True and cov["not_exercised"]:
        valid = None  # every checker held, but on too little: not evidence of anything
    verdict = Verdict(run_dir, valid, results, facts=facts, coverage=cov, stats={
        "ops": facts.ops, "orders": len(facts.orders), "first_ms": facts.first_ms,
        "workload_start_ms": facts.phases.get("workload", {}).get("invoke"),
        "last_ms": facts.last_ms, "check_seconds": round(time.perf_counter() - t0, 3),
        "run_status": status, "faults": [
            {"kind": w.kind, "start_ms": w.start_ms, "stop_ms": w.stop_ms, "ok": w.ok,
             "target": w.target} for w in facts.faults],
        # instances that kept dying, with the entry each held pending most often
        "governor_findings": governor_findings(facts.governor_events),
    })
    if models:
        from chaos.checkers.model import check_model

        try:
            verdict.models = check_model(facts, timeout_s=model_timeout_s)
        except Exception as exc:  # noqa: BLE001 - a second opinion must not sink the first
            verdict.models = {"model": CheckResult("model", None, note=f"model check failed: "
                                                   f"{type(exc).__name__}: {exc}")}
    return verdict

"""How much of the governor a run exercised, and whether that is enough for a verdict.

The invariant checkers judge what happened; a run in which little happened passes them
vacuously: a governor that permits nothing breaks no capital rule, an apply layer that
executed nothing opens no double position. VALID must mean "this governor was exercised
and held", so :func:`coverage` counts what the run did against what its scenario asked
(``run.json`` ``scenario_spec``), and :func:`not_exercised` gives the reasons a run that
passed every checker must still be UNKNOWN.

The rule applies to ``chaos run`` directories (those with a ``scenario_spec``); a load
test (``kind: "loadtest"``) has its own, smaller one (:func:`loadtest_not_exercised`). An
import (``kind: "import"``) has no scenario, and a hand-written history says nothing of
what was asked: their coverage is recorded, and not judged.

Thresholds (see docs/harness.md, "Coverage"):

* a producer that sent fewer than :data:`MIN_SENT_FRACTION` of the plans its workload
  asks for (rate x duration; ``duplicate_close`` one plan per period at least) is
  stuck. Each producer runs ``duration_s`` from its own start, so start-up time does not
  count against it; but a producer that falls behind gets no catch-up burst, a loaded
  host slows it (open-storm's 4 x 250 plans/s came out at about half on a busy 2-core
  machine) and a Redis fault stalls it (redis-pause stops Redis for 6 of 14 s): hence a
  low bar, which a stuck producer (near 0) still fails. A rate of 0 ("as fast as
  possible") has no expected count: such a producer only has to send something;
* a producer that wrote no summary (``workloads/*.json``, written at its exit) did not
  finish: stuck, or killed at teardown;
* no plan a correct governor would permit was permitted (when the scenario sends any:
  a workload of only stale or only malformed plans does not);
* none of the permits reached the exchange, or the apply layer left more than
  :data:`MAX_UNHANDLED_FRACTION` of them without any outcome (an order, a missing
  permit, a result);
* faults were scheduled within the duration and none was applied.
"""

from __future__ import annotations

import json
import math
from itertools import chain, takewhile
from operator import attrgetter
from pathlib import Path
from typing import Any

from chaos.checkers.facts import Facts

MIN_SENT_FRACTION = 0.10
MAX_UNHANDLED_FRACTION = 0.5

# Workload kinds that send plans at ``rate`` per process (0: as fast as possible).
_RATE_KINDS = frozenset(("open_storm", "same_symbol", "rotation_pressure", "stale", "drift",
                         "malformed"))
_NOT_PRODUCERS = frozenset(("regime_flip",))  # an operator: flips the regime, sends no plan
_STATUS = attrgetter("status")


def _IS_INITIAL(o: Any) -> bool:  # noqa: N802 - a predicate constant, like _STATUS
    return str(o.plan_id).startswith("initial-")


def _per_process(w: dict[str, Any], duration_s: float) -> float | None:
    """Plans one process of workload ``w`` is asked to send (a lower bound), None when the
    scenario sets no pace (rate 0)."""
    kind = w.get("kind")
    params = w.get("params") or {}
    if kind in _NOT_PRODUCERS:
        return 0.0
    if kind == "replay":  # exactly its recorded plans
        ops = params.get("ops")
        return float(sum(1 for op in ops if isinstance(op, dict) and "plan" in op)) \
            if isinstance(ops, list) else None
    if kind == "duplicate_close":  # one burst per period: 1 OPEN or 3 CLOSEs
        return duration_s * 1000.0 / float(params.get("period_ms", 100.0))
    rate = float(w.get("rate") or 0.0)
    return rate * duration_s if rate > 0 else None


def _may_permit(workloads: list[dict[str, Any]]) -> bool:
    """Whether the scenario sends plans that a correct governor may permit: not when every
    producer sends only stale or only malformed plans."""
    for w in workloads:
        kind, params = w.get("kind"), w.get("params") or {}
        if kind in _NOT_PRODUCERS:
            continue
        if kind == "stale" and float(params.get("stale_fraction", 0.5)) >= 1.0:
            continue
        if kind == "malformed" and float(params.get("bad_fraction", 0.3)) >= 1.0:
            continue
        return True
    return False


def _faults_scheduled(faults: list[dict[str, Any]], duration_s: float) -> int:
    """Fault starts the schedule has within the workload's duration."""
    n = 0
    for f in faults:
        at, every = float(f.get("at") or 0.0), float(f.get("every") or 0.0)
        if at >= duration_s:
            continue
        n += 1 + (math.floor((duration_s - at) / every - 1e-9) if every > 0 else 0)
    return n


def _describe(after: Any) -> str:
    """An anchor as the history records it, as the scenario file writes it."""
    if not isinstance(after, dict):
        return str(after)
    return "{ " + ", ".join(f"{k} = {v!r}" for k, v in after.items()) + " }"


def _summaries(run_dir: Path) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for p in sorted((run_dir / "workloads").glob("*.json")):
        try:
            out[p.stem] = json.loads(p.read_text())
        except (OSError, ValueError):
            continue  # a torn summary is a missing one
    return out


def coverage(facts: Facts) -> dict[str, Any]:
    """The run's figures: plans asked, sent, decided; permits, executed, left without an
    outcome; faults scheduled and applied; per producer, plans sent against asked.
    ``exercised`` is None when the run is not judged on them (no scenario)."""
    # Counted without a lookup per plan (a million-operation history has 10^5 plans and
    # each lookup is a cache miss): from sizes, and from the few failed takes, aborted
    # results, harness-placed positions and probe plans. Every order on the exchange comes
    # from a permit the apply layer took, except the harness's initial positions (placed
    # first, plan ids ``initial-N``).
    submits, decisions = facts.submits, facts.decisions
    probes = facts.probes
    permits = facts.permits()
    reached = facts.first_order()
    statuses = list(map(_STATUS, submits.values()))
    initial = sum(1 for _ in takewhile(_IS_INITIAL, facts.orders))
    probe_permits = [p for p in probes if p in permits]
    probe_reached = sum(map(reached.__contains__, probe_permits))
    executed = min(len(permits), len(reached) - initial)
    outcome_only = {p for p in chain(facts.take_fails, facts.aborts)
                    if p in permits and p not in reached}
    cov: dict[str, Any] = {
        "plans_expected": None,
        "plans_sent": len(submits),
        "plans_added": statuses.count("ok"),
        # plan ids with a decision: the producers' and the governor's (rotation); not probes
        "plans_decided": len(decisions) - sum(map(decisions.__contains__, probes)),
        "permits": len(permits) - len(probe_permits),
        "permits_executed": executed - probe_reached,
        "permits_unhandled": max(0, len(permits) - executed - len(outcome_only)),
        "probe_permits_executed": probe_reached,
        "faults_scheduled": None,
        "faults_applied": sum(1 for w in facts.faults if w.ok),
        "faults_failed": sum(1 for w in facts.faults if not w.ok),
        "faults_not_fired": len(facts.faults_not_fired),
        "producers": {},
        "exercised": None,
        "not_exercised": [],
    }
    spec = facts.meta.get("scenario_spec")
    if facts.meta.get("kind") == "loadtest":
        cov["not_exercised"] = loadtest_not_exercised(
            cov, own_executor=bool(facts.meta.get("own_executor")),
            skipped=list(facts.meta.get("checks_skipped") or ()))
        cov["exercised"] = not cov["not_exercised"]
        return cov
    if facts.meta.get("kind") == "import" or not isinstance(spec, dict):
        return cov
    duration = float(spec.get("duration_s") or 0.0)
    workloads = [w for w in spec.get("workloads") or [] if isinstance(w, dict)]
    per_kind: dict[str, float | None] = {}
    expected = 0.0
    processes = 0
    for w in workloads:
        n = _per_process(w, duration)
        procs = int(w.get("processes") or 1)
        processes += procs
        kind = str(w.get("kind"))
        # Two workloads of one kind: each producer is held to the smaller pace.
        seen = per_kind.get(kind, n)
        per_kind[kind] = None if n is None or seen is None else min(n, seen)
        expected += (n or 0.0) * procs
    cov["plans_expected"] = round(expected)
    cov["faults_scheduled"] = _faults_scheduled(
        [f for f in spec.get("faults") or [] if isinstance(f, dict)], duration)
    summaries = _summaries(facts.run_dir)
    cov["producers"] = {name: {"kind": s.get("kind"), "plans": s.get("plans"),
                               "asked": (None if per_kind.get(str(s.get("kind"))) is None
                                         else round(per_kind[str(s.get("kind"))] or 0)),
                               "stopped_by": s.get("stopped_by")}
                        for name, s in summaries.items()}
    cov["not_exercised"] = not_exercised(cov, processes, _may_permit(workloads))
    # An anchored fault that never fired: the run did not do what the scenario asked.
    cov["not_exercised"] += [
        f"fault[{v.get('slot', '?')}] {v.get('kind', '?')} never fired: {v.get('why', '')} "
        f"(after {_describe(v.get('after'))})" for v in facts.faults_not_fired]
    cov["exercised"] = not cov["not_exercised"]
    return cov


def loadtest_not_exercised(cov: dict[str, Any], own_executor: bool = False,
                           skipped: list[str] | None = None) -> list[str]:
    """A load test (``kind: "loadtest"``) has no scenario to hold it to: its rate is the
    operator's. It must still have sent plans, had them decided, and executed permits,
    or a VALID verdict would be vacuous.

    ``own_executor``: the system under test executed its permits itself (run.json
    ``own_executor``), so the harness has no ledger and the checks that need one were
    skipped: such a run is at best UNKNOWN (nothing found among the checks that ran),
    never VALID; a violation of those checks still makes it INVALID."""
    why: list[str] = []
    if not cov["plans_sent"]:
        why.append("the load test sent no plan")
    elif cov["plans_added"] and not cov["plans_decided"]:
        why.append("no plan was decided")
    elif not cov["permits"]:
        why.append(f"no plan was permitted ({cov['plans_decided']} decided)")
    elif own_executor:
        ledger = [c for c in skipped or () if c != "liveness"]
        why.append(f"the system's own executor ran the {cov['permits']} permits: no ledger "
                   f"here, so {', '.join(ledger) or 'the ledger checks'} were not judged")
    elif not cov["permits_executed"]:
        why.append(f"none of the {cov['permits']} permits reached the exchange")
    return why


def not_exercised(cov: dict[str, Any], processes: int, may_permit: bool) -> list[str]:
    """Why the run did not exercise the governor enough for a VALID verdict (empty: it
    did); ``processes``: producer and operator processes the scenario asks for."""
    why: list[str] = []
    for name, p in sorted(cov["producers"].items()):
        asked, sent = p.get("asked"), int(p.get("plans") or 0)
        if p.get("kind") in _NOT_PRODUCERS:
            continue
        if asked is None and sent == 0:
            why.append(f"producer {name} sent no plan")
        elif asked and sent < MIN_SENT_FRACTION * asked:
            why.append(f"producer {name} sent {sent} plans of the ~{asked} its workload asks "
                       f"(less than {MIN_SENT_FRACTION:.0%}): stuck or starved")
    if len(cov["producers"]) < processes:
        why.append(f"{processes - len(cov['producers'])} of {processes} workload processes "
                   f"wrote no summary (workloads/*.json): they did not finish (stuck or "
                   f"killed)")
    expected, sent = cov["plans_expected"], cov["plans_sent"]
    if expected and sent < MIN_SENT_FRACTION * expected:
        why.append(f"{sent} plans sent of the ~{expected} the scenario asks (less than "
                   f"{MIN_SENT_FRACTION:.0%})")
    if cov["plans_added"] and not cov["plans_decided"]:
        why.append("no plan was decided")
    if may_permit and cov["plans_decided"] and not cov["permits"]:
        why.append(f"no plan was permitted ({cov['plans_decided']} decided): the permit "
                   f"paths (slots, capital, closes) were not exercised")
    permits = cov["permits"]
    if permits and not cov["permits_executed"]:
        why.append(f"none of the {permits} permits reached the exchange: nothing was "
                   f"executed (apply layer stuck?)")
    elif permits and cov["permits_unhandled"] > MAX_UNHANDLED_FRACTION * permits:
        why.append(f"{cov['permits_unhandled']} of {permits} permits got no outcome from the "
                   f"apply layer (no order, no missing permit, no result)")
    if cov["faults_scheduled"] and not cov["faults_applied"]:
        why.append(f"{cov['faults_scheduled']} faults scheduled, none applied")
    return why

"""``chaos shrink RUN_DIR``: from an invalid run, a smaller scenario that still fails.

A *try* is a full chaos run of a candidate scenario (the runner, the governor under test,
the checkers); a candidate *still fails* when the invariant the original run violated is
violated again. Whether a candidate fails is a rate, never one run: the search asks for
``search_k`` failures in ``search_n`` tries and stops each candidate's tries as soon as
the answer is known (the k-th failure, or too many passes for k to be reachable), and the
result is verified with a full ``tries``-run measurement whose rate is reported as
measured. Where the targets (<= 1 fault, <= 3 producers, <= 50 plans, >= k/N) are not
reached, the output says which, and why the search stopped.

The candidates start from the run's own replay (``chaos.replay.scenario_from_run``: the
same plans, ids, symbols and offsets per producer, the same faults), and shrink in the
order that pays most per try:

1. **seed** from the witness: the plans the violation names and the plans on its symbols
   up to it, in their producers; else those producers up to the violation; else every
   producer up to it; else the whole replay;
2. **faults**: none; else one firing of one fault (the one active at the violation first),
   the target it actually hit;
3. **anchor**: that fault started on the event just before it in the original history
   (the last submit of a kept plan), not on the wall clock;
4. **producers**: delta debugging over the producers, then merged into one (or three);
5. **plans**: delta debugging (ddmin) over each producer's plans;
6. **symbols**: the market cut to the symbols the plans still use;
7. **duration**: cut to the last operation plus a settle time.

Outputs in ``--out``: ``repro.toml`` (runnable with ``chaos run --scenario``),
``shrink.json`` (rewritten after every step: a Ctrl-C keeps what was found) and
``shrink.md``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from chaos import scenario as scn
from chaos.history import iter_history
from chaos.runner import _terminal_handlers

SETTLE_S = 1.0  # a candidate's duration after its last operation: decisions and orders land
MIN_DURATION_S = 0.5
SHIFT_TO_S = 0.2  # where the time step moves the first operation to
SEARCH_TRIES = 4  # tries per candidate during the search (at most --tries)
TARGETS = {"faults": 1, "producers": 3, "plans": 50}
MAX_STEP_BACK = 2  # accepted candidates re-verified when the final one misses the rate


class ShrinkError(ValueError):
    """Bad input (exit 254): the message is one line naming what is wrong."""


class _OutOfBudget(Exception):
    """The time budget left is what the final verification needs: the search stops."""


# -- candidates ---------------------------------------------------------------------------
def _ops(w: scn.WorkloadSpec) -> list[dict[str, Any]]:
    return list(w.params.get("ops") or ())


def _with_ops(w: scn.WorkloadSpec, ops: Sequence[dict[str, Any]]) -> scn.WorkloadSpec:
    return replace(w, params={**w.params, "ops": list(ops)})


def _is_plan(op: dict[str, Any]) -> bool:
    return isinstance(op.get("plan"), dict)


def _plan_id(op: dict[str, Any]) -> str | None:
    return op["plan"].get("plan_id") if _is_plan(op) else None


def _producers(sc: scn.Scenario) -> list[scn.WorkloadSpec]:
    return [w for w in sc.workloads if w.kind == "replay"]


def _plans(sc: scn.Scenario) -> list[dict[str, Any]]:
    return [op for w in _producers(sc) for op in _ops(w) if _is_plan(op)]


@dataclass(frozen=True)
class Size:
    faults: int
    producers: int
    plans: int
    symbols: int
    duration_s: float

    @classmethod
    def of(cls, sc: scn.Scenario) -> Size:
        plans = _plans(sc)
        return cls(len(sc.faults), len([w for w in sc.workloads if _ops(w)]), len(plans),
                   len({str(op["plan"].get("symbol")) for op in plans}), round(sc.duration_s, 2))

    def line(self) -> str:
        return (f"faults {self.faults} producers {self.producers} plans {self.plans:4d} "
                f"symbols {self.symbols:3d} {self.duration_s:5.1f}s")


def _last_t(sc: scn.Scenario) -> float:
    ts = [float(op.get("t", 0)) for w in sc.workloads for op in _ops(w)]
    return max(ts, default=0.0)


def _fit_duration(sc: scn.Scenario, duration: float | None = None) -> scn.Scenario:
    """``duration`` (default: the last operation plus :data:`SETTLE_S`), never before a
    time-anchored fault has started and stopped."""
    d = _last_t(sc) + SETTLE_S if duration is None else duration
    sent = {_plan_id(op): float(op.get("t", 0)) for op in _plans(sc)}
    for f in sc.faults:
        if f.after is None:
            d = max(d, f.at + f.duration + 0.2)
        elif f.after.plan_id in sent:  # fires after that plan's decision, + the delay
            d = max(d, sent[f.after.plan_id] + f.after.delay + f.duration + 0.2)
    return replace(sc, duration_s=round(max(MIN_DURATION_S, d), 3))


def _whole(replay: scn.Scenario) -> scn.Scenario:
    """The whole replay as a candidate: long enough for its last operation to settle."""
    return _fit_duration(replay, max(replay.duration_s, _last_t(replay) + SETTLE_S))


def _anchor_plans(sc: scn.Scenario) -> set[str]:
    """The plans ``sc``'s event-anchored faults wait for."""
    return {f.after.plan_id for f in sc.faults if f.after is not None and f.after.plan_id}


def _keep(sc: scn.Scenario, keep: Callable[[str, dict[str, Any]], bool],
          until: float | None = None, producers: set[str] | None = None) -> scn.Scenario:
    """The scenario with only the plan ops ``keep(producer, op)`` accepts and only the
    ``producers`` named (default all); other ops stay (up to ``until``); a producer whose
    plans are all gone is dropped (one that never had any, an operator, stays); the
    duration is refitted."""
    # A plan a fault is anchored on is part of that fault: without it the fault never
    # fires, and the candidate would be judged on a scenario it does not describe.
    anchors = _anchor_plans(sc)
    if anchors:
        inner = keep

        def keep(p: str, op: dict[str, Any]) -> bool:
            return inner(p, op) or _plan_id(op) in anchors

    out = []
    for w in sc.workloads:
        name = str(w.params.get("producer", ""))
        if w.kind != "replay":
            out.append(w)
            continue
        if producers is not None and name not in producers:
            kept = [op for op in _ops(w) if _is_plan(op) and _plan_id(op) in anchors]
            if kept:  # a dropped producer still sends the plans faults are anchored on
                out.append(_with_ops(w, kept))
            continue
        ops = [op for op in _ops(w) if (keep(name, op) if _is_plan(op) else
                                        until is None or float(op.get("t", 0)) <= until)]
        had_plans = any(_is_plan(op) for op in _ops(w))
        if ops and (any(_is_plan(op) for op in ops) or not had_plans):
            out.append(_with_ops(w, ops))
    return _fit_duration(replace(sc, workloads=tuple(out)))


def _renamed(op: dict[str, Any], mapping: dict[str, str]) -> dict[str, Any]:
    """A replay op with its symbols renamed (the plan's, and the op's own when given)."""
    out = dict(op)
    if _is_plan(op) and isinstance(op["plan"].get("symbol"), str):
        out["plan"] = {**op["plan"], "symbol": mapping.get(op["plan"]["symbol"],
                                                           op["plan"]["symbol"])}
    if isinstance(op.get("symbol"), str):
        out["symbol"] = mapping.get(op["symbol"], op["symbol"])
    return out


def _merge(ws: Sequence[scn.WorkloadSpec], name: str) -> scn.WorkloadSpec:
    ops = sorted((op for w in ws for op in _ops(w)), key=lambda op: float(op.get("t", 0)))
    return replace(_with_ops(ws[0], ops), params={**ws[0].params, "producer": name,
                                                  "ops": ops})


def ddmin(items: list[str], fails: Callable[[list[str]], bool]) -> list[str]:
    """Zeller's delta debugging: a subset of ``items`` for which ``fails`` holds and from
    which no single chunk at the finest split can be removed (1-minimal when the split
    reaches single items). ``fails(items)`` is taken as true."""
    n = 2
    while len(items) >= 2:
        size = math.ceil(len(items) / n)
        chunks = [items[i:i + size] for i in range(0, len(items), size)]
        found = next((c for c in chunks if fails(c)), None)
        if found is not None:
            items, n = found, 2
            continue
        if len(chunks) > 2:
            comps = ([x for j, ch in enumerate(chunks) if j != i for x in ch]
                     for i in range(len(chunks)))
            found = next((c for c in comps if fails(c)), None)
            if found is not None:
                items, n = found, max(n - 1, 2)
                continue
        if n >= len(items):
            break
        n = min(len(items), 2 * n)
    return items


# -- the original run ---------------------------------------------------------------------
@dataclass
class Original:
    """What shrinking needs of the invalid run: its verdict, witness and history times."""

    run_dir: Path
    invariant: str
    violation: dict[str, Any]
    violations: int
    workload_ms: int
    governor: str
    faults: list[dict[str, Any]] = field(default_factory=list)  # windows: kind, start, target
    submits: list[tuple[int, str]] = field(default_factory=list)  # (wall_ms, plan_id)
    violated: tuple[str, ...] = ()  # every invariant the run violated, most violated first

    @property
    def at_s(self) -> float:
        """The violation's time from the workload start."""
        return (int(self.violation["wall_ms"]) - self.workload_ms) / 1000

    def witness_plans(self) -> set[str]:
        ids = set(self.violation.get("plan_ids") or ())
        ids |= {str(e["plan_id"]) for e in self.violation.get("events") or ()
                if isinstance(e, dict) and e.get("plan_id")}
        return ids

    def witness_symbols(self) -> set[str]:
        syms = {self.violation.get("symbol")}
        syms |= {e.get("symbol") for e in self.violation.get("events") or ()
                 if isinstance(e, dict)}
        return {str(s) for s in syms if s}


def load_original(run_dir: Path, invariant: str | None) -> Original:
    """The run's verdict and witness; ShrinkError when there is nothing to shrink."""
    from chaos.checkers import INVARIANTS
    from chaos.rundir import validate

    validate(run_dir)  # NotARun / RunDirError: the caller names the exit code
    if invariant is not None and invariant not in INVARIANTS:
        raise ShrinkError(f"--invariant: unknown invariant {invariant!r}; known: "
                          f"{', '.join(INVARIANTS)}")
    res_path = run_dir / "results.json"
    try:
        results = json.loads(res_path.read_text())
    except (OSError, ValueError):
        from chaos.checkers import check_run

        results = check_run(run_dir).to_dict()
    meta = json.loads((run_dir / "run.json").read_text())
    violations = [v for v in results.get("violations") or () if isinstance(v, dict)]
    if not violations:
        word = {True: "VALID", False: "INVALID", "unknown": "UNKNOWN"}.get(
            results.get("valid"), str(results.get("valid")))
        raise ShrinkError(f"{run_dir}: nothing to shrink: the run is {word} with no "
                          f"violation")
    # Per invariant: how often it was violated (the per-invariant totals: the list may be
    # capped) and its first violation. By default the one violated most often (ties: the
    # one violated first) is shrunk: a design's systematic failure comes back in a replay
    # far more often than a single violation of a rare race does.
    totals: dict[str, int] = {}
    first: dict[str, dict[str, Any]] = {}
    for x in sorted(violations, key=lambda x: int(x.get("wall_ms") or 0)):
        name = str(x.get("invariant"))
        totals[name] = totals.get(name, 0) + 1
        first.setdefault(name, x)
    for name, r in (results.get("invariants") or {}).items():
        if name in totals and isinstance(r, dict) and isinstance(r.get("violations"), int):
            totals[name] = max(totals[name], r["violations"])
    if invariant is not None and invariant not in first:
        raise ShrinkError(f"{run_dir}: {invariant} is not violated in this run (violated: "
                          f"{', '.join(sorted(first))})")
    violated = tuple(sorted(first, key=lambda n: (-totals[n],
                                                  int(first[n].get("wall_ms") or 0))))
    v = first[invariant if invariant is not None else violated[0]]
    stats = results.get("stats") or {}
    o = Original(run_dir, str(v["invariant"]), v,
                 sum(x.get("invariant") == v["invariant"] for x in violations),
                 int(stats.get("workload_start_ms") or stats.get("first_ms") or 0),
                 str(meta.get("governor") or "reference"), violated=violated)
    targets: dict[str, str] = {}
    for op in iter_history(run_dir):
        val = op.value if isinstance(op.value, dict) else {}
        if op.f == "phase" and op.key == "workload" and op.type == "invoke":
            o.workload_ms = op.wall_ms
        elif op.f == "fault" and val.get("phase") == "start":
            if op.type == "invoke":
                o.faults.append({"key": op.key, "kind": val.get("kind"), "start_ms": op.wall_ms,
                                 "stop_ms": None, "target": val.get("target")})
            elif op.type == "ok" and len(val.get("targets") or ()) == 1:
                targets[str(op.key)] = str(val["targets"][0])
        elif op.f == "fault" and val.get("phase") == "stop" and op.type == "invoke":
            for w in o.faults:
                if w["key"] == op.key and w["stop_ms"] is None:
                    w["stop_ms"] = op.wall_ms
        elif op.f == "submit" and op.type == "invoke" and isinstance(val.get("plan"), dict):
            o.submits.append((op.wall_ms, str(val["plan"].get("plan_id"))))
    for w in o.faults:
        w["resolved_target"] = targets.get(str(w["key"]))
    return o


# -- tries --------------------------------------------------------------------------------
class _HoldBack(logging.Filter):
    """Keeps a try's "fault never fired" warnings off the terminal (they stay in the
    try's logs/harness.log) and counts them: the progress line says it instead, once per
    candidate, rather than a log line per try between the progress lines."""

    def __init__(self) -> None:
        super().__init__()
        # One record passes every terminal handler; kept alive so that its id stays its own.
        self._seen: dict[int, logging.LogRecord] = {}

    @property
    def unfired(self) -> int:
        return len(self._seen)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "chaos.nemesis" and "never fired" in record.getMessage():
            self._seen[id(record)] = record
            return False
        return True


@dataclass
class Try:
    run_dir: str
    verdict: str  # valid | INVALID | unknown | error
    failed: bool  # the invariant was violated
    seconds: float
    error: str | None = None
    unfired: int = 0  # event-anchored faults whose event never came (the try's harness.log)
    violated: tuple[str, ...] = ()  # every invariant the try violated


@dataclass
class Step:
    name: str
    size: Size
    tries: list[Try] = field(default_factory=list)
    accepted: bool = False
    elapsed_s: float = 0.0
    note: str = ""

    @property
    def failures(self) -> int:
        return sum(t.failed for t in self.tries)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["failures"] = self.failures
        return d


@dataclass
class ShrinkOptions:
    run_dir: Path
    out: Path | None = None
    tries: int = 10
    k: int = 8
    budget_s: float = 600.0
    invariant: str | None = None
    governor: str | None = None  # default: the run's own (run.json ``governor``)
    governor_cmd: str | None = None
    search_tries: int = SEARCH_TRIES
    progress: Callable[[str], None] | None = None

    @property
    def search_n(self) -> int:
        return max(1, min(self.tries, self.search_tries))

    @property
    def search_k(self) -> int:
        """The search's bar: the final rate k/N scaled to its tries, rounded up."""
        return max(1, math.ceil(self.k * self.search_n / self.tries - 1e-9))


@dataclass
class ShrinkResult:
    status: str  # reproduced | not_reproduced | interrupted
    out: Path
    exit_code: int
    message: str


class Shrinker:
    def __init__(self, opts: ShrinkOptions, orig: Original) -> None:
        self.opts, self.orig = opts, orig
        self.out = (opts.out or opts.run_dir / "shrink").resolve()
        self.t0 = time.monotonic()
        self.steps: list[Step] = []
        self.n_runs = 0
        self.try_seconds: list[float] = []
        self.before: Size | None = None
        self.current: scn.Scenario | None = None
        self.accepted: list[scn.Scenario] = []
        self.verification: Step | None = None
        self.stopped_because = ""
        self.shifted_s = 0.0  # how much earlier the operations run than in the original
        self.governor, self.governor_cmd = opts.governor, opts.governor_cmd
        if self.governor is None and self.governor_cmd is None:
            label = orig.governor
            if label.startswith("cmd:"):
                self.governor_cmd = label[4:]
            else:
                self.governor = label
        self.governor = self.governor or "reference"

    # -- bookkeeping ----------------------------------------------------------------------
    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def say(self, text: str) -> None:
        if self.opts.progress is not None:
            self.opts.progress(text)

    def _est_try_s(self) -> float:
        recent = self.try_seconds[-3:]
        return sum(recent) / len(recent) if recent else 10.0

    def _cur(self) -> scn.Scenario:
        """The current candidate (the steps after the seed always have one)."""
        assert self.current is not None
        return self.current

    def _left(self) -> float:
        return self.opts.budget_s - self.elapsed()

    # -- tries ------------------------------------------------------------------------------
    def run_try(self, sc: scn.Scenario) -> Try:
        from chaos.checkers import check_run
        from chaos.runner import HarnessError, RunOptions, run

        self.n_runs += 1
        run_dir = self.out / "tries" / f"{self.n_runs:04d}"
        t0 = time.monotonic()
        liveness = self.orig.invariant == "liveness"
        held = _HoldBack()
        terminals = _terminal_handlers()
        for h in terminals:
            h.addFilter(held)
        try:
            res = run(RunOptions(scenario=sc, governor=self.governor,
                                 governor_cmd=self.governor_cmd, out=run_dir, progress=False,
                                 probe=liveness, probe_max_wait_s=30.0))
        except (HarnessError, scn.ScenarioError) as exc:
            if self.n_runs == 1 and isinstance(exc, HarnessError):
                raise  # the governor does not start at all: exit 255, not "no repro"
            t = Try(str(run_dir), "error", False, time.monotonic() - t0, str(exc))
        else:
            if res.status == "interrupted":
                raise KeyboardInterrupt("interrupted during a try")
            v = check_run(run_dir, models=False)
            r = v.results.get(self.orig.invariant)
            word = {True: "valid", False: "INVALID", None: "unknown"}[v.valid]
            t = Try(str(run_dir), word, bool(r is not None and r.valid is False),
                    time.monotonic() - t0,
                    violated=tuple(n for n, x in v.results.items() if x.valid is False))
        finally:
            for h in terminals:
                h.removeFilter(held)
        t.unfired = held.unfired
        self.try_seconds.append(t.seconds)
        return t

    def judge(self, name: str, sc: scn.Scenario) -> bool:
        """Whether ``sc`` still fails: ``search_k`` of ``search_n`` tries, stopped as soon
        as that is reached or out of reach. Raises _OutOfBudget when the tries would eat
        the final verification's share of the budget."""
        n, k = self.opts.search_n, self.opts.search_k
        step = Step(name, Size.of(sc))
        try:  # what the runner would refuse, refused here: no try, no verdict
            scn.parse(scn.dump(sc))
        except scn.ScenarioError as exc:
            step.note = f"not a valid scenario: {exc}"
            self.steps.append(step)
            self.say(f"[{self.elapsed():5.0f}s] {name:<28} skipped: {step.note}")
            return False
        for i in range(n):
            reserve = self._est_try_s() * (self.opts.tries + 1)
            if self._left() < reserve + self._est_try_s():
                self.stopped_because = (f"time budget: {self._left():.0f} s left, the "
                                        f"verification needs about {reserve:.0f} s")
                raise _OutOfBudget
            step.tries.append(self.run_try(sc))
            fails = step.failures
            if fails >= k or fails + (n - i - 1) < k:
                break
        step.accepted = step.failures >= k
        step.elapsed_s = round(self.elapsed(), 1)
        self.steps.append(step)
        unfired = sum(t.unfired > 0 for t in step.tries)
        self.say(f"[{self.elapsed():5.0f}s] {name:<28} {step.size.line()}  tries "
                 f"{step.failures}/{len(step.tries)} failed  "
                 f"{'kept' if step.accepted else 'rejected'}"
                 + (f"  (its fault never fired in {unfired} of {len(step.tries)})"
                    if unfired else ""))
        if step.accepted:
            self.current = sc
            self.accepted.append(sc)
        self.write()
        return step.accepted

    def first(self, candidates: Sequence[tuple[str, scn.Scenario]]) -> bool:
        """The first candidate that still fails becomes the current one."""
        seen: list[scn.Scenario] = []
        for name, sc in candidates:
            if sc in seen or sc == self.current:
                continue
            seen.append(sc)
            if self.judge(name, sc):
                return True
        return False

    # -- the search -------------------------------------------------------------------------
    def shrink(self, replay: scn.Scenario) -> None:
        self.before = Size.of(replay)
        self.say(f"shrinking {self.orig.run_dir} ({self.orig.invariant}: "
                 f"{self.orig.violations} violation(s), the first at {self.orig.at_s:.2f} s); "
                 f"governor {self.governor_cmd or self.governor}; search {self.opts.search_k}"
                 f"/{self.opts.search_n} tries, verify {self.opts.k}/{self.opts.tries}, "
                 f"budget {self.opts.budget_s:.0f} s")
        self.say(f"[{self.elapsed():5.0f}s] {'original':<28} {self.before.line()}")
        self.write()
        try:
            if not self.seed(replay) and not self.pick_invariant(replay):
                if not self.stopped_because:
                    self.stopped_because = ("no candidate, not even the whole replay, failed "
                                            "in enough tries")
                return
            self.shift_start()
            self.shrink_faults()
            self.anchor_fault()
            self.shrink_producers()
            self.rewitness()
            self.shrink_plans()
            self.shrink_symbols()
            self.shrink_duration()
            self.stopped_because = "every step done"
        except _OutOfBudget:
            pass

    def _witness_candidates(self, sc: scn.Scenario, o: Original,
                            label: str) -> list[tuple[str, scn.Scenario]]:
        """Candidates cut from ``sc`` around the witness of violation ``o`` (of the
        original run, or of a try of a replay: the same plan ids and time frame): its
        plans and the plans on its symbols up to it; its producers up to it; every
        producer up to it."""
        until = o.at_s + 0.05
        wp, ws = o.witness_plans(), o.witness_symbols()
        with_witness = {str(w.params.get("producer", "")) for w in _producers(sc)
                        if any(_plan_id(op) in wp for op in _ops(w))}

        def up_to(op: dict[str, Any]) -> bool:
            return float(op.get("t", 0)) <= until or _plan_id(op) in wp

        cands = []
        if wp or ws:
            cands.append((f"{label}: witness plans", _keep(sc, lambda p, op: _plan_id(op) in wp
                          or (str(op["plan"].get("symbol")) in ws and up_to(op)), until)))
        if with_witness:
            cands.append((f"{label}: witness producers", _keep(
                sc, lambda p, op: p in with_witness and up_to(op), until)))
        cands.append((f"{label}: up to the violation", _keep(sc, lambda p, op: up_to(op),
                                                            until)))
        return [(n, c) for n, c in cands if _plans(c)]

    def seed(self, replay: scn.Scenario) -> bool:
        o = self.orig
        until = o.at_s + 0.05
        late = [f for f in replay.faults if f.after is None and f.at > until and not f.every]
        base = replace(replay, faults=tuple(f for f in replay.faults if f not in late))
        cands = self._witness_candidates(base, o, "seed")
        upto = cands[-1][1] if cands else base
        firings = [f for w in self._windows(limit=None) if (f := self._firing(w, upto, True))]
        if firings:
            cands.append(("seed: up to it, faults on events",
                          _fit_duration(replace(upto, faults=tuple(firings)))))
        whole = _whole(replay)
        cands.append(("seed: the whole replay", whole))
        if not self.first(cands):
            return False
        if self.current is whole or self.current == whole:
            self.reseed()
        return True

    def pick_invariant(self, replay: scn.Scenario) -> bool:
        """When the default invariant does not come back (no ``--invariant`` given): the
        whole replay measured with the verification's bar (k of N, stopped as soon as that
        is reached or out of reach) for every invariant the original run violated; the
        first to reach k becomes the one shrunk, from its own witness. A design's races
        replay at different rates: on the seed design a run's most violated invariant
        came back in 0 to 2 of 5 replays where another came back in 5 of 5."""
        # liveness needs the probe, which a try runs only when liveness is the one shrunk
        names = [x for x in self.orig.violated if x != "liveness"]
        if self.opts.invariant is not None or not names:
            return False
        from chaos.rundir import RunDirError

        whole = _whole(replay)
        n, k = self.opts.tries, self.opts.k
        step = Step(f"seed: the whole replay, any of {len(names)} invariants", Size.of(whole))
        counts = dict.fromkeys(names, 0)
        best: str | None = None
        self.steps.append(step)  # in shrink.json from its first try: a Ctrl-C keeps them
        for i in range(n):
            reserve = self._est_try_s() * (n + 1)
            if self._left() < reserve + self._est_try_s():
                self.stopped_because = (f"time budget: {self._left():.0f} s left while "
                                        f"measuring the whole replay per invariant")
                break
            t = self.run_try(whole)
            step.tries.append(t)
            for name in names:
                counts[name] += name in t.violated
            best = max(names, key=lambda x: counts[x])
            step.note = "failures per invariant: " + ", ".join(
                f"{x} {c}/{len(step.tries)}" for x, c in counts.items())
            self.write()
            if counts[best] >= k or counts[best] + (n - i - 1) < k:
                break
        step.elapsed_s = round(self.elapsed(), 1)
        step.accepted = best is not None and counts[best] >= k
        self.say(f"[{self.elapsed():5.0f}s] {step.name:<28} {step.size.line()}  "
                 f"{step.note}  " + (f"kept: {best}" if step.accepted else "rejected"))
        if not step.accepted or best is None:
            self.write()
            return False
        try:
            orig = load_original(self.orig.run_dir, best)
        except (ShrinkError, RunDirError, OSError, ValueError) as exc:
            self.say(f"{best}: {exc}")
            return False
        same = best == self.orig.invariant
        self.orig = orig
        for t in step.tries:
            t.failed = best in t.violated
        self.current = whole
        self.accepted.append(whole)
        self.say(f"[{self.elapsed():5.0f}s] shrinking {best} "
                 f"{'from the whole replay' if same else 'instead'} ({orig.violations} "
                 f"violation(s) in the run, the first at {orig.at_s:.2f} s)")
        self.write()
        self.reseed()
        return True

    def reseed(self, step: Step | None = None, label: str = "reseed") -> None:
        """The whole replay fails, the original's witness alone did not: the witnesses of
        the replay's own failing tries (other plans, other moments) are tried as seeds.
        Also before delta debugging a candidate still above the plan target: the
        witnesses of its own failing tries (``step``, the one that kept it), where halving
        a crowd of plans thins the race out of it."""
        from chaos.rundir import RunDirError

        step = step or self.steps[-1]
        cands: list[tuple[str, scn.Scenario]] = []
        for t in [t for t in step.tries if t.failed][:2]:
            try:
                o = load_original(Path(t.run_dir), self.orig.invariant)
            except (ShrinkError, RunDirError, OSError, ValueError) as exc:
                self.say(f"reseed: {t.run_dir}: {exc}")
                continue
            assert self.current is not None
            cands += self._witness_candidates(self.current, o,
                                              f"{label} {Path(t.run_dir).name}")[:2]
        self.first(cands)

    def rewitness(self) -> None:
        """:meth:`reseed` from the tries of the step that kept the current candidate, when
        it still has more plans than the target."""
        if self.current is None or Size.of(self.current).plans <= TARGETS["plans"]:
            return
        kept = next((st for st in reversed(self.steps) if st.accepted and st.failures), None)
        if kept is not None:
            self.reseed(kept, "witness of try")

    def shift_start(self) -> None:
        """Every operation (and a time-anchored fault) moved earlier so that the first is
        sent :data:`SHIFT_TO_S` after the workload starts: every later try is shorter by
        as much. Kept only if it still fails (the governors are younger when it starts)."""
        sc = self.current
        assert sc is not None
        first = min((float(op.get("t", 0)) for w in sc.workloads for op in _ops(w)),
                    default=0.0)
        shift = first - SHIFT_TO_S
        timed = [f.at for f in sc.faults if f.after is None]
        shift = min([shift, *timed])
        if shift < 0.5:
            return

        def moved(w: scn.WorkloadSpec) -> scn.WorkloadSpec:
            return _with_ops(w, [{**op, "t": round(float(op.get("t", 0)) - shift, 3)}
                                 for op in _ops(w)]) if _ops(w) else w

        faults = tuple(replace(f, at=round(f.at - shift, 3)) if f.after is None else f
                       for f in sc.faults)
        cand = _fit_duration(replace(sc, workloads=tuple(map(moved, sc.workloads)),
                                     faults=faults))
        if self.first([(f"time: {shift:.2f}s earlier", cand)]):
            self.shifted_s += shift

    def _windows(self, limit: int | None = 3) -> list[dict[str, Any]]:
        """The original's fault firings up to the violation: the one active at it first,
        then the others, latest first (``limit`` of them)."""
        o = self.orig
        v_ms = int(o.violation["wall_ms"])
        before = [w for w in o.faults if w["start_ms"] <= v_ms]
        active = [w for w in before if w["stop_ms"] is None or w["stop_ms"] >= v_ms]
        rest = sorted((w for w in before if w not in active), key=lambda w: -w["start_ms"])
        return (active + rest)[:limit]

    def _anchor_before(self, start_ms: int, sc: scn.Scenario) -> scn.AnchorSpec | None:
        """The submit of a plan ``sc`` still sends that came last before ``start_ms`` in
        the original history, with the delay from it to ``start_ms``. A submit, not the
        plan's permit: the replay sends the plan whatever the governor decides, so the
        fault always fires (a permit anchor never fires when the candidate's governor
        blocks that plan)."""
        kept = {_plan_id(op) for op in _plans(sc)}
        before = [(ms, pid) for ms, pid in sorted(self.orig.submits)
                  if ms <= start_ms and pid in kept]
        if not before:
            return None
        ms, pid = before[-1]
        return scn.AnchorSpec(event="submit", plan_id=pid, delay=round((start_ms - ms) / 1000, 3))

    def _firing(self, w: dict[str, Any], sc: scn.Scenario,
                anchored: bool) -> scn.FaultSpec | None:
        """One original firing ``w`` as a one-shot fault of ``sc``: on the instance it hit,
        at its time (or, ``anchored``, on the submit of a kept plan before it, if any)."""
        spec = next((f for f in sc.faults if f.kind == w["kind"]), None)
        if spec is None:
            return None
        target = spec.target
        if spec.kind in scn.GOVERNOR_FAULTS and w.get("resolved_target"):
            target = w["resolved_target"]
        at = round((w["start_ms"] - self.orig.workload_ms) / 1000 - self.shifted_s, 3)
        anchor = self._anchor_before(w["start_ms"], sc) if anchored else None
        if anchor is not None:
            return replace(spec, at=0.0, every=0.0, target=target, after=anchor)
        return replace(spec, at=at, every=0.0, target=target, after=None) if at >= 0 else None

    def shrink_faults(self) -> None:
        assert self.current is not None
        sc = self.current
        if not sc.faults:
            return
        cands = [("faults: none", _fit_duration(replace(sc, faults=())))]
        if len(sc.faults) > 1 or any(f.every for f in sc.faults):
            anchored = all(f.after is not None for f in sc.faults)
            for w in self._windows():
                one = self._firing(w, sc, anchored)
                if one is not None:
                    when = one.after.describe() if one.after else f"{one.at:g}s"
                    cands.append((f"faults: one {one.kind} at {when}",
                                  _fit_duration(replace(sc, faults=(one,)))))
        self.first(cands)

    def anchor_fault(self) -> None:
        """The one time-anchored fault left, started on the submit of a kept plan just
        before its original start (+ the same delay), where that still fails."""
        sc = self.current
        assert sc is not None
        if len(sc.faults) != 1 or sc.faults[0].after is not None or sc.faults[0].every:
            return
        f = sc.faults[0]
        anchor = self._anchor_before(
            self.orig.workload_ms + int((f.at + self.shifted_s) * 1000), sc)
        if anchor is not None:
            cand = _fit_duration(replace(sc, faults=(replace(f, at=0.0, after=anchor),)))
            self.first([(f"anchor: {anchor.describe()}", cand)])

    def shrink_producers(self) -> None:
        """ddmin over the producers, then the rest merged into one (or three) producers:
        one producer sends in the recorded order, concurrency between them is lost."""
        assert self.current is not None
        names = [str(w.params.get("producer", "")) for w in _producers(self.current)]
        if len(names) > 1:
            self.ddmin("producers", names, lambda sub: _keep(
                self._cur(), lambda p, op: True, producers=set(sub)))
        sc = self.current
        prods = _producers(sc)
        if len(prods) <= 1:
            return
        others = tuple(w for w in sc.workloads if w.kind != "replay")
        cands = []
        for groups in ([prods], [prods[i::3] for i in range(3)]) if len(prods) > 3 \
                else ([prods],):
            merged = tuple(_merge(g, f"merged-{i}") for i, g in enumerate(groups))
            cands.append((f"producers: merged into {len(merged)}",
                          _fit_duration(replace(sc, workloads=(*merged, *others)))))
        self.first(cands)

    def shrink_plans(self) -> None:
        assert self.current is not None
        for w in sorted(_producers(self.current), key=lambda w: -len(_ops(w))):
            name = str(w.params.get("producer", ""))
            anchors = _anchor_plans(self._cur())
            ids = [_plan_id(x) or "" for x in _ops(w) if _is_plan(x)
                   and _plan_id(x) not in anchors]  # kept by _keep whatever the subset
            if len(ids) < 2:
                continue

            def build(sub: Sequence[str], name: str = name) -> scn.Scenario:
                keep = set(sub)
                return _keep(self._cur(), lambda p, op: p != name or _plan_id(op) in keep)

            self.ddmin(f"plans of {name}", ids, build)

    def shrink_symbols(self) -> None:
        """Rename the symbols the plans use to the first market symbols and cut the market
        to them (positions seeded before the run keep theirs)."""
        sc = self.current
        assert sc is not None
        if any("pnl" in op for w in _producers(sc) for op in _ops(w)):
            return  # pnl writes name open positions' symbols: left as they are
        names = [f"S{i:03d}USDT" for i in range(sc.market.symbols)]
        fixed = names[:sc.market.initial_positions]
        used = sorted({str(op["plan"].get("symbol")) for op in _plans(sc)} - set(fixed))
        if not set(used) <= set(names):
            return  # a malformed plan's symbol, or bytes: left as they are
        mapping = dict(zip(used, names[len(fixed):], strict=False))
        count = len(fixed) + len(used)
        if count >= sc.market.symbols or count < 1:
            return
        ws = []
        for w in sc.workloads:
            if w.kind == "replay":
                ops = [_renamed(op, mapping) for op in _ops(w)]
                w = _with_ops(w, ops)
            ws.append(w)
        faults = tuple(replace(f, after=replace(f.after, symbol=mapping.get(f.after.symbol,
                                                                          f.after.symbol)))
                       if f.after is not None and f.after.symbol else f for f in sc.faults)
        cand = replace(sc, workloads=tuple(ws), faults=faults,
                       market=replace(sc.market, symbols=count))
        self.first([(f"symbols: market cut to {count}", cand)])

    def shrink_duration(self) -> None:
        sc = self.current
        assert sc is not None
        cand = _fit_duration(sc, _last_t(sc) + SETTLE_S / 2)
        if cand.duration_s < sc.duration_s:
            self.first([(f"duration: {cand.duration_s:g}s", cand)])

    def ddmin(self, what: str, items: list[str],
              build: Callable[[Sequence[str]], scn.Scenario]) -> list[str]:
        """:func:`ddmin` with each subset judged by tries (each subset at most once)."""
        cache: dict[frozenset[str], bool] = {frozenset(items): True}
        total = len(items)

        def test(sub: list[str]) -> bool:
            key = frozenset(sub)
            if key not in cache:
                cache[key] = self.judge(f"{what}: {len(sub)} of {total}", build(sub))
            return cache[key]

        return ddmin(items, test)

    # -- verification and output --------------------------------------------------------------
    def verify(self) -> None:
        """The full ``tries``-run measurement of the smallest candidate; when it misses
        k/N, the candidate kept before it (at most :data:`MAX_STEP_BACK` times, and only
        when the budget left holds N more tries). The budget cuts a verification short;
        the rate of the tries it ran is reported, and is not called reproduced."""
        previous: Step | None = None
        for back in range(min(MAX_STEP_BACK + 1, len(self.accepted))):
            if back and self._left() < self.opts.tries * self._est_try_s():
                self.stopped_because += (f"; no budget left to verify the candidate before "
                                         f"(measured {previous.failures}/"
                                         f"{len(previous.tries)})" if previous else "")
                return
            sc = self.accepted[-1 - back]
            step = Step("verify" + (f" (step back {back})" if back else ""), Size.of(sc))
            self.verification, self.current = step, sc
            for _ in range(self.opts.tries):
                if self._left() < self._est_try_s():  # a try started must end in budget
                    step.note = "the time budget ran out during the verification"
                    break
                step.tries.append(self.run_try(sc))
                self.write()
            step.elapsed_s = round(self.elapsed(), 1)
            step.accepted = self._reproduces(step)
            self.steps.append(step)
            self.say(f"[{self.elapsed():5.0f}s] {step.name:<28} {step.size.line()}  rate "
                     f"{step.failures}/{len(step.tries)}" + (f" ({step.note})" if step.note
                                                              else ""))
            self.write()
            if step.accepted or step.note:
                return
            previous = step

    def _reproduces(self, step: Step) -> bool:
        """At least k failures (in N tries, or fewer when the budget cut them short: k
        failures in fewer than N tries are k/N or better whatever the rest would do)."""
        return step.failures >= self.opts.k

    def targets(self) -> dict[str, Any]:
        after = Size.of(self.current) if self.current is not None else None
        v = self.verification
        out: dict[str, Any] = {}
        for name, limit in TARGETS.items():
            got = getattr(after, name) if after is not None else None
            out[name] = {"limit": limit, "after": got, "met": got is not None and got <= limit}
        out["rate"] = {"limit": f"{self.opts.k}/{self.opts.tries}",
                       "after": f"{v.failures}/{len(v.tries)}" if v else None,
                       "met": bool(v and v.accepted)}
        return out

    def to_dict(self, status: str) -> dict[str, Any]:
        v = self.verification
        return {
            "status": status, "run_dir": str(self.orig.run_dir),
            "invariant": self.orig.invariant, "witness": self.orig.violation,
            "governor": f"cmd:{self.governor_cmd}" if self.governor_cmd else self.governor,
            "options": {"tries": self.opts.tries, "k": self.opts.k,
                        "budget_s": self.opts.budget_s, "search_tries": self.opts.search_n,
                        "search_k": self.opts.search_k},
            "elapsed_s": round(self.elapsed(), 1), "runs": self.n_runs,
            "before": asdict(self.before) if self.before else None,
            "after": asdict(Size.of(self.current)) if self.current is not None else None,
            "rate": {"failures": v.failures, "tries": len(v.tries),
                     "measured": round(v.failures / len(v.tries), 3) if v and v.tries else None}
            if v else None,
            "targets": self.targets(), "stopped_because": self.stopped_because,
            "repro": str(self.out / "repro.toml") if self.current is not None else None,
            "steps": [s.to_dict() for s in self.steps],
        }

    def write(self, status: str = "running") -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        if self.current is not None:
            _atomic(self.out / "repro.toml", scn.dump(replace(
                self.current, name=_repro_name(self.orig.run_dir), source=None,
                description=f"shrunk from {self.orig.run_dir}: {self.orig.invariant}")))
        _atomic(self.out / "shrink.json", json.dumps(self.to_dict(status), indent=2,
                                                     default=str))

    def write_md(self, status: str) -> None:
        d = self.to_dict(status)
        rate = d["rate"]
        lines = [f"# Shrink: {self.orig.invariant}", "",
                 f"Run `{self.orig.run_dir}`, governor `{d['governor']}`: status "
                 f"**{status}** after {d['elapsed_s']:.0f} s and {d['runs']} runs.", ""]
        if rate:
            lines += [f"Reproduction rate of `repro.toml`: **{rate['failures']}/{rate['tries']}**"
                      f" (required {self.opts.k}/{self.opts.tries}).", ""]
        lines += ["| | faults | producers | plans | symbols | duration (s) |",
                  "|---|---|---|---|---|---|"]
        for label in ("before", "after"):
            s = d[label]
            if s:
                lines.append(f"| {label} | {s['faults']} | {s['producers']} | {s['plans']} | "
                             f"{s['symbols']} | {s['duration_s']} |")
        missed = [f"{k} ({t['after']}, target {t['limit']})" for k, t in d["targets"].items()
                  if not t["met"]]
        lines += ["", "Targets: " + ("all met." if not missed else
                                     "**not reached**: " + ", ".join(missed) + "."),
                  f"Search stopped: {self.stopped_because or status}.", "",
                  "| step | candidate | tries failed | kept |", "|---|---|---|---|"]
        for s in self.steps:
            z = s.size
            lines.append(f"| {s.name}{f' ({s.note})' if s.note else ''} | {z.faults}f "
                         f"{z.producers}p {z.plans} plans "
                         f"{z.duration_s}s | {s.failures}/{len(s.tries)} | "
                         f"{'yes' if s.accepted else 'no'} |")
        if self.current is not None:
            lines += ["", f"Run it: `chaos run --scenario {self.out / 'repro.toml'}" +
                      (f" --governor-cmd '{self.governor_cmd}'`" if self.governor_cmd
                       else f" --governor {self.governor}`")]
        _atomic(self.out / "shrink.md", "\n".join(lines) + "\n")


def _repro_name(run_dir: Path) -> str:
    try:
        name = str(json.loads((run_dir / "run.json").read_text()).get("scenario") or "run")
    except (OSError, ValueError):
        name = "run"
    return f"{name}-repro"[:64]


def _atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def check_options(opts: ShrinkOptions) -> None:
    if not 1 <= opts.tries <= 1000:
        raise ShrinkError("--tries: must be within 1..1000")
    if not 1 <= opts.k <= opts.tries:
        raise ShrinkError(f"--k: must be within 1..--tries ({opts.tries}), got {opts.k}")
    if not (math.isfinite(opts.budget_s) and 1 <= opts.budget_s <= 86_400):
        raise ShrinkError("--budget-s: must be within 1..86400 seconds")
    if not 1 <= opts.search_tries <= 1000:
        raise ShrinkError("--search-tries: must be within 1..1000")
    if opts.governor_cmd is not None and not opts.governor_cmd.strip():
        raise ShrinkError("--governor-cmd: must not be empty")
    out = opts.out or opts.run_dir / "shrink"
    if out.exists() and (not out.is_dir() or (out / "shrink.json").exists()):
        raise ShrinkError(f"--out {out} already holds a shrink or is not a directory; give "
                          f"a new directory")


def shrink(opts: ShrinkOptions) -> ShrinkResult:
    """Shrink ``opts.run_dir``. ShrinkError (254), NotARun (254) and RunDirError (255)
    before anything runs; a Ctrl-C (KeyboardInterrupt) during the search is caught here:
    the tries tear themselves down, and what was found so far is written."""
    from chaos.replay import scenario_from_run

    check_options(opts)
    orig = load_original(opts.run_dir, opts.invariant)
    try:
        replay = scenario_from_run(opts.run_dir)
    except scn.ScenarioError as exc:
        raise ShrinkError(f"{opts.run_dir}: cannot replay this run: {exc}") from None
    sh = Shrinker(opts, orig)
    try:
        sh.shrink(replay)
        if sh.current is not None:
            sh.verify()
    except Exception as exc:
        sh.stopped_because = f"harness failure: {type(exc).__name__}: {exc}"
        with contextlib.suppress(Exception):
            sh.write("error")
        raise
    except KeyboardInterrupt:
        with contextlib.suppress(Exception):
            sh.write("interrupted")
            sh.write_md("interrupted")
        return ShrinkResult("interrupted", sh.out, 2, f"interrupted; what was found so far is "
                            f"in {sh.out}/shrink.json")
    v = sh.verification
    ok = bool(v and sh._reproduces(v))
    status = "reproduced" if ok else "not_reproduced"
    sh.write(status)
    sh.write_md(status)
    if sh.current is None:
        msg = (f"no candidate reproduces {sh.orig.invariant} ({sh.opts.search_k} of "
               f"{sh.opts.search_n} tries): {sh.stopped_because}; see {sh.out}/shrink.md")
    else:
        after = Size.of(sh.current)
        assert v is not None
        msg = (f"{'reproduces' if ok else 'does NOT reproduce'} {sh.orig.invariant} in "
               f"{v.failures}/{len(v.tries)} tries: {after.line()}; {sh.out}/repro.toml")
    return ShrinkResult(status, sh.out, 0 if ok else 1, msg)


def progress_line(text: str) -> None:
    print(text, file=sys.stderr, flush=True)

"""Replay a recorded run: the same plans, in the same order per producer, at the same
offsets, so that a candidate reproduction differs from the original only by the timing no
harness controls.

:func:`scenario_from_run` reads a run directory (``chaos run``, each run of a suite) and
returns its own scenario (as run: with the command line's overrides, from ``run.json``)
with every workload process turned into one ``replay`` workload
(:class:`chaos.workloads.Replay`) holding what that process did, from the history:

* each plan it tried to add (every ``submit`` invoke, whatever its outcome: the replay
  tries it again), with its fields as sent, its key, its meta (``stale``, ``malformed``,
  ``burst``...), its offset ``t`` from the workload start and its age (``age_ms``:
  ``intent_created_at_ms`` is rewritten at send time to keep it). Bytes that were not
  UTF-8 (the ``binary_field`` malformed plans) are recovered from the history's
  backslash escapes and sent as bytes again;
* each regime write and the regime read at start (``regime_flip``), each pnl write
  (``rotation_pressure``), at their offsets.

Faults (timed or anchored), market, apply layer, config, governors, seed and duration stay
as they were. What cannot be replayed is refused in one line (:class:`ReplayError`): a run
with no scenario (an import, a load test), a history with no workload start.
"""

from __future__ import annotations

import codecs
import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from chaos.anchors import AnchorEvent, events_of, matches
from chaos.history import F, Op, OpType, history_files, iter_history
from chaos.scenario import (
    ANCHOR_EVENTS,
    NAME_RE,
    AnchorSpec,
    Scenario,
    ScenarioError,
    WorkloadSpec,
    from_dict,
)
from chaos.workloads import REPLAY_TAIL_S

log = logging.getLogger(__name__)

REPLAY_SUFFIX = "-replay"
# Submit invoke fields that are not meta: the plan itself, the workload kind, the replayed
# producer (set again from the replay's own params).
_NOT_META = frozenset({"plan", "workload", "producer"})
# Offsets are kept to the µs; past the tail a replay allows (absurd: a producer that came up
# 10 s late), an op is sent at the tail's end rather than dropped.
_END_MARGIN_S = 0.001


class ReplayError(ScenarioError):
    """A run that cannot be replayed; the message names the run directory and why."""


def run_scenario(run_dir: str | Path) -> Scenario:
    """The scenario a run ran, as it ran (overrides included), from its ``run.json``."""
    run_dir = Path(run_dir)
    meta_path = run_dir / "run.json"
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ReplayError(f"{run_dir}: no run.json: not a run directory") from None
    except (OSError, ValueError) as exc:
        raise ReplayError(f"{meta_path}: unreadable: {exc}") from None
    spec = meta.get("scenario_spec") if isinstance(meta, dict) else None
    if not isinstance(spec, dict):
        kind = meta.get("kind") if isinstance(meta, dict) else None
        raise ReplayError(f"{run_dir}: run.json holds no scenario ({kind or 'not a chaos run'}"
                          f"): only a `chaos run` (or a suite's run) can be replayed")
    try:
        return from_dict(_raw(spec))
    except ScenarioError as exc:
        raise ReplayError(f"{meta_path}: scenario_spec: {exc}") from None


def _raw(spec: dict[str, Any]) -> dict[str, Any]:
    """``run.json``'s ``scenario_spec`` (a dataclass as a dict) as a scenario file's tables."""
    raw = {k: v for k, v in spec.items()
           if k not in ("workloads", "faults", "source") and v is not None}
    for section in ("redis", "market", "apply"):
        if isinstance(raw.get(section), dict):
            raw[section] = {k: v for k, v in raw[section].items() if v is not None}
    url = raw.get("redis", {}).get("url")
    if isinstance(url, str) and "***" in url:
        del raw["redis"]["url"]  # masked in run.json: --redis-url gives it again
    raw["workload"] = [_flat(w) for w in spec.get("workloads") or []]
    raw["fault"] = []
    duration = spec.get("duration_s")
    for f in spec.get("faults") or []:
        table = _flat(f)
        at = table.get("at")
        if (not isinstance(table.get("after"), dict) and isinstance(at, int | float)
                and isinstance(duration, int | float) and at >= duration):
            # Scheduled after the run's end (e.g. a --quick run cut the scenario short):
            # it never started, so the replay leaves it out (the scenario checks refuse it).
            continue
        if isinstance(table.get("after"), dict):
            table["after"] = {k: v for k, v in table["after"].items() if v is not None}
        else:
            table.pop("after", None)
        raw["fault"].append(table)
    return raw


def _flat(table: Any) -> dict[str, Any]:
    if not isinstance(table, dict):
        raise ReplayError(f"scenario_spec: a workload or fault is not a table: {table!r}")
    params = table.get("params") or {}
    return {**{k: v for k, v in table.items() if k != "params"}, **params}


def scenario_from_run(run_dir: str | Path) -> Scenario:
    """The run's scenario with each workload process replaced by a ``replay`` workload of
    what it did (module docstring). Raises :class:`ReplayError` (a ScenarioError)."""
    run_dir = Path(run_dir)
    sc = run_scenario(run_dir)
    if not history_files(run_dir):
        raise ReplayError(f"{run_dir}: no history/*.jsonl: nothing to replay")
    workers = _workers(sc.workloads)
    t0_ns: int | None = None
    ops: dict[str, list[dict[str, Any]]] = {name: [] for name in workers}
    # A replay's producer is the one it replayed: a replay of a replay keeps the first name.
    producer = {name: str(spec.params.get("producer") or "") if spec.kind == "replay" else ""
                for name, spec in workers.items()}
    for op in iter_history(run_dir):
        if op.f == F.PHASE and op.key == "workload" and op.type == OpType.INVOKE:
            t0_ns = op.time_ns
        if op.process not in ops or t0_ns is None:
            continue
        t = max(0.0, min((op.time_ns - t0_ns) / 1e9,
                         sc.duration_s + REPLAY_TAIL_S - _END_MARGIN_S))
        entry = _replay_op(op, round(t, 6))
        if entry is not None:
            ops[op.process].append(entry)
            if op.f == F.SUBMIT and not producer[op.process]:
                producer[op.process] = str(op.value.get("producer") or op.process)
    if t0_ns is None:
        raise ReplayError(f"{run_dir}: the history has no workload phase (the run ended "
                          f"before its load started): nothing to replay")
    replays = tuple(WorkloadSpec("replay", params={"producer": producer[name] or name,
                                                   "ops": ops[name]})
                    for name in workers)
    name = sc.name if sc.name.endswith(REPLAY_SUFFIX) else sc.name + REPLAY_SUFFIX
    if not NAME_RE.fullmatch(name):
        name = sc.name
    out = replace(sc, name=name, workloads=replays, source=None,
                  description=(f"replay of {run_dir.name}"
                               + (f": {sc.description}" if sc.description else ""))[:2000])
    log.info("replay of %s: %s", run_dir, ", ".join(
        f"{w.params['producer']} {len(w.params['ops'])} ops" for w in replays))
    return _checked(out)


def truncate(sc: Scenario, duration_s: float) -> Scenario:
    """The first ``duration_s`` seconds of a replay: ops from then on dropped, the duration
    set (``chaos run --replay RUN_DIR --duration S``). Other workloads are left as they are."""
    workloads = tuple(
        replace(w, params={**w.params, "ops": [op for op in w.params.get("ops", [])
                                               if op.get("t", 0) < duration_s]})
        if w.kind == "replay" else w for w in sc.workloads)
    return replace(sc, workloads=workloads).with_overrides(duration_s=duration_s)


def _checked(sc: Scenario) -> Scenario:
    """Validated as a scenario file would be: what ``chaos run --replay`` runs is exactly
    what ``dump`` writes and ``parse`` reads."""
    from chaos.scenario import dump, parse

    return parse(dump(sc))


def _workers(specs: Iterable[WorkloadSpec]) -> dict[str, WorkloadSpec]:
    """Process names of a run's workload workers and their specs, in start order (as
    start_workloads names them: ``<kind>-<index>``, numbered across specs)."""
    names, index = {}, 0
    for spec in specs:
        for _ in range(spec.processes):
            names[f"{spec.kind}-{index}"] = spec
            index += 1
    return names


def _replay_op(op: Op, t: float) -> dict[str, Any] | None:
    """One history op of a producer as a replay op, or None when it is not one (a
    completion, a read)."""
    v = op.value
    if op.f == F.SUBMIT and op.type == OpType.INVOKE and isinstance(v.get("plan"), dict):
        plan = {k: _field(x) for k, x in v["plan"].items()}
        out: dict[str, Any] = {"t": t, "plan": plan}
        if op.key is not None and op.key != plan.get("plan_id"):
            out["key"] = op.key
        sym = plan.get("symbol")
        if op.symbol != (sym if isinstance(sym, str) else None):
            out["symbol"] = op.symbol
        created = plan.get("intent_created_at_ms")
        if isinstance(created, str) and created.lstrip("-").isdigit():
            out["age_ms"] = op.wall_ms - int(created)
        meta = {k: x for k, x in v.items() if k not in _NOT_META and x is not None}
        if meta:
            out["meta"] = meta
        return {k: x for k, x in out.items() if x is not None}
    if op.f != F.OPERATOR:
        return None
    if op.type == OpType.OK and v.get("initial"):
        return {"t": t, "initial_regime": True}
    if op.type != OpType.INVOKE:
        return None
    if v.get("target") == "regime" and "regime" in v:
        out = {"t": t, "regime": v["regime"], "key": op.key, "previous": v.get("previous")}
        return {k: x for k, x in out.items() if x is not None}
    if v.get("target") == "pnl" and "pnl_pct" in v and op.symbol:
        return {"t": t, "pnl": float(v["pnl_pct"]), "symbol": op.symbol, "key": op.key}
    return None


@dataclass(frozen=True)
class Sent:
    """One thing a producer sent, as a replay must send it again: ``what`` is compared
    exactly (f, key, symbol, the plan's fields but its intent time, regime, pnl); the
    offset from the workload start and the plan's age are timing."""

    what: tuple[Any, ...]
    offset_s: float
    age_ms: int | None


def sent_by_producer(run_dir: str | Path) -> dict[int, list[Sent]]:
    """Per workload worker (its index: ``open_storm-0`` and the ``replay-0`` that replays
    it are both 0), what it sent, in order: for checking a replay against its original."""
    out: dict[int, list[Sent]] = {}
    t0_ns = 0
    for op in iter_history(run_dir):
        if op.f == F.PHASE and op.key == "workload" and op.type == OpType.INVOKE:
            t0_ns = op.time_ns
        index = op.process.rsplit("-", 1)[-1]
        if not index.isdigit() or _replay_op(op, 0.0) is None:
            continue
        plan = dict(op.value.get("plan") or {})
        created = plan.pop("intent_created_at_ms", None)
        age = op.wall_ms - int(created) if isinstance(created, str) and \
            created.lstrip("-").isdigit() else None
        what = (op.f, op.key, op.symbol, tuple(sorted(plan.items())), op.value.get("regime"),
                op.value.get("pnl_pct"))
        out.setdefault(int(index), []).append(Sent(what, (op.time_ns - t0_ns) / 1e9, age))
    return out


def anchor_before(run_dir: str | Path, fault_key: str, event: str = "submit",
                  **filters: str) -> AnchorSpec | None:
    """An anchor that starts a fault where it started in this run: on the last ``event``
    (matching ``filters``) before the start of fault ``fault_key`` (its history key, e.g.
    ``pause_governor-2``), ``delay`` the gap after it; None when no such event preceded it.

    For turning a timed fault into an event-anchored one. ``submit`` (the default) is
    anchored to the plan id (``n = 1``): a replay sends the same plans, so it finds the
    same plan whatever the governor does; other events are counted (``n``) from the
    workload start, as the watcher counts them."""
    if event not in ANCHOR_EVENTS:
        raise ReplayError(f"event: unknown {event!r}; known: {', '.join(ANCHOR_EVENTS)}")
    try:
        probe = AnchorSpec(event, **filters)
    except TypeError:
        raise ReplayError(f"filters: unknown in {sorted(filters)}; known: action, instance, "
                          f"symbol, reason, plan_id, status") from None
    events: list[tuple[float, AnchorEvent]] = []  # (ms, event) in stream / take order
    start: Op | None = None
    t0: Op | None = None
    # The whole history: the recorder writes an entry down after it happened, so it may
    # come after the fault's start in the history although the entry came before it.
    for op in iter_history(run_dir):
        if op.f == F.PHASE and op.key == "workload" and op.type == OpType.INVOKE:
            t0 = op
        elif op.f == F.FAULT and op.key == fault_key and op.type == OpType.INVOKE \
                and op.value.get("phase") == "start":
            start = op
        elif t0 is not None:
            events += [(ms, ev) for ms, ev in _as_events(op) if ev.event == event]
    if start is None or t0 is None:
        return None
    # a take is timed on the monotonic clock, as the history is; an entry by its id (the
    # server's wall clock, whole ms)
    cut = start.time_ns / 1e6 if event == "take" else float(start.wall_ms)
    events.sort(key=lambda x: x[0])  # stable: entries of one ms stay in stream order
    matching = [(ms, ev) for ms, ev in events if ms <= cut and matches(probe, ev)]
    if not matching:
        return None
    ms, ev = matching[-1]
    delay = round(max(0.0, cut - ms) / 1000.0, 3)
    if event == "submit" and ev.plan_id and "plan_id" not in filters:
        return AnchorSpec("submit", n=1, delay=delay, plan_id=ev.plan_id,
                          **{k: v for k, v in filters.items() if k != "plan_id"})
    return AnchorSpec(event, n=len(matching), delay=delay, **filters)


def _as_events(op: Op) -> list[tuple[float, AnchorEvent]]:
    """The anchor events one history op shows, each with its time in ms (the entry id's
    for stream events, the monotonic clock's for a take)."""
    v = op.value
    if op.f == F.TAKE and op.type == OpType.OK:
        return [(op.time_ns / 1e6, AnchorEvent("take", plan_id=op.key, symbol=op.symbol,
                                               action=(v.get("permit") or {}).get("action")))]
    if op.f == F.SUBMIT and op.type == OpType.OK and v.get("entry_id"):
        ms = float(str(v["entry_id"]).split("-")[0])
        return [(ms, AnchorEvent("submit", plan_id=op.key, symbol=op.symbol))]
    kind = {F.DECISION: "events", F.RESULT: "results"}.get(op.f)  # type: ignore[call-overload]
    if kind is None or "entry_ms" not in v:
        return []
    fields = {k: str(x) for k, x in v.items()}
    return [(float(v["entry_ms"]), AnchorEvent(
        e, plan_id=op.key, symbol=op.symbol, action=fields.get("action"),
        instance=fields.get("governor"), reason=fields.get("reason"),
        status=fields.get("status"))) for e in events_of(kind, fields)]


def _field(text: Any) -> Any:
    """A plan field as the history shows it, back as it was sent: bytes that were not
    UTF-8 appear with backslash escapes (``\\xff``); those become ``{ hex = ... }``."""
    if not isinstance(text, str) or "\\x" not in text:
        return text
    try:
        raw = codecs.escape_decode(text.encode("utf-8"))[0]
    except ValueError:
        return text
    if raw.decode("utf-8", "backslashreplace") != text:
        return text  # not what backslashreplace makes of any bytes: text as it was
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return {"hex": raw.hex()}
    return text


__all__ = ["ReplayError", "Sent", "anchor_before", "run_scenario", "scenario_from_run",
           "sent_by_producer", "truncate"]

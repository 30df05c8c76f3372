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
from dataclasses import replace
from pathlib import Path
from typing import Any

from chaos.history import F, Op, OpType, history_files, iter_history
from chaos.scenario import NAME_RE, Scenario, ScenarioError, WorkloadSpec, from_dict
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
    for f in spec.get("faults") or []:
        table = _flat(f)
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
    producer: dict[str, str] = dict.fromkeys(workers, "")
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


def _checked(sc: Scenario) -> Scenario:
    """Validated as a scenario file would be: what ``chaos run --replay`` runs is exactly
    what ``dump`` writes and ``parse`` reads."""
    from chaos.scenario import dump, parse

    return parse(dump(sc))


def _workers(specs: Iterable[WorkloadSpec]) -> list[str]:
    """Process names of a run's workload workers, in start order (as start_workloads names
    them: ``<kind>-<index>``, numbered across specs)."""
    names, index = [], 0
    for spec in specs:
        for _ in range(spec.processes):
            names.append(f"{spec.kind}-{index}")
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


__all__ = ["ReplayError", "run_scenario", "scenario_from_run"]

"""What a run did, gathered in one pass over its history and its exchange ledger.

The checkers judge these facts, not the raw files: the history is streamed
once (never held whole), and each plan keeps only the few fields a checker
needs. The ledger is the ground truth of what executed; the history is the
evidence of what was asked, decided and when.

Times: ``*_ms`` are epoch milliseconds. Decision, plan and result times are
Redis stream ids (the server's clock); order times are the exchange host's
clock; operator and fault times are the harness host's clock. With an
embedded Redis these are one clock.
"""

from __future__ import annotations

import json
import sqlite3
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chaos.history import F, OpType, iter_history
from governor_ref.protocol import GovernorConfig


@dataclass(frozen=True)
class Decision:
    plan_id: str
    symbol: str
    action: str
    decision: str
    reason: str
    governor: str
    entry_ms: int
    entry_id: str
    fence: str = ""


@dataclass(frozen=True)
class LedgerOrder:
    seq: int
    plan_id: str
    symbol: str
    action: str
    side: str
    notional: float
    fence: str
    effect: str
    position_id: str
    open_count_after: int
    wall_ms: int
    issued_at_ms: int | None

    @property
    def executed(self) -> bool:
        return not self.effect.startswith("rejected")


@dataclass
class Submit:
    status: str  # ok / info / fail
    wall_ms: int
    fields: dict[str, Any]
    malformed: str | None = None


@dataclass
class FaultWindow:
    kind: str
    key: str
    start_ms: int
    stop_ms: int | None
    ok: bool = True
    target: str | None = None


@dataclass
class Facts:
    run_dir: Path
    config: GovernorConfig
    capital: float
    allocation_pct: float
    initial_regime: str
    # (invoked_ms, completed_ms, regime, completion type) of each regime flip
    regimes: list[tuple[int, int, str, str]] = field(default_factory=list)
    submits: dict[str, Submit] = field(default_factory=dict)
    plan_entries: dict[str, list[tuple[int, dict[str, str]]]] = field(
        default_factory=lambda: defaultdict(list))
    decisions: dict[str, list[Decision]] = field(default_factory=lambda: defaultdict(list))
    takes: dict[str, list[tuple[str, int]]] = field(default_factory=lambda: defaultdict(list))
    results: dict[str, list[tuple[int, dict[str, str]]]] = field(
        default_factory=lambda: defaultdict(list))
    faults: list[FaultWindow] = field(default_factory=list)
    probes: dict[str, dict[str, Any]] = field(default_factory=dict)
    phases: dict[str, dict[str, int]] = field(default_factory=dict)
    governor_events: list[dict[str, Any]] = field(default_factory=list)
    stream_resets: int = 0
    ops: int = 0
    orders: list[LedgerOrder] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    first_ms: int | None = None
    last_ms: int | None = None

    def fault_at(self, ms: int) -> list[str]:
        """The faults active at ``ms`` (for telling whether a violation came under a fault)."""
        return [f.kind for f in self.faults
                if f.start_ms <= ms <= (f.stop_ms if f.stop_ms is not None else 2**62)]

    def regime_at(self, ms: int) -> set[str]:
        """The regimes that may have been in force at ``ms``: two while a flip is in flight."""
        current = {self.initial_regime}
        for inv, done, regime, typ in self.regimes:
            if inv > ms:
                break
            # Done: the new regime; in flight at ms or unknown outcome: either may hold.
            current = {regime} if done <= ms and typ == "ok" else current | {regime}
        return current


def load_ledger(run_dir: Path) -> list[LedgerOrder]:
    path = run_dir / "ledger.sqlite"
    if not path.exists():
        return []
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        cols = {r[1] for r in con.execute("PRAGMA table_info(orders)")}
        wall = "wall_ms" if "wall_ms" in cols else "t_wall_ms"
        rows = con.execute(
            f"SELECT seq, plan_id, symbol, action, side, notional, fence, effect, position_id, "
            f"open_count_after, {wall}, issued_at_ms FROM orders ORDER BY seq").fetchall()
    finally:
        con.close()
    return [LedgerOrder(int(r[0]), r[1] or "", r[2] or "", r[3] or "", r[4] or "",
                        float(r[5] or 0), "" if r[6] is None else str(r[6]), r[7] or "",
                        r[8] or "", int(r[9] or 0), int(r[10] or 0),
                        None if r[11] is None else int(r[11])) for r in rows]


def gather(run_dir: str | Path) -> Facts:
    run_dir = Path(run_dir)
    meta: dict[str, Any] = {}
    if (run_dir / "run.json").exists():
        meta = json.loads((run_dir / "run.json").read_text())
    cfg_hash = meta.get("governor_config") or {}
    facts = Facts(run_dir=run_dir, config=GovernorConfig.from_hash(cfg_hash),
                  capital=0.0, allocation_pct=0.0, initial_regime="BASE", meta=meta)
    open_faults: dict[str, FaultWindow] = {}
    regime_inv: dict[str, tuple[int, str]] = {}
    for op in iter_history(run_dir):
        facts.ops += 1
        ms = op.wall_ms
        facts.first_ms = ms if facts.first_ms is None else min(facts.first_ms, ms)
        facts.last_ms = ms if facts.last_ms is None else max(facts.last_ms, ms)
        v = op.value
        f = op.f
        if f == F.DECISION:
            if v.get("decision") in ("PERMIT", "BLOCK") and op.key:
                facts.decisions[op.key].append(Decision(
                    op.key, v.get("symbol", ""), v.get("action", ""), v["decision"],
                    v.get("reason", ""), v.get("governor", ""), int(v.get("entry_ms", ms)),
                    v.get("entry_id", ""), v.get("fence", "") or ""))
        elif f == F.PLAN:
            if op.key:
                facts.plan_entries[op.key].append((int(v.get("entry_ms", ms)),
                                                   {k: x for k, x in v.items()
                                                    if k in ("action", "symbol", "source",
                                                             "intent_created_at_ms",
                                                             "notional")}))
        elif f == F.SUBMIT:
            key = op.key or ""
            if op.type == OpType.INVOKE:
                facts.submits[key] = Submit("invoke", ms, v.get("plan") or {},
                                            v.get("malformed"))
            elif key in facts.submits:
                facts.submits[key].status = str(op.type)
                facts.submits[key].wall_ms = ms
        elif f == F.TAKE and op.key:
            facts.takes[op.key].append((str(op.type), ms))
        elif f == F.RESULT and op.key:
            facts.results[op.key].append((int(v.get("entry_ms", ms)), v))
        elif f == F.OPERATOR:
            if "config" in v:
                facts.config = GovernorConfig.from_hash(v["config"])
            if "capital" in v:
                facts.capital = float(v["capital"])
                facts.allocation_pct = float(v.get("allocation_pct", 0))
            if "regime" in v:
                if v.get("initial"):
                    facts.initial_regime = v["regime"]
                elif op.type == OpType.INVOKE:
                    regime_inv[op.key or ""] = (ms, v["regime"])
                else:
                    inv_ms, regime = regime_inv.pop(op.key or "", (ms, v["regime"]))
                    facts.regimes.append((inv_ms, ms, regime, str(op.type)))
        elif f == F.FAULT:
            key = op.key or ""
            phase = v.get("phase")
            if phase == "start" and op.type == OpType.INVOKE:
                open_faults[key] = FaultWindow(v.get("kind", "?"), key, ms, None,
                                               target=v.get("target"))
            elif phase == "start" and op.type == OpType.FAIL and key in open_faults:
                open_faults.pop(key).ok = False
            elif phase == "stop" and op.type != OpType.INVOKE and key in open_faults:
                w = open_faults.pop(key)
                w.stop_ms = ms
                facts.faults.append(w)
        elif f == F.PROBE and op.key:
            p = facts.probes.setdefault(op.key, {"probe": v.get("probe"), "symbol": op.symbol})
            if op.type != OpType.INVOKE:
                p.update(status=str(op.type), decision=v.get("decision"),
                         reason=v.get("reason", ""))
        elif f == F.PHASE and op.key:
            facts.phases.setdefault(op.key, {})[str(op.type)] = ms
            if op.key == "stream_reset":
                facts.stream_resets += 1
        elif f == F.GOVERNOR:
            facts.governor_events.append({"ms": ms, **v})
    for inv_ms, regime in regime_inv.values():  # invoked, never completed: unknown
        facts.regimes.append((inv_ms, 2**62, regime, "info"))
    facts.regimes.sort()
    facts.faults.extend(open_faults.values())
    facts.faults.sort(key=lambda w: w.start_ms)
    facts.orders = load_ledger(run_dir)
    if not facts.capital:
        facts.capital = float(meta.get("scenario_spec", {}).get("market", {}).get("capital", 0))
        facts.allocation_pct = float(meta.get("scenario_spec", {}).get("market", {})
                                     .get("allocation_pct", 0))
    return facts

"""One checker per invariant of the protocol (docs/protocol.md, "Invariants").

Each is ``check(facts) -> CheckResult`` with ``valid`` True, False, or None
(unknown: the history cannot decide, e.g. the run was cut short). A
violation names the time, symbol and plans, the bound and what was observed,
and the few events that show it. Outcomes that are unknown (an ``info`` op,
a regime flip in flight) are read in the governor's favour: a violation is
reported only when every reading of them violates.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from itertools import count, repeat
from operator import attrgetter, itemgetter
from typing import Any

from chaos.checkers.facts import BadDecision, Decision, Facts, LedgerOrder, Submit
from chaos.history import history_files

_WALL_MS = attrgetter("wall_ms")
_START = itemgetter(0)
_OPEN_AFTER = attrgetter("open_count_after")

INVARIANTS = ("slots", "one_position_per_symbol", "single_close", "capital", "fresh_intent",
              "one_decision", "liveness", "protocol")


@dataclass(frozen=True)
class Violation:
    invariant: str
    wall_ms: int
    symbol: str | None
    plan_ids: tuple[str, ...]
    expected: str
    observed: str
    message: str
    events: tuple[dict[str, Any], ...] = ()
    faults: tuple[str, ...] = ()  # faults active at the time
    # The fewest operations that still show it (chaos.checkers.minimize), when searched.
    minimal_witness: dict[str, Any] | None = field(default=None, compare=False)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["plan_ids"] = list(self.plan_ids)
        d["events"] = list(self.events)
        d["faults"] = list(self.faults)
        if self.minimal_witness is None:
            del d["minimal_witness"]
        return d


@dataclass
class CheckResult:
    invariant: str
    valid: bool | None
    violations: list[Violation] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"invariant": self.invariant,
                "valid": "unknown" if self.valid is None else self.valid,
                "violations": len(self.violations), "stats": self.stats, "note": self.note}


def _order_event(o: LedgerOrder) -> dict[str, Any]:
    return {"what": "order", "seq": o.seq, "plan_id": o.plan_id, "symbol": o.symbol,
            "action": o.action, "effect": o.effect, "position_id": o.position_id,
            "open_count_after": o.open_count_after, "wall_ms": o.wall_ms,
            "issued_at_ms": o.issued_at_ms, "notional": o.notional}


def _decision_event(d: Decision) -> dict[str, Any]:
    return {"what": "decision", "plan_id": d.plan_id, "symbol": d.symbol, "action": d.action,
            "decision": d.decision, "reason": d.reason, "governor": d.governor,
            "entry_ms": d.entry_ms, "fence": d.fence}


def _issued_ms(facts: Facts, o: LedgerOrder) -> int:
    if o.issued_at_ms:
        return o.issued_at_ms
    p = facts.permit(o.plan_id)
    return p.entry_ms if p else o.wall_ms


# -- explanations: the events that make a violation one (built only once one is found) -------
def _opened_event(o: LedgerOrder) -> dict[str, Any]:
    """A position open at the time, by the order that opened it."""
    return {"what": "open position", "plan_id": o.plan_id, "symbol": o.symbol,
            "position_id": o.position_id, "effect": o.effect, "wall_ms": o.wall_ms}


def _open_positions_before(facts: Facts, seqs: set[int]) -> dict[int, list[LedgerOrder]]:
    """For each ledger seq in ``seqs``: the positions open just before that order executed.

    One replay of the ledger (an OPEN or a flip opens, a close flattens, an add keeps the
    position), run only when a violation needs it.
    """
    open_on: dict[str, LedgerOrder] = {}
    out: dict[int, list[LedgerOrder]] = {}
    for o in facts.orders:
        if o.seq in seqs:
            out[o.seq] = sorted(open_on.values(), key=_WALL_MS)
        _apply_order(open_on, o)
    return out


def _apply_order(open_on: dict[str, LedgerOrder], o: LedgerOrder) -> None:
    if o.effect in ("open", "flip"):
        open_on[o.symbol] = o
    elif o.effect == "close":
        open_on.pop(o.symbol, None)


def _open_positions_at(facts: Facts, ms: int) -> dict[str, LedgerOrder]:
    """The positions open on the exchange at ``ms`` (orders executed by then)."""
    open_on: dict[str, LedgerOrder] = {}
    for o in facts.orders:
        if o.wall_ms > ms:
            break
        _apply_order(open_on, o)
    return open_on


def _permit_events(facts: Facts, orders: list[LedgerOrder]) -> list[dict[str, Any]]:
    """The PERMIT decisions behind ``orders`` (governor, time, fence), then the orders."""
    out = []
    for o in orders:
        p = facts.permit(o.plan_id)
        if p is not None:
            out.append(_decision_event(p))
        out.append(_order_event(o))
    return sorted(out, key=lambda e: e.get("entry_ms") or e.get("wall_ms") or 0)


def _finish(name: str, violations: list[Violation], stats: dict[str, Any],
            unknown: str = "") -> CheckResult:
    if violations:
        return CheckResult(name, False, violations, stats)
    if unknown:
        return CheckResult(name, None, [], stats, unknown)
    return CheckResult(name, True, [], stats)


# -- slots ----------------------------------------------------------------------------------
def check_slots(facts: Facts) -> CheckResult:
    cfg = facts.config
    vs: list[Violation] = []
    peak = max(map(_OPEN_AFTER, facts.orders), default=0)
    # Only an order above max_positions, or an OPEN with at least the fewest slots any regime
    # of the run allows already open, can break the bound: the others are passed over.
    fewest = min(cfg.slots_for(r) for r in {facts.initial_regime, *(x[2] for x in facts.regimes)})
    suspects = [o for o in facts.orders if o.open_count_after > fewest]
    explain: list[tuple[LedgerOrder, set[str] | None, int]] = []  # (order, regimes, slots)
    for o in suspects:
        if o.open_count_after > cfg.max_positions:
            vs.append(Violation("slots", o.wall_ms, o.symbol, (o.plan_id,),
                                f"<= {cfg.max_positions} open (max_positions)",
                                f"{o.open_count_after} open", f"{o.open_count_after} positions "
                                f"open after {o.plan_id}, above max_positions "
                                f"{cfg.max_positions}", (_order_event(o),),
                                tuple(facts.fault_at(o.wall_ms))))
            explain.append((o, None, cfg.max_positions))
            continue
        if o.action != "OPEN" or o.effect != "open":
            continue
        before = o.open_count_after - 1
        issued = _issued_ms(facts, o)
        regimes = facts.regime_at(issued)
        allowed = max(cfg.slots_for(r) for r in regimes)
        if before >= allowed:
            p = facts.permit(o.plan_id)
            vs.append(Violation(
                "slots", o.wall_ms, o.symbol, (o.plan_id,),
                f"< {allowed} open before an OPEN executes (regime "
                f"{'/'.join(sorted(regimes))} at permit time)",
                f"{before} open", f"OPEN {o.plan_id} on {o.symbol} executed with {before} "
                f"positions already open; the regime in force when its permit was issued "
                f"allows {allowed}",
                tuple(x for x in (_decision_event(p) if p else None, _order_event(o)) if x),
                tuple(facts.fault_at(o.wall_ms))))
            explain.append((o, regimes, allowed))
    if vs:
        vs = _explain_slots(facts, vs, explain)
    return _finish("slots", vs, {"peak_open_positions": peak, "orders": len(facts.orders)})


def _explain_slots(facts: Facts, vs: list[Violation],
                   explain: list[tuple[LedgerOrder, set[str] | None, int]]) -> list[Violation]:
    """Each slot violation with the positions open at that moment and the permit's regime."""
    before = _open_positions_before(facts, {o.seq for o, _r, _n in explain})
    out = []
    for v, (o, regimes, allowed) in zip(vs, explain, strict=True):
        held = before.get(o.seq, [])
        p = facts.permit(o.plan_id)
        events: list[dict[str, Any]] = []
        if p is not None:
            events.append(_decision_event(p))
        if regimes is not None:
            events.append({"what": "regime at permit", "regime": "/".join(sorted(regimes)),
                           "slots": allowed, "wall_ms": _issued_ms(facts, o)})
        events += [_opened_event(x) for x in held]
        events.append(_order_event(o))
        held_txt = ", ".join(f"{x.symbol} ({x.plan_id})" for x in held)
        out.append(replace(
            v, events=tuple(events),
            message=f"{v.message}; open before it: {held_txt or 'none'}"))
    return out


# -- one position per symbol --------------------------------------------------------------
def check_one_position_per_symbol(facts: Facts) -> CheckResult:
    vs = []
    for o in facts.orders:
        if o.effect == "add":
            vs.append(Violation("one_position_per_symbol", o.wall_ms, o.symbol, (o.plan_id,),
                                "OPEN only on a flat symbol", "OPEN on an open symbol",
                                f"OPEN {o.plan_id} added to the open position {o.position_id} "
                                f"on {o.symbol} (a double open)", (_order_event(o),),
                                tuple(facts.fault_at(o.wall_ms))))
    return _finish("one_position_per_symbol", vs, {})


# -- single close ---------------------------------------------------------------------------
def check_single_close(facts: Facts) -> CheckResult:
    vs: list[Violation] = []
    closes_by_position: dict[str, list[LedgerOrder]] = defaultdict(list)
    flips: list[LedgerOrder] = []
    for o in [o for o in facts.orders if o.action == "CLOSE"]:
        if o.effect == "flip":
            flips.append(o)
        elif o.effect == "close":
            closes_by_position[o.position_id].append(o)
    if flips:
        vs += _explain_flips(facts, flips)
    for pid, closes in closes_by_position.items():
        if len(closes) > 1:
            o = closes[1]
            vs.append(Violation("single_close", o.wall_ms, o.symbol,
                                tuple(c.plan_id for c in closes), "one executed close",
                                f"{len(closes)} closes", f"position {pid} closed {len(closes)} "
                                f"times", tuple(_permit_events(facts, closes)),
                                tuple(facts.fault_at(o.wall_ms))))
    # No two CLOSE permits of one symbol outstanding at once.
    permits: dict[str, list[tuple[int, int, Decision]]] = defaultdict(list)
    for d, end, _lapsed in facts.close_permit_spans():
        permits[d.symbol].append((d.entry_ms, end, d))
    overlaps = 0
    for sym, spans in permits.items():
        if len(spans) > 1:
            spans.sort(key=_START)
        for (s1, e1, d1), (s2, _e2, d2) in zip(spans, spans[1:], strict=False):
            if s2 < e1:
                overlaps += 1
                vs.append(Violation(
                    "single_close", s2, sym, (d1.plan_id, d2.plan_id),
                    "at most one CLOSE permit of a symbol outstanding",
                    "two outstanding", f"CLOSE permit {d2.plan_id} on {sym} issued at {s2} "
                    f"while permit {d1.plan_id} (issued {s1}) was outstanding until {e1}",
                    _overlap_events(facts, d1, d2), tuple(facts.fault_at(s2))))
    return _finish("single_close", vs, {"close_permits": sum(len(v) for v in permits.values()),
                                        "overlapping_permits": overlaps})


def _explain_flips(facts: Facts, flips: list[LedgerOrder]) -> list[Violation]:
    """A close on a flat symbol, with the close that made it flat and both permits."""
    wanted = {o.symbol for o in flips}
    flip_seqs = {o.seq for o in flips}
    last_close: dict[str, LedgerOrder] = {}  # per symbol, the last close before each flip
    made_flat: dict[int, LedgerOrder | None] = {}
    for o in facts.orders:
        if o.symbol not in wanted:
            continue
        if o.seq in flip_seqs:
            made_flat[o.seq] = last_close.get(o.symbol)
        if o.effect == "close":
            last_close[o.symbol] = o
        elif o.effect in ("open", "flip"):
            last_close.pop(o.symbol, None)
    out = []
    for o in flips:
        prev = made_flat.get(o.seq)
        plans = (prev.plan_id, o.plan_id) if prev is not None else (o.plan_id,)
        why = (f"; {prev.plan_id} had closed {prev.position_id} "
               f"{(o.wall_ms - prev.wall_ms) / 1000:.3f} s before"
               if prev is not None else "; no close of this symbol before it in the ledger")
        out.append(Violation(
            "single_close", o.wall_ms, o.symbol, plans, "CLOSE only on an open position",
            "CLOSE on a flat symbol", f"CLOSE {o.plan_id} executed on flat {o.symbol}: the "
            f"account flipped into a new position {o.position_id} (a double close){why}",
            tuple(_permit_events(facts, [prev, o] if prev is not None else [o])),
            tuple(facts.fault_at(o.wall_ms))))
    return out


def _overlap_events(facts: Facts, d1: Decision, d2: Decision) -> tuple[dict[str, Any], ...]:
    """Both CLOSE permits, and what each led to on the exchange."""
    first = facts.first_order()
    events = [_decision_event(d1), _decision_event(d2)]
    events += [_order_event(o) for o in (first.get(d1.plan_id), first.get(d2.plan_id)) if o]
    return tuple(sorted(events, key=lambda e: e.get("entry_ms") or e.get("wall_ms") or 0))


# -- capital --------------------------------------------------------------------------------
def check_capital(facts: Facts) -> CheckResult:
    cfg = facts.config
    vs: list[Violation] = []
    enforce_alloc = cfg.enforce_allocation != 0 or cfg.mode == "production"
    alloc_cap = facts.capital * facts.allocation_pct
    # Timeline of OPEN permits (Redis time) and executions (ledger): open + permitted notional.
    # Events are (ms, kind, n, x), kind 0 a permit, 1 a permit settling without an order, 2 an
    # order (which settles its plan's permit too); n keeps ties in insertion order.
    opens_exec = {o.plan_id: o for o in facts.orders if o.action == "OPEN" and o.executed}
    events: list[tuple[int, int, int, Any]] = []
    notional_of = facts.notional
    max_trade = cfg.max_notional_per_trade + 1e-9
    ttl = cfg.permit_ttl_ms
    n = 0
    for pid, d in facts.permits().items():
        if d.action != "OPEN":
            continue
        notional = notional_of(pid)
        if notional is None:
            continue
        if notional > max_trade:
            vs.append(Violation("capital", d.entry_ms, d.symbol, (pid,),
                                f"<= {cfg.max_notional_per_trade} per trade", f"{notional}",
                                f"OPEN {pid} permitted for {notional}, above "
                                f"max_notional_per_trade", (_decision_event(d),),
                                tuple(facts.fault_at(d.entry_ms))))
        t = d.entry_ms
        events.append((t, 0, n, (pid, d, _micro(notional))))
        n += 1
        o = opens_exec.get(pid)
        if o is not None and o.wall_ms >= t:
            continue  # settled by its order's event (the same time, after every permit)
        if o is not None:
            end = o.wall_ms
        else:
            fails = facts.failed_takes(pid)
            end = min(fails) if fails else t + ttl
        events.append((max(end, t), 1, n, pid))
        n += 1
    orders = facts.orders
    events.extend(zip(map(_WALL_MS, orders), repeat(2), count(n), orders))
    events.sort()  # by time, then kind, then insertion: plain tuple order, no key function
    # Running totals (open + permitted, overall and per symbol), O(1) per event, kept in
    # integer micro-units so that a million additions and removals do not drift.
    pending: dict[str, tuple[str, int]] = {}
    open_on: dict[str, int] = defaultdict(int)
    pending_on: dict[str, int] = defaultdict(int)
    total = 0
    max_total = _micro(cfg.max_total_notional)
    max_on = _micro(alloc_cap)
    check_on = enforce_alloc and alloc_cap > 0
    no_pending = ("", 0)

    for _ms, kind, _n, x in events:
        if kind == 0:
            pid, d, m = x
            if pid in pending:
                sym, was = pending.pop(pid)
                pending_on[sym] -= was
                total -= was
            sym = d.symbol
            pending[pid] = (sym, m)
            pending_on[sym] += m
            total += m
            if total > max_total + 1:
                vs.append(Violation("capital", d.entry_ms, sym, (pid,),
                                    f"<= {cfg.max_total_notional} open + permitted",
                                    f"{total / 1e6:.2f}", f"OPEN {pid} permitted with "
                                    f"{total / 1e6:.2f} open + permitted in total",
                                    (_decision_event(d),), tuple(facts.fault_at(d.entry_ms))))
            if check_on:
                on_sym = open_on[sym] + pending_on[sym]
                if on_sym > max_on + 1:
                    vs.append(Violation("capital", d.entry_ms, sym, (pid,),
                                        f"<= {alloc_cap:.2f} on {sym} (capital x "
                                        f"allocation_pct)", f"{on_sym / 1e6:.2f}",
                                        f"OPEN {pid} permitted with {on_sym / 1e6:.2f} open + "
                                        f"permitted on {sym}", (_decision_event(d),),
                                        tuple(facts.fault_at(d.entry_ms))))
            continue
        if kind == 1:
            sym, was = pending.pop(x, no_pending)
            if sym:
                pending_on[sym] -= was
                total -= was
            continue
        o: LedgerOrder = x
        sym, was = pending.pop(o.plan_id, no_pending)
        if sym:
            pending_on[sym] -= was
            total -= was
        if not o.executed:
            continue
        sym = o.symbol
        before = open_on[sym]
        if o.action == "OPEN":
            open_on[sym] = before + _micro(o.notional)
        elif o.effect == "close":
            open_on[sym] = 0
        elif o.effect == "flip":
            open_on[sym] = _micro(o.notional)
        total += open_on[sym] - before
    return _finish("capital", vs, {"allocation_enforced": enforce_alloc})


def _micro(x: float) -> int:
    return round(x * 1_000_000)


# -- fresh intent ---------------------------------------------------------------------------
def check_fresh_intent(facts: Facts) -> CheckResult:
    max_age = facts.config.max_intent_age_ms
    vs = []
    checked = 0
    created_ms = facts.created_ms
    for pid, ds in facts.decisions.items():
        for d in ds:
            if d.decision != "PERMIT":
                continue
            created = created_ms(pid)
            if created is None:
                continue
            checked += 1
            age = d.entry_ms - created
            if age > max_age:
                vs.append(Violation("fresh_intent", d.entry_ms, d.symbol, (pid,),
                                    f"age <= {max_age} ms at decision", f"{age} ms",
                                    f"{d.action} {pid} permitted {age} ms after its intent was "
                                    f"created", (_decision_event(d),),
                                    tuple(facts.fault_at(d.entry_ms))))
    return _finish("fresh_intent", vs, {"permits_checked": checked})


# -- one decision ---------------------------------------------------------------------------
def check_one_decision(facts: Facts, deadline_ms: int = 60_000) -> CheckResult:
    vs: list[Violation] = []
    # Plans submitted after the faults healed may still be waiting for their decision; so
    # may those after a cutoff (an import's last entry, or the end of a run that stopped
    # while its governors were behind, minus the decision deadline): the earlier one holds.
    ends = [ms for ms in (facts.phases.get("heal", {}).get("ok"),
                          facts.phases.get("cutoff", {}).get("ok")) if ms]
    end_ms = min(ends) if ends else facts.last_ms or 0
    data_lost = facts.stream_resets > 0
    expected = 0
    decisions = facts.decisions
    for pid, s in facts.submits.items():
        ds = decisions.get(pid, ())
        if len(ds) == 1 and s.status == "ok" and not s.malformed:  # the common case
            expected += 1
            if ds[0].entry_ms - s.wall_ms > deadline_ms:
                vs.append(_late(facts, pid, ds[0], s, deadline_ms))
            continue
        if len(ds) > 1:
            differ = len({(d.decision, d.reason) for d in ds}) > 1
            vs.append(Violation("one_decision", ds[1].entry_ms, ds[0].symbol, (pid,),
                                "exactly one decision", f"{len(ds)} decisions",
                                f"plan {pid} got {len(ds)} decisions"
                                f"{' that differ' if differ else ''}",
                                tuple(_decision_event(d) for d in ds),
                                tuple(facts.fault_at(ds[1].entry_ms))))
            continue
        if s.status != "ok" or s.malformed and not _answerable(s):
            continue  # unknown whether it was added, or nothing to answer to
        expected += 1
        if ds:
            if ds[0].entry_ms - s.wall_ms > deadline_ms:
                vs.append(_late(facts, pid, ds[0], s, deadline_ms))
            continue
        if data_lost:
            continue  # the plan may have been lost with Redis's data: unknown, not invalid
        if s.wall_ms > end_ms:
            continue
        vs.append(Violation("one_decision", s.wall_ms, s.symbol, (pid,),
                            "exactly one decision", "none", f"plan {pid} was never decided",
                            ({"what": "submit", "plan_id": pid, "wall_ms": s.wall_ms},),
                            tuple(facts.fault_at(s.wall_ms))))
    # Decisions for plans of other origins (rotation) may also be doubled.
    submits = facts.submits
    for pid, ds in decisions.items():
        if len(ds) > 1 and pid not in submits:
            vs.append(Violation("one_decision", ds[1].entry_ms, ds[0].symbol, (pid,),
                                "exactly one decision", f"{len(ds)} decisions",
                                f"plan {pid} got {len(ds)} decisions",
                                tuple(_decision_event(d) for d in ds),
                                tuple(facts.fault_at(ds[1].entry_ms))))
    note = "Redis lost data during the run: undecided plans are unknown" if data_lost else ""
    return _finish("one_decision", vs, {"plans_expected": expected}, note if data_lost and
                   not vs else "")


def _late(facts: Facts, pid: str, d: Decision, s: Submit, deadline_ms: int) -> Violation:
    return Violation("one_decision", d.entry_ms, d.symbol, (pid,),
                     f"a decision within {deadline_ms} ms", f"after {d.entry_ms - s.wall_ms} ms",
                     f"plan {pid} was decided late", (_decision_event(d),),
                     tuple(facts.fault_at(d.entry_ms)))


def _answerable(s: Submit) -> bool:
    pid = s.plan_id
    return isinstance(pid, str) and 0 < len(pid) <= 64 and all(
        c.isalnum() or c in "_.:-" for c in pid)


# -- liveness -------------------------------------------------------------------------------
def check_liveness(facts: Facts) -> CheckResult:
    if not facts.probes:
        return CheckResult("liveness", None, note="no liveness probe in this run")
    vs = []
    failed = [(pid, p) for pid, p in facts.probes.items() if p.get("decision") != "PERMIT"]
    for pid, p in failed:
        observed = p.get("reason") or ("no decision" if p.get("decision") is None
                                       else p.get("decision"))
        vs.append(Violation("liveness", facts.phases.get("probe", {}).get("invoke", 0),
                            p.get("symbol"), (pid,), f"probe {p.get('probe')} permitted",
                            str(observed), f"liveness probe {p.get('probe')} {pid} on "
                            f"{p.get('symbol')} was not permitted: {observed}", ()))
    if vs:
        vs = _explain_liveness(facts, vs, failed)
    return _finish("liveness", vs, {"probes": len(facts.probes)})


# -- protocol ---------------------------------------------------------------------------------
def check_protocol(facts: Facts) -> CheckResult:
    """Every PERMIT and BLOCK entry is one the protocol defines (docs/protocol.md,
    "Decisions"): a plan id, an action OPEN or CLOSE, a symbol on a PERMIT, and a
    ``decided_at_ms`` in epoch milliseconds. Malformed output of the governor under test
    is the governor's fault, so it is a violation here rather than a crash of the harness;
    the other checkers judge the rest (such an entry still answers its plan for
    ``one_decision``; with its action unknown it counts for no OPEN or CLOSE rule).

    A BLOCK may carry an action outside OPEN/CLOSE when the plan it answers had none
    valid (the protocol BLOCKs such plans ``invalid_plan``, symbol and action as given):
    it is a violation only when it answers a well-formed plan that a producer sent.
    Informational entries (neither PERMIT nor BLOCK) are skipped, as the protocol says.
    A CLOSE PERMIT without ``fence`` is not judged: no invariant depends on it, the
    audited designs predate fencing, and a fenced venue rejects such closes (which the
    ledger shows). Only the malformed entries are gone over: the cost is theirs."""
    vs: list[Violation] = []
    submits = facts.submits
    for b in facts.bad_decisions:
        problems = b.problems
        if b.odd_action and b.decision == "BLOCK":
            s = submits.get(b.plan_id) if b.plan_id is not None else None
            if s is None or s.malformed:
                # The plan had no protocol action to echo (or is not one we sent).
                problems = "; ".join(p for p in problems.split("; ") if not p.startswith(
                    "action "))
                if not problems:
                    continue
        vs.append(_protocol_violation(facts, b, problems))
    return _finish("protocol", vs, {"malformed_decisions": len(vs)})


def _protocol_violation(facts: Facts, b: BadDecision, problems: str) -> Violation:
    pid = b.plan_id if isinstance(b.plan_id, str) else None
    event = {"what": "decision", "plan_id": b.plan_id, "symbol": b.symbol, "action": b.action,
             "decision": b.decision, "reason": b.reason, "governor": b.governor,
             "decided_at_ms": b.decided_at_ms, "entry_ms": b.entry_ms, "entry_id": b.entry_id}
    return Violation("protocol", b.entry_ms, b.symbol if isinstance(b.symbol, str) else None,
                     (pid,) if pid else (), "a decision entry as docs/protocol.md defines it",
                     problems, f"{b.decision} entry {b.entry_id or '?'}"
                     f"{' for ' + pid if pid else ''} from {b.governor or '?'} breaks the "
                     f"protocol: {problems}", (event,), tuple(facts.fault_at(b.entry_ms)))


def _permit_end(facts: Facts, d: Decision) -> int:
    """When a permit stopped being outstanding: its order, a failed take, a result other
    than executed, else its expiry (the single_close rule, for either action)."""
    ends = list(facts.take_fails.get(d.plan_id, ()))
    ends += [ms for ms, _status in facts.aborts.get(d.plan_id, ())]
    o = facts.first_order().get(d.plan_id)
    if o is not None:
        ends.append(o.wall_ms)
    return max(min(ends), d.entry_ms) if ends else d.entry_ms + facts.config.permit_ttl_ms


def _results_sent(facts: Facts, symbols: set[str], until_ms: int) -> dict[str, dict[str, Any]]:
    """The last apply result entry (a release) per symbol up to ``until_ms``.

    Executed results are not kept in the facts (the ledger says what executed), so this
    reads the history again: only when a liveness violation needs it.
    """
    last: dict[str, dict[str, Any]] = {}
    for path in history_files(facts.run_dir):
        with open(path, "rb") as fh:
            for line in fh:
                if b'"f":"result"' not in line:
                    continue
                try:
                    op = json.loads(line)
                except ValueError:
                    continue
                v = op.get("value") or {}
                sym = v.get("symbol")
                ms = v.get("entry_ms") or op.get("wall_ms") or 0
                if sym not in symbols or not isinstance(ms, int) or ms > until_ms:
                    continue
                if sym not in last or ms >= last[sym]["entry_ms"]:
                    last[sym] = {"what": "result sent", "plan_id": v.get("plan_id"),
                                 "symbol": sym, "action": v.get("action"),
                                 "effect": v.get("status"), "position_id": v.get("position_id"),
                                 "fence": v.get("fence"), "entry_ms": ms}
    return last


def _explain_liveness(facts: Facts, vs: list[Violation],
                      failed: list[tuple[str, dict[str, Any]]]) -> list[Violation]:
    """What the exchange held when the probe was answered, against the governor's answer,
    and the last releases (apply results) for the symbols concerned. The violation's time
    becomes that answer's (the probe phase starts with a wait for every TTL to lapse)."""
    cfg = facts.config
    probe_ms = facts.phases.get("probe", {}).get("invoke", 0)
    permits = [d for pid, d in facts.permits().items() if pid not in facts.probes]
    answers = {}
    for pid, _p in failed:
        ds = facts.decisions.get(pid)
        answers[pid] = ds[0].entry_ms if ds else (facts.last_ms or probe_ms)
    plan: list[tuple[int, set[str], list[dict[str, Any]], str]] = []
    wanted: set[str] = set()
    for (pid, p), v in zip(failed, vs, strict=True):
        at = answers[pid]
        held = _open_positions_at(facts, at)
        outstanding = [d for d in permits if d.entry_ms <= at < _permit_end(facts, d)]
        regimes = facts.regime_at(at)
        slots = max(cfg.slots_for(r) for r in regimes)
        events: list[dict[str, Any]] = [
            {"what": "probe", "plan_id": pid, "symbol": p.get("symbol"),
             "action": str(p.get("probe") or "").upper(), "decision": p.get("decision") or "",
             "reason": p.get("reason") or "", "entry_ms": at},
            {"what": "exchange at probe", "open_positions": len(held),
             "outstanding_permits": len(outstanding), "regime": "/".join(sorted(regimes)),
             "slots": slots, "wall_ms": at}]
        events += [_opened_event(o) for o in sorted(held.values(), key=_WALL_MS)]
        events += [_decision_event(d) for d in outstanding]
        if p.get("probe") == "close":
            sym = p.get("symbol") or ""
            pos = held.get(sym)
            closing = [d for d in outstanding if d.action == "CLOSE" and d.symbol == sym]
            text = (f"the exchange held {sym} open"
                    f"{f' ({pos.position_id})' if pos else ' (not any more)'} with "
                    f"{len(closing)} outstanding CLOSE permits, yet the governor answered "
                    f"{v.observed}")
            symbols = {sym}
        else:
            opens = [d for d in outstanding if d.action == "OPEN"]
            leaked = slots - len(held) - len(opens)
            text = (f"{len(held)} open positions and {len(opens)} outstanding OPEN permits on "
                    f"the exchange against {slots} slots ({'/'.join(sorted(regimes))}), yet "
                    f"the governor answered {v.observed}")
            if leaked > 0 and v.observed == "active_slots_waiting_rotation_close":
                text += f": {leaked} slot{'s' if leaked != 1 else ''} leaked"
            # The symbols released last: the slots a governor failed to free are theirs.
            closed: dict[str, int] = {}
            for o in facts.orders:
                if o.wall_ms > at:
                    break
                if o.effect == "close":
                    closed[o.symbol] = o.wall_ms
                elif o.effect in ("open", "flip"):
                    closed.pop(o.symbol, None)
            recent = sorted(closed, key=closed.__getitem__, reverse=True)
            symbols = set(recent[:min(10, max(leaked, 3))])
        wanted |= symbols
        plan.append((at, symbols, events, text))
    sent = _results_sent(facts, wanted, max(answers.values(), default=0))
    out = []
    for v, (at, symbols, events, text) in zip(vs, plan, strict=True):
        releases = sorted((sent[s] for s in symbols if s in sent), key=lambda e: e["entry_ms"])
        missing = sorted(s for s in symbols if s not in sent)
        if missing:
            text += f"; no result sent for {', '.join(missing)}"
        out.append(replace(v, wall_ms=at, message=f"{v.message}: {text}",
                           events=tuple(events + releases), faults=tuple(facts.fault_at(at))))
    return out


CHECKERS: dict[str, Callable[[Facts], CheckResult]] = {
    "slots": check_slots,
    "one_position_per_symbol": check_one_position_per_symbol,
    "single_close": check_single_close,
    "capital": check_capital,
    "fresh_intent": check_fresh_intent,
    "one_decision": check_one_decision,
    "liveness": check_liveness,
    "protocol": check_protocol,
}

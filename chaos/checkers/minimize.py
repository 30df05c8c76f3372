"""Minimal witnesses: for each violation, the fewest history operations that still show it.

A checker names a violation's plans and the events that make it one, but it judged the
whole history: a reader of a 10^6-operation import wants the handful of stream entries
that, on their own, still break the invariant. This module finds them offline and
deterministically (no Redis, no governor): the violation's checker is re-run on subsets
of the history and ddmin (delta debugging, Zeller and Hildebrandt 2002) shrinks the set
while the checker still reports the violation.

What the oracle asks of a subset, strictest first (the first that the candidates pass is
kept and reported as ``match``):

- ``same violation``: the same invariant, time, symbol and plans;
- ``same plans``: the same invariant, symbol and plans at another time;
- ``same invariant``: any violation of that invariant.

Candidates, widest last (``searched``), each tried only when the narrower ones do not show
the violation: the operations of the plans the violation names (its plans and every plan
in its events; their ledger orders), then also every operation on its symbol up to its
time, then every operation up to its time (the two wider ones only on histories of at
most ``scan_ops`` operations, the widest only with at most ``max_candidates``). The
operations whose meaning is a bound rather than an event (``operator``: config, regime,
capital; ``phase``: heal, cutoff, probe) are context: always kept, never minimised,
listed apart, so that no witness is a violation only because a cut-off or a regime flip
was dropped. Faults and governor process events never change a verdict and
are left out.

For a recorded run the ledger (the exchange's own record) is ground truth: its orders are
candidates like history operations, and an order carries what the exchange saw then
(``open_count_after``, ``effect``). For an import the ledger is derived from the executed
results (chaos.importer.replay_results), so it is derived again from each subset: there a
double close needs the opening result and both closes.

ddmin runs over plans first (a plan's operations removed together), then over single
operations, after a linear sweep when there are more than 64 of them; each subset is
judged once (cached). ``one_minimal`` is True only when removing any single operation of
the witness was tested and made the violation disappear. A search stops at ``max_work``
operations judged (the same on any machine) or, as a safety net, at its time budget
(``violation_budget_s``, and ``budget_s`` for the run); cut short, it keeps the smallest
set found so far and says so. At most
``per_invariant`` violations of each invariant are minimised (the first in time order);
the others are counted (``left``).
"""

from __future__ import annotations

import gc
import json
import re
import sqlite3
import time
from bisect import bisect_right
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import msgspec

from chaos.checkers.facts import Facts, LedgerOrder, _blocks, facts_of_lines
from chaos.checkers.invariants import CHECKERS, CheckResult, Violation
from chaos.history import HISTORY_DIR, history_files

__all__ = ["MinimizeOptions", "WitnessSearch", "ddmin", "minimize", "minimize_verdict",
           "reproduces", "witness_items", "write_witness_run"]

CONTEXT_F = ("operator", "phase")
# The operations a checker reads (a take only when it failed); orders are the ledger's.
CANDIDATE_F = ("submit", "plan", "decision", "take", "result", "probe")
TIERS = ("same violation", "same plans", "same invariant")
LEVELS = ("named plans", "symbol up to its time", "history up to its time")


@dataclass(frozen=True)
class MinimizeOptions:
    """Bounds of the search; the defaults keep ``chaos check`` within seconds."""

    # Operations judged per violation, summed over the checker runs: the bound that stops
    # a search, the same on any machine (about 1 s of checking per 10^6 here).
    max_work: int = 2_000_000
    violation_budget_s: float = 3.0  # a safety net on a slow or loaded machine
    budget_s: float = 15.0
    per_invariant: int = 5
    scan_ops: int = 200_000  # the widest candidates only on histories up to this long...
    max_candidates: int = 5_000  # ... and only when they are at most this many


@dataclass(slots=True)
class _Item:
    """One candidate: a history line (by file and line) or a ledger order (by seq)."""

    ref: str
    f: str
    type: str
    key: Any
    symbol: Any
    wall_ms: int
    time_ns: int
    process: str = ""
    line: bytes | None = None
    order: LedgerOrder | None = None
    _value: dict[str, Any] | None = None

    @property
    def value(self) -> dict[str, Any]:
        if self._value is None:
            v = json.loads(self.line).get("value") if self.line else None
            self._value = v if isinstance(v, dict) else {}
        return self._value

    @property
    def sort_key(self) -> tuple[int, int, str, str]:
        if self.order is not None:
            return (1, self.order.seq, "", "")
        return (0, self.time_ns, self.process, self.ref)


class _Light(msgspec.Struct):
    f: Any = None
    type: Any = None
    key: Any = None
    symbol: Any = None
    wall_ms: Any = 0
    time_ns: Any = 0
    process: Any = ""


_LIGHT = msgspec.json.Decoder(_Light)


def _int(x: Any) -> int:
    try:
        return int(x)
    except (TypeError, ValueError):
        return 0


def _history_item(ref: str, line: bytes) -> _Item | None:
    try:
        o = _LIGHT.decode(line)
    except msgspec.MsgspecError:
        return None
    return _Item(ref, str(o.f), str(o.type), o.key, o.symbol, _int(o.wall_ms), _int(o.time_ns),
                 str(o.process or ""), line)


def _order_item(o: LedgerOrder) -> _Item:
    return _Item(f"ledger:{o.seq}", "order", "ledger", o.plan_id, o.symbol, o.wall_ms, 0,
                 order=o)


def _select(run_dir: Path, pattern: re.Pattern[bytes],
            keep: Callable[[_Item], bool]) -> list[_Item]:
    """The history lines ``pattern`` finds (C-level search, block by block) that ``keep``
    accepts, named ``history/<file>:<line>``."""
    out: list[_Item] = []
    for path in history_files(run_dir):
        name = f"{HISTORY_DIR}/{path.name}"
        base = 0  # lines before the current block
        for _offset, block in _blocks((str(path), 0, None), 4 << 20):
            pos, before, last = 0, 0, -1  # newlines in block[:pos]: ``before``
            for m in pattern.finditer(block):
                start = block.rfind(b"\n", 0, m.start()) + 1
                if start == last:
                    continue  # the same line again
                last = start
                before += block.count(b"\n", pos, start)
                pos = start
                it = _history_item(f"{name}:{base + before + 1}",
                                   block[start:block.find(b"\n", start) + 1])
                if it is not None and keep(it):
                    out.append(it)
            base += block.count(b"\n")
    return out


def _alternation(field_name: str, values: Iterable[Any]) -> bytes:
    words = sorted({re.escape(json.dumps(v).encode()) for v in values})
    return rb'"' + field_name.encode() + rb'":\s*(?:' + b"|".join(words) + rb")\s*[,}]"


_CONTEXT = re.compile(rb'"f":\s*"(?:' + b"|".join(f.encode() for f in CONTEXT_F) + rb')"')
_CANDIDATE = re.compile(rb'"f":\s*"(?:' + b"|".join(f.encode() for f in CANDIDATE_F) + rb')"')


def _is_candidate(it: _Item) -> bool:
    return it.f in CANDIDATE_F and (it.f != "take" or it.type == "fail")


def _named(v: Violation) -> set[str]:
    """The plans a violation names: its own and every plan in its events."""
    ids = {p for p in v.plan_ids if isinstance(p, str) and p}
    ids |= {e["plan_id"] for e in v.events if isinstance(e.get("plan_id"), str) and e["plan_id"]}
    return ids


def _tier_key(v: Violation, tier: str) -> tuple[Any, ...]:
    if tier == TIERS[0]:
        return (v.invariant, v.wall_ms, v.symbol, tuple(v.plan_ids))
    if tier == TIERS[1]:
        return (v.invariant, v.symbol, tuple(v.plan_ids))
    return (v.invariant,)


class WitnessSearch:
    """The candidates of one run directory and the checker re-run on subsets of them.

    Built once per run (the context operations, the ledger, the history lines of the plans
    the violations name, read in one pass); wider candidates are read when a violation
    needs them."""

    def __init__(self, facts: Facts, options: MinimizeOptions | None = None,
                 named: Iterable[str] = ()) -> None:
        self.facts = facts
        self.options = options or MinimizeOptions()
        self.run_dir = Path(facts.run_dir)
        self.meta = facts.meta
        led = self.meta.get("ledger")
        self.derived = isinstance(led, dict) and led.get("derived_from") == "apply.result"
        window = self.meta.get("window")
        self.window_cut = bool(window.get("cuts_start")) if isinstance(window, dict) else False
        self._by_key: dict[str, list[_Item]] = {}
        # ledger orders as candidates (a recorded run; an import's ledger is derived), by
        # plan and by symbol, made only for the plans and symbols searched
        self._orders_of: dict[str, list[_Item]] = {}
        self._everything: list[_Item] | None = None
        self._symbols: dict[Any, list[_Item]] = {}
        self.symbols: set[str] = set()  # the symbols of the violations to be searched
        self._times: list[int] | None = None
        # judged on a directory that is not there: no checker reads the history again
        self.nowhere = self.run_dir / "\x00witness"
        self.tests = 0
        self.context: list[_Item] = []
        self.load_named(named, context=True)
        self.context.sort(key=lambda it: it.sort_key)
        self._context_block = b"".join(it.line for it in self.context)  # type: ignore[misc]

    # -- candidates --------------------------------------------------------------------------
    def load_named(self, keys: Iterable[str], context: bool = False) -> None:
        """Read the history lines of these plans (one pass for every violation at once;
        with ``context``, the context operations in the same pass)."""
        want = sorted(set(keys) - self._by_key.keys())
        if not want and not context:
            return
        for k in want:
            self._by_key[k] = []
        wanted = set(want)
        if not self.derived and want:
            for o in self.facts.orders:
                if o.plan_id in wanted:
                    self._orders_of.setdefault(o.plan_id, []).append(_order_item(o))
        for i in range(0, max(len(want), 1), 2000):  # a regex of a few thousand words at most
            words = [_alternation("key", want[i:i + 2000])] if want else []
            if context and i == 0:
                words.append(_CONTEXT.pattern)
            for it in _select(self.run_dir, re.compile(b"|".join(words)),
                              lambda it: _is_candidate(it) and it.key in wanted
                              or context and it.f in CONTEXT_F):
                if it.f in CONTEXT_F:
                    self.context.append(it)
                else:
                    self._by_key[it.key].append(it)

    def candidates(self, v: Violation, level: int) -> tuple[list[_Item] | None, str]:
        """The candidates at ``level`` (LEVELS), or None and why that level is not searched."""
        named = _named(v)
        self.load_named(named)
        out = {it.ref: it for k in sorted(named) for it in self._by_key.get(k, ())}
        out.update((it.ref, it) for k in sorted(named) for it in self._orders_of.get(k, ()))
        if level == 1 and not isinstance(v.symbol, str):
            return None, "no symbol"
        if level >= 1 and self.facts.ops > self.options.scan_ops:
            return None, f"history longer than {self.options.scan_ops} operations"
        if level == 2 and (about := self._about_before(v.wall_ms)) > \
                self.options.max_candidates:
            return None, f"about {about} candidates, more than {self.options.max_candidates}"
        if level >= 1:
            extra = self._symbol_items(v.symbol) if level == 1 else self._all_items()
            if not self.derived:
                extra += ([_order_item(o) for o in self.facts.orders] if level == 2 else
                          self._orders_of.get(f"\x00{v.symbol}", []))
            out.update((it.ref, it) for it in extra if it.wall_ms <= v.wall_ms and
                       it.ref not in out)
            if len(out) > self.options.max_candidates:
                return None, (f"{len(out)} candidates, more than "
                              f"{self.options.max_candidates}")
        return sorted(out.values(), key=lambda it: it.sort_key), ""

    def _about_before(self, ms: int) -> int:
        """About how many candidates there are up to ``ms``, from the facts (a submit's
        invoke and completion, plan entries, decisions, results, orders): the widest
        search is skipped, unread, when it would be too wide anyway."""
        if self._times is None:
            f = self.facts
            ts = [d.entry_ms for ds in f.decisions.values() for d in ds]
            ts += [s.wall_ms for s in f.submits.values()] * 2
            ts += [p.entry_ms for p in f.plans.values()]
            ts += f.executed_ms
            ts += [ms for rs in f.aborts.values() for ms, _status in rs]
            if not self.derived:
                ts += [o.wall_ms for o in f.orders]
            self._times = sorted(ts)
        return bisect_right(self._times, ms)

    def _symbol_items(self, symbol: str) -> list[_Item]:
        if symbol not in self._symbols:
            # every symbol a search may want, read in one pass
            want = {symbol} | (self.symbols - self._symbols.keys())
            for sym in want:
                self._symbols[sym] = []
            pat = re.compile(_alternation("symbol", want))
            for it in _select(self.run_dir, pat, lambda it: _is_candidate(it)
                              and it.symbol in want):
                self._symbols[it.symbol].append(it)
            if not self.derived:  # keyed apart from plan ids by a leading NUL
                for o in self.facts.orders:
                    if o.symbol in want:
                        self._orders_of.setdefault(f"\x00{o.symbol}", []).append(
                            _order_item(o))
        return list(self._symbols[symbol])

    def _all_items(self) -> list[_Item]:
        if self._everything is None:
            self._everything = _select(self.run_dir, _CANDIDATE, _is_candidate)
        return list(self._everything)

    # -- the oracle --------------------------------------------------------------------------
    def facts_of(self, items: Sequence[_Item]) -> Facts:
        """The facts of the context and ``items`` alone (in ``sort_key`` order: history
        lines, then ledger orders), as ``gather`` would find them."""
        hist = [it for it in items if it.line is not None]
        block = self._context_block + b"".join([it.line for it in hist])  # type: ignore[misc]
        if self.derived:
            orders = self._derive(hist)
        else:
            orders = [it.order for it in items if it.order is not None]
        return facts_of_lines(self.nowhere, self.meta, (block,), orders)  # type: ignore[arg-type]

    def _derive(self, hist: list[_Item]) -> list[LedgerOrder]:
        """An import's ledger, derived from the executed results among ``hist`` as the
        import derived it from all of them."""
        from chaos.importer import replay_results
        from chaos.recorder import _id_tuple

        executed, plans, permits = [], {}, {}
        for it in hist:
            v = it.value
            if it.f == "result" and v.get("status") == "executed":
                executed.append((str(v.get("entry_id") or f"{it.wall_ms}-0"), v))
            elif it.f == "plan" and isinstance(it.key, str):
                plans.setdefault(it.key, v)
            elif it.f == "decision" and v.get("decision") == "PERMIT" and it.key:
                permits.setdefault(it.key, _int(v.get("entry_ms")) or it.wall_ms)
        executed.sort(key=lambda e: _id_tuple(e[0]))
        rp, _positions = replay_results(executed, plans, permits, self.window_cut)
        return [LedgerOrder(r[0], r[1], r[2], r[3], r[4], float(r[5]),
                            "" if r[6] is None else str(r[6]), r[7], r[8], r[10], r[11], r[14])
                for r in rp.rows]

    def check(self, invariant: str, items: Sequence[_Item]) -> CheckResult:
        self.tests += 1
        return CHECKERS[invariant](self.facts_of(items))

    def shows(self, v: Violation, tier: str, items: Sequence[_Item]) -> bool:
        want = _tier_key(v, tier)
        return any(_tier_key(w, tier) == want for w in self.check(v.invariant, items).violations)


OPTIONS_DEFAULT = MinimizeOptions()


def ddmin(n_items: int, test: Callable[[list[int]], bool], deadline: float,
          groups: list[list[int]] | None = None,
          max_work: int | None = None, sweep_above: int = 64) -> tuple[list[int], bool]:
    """Zeller's ddmin over ``range(n_items)`` (``test(subset)`` True: still failing; the
    whole set must fail). With ``groups`` it first runs over the groups (each removed
    whole), then over the single items left. Over more than ``sweep_above`` units a
    linear sweep (each unit removed in turn, once) comes first, and ddmin only if that
    left at most ``sweep_above``: ddmin is quick when the failure needs a few units and
    slow (many more tests than units) when it needs many. Returns the set found and whether it was
    finished (1-minimal as far as ddmin's last round tested) before ``deadline`` and
    within ``max_work`` items tested, summed over the calls of ``test`` (a bound that,
    unlike the deadline, gives the same answer on any machine)."""
    cache: dict[tuple[int, ...], bool] = {}
    work = [0]

    def t(xs: list[int]) -> bool:
        k = tuple(xs)
        if k not in cache:
            work[0] += len(xs)
            cache[k] = test(xs)
        return cache[k]

    def spent() -> bool:
        return time.perf_counter() > deadline or (max_work is not None
                                                  and work[0] >= max_work)

    def run(units: list[list[int]]) -> tuple[list[list[int]], bool]:
        n = 2
        while len(units) >= 2:
            if spent():
                return units, False
            size = len(units)
            chunks = [units[i * size // n:(i + 1) * size // n] for i in range(n)]
            found = False
            for c in chunks:  # a subset that still fails
                if spent():
                    return units, False
                if len(c) < size and t(sorted(x for u in c for x in u)):
                    units, n, found = c, 2, True
                    break
            if not found:
                for i in range(n):  # a complement that still fails
                    rest = [u for j, c in enumerate(chunks) if j != i for u in c]
                    if spent():
                        return units, False
                    if t(sorted(x for u in rest for x in u)):
                        units, n, found = rest, max(n - 1, 2), True
                        break
            if not found:
                if n >= size:
                    return units, True
                n = min(2 * n, size)
        return units, True

    def sweep(units: list[list[int]]) -> tuple[list[list[int]], bool]:
        """One pass removing each unit in turn when the rest still fails: ``len(units)``
        tests, where ddmin needs many more once the failure needs many units (a capital
        total is the sum of every position open then)."""
        i = 0
        while i < len(units):
            if spent():
                return units, False
            rest = units[:i] + units[i + 1:]
            if rest and t(sorted(x for u in rest for x in u)):
                units = rest
            else:
                i += 1
        return units, True

    def minimise(units: list[list[int]]) -> tuple[list[list[int]], bool]:
        if len(units) > sweep_above:
            units, done = sweep(units)
            if not done or len(units) > sweep_above:
                return units, done
        return run(units)

    units, done = minimise(groups if groups is not None else [[i] for i in range(n_items)])
    if groups is not None and done:
        units, done = minimise([[x] for u in units for x in u])
    return sorted(x for u in units for x in u), done


@dataclass
class _Found:
    items: list[_Item]
    tier: str
    level: str
    candidates: int
    finished: bool
    one_minimal: bool
    tests: int
    note: str = ""


def _search(ws: WitnessSearch, v: Violation, deadline: float,
            max_work: int | None = None) -> _Found:
    """The smallest set found for ``v``: the strictest match first, over the narrowest
    candidates that show it. Without one, ``_Found`` with no items and a note of what was
    tried."""
    tests0 = ws.tests
    levels: dict[int, tuple[list[_Item] | None, str]] = {}
    tried: dict[str, str] = {}  # per level, what came of it
    for tier in TIERS:
        for level, level_name in enumerate(LEVELS):
            if time.perf_counter() > deadline:
                tried["time budget"] = "reached"
                return _Found([], tier, "", 0, False, False, ws.tests - tests0, _tried(tried))
            if level not in levels:
                levels[level] = ws.candidates(v, level)
            cands, why = levels[level]
            if cands is None:
                tried[level_name] = f"not searched ({why})"
                continue
            if not cands or not ws.shows(v, tier, cands):
                tried[level_name] = "do not show it"
                continue
            groups: dict[Any, list[int]] = {}
            for i, it in enumerate(cands):
                k = it.key if isinstance(it.key, str) and it.key else ("#", i)
                groups.setdefault(k, []).append(i)
            keep, finished = ddmin(len(cands), lambda xs, c=cands, tier=tier: ws.shows(
                v, tier, [c[i] for i in xs]), deadline, list(groups.values()), max_work)
            items = [cands[i] for i in keep]
            # 1-minimal: dropping any one operation must make the violation disappear
            # (tested here, each removal, whatever ddmin's last round covered).
            one_minimal = False
            if finished and len(items) <= 200:
                one_minimal = all(not ws.shows(v, tier, items[:i] + items[i + 1:])
                                  for i in range(len(items)))
            note = "" if finished else (
                "time budget reached" if time.perf_counter() > deadline else
                f"{max_work} operations judged") + ": the smallest set found so far"
            return _Found(items, tier, level_name, len(cands), finished, one_minimal,
                          ws.tests - tests0, note)
    return _Found([], "", "", 0, True, False, ws.tests - tests0, _tried(tried))


def _tried(tried: dict[str, str]) -> str:
    return "; ".join(f"{k}: {x}" for k, x in tried.items())


def _what(it: _Item) -> dict[str, Any]:
    """One witness operation, compact and readable."""
    if it.order is not None:
        o = it.order
        return {"ref": it.ref, "ms": o.wall_ms, "f": "order", "type": "ledger",
                "plan_id": o.plan_id, "symbol": o.symbol, "action": o.action,
                "outcome": o.effect, "detail": f"{o.position_id}, {o.open_count_after} open "
                                                f"after, seq {o.seq}"}
    v = it.value
    plan = v.get("plan") if isinstance(v.get("plan"), dict) else {}
    ms = _int(v.get("entry_ms")) or it.wall_ms
    outcome, detail = it.type, ""
    if it.f == "decision":
        outcome, detail = str(v.get("decision", "")), str(v.get("reason") or "")
        if v.get("governor"):
            detail = f"{detail} by {v['governor']}".strip()
    elif it.f == "result":
        outcome = str(v.get("status", ""))
    elif it.f == "probe":
        outcome = str(v.get("decision") or it.type)
        detail = str(v.get("probe") or "")
    created = (plan if it.f == "submit" and it.type == "invoke" else v if it.f == "plan"
               else {}).get("intent_created_at_ms")
    if created is not None:
        detail = f"intent created at {created}"  # as seconds since time 0 in ``_witness``
    return {"ref": it.ref, "ms": ms, "f": it.f, "type": it.type,
            "plan_id": it.key if isinstance(it.key, str) else None,
            "symbol": it.symbol if isinstance(it.symbol, str) else v.get("symbol"),
            "action": v.get("action") or plan.get("action"), "outcome": outcome,
            "detail": detail}


def _context_names(ws: WitnessSearch) -> list[str]:
    """The context operations in a few words, each once (an invoke and its completion)."""
    return list(dict.fromkeys(f"{it.f} {it.key}" if it.key else it.f for it in ws.context))


def minimize(facts: Facts, violations: Sequence[Violation],
             options: MinimizeOptions = OPTIONS_DEFAULT,
             t0_ms: int | None = None) -> tuple[dict[int, dict[str, Any]], dict[str, Any]]:
    """Minimal witnesses of ``violations`` (judged on ``facts``): ``{index: witness}`` for
    those minimised, and a summary (per invariant: violations, minimised, left)."""
    started = time.perf_counter()
    run_deadline = started + options.budget_s
    per_inv: dict[str, dict[str, int]] = {}
    chosen: list[int] = []
    for i, v in sorted(enumerate(violations), key=lambda x: x[1].wall_ms):
        s = per_inv.setdefault(v.invariant, {"violations": 0, "minimised": 0, "left": 0})
        s["violations"] += 1
        if s["violations"] <= options.per_invariant and v.invariant in CHECKERS:
            chosen.append(i)
    out: dict[int, dict[str, Any]] = {}
    stopped = ""
    was = gc.isenabled()
    gc.disable()  # many small short-lived facts, no cycles among them
    try:
        ws = WitnessSearch(facts, options, (k for i in chosen for k in _named(
            violations[i]))) if chosen else None
        if ws is not None:
            ws.symbols = {s for i in chosen if isinstance(s := violations[i].symbol, str)}
        for i in chosen:
            v = violations[i]
            now = time.perf_counter()
            if now > run_deadline:
                stopped = "run budget reached"
                break
            assert ws is not None
            found = _search(ws, v, min(now + options.violation_budget_s, run_deadline),
                            options.max_work)
            out[i] = _witness(found, t0_ms or facts.first_ms or 0)
            per_inv[v.invariant]["minimised"] += 1
    finally:
        if was:
            gc.enable()
    for s in per_inv.values():
        s["left"] = s["violations"] - s["minimised"]
    summary = {"per_invariant": per_inv, "max_work": options.max_work,
               "violation_budget_s": options.violation_budget_s,
               "budget_s": options.budget_s,
               "per_invariant_cap": options.per_invariant, "stopped": stopped or None,
               "context": _context_names(ws) if chosen and ws is not None else []}
    return out, summary


def _witness(found: _Found, t0_ms: int) -> dict[str, Any]:
    """The witness as results.json keeps it (no timings: the same history gives the same
    witness; the time spent is in ``stats.check_seconds``)."""
    if not found.items:
        return {"reproduced": False, "ops": [], "size": 0, "tests": found.tests,
                "note": "not shown again: " + found.note}
    ops = [_what(it) for it in sorted(found.items, key=lambda it: (_what(it)["ms"],
                                                                   it.sort_key))]
    for op in ops:
        op["t"] = round((op["ms"] - t0_ms) / 1000, 3) if t0_ms else None
        created = op["detail"].removeprefix("intent created at ")
        if t0_ms and created != op["detail"] and created.isdigit():
            op["detail"] = f"intent created at t={(int(created) - t0_ms) / 1000:+.3f} s"
    return {"reproduced": True, "ops": ops, "size": len(ops), "candidates": found.candidates,
            "searched": found.level, "match": found.tier, "one_minimal": found.one_minimal,
            "finished": found.finished, "tests": found.tests, "note": found.note}


def minimize_verdict(verdict: Any, options: MinimizeOptions = OPTIONS_DEFAULT) -> None:
    """Attach a ``minimal_witness`` to the violations of ``verdict`` (its facts kept) and
    the summary to ``verdict.stats["minimal_witnesses"]``."""
    started = time.perf_counter()
    facts = verdict.facts
    if facts is None:
        return
    flat = [(name, j, v) for name, r in verdict.results.items()
            for j, v in enumerate(r.violations)]
    if not flat:
        verdict.stats["minimal_witnesses"] = {"per_invariant": {}}
        return
    t0 = verdict.stats.get("workload_start_ms") or facts.first_ms
    found, summary = minimize(facts, [v for _n, _j, v in flat], options, t0)
    for k, w in found.items():
        name, j, v = flat[k]
        verdict.results[name].violations[j] = replace(v, minimal_witness=w)
    verdict.stats["minimal_witnesses"] = summary
    if "check_seconds" in verdict.stats:  # the whole check, the search included
        verdict.stats["check_seconds"] = round(verdict.stats["check_seconds"]
                                               + time.perf_counter() - started, 3)


# -- re-checking a witness -----------------------------------------------------------------
def witness_items(run_dir: str | Path, refs: Iterable[str]) -> list[_Item]:
    """The operations a witness names (``history/<file>:<line>``, ``ledger:<seq>``)."""
    run_dir = Path(run_dir)
    lines: dict[str, dict[int, str]] = {}
    seqs: list[int] = []
    for ref in refs:
        if ref.startswith("ledger:"):
            seqs.append(int(ref.split(":", 1)[1]))
        else:
            name, n = ref.rsplit(":", 1)
            lines.setdefault(name, {})[int(n)] = ref
    out: list[_Item] = []
    for name, wanted in lines.items():
        with open(run_dir / name, "rb") as fh:
            for n, line in enumerate(fh, 1):
                if n in wanted:
                    it = _history_item(wanted[n], line if line.endswith(b"\n")
                                       else line + b"\n")
                    if it is not None:
                        out.append(it)
    if seqs:
        from chaos.checkers.facts import load_ledger

        by_seq = {o.seq: o for o in load_ledger(run_dir)}
        out += [_order_item(by_seq[s]) for s in seqs if s in by_seq]
    return sorted(out, key=lambda it: it.sort_key)


def reproduces(facts: Facts, violation: Violation, refs: Iterable[str],
               tier: str = TIERS[0]) -> bool:
    """Whether the operations ``refs`` (with the run's context) show ``violation`` again."""
    ws = WitnessSearch(facts)
    return ws.shows(violation, tier, witness_items(facts.run_dir, refs))


def write_witness_run(run_dir: str | Path, refs: Iterable[str], out: str | Path) -> Path:
    """A run directory holding only the context and the operations ``refs`` (and, for a
    recorded run, their ledger orders; for an import, the ledger derived from them), with
    the run's run.json: ``chaos check OUT`` judges the witness alone."""
    run_dir, out = Path(run_dir), Path(out)
    refs = list(refs)
    (out / HISTORY_DIR).mkdir(parents=True, exist_ok=True)
    meta = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").exists() \
        else {}
    (out / "run.json").write_text(json.dumps({**meta, "witness_of": str(run_dir)}, indent=2))
    from chaos.checkers.facts import gather

    ws = WitnessSearch(gather(run_dir))
    items = witness_items(run_dir, refs)
    hist = sorted(ws.context + [it for it in items if it.line is not None],
                  key=lambda it: it.sort_key)
    (out / HISTORY_DIR / "witness.jsonl").write_bytes(b"".join(it.line for it in hist
                                                              if it.line is not None))
    from chaos.exchange import Exchange

    Exchange.create(out / "ledger.sqlite")
    con = sqlite3.connect(out / "ledger.sqlite")
    try:
        if ws.derived:
            from chaos.importer import _write_ledger, replay_results
            from chaos.recorder import _id_tuple

            con.close()
            executed = sorted(((str(it.value.get("entry_id")), it.value) for it in hist
                               if it.f == "result" and it.value.get("status") == "executed"),
                              key=lambda e: _id_tuple(e[0]))
            plans = {it.key: it.value for it in hist if it.f == "plan"}
            permits = {}
            for it in hist:
                if it.f == "decision" and it.value.get("decision") == "PERMIT":
                    permits.setdefault(it.key, _int(it.value.get("entry_ms")) or it.wall_ms)
            rp, positions = replay_results(executed, plans, permits, ws.window_cut)
            _write_ledger(out / "ledger.sqlite", rp.rows, positions)
        else:
            seqs = [it.order.seq for it in items if it.order is not None]
            con.execute("ATTACH DATABASE ? AS src", (str(run_dir / "ledger.sqlite"),))
            con.execute(f"INSERT INTO orders SELECT * FROM src.orders WHERE seq IN "
                        f"({','.join('?' * len(seqs))})", seqs)
            con.commit()
    finally:
        con.close()
    return out

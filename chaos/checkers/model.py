"""A Porcupine/Knossos-style linearizability checker and the governor models it checks.

Generic core
------------
A :class:`Model` is Porcupine's interface: ``init() -> state``,
``step(state, input, output) -> (ok, new_state)``, ``partition(ops)`` (a list of
independent sub-histories, or None) and ``describe(state)``. States must be
hashable. An :class:`Operation` is ``(client, input, call_ms, output,
return_ms)``. ``output`` may be :data:`UNKNOWN` (Knossos's ``:info``): the op may
or may not have taken effect, so its return time is +infinity, it may be
linearized at any point after its call, and it may be left out entirely. For
such an op ``step(state, input, UNKNOWN)`` returns the state after the op took
effect with whatever output the model would give; leaving it out covers "did
not happen". Any op whose return is +infinity (known output or not) may be left
out: nothing after the end of the history can observe it, so leaving it out is
the same as linearizing it last.

:func:`check` runs the Wing-Gong-Lowe search as Porcupine implements it: call
and return events sorted by time (calls before returns on ties) in a doubly
linked list; a call is *lifted* (it and its return unlinked) when the op is
linearized and *unlifted* on backtracking; a cache of ``(linearized ops as an
int bitset, state)`` prunes states already explored. Reaching the return event
of an op not yet linearized forces a backtrack; reaching a return at +infinity
(or the end of the list) means every op with a finite return is linearized: the
history is linearizable. It runs per partition and gives ``valid=None``
(unknown) when the deadline passes.

Governor models: which history events become which operations
--------------------------------------------------------------
All built from :class:`~chaos.checkers.facts.Facts` by :func:`slots_ops` and
:func:`exit_lock_ops`. A decision's call is the plan's first stream entry time
(``plans[pid].entry_ms``; the decision time minus 1 ms when absent), its
return the decision's stream-entry time: the governor decided somewhere in
between.

``SlotsModel`` (one global history; state ``(slots_in_use, regime)``):

* OPEN PERMIT -> ``("acquire", symbol)``, output ``"PERMIT"``: ok iff
  in_use < ``config.slots_for(regime)``; then in_use + 1.
* OPEN BLOCK ``active_slots_waiting_rotation_close`` -> ``("full", symbol)``,
  output ``"BLOCK"``: ok iff in_use >= capacity; state unchanged.
* ``("release", symbol)``, interval ``[event, +inf)``, when a reserved slot is
  freed: the permit's order was rejected (ledger ``rejected_*``, at the order
  time), its permit was missing (``take`` fail, at that time), it never
  executed (lease expiry at decision + ``capital_reservation_ttl_ms``), or the
  symbol's position was closed by an executed CLOSE (effect ``close``, one
  release per slot the symbol holds, at the order time).
* ``("adopt", symbol)``, ``[order time, +inf)``: a position opened by an order
  no OPEN permit in the history accounts for (a ``flip``, or an OPEN without a
  PERMIT decision after the history began). Always ok, in_use + 1.
  Positions opened before the first decision (``initial-*``) are counted in the
  initial state instead (an acquire at -infinity).
* ``("regime", r)`` from ``Facts.regimes``: call/return of the operator's write,
  :data:`UNKNOWN` output (return +inf) when its completion is ``info``.

``ExitLockModel`` (partitioned per symbol; state ``(position_open, lock_held)``):

* CLOSE PERMIT -> ``("lock", symbol)``: ok iff position open and lock free;
  then lock held.
* CLOSE BLOCK ``exit_lock_busy_double_close_prevention`` -> ``("busy", symbol)``:
  ok iff the lock is held.
* ``("unlock", symbol, effect)``, ``[end, +inf)`` at the end of the CLOSE
  permit as ``check_single_close`` defines it (first of: its order, a missing
  permit, a non-executed result; else decision + ``permit_ttl_ms``). Effect
  ``close`` -> position closed, ``flip`` -> position open, anything else
  (rejected, missing, expired) -> position unchanged; the lock is released.
* An executed OPEN (``open``/``add``, ``initial-*`` included) -> ``("opened",
  symbol)`` on ``[order time, order time + 1]``.

Why releases and unlocks are ``[event, +inf)``: a governor can only learn of a
release after it happened (from the result stream, the mirror or a TTL), and it
may learn late, so the release may take effect at any point after the event -
never before it. Linearizing one late only makes the governor more
conservative, which no invariant forbids.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from chaos.checkers.facts import Decision, Facts
from chaos.checkers.invariants import CheckResult, Violation

INF = math.inf


class _Unknown:
    _inst: _Unknown | None = None

    def __new__(cls) -> _Unknown:
        if cls._inst is None:
            cls._inst = super().__new__(cls)
        return cls._inst

    def __repr__(self) -> str:
        return "UNKNOWN"


UNKNOWN: Any = _Unknown()


@dataclass(frozen=True)
class Operation:
    client: str
    input: Any
    call_ms: float
    output: Any
    return_ms: float = INF

    def __post_init__(self) -> None:
        if self.output is UNKNOWN and self.return_ms != INF:
            object.__setattr__(self, "return_ms", INF)
        if self.return_ms < self.call_ms:
            object.__setattr__(self, "return_ms", self.call_ms)


@dataclass
class LinResult:
    valid: bool | None
    partition_failed: int | None = None
    explanation: str = ""
    ops_checked: int = 0
    failed_ops: tuple[Operation, ...] = ()


class Model:
    """Porcupine's model interface; subclass and override."""

    def init(self) -> Hashable:
        raise NotImplementedError

    def step(self, state: Any, input: Any, output: Any) -> tuple[bool, Any]:  # noqa: A002
        raise NotImplementedError

    def partition(self, ops: Sequence[Operation]) -> list[list[Operation]] | None:
        return None

    def describe(self, state: Any) -> str:
        return repr(state)


# -- the search ------------------------------------------------------------------------------
class _Timeout(Exception):
    pass


def _fmt(op: Operation) -> str:
    def t(x: float) -> str:
        return "inf" if x == INF else ("-inf" if x == -INF else str(int(x)))
    return f"{op.client}: {op.input!r} -> {op.output!r} [{t(op.call_ms)}, {t(op.return_ms)}]"


def _check_one(model: Model, ops: Sequence[Operation], deadline: float) -> tuple[bool, str,
                                                                                 tuple]:
    n = len(ops)
    if n == 0:
        return True, "", ()
    events = []
    for i, op in enumerate(ops):
        events.append((op.call_ms, 0, i))
        events.append((op.return_ms, 1, i))
    events.sort()
    m = len(events)
    head, tail = m, m + 1
    nxt = list(range(1, m + 1)) + [0, 0]
    prv = [head] + list(range(0, m - 1)) + [0, 0]
    nxt[head] = 0
    prv[tail] = m - 1
    nxt[m - 1] = tail
    is_ret = [e[1] == 1 for e in events]
    ret_inf = [e[1] == 1 and e[0] == INF for e in events]
    opid = [e[2] for e in events]
    match = [0] * m
    call_node = [0] * n
    for k, e in enumerate(events):
        if e[1] == 0:
            call_node[e[2]] = k
    for k, e in enumerate(events):
        if e[1] == 1:
            match[call_node[e[2]]] = k

    state = model.init()
    linearized = 0
    stack: list[tuple[int, Any]] = []
    cache: set[tuple[int, Any]] = set()
    best_depth = -1
    best: tuple[int, int, tuple[int, ...], Any, list[int]] | None = None
    step = model.step
    entry = nxt[head]
    iters = 0
    while True:
        iters += 1
        if iters & 0x3FF == 0 and time.monotonic() > deadline:
            raise _Timeout
        if entry == tail or ret_inf[entry]:
            return True, "", ()
        if not is_ret[entry]:
            i = opid[entry]
            op = ops[i]
            ok, new_state = step(state, op.input, op.output)
            if ok:
                nl = linearized | (1 << i)
                key = (nl, new_state)
                if key not in cache:
                    cache.add(key)
                    stack.append((entry, state))
                    state, linearized = new_state, nl
                    c, r = entry, match[entry]
                    prv[nxt[c]] = prv[c]
                    nxt[prv[c]] = nxt[c]
                    prv[nxt[r]] = prv[r]
                    nxt[prv[r]] = nxt[r]
                    entry = nxt[head]
                    continue
            entry = nxt[entry]
            continue
        # The return of an op not linearized: backtrack.
        if len(stack) > best_depth:
            best_depth = len(stack)
            tried = []
            k = nxt[head]
            while k != entry and len(tried) < 6:
                if not is_ret[k]:
                    tried.append(opid[k])
                k = nxt[k]
            best = (len(stack), opid[entry], tuple(opid[e] for e, _ in stack[-4:]), state,
                    tried)
        if not stack:
            break
        top, prev_state = stack.pop()
        state = prev_state
        linearized &= ~(1 << opid[top])
        c, r = top, match[top]
        nxt[prv[r]] = r
        prv[nxt[r]] = r
        nxt[prv[c]] = c
        prv[nxt[c]] = c
        entry = nxt[top]
    assert best is not None
    depth, stuck, last, st, tried = best
    lines = [f"no linearization: at most {depth} of {n} ops linearize; then "
             f"{_fmt(ops[stuck])} cannot take effect before it returns",
             f"  state there: {model.describe(st)}"]
    lines += [f"  linearized just before: {_fmt(ops[i])}" for i in last]
    lines += [f"  pending, none applies: {_fmt(ops[i])}" for i in tried if i != stuck]
    involved = tuple(ops[i] for i in (*last, stuck))
    return False, "\n".join(lines), involved


def check(model: Model, ops: Sequence[Operation], timeout_s: float = 10.0) -> LinResult:
    """Is the history linearizable under ``model``? valid None: the deadline passed."""
    deadline = time.monotonic() + timeout_s
    parts = model.partition(ops)
    if parts is None:
        parts = [list(ops)]
    unknown: list[int] = []
    checked = 0
    for idx, part in enumerate(parts):
        try:
            ok, why, involved = _check_one(model, part, deadline)
        except _Timeout:
            unknown.append(idx)
            continue
        checked += len(part)
        if not ok:
            return LinResult(False, idx, why, checked, involved)
    if unknown:
        return LinResult(None, None, f"timed out after {timeout_s} s in {len(unknown)} of "
                         f"{len(parts)} partitions (first: {unknown[0]})", checked)
    return LinResult(True, None, "", checked)


# -- the governor models ---------------------------------------------------------------------
class SlotsModel(Model):
    """Global slot count; state ``(in_use, regime)``. Not partitionable."""

    def __init__(self, capacity: dict[str, int] | Any, initial_in_use: int = 0,
                 initial_regime: str = "BASE") -> None:
        # capacity: a GovernorConfig (slots_for) or a dict regime -> slots
        self._cap = capacity.get if isinstance(capacity, dict) else capacity.slots_for
        self.initial = (initial_in_use, initial_regime)

    def init(self) -> Hashable:
        return self.initial

    def step(self, state: Any, input: Any, output: Any) -> tuple[bool, Any]:  # noqa: A002
        count, regime = state
        kind = input[0]
        if kind == "acquire":
            free = count < self._cap(regime)
            if output is UNKNOWN:
                return True, (count + 1, regime) if free else state
            return (True, (count + 1, regime)) if free else (False, state)
        if kind == "full":
            return output is UNKNOWN or count >= self._cap(regime), state
        if kind == "release":
            return (True, (count - 1, regime)) if count > 0 else (False, state)
        if kind == "adopt":
            return True, (count + 1, regime)
        if kind == "regime":
            return True, (count, input[1])
        raise ValueError(f"unknown slots op {input!r}")

    def describe(self, state: Any) -> str:
        return f"{state[0]} slots in use of {self._cap(state[1])} (regime {state[1]})"


class ExitLockModel(Model):
    """Per-symbol exit lock; state ``(position_open, lock_held)``; partitioned by symbol."""

    def init(self) -> Hashable:
        return (False, False)

    def step(self, state: Any, input: Any, output: Any) -> tuple[bool, Any]:  # noqa: A002
        pos, lock = state
        kind = input[0]
        if kind == "lock":
            if pos and not lock:
                return True, (pos, True)
            return output is UNKNOWN, state  # unknown: it may have been a BLOCK
        if kind == "busy":
            return output is UNKNOWN or lock, state
        if kind == "unlock":
            effect = input[2] if len(input) > 2 else ""
            pos = False if effect == "close" else (True if effect == "flip" else pos)
            return True, (pos, False)
        if kind == "opened":
            return True, (True, lock)
        raise ValueError(f"unknown exit-lock op {input!r}")

    def partition(self, ops: Sequence[Operation]) -> list[list[Operation]]:
        by: dict[str, list[Operation]] = defaultdict(list)
        for op in ops:
            by[op.input[1]].append(op)
        return list(by.values())

    def describe(self, state: Any) -> str:
        return (f"position {'open' if state[0] else 'flat'}, exit lock "
                f"{'held' if state[1] else 'free'}")


# -- ops from a run's facts ------------------------------------------------------------------
FULL = "active_slots_waiting_rotation_close"
BUSY = "exit_lock_busy_double_close_prevention"


def _first_decision(ds: list[Decision]) -> Decision | None:
    return next((d for d in ds if d.decision in ("PERMIT", "BLOCK")), None)


def _call_ms(facts: Facts, pid: str, d: Decision) -> int:
    entry = facts.plans.get(pid)
    call = entry.entry_ms if entry else d.entry_ms - 1
    return min(call, d.entry_ms)


def _permitted(facts: Facts, action: str, block_reason: str, block_f: str,
               ops: list[Operation]) -> Iterator[tuple[str, Decision, int]]:
    """The plans of ``action`` by their first decision: a BLOCK for ``block_reason`` goes
    into ``ops`` as a ``block_f`` operation (other blocks say nothing about the model);
    each PERMIT is yielded as ``(plan_id, decision, call_ms)``."""
    for pid, ds in facts.decisions.items():
        d = _first_decision(ds)
        if d is None or d.action != action:
            continue
        call = _call_ms(facts, pid, d)
        if d.decision == "BLOCK":
            if d.reason == block_reason:
                ops.append(Operation(pid, (block_f, d.symbol), call, "BLOCK", d.entry_ms))
            continue
        yield pid, d, call


def slots_ops(facts: Facts) -> tuple[SlotsModel, list[Operation]]:
    cfg = facts.config
    ops: list[Operation] = []
    first_order = facts.first_order()
    permitted_open: set[str] = set()
    first_decision_ms = min((d.entry_ms for ds in facts.decisions.values() for d in ds),
                            default=INF)
    for pid, d, call in _permitted(facts, "OPEN", FULL, "full", ops):
        permitted_open.add(pid)
        ops.append(Operation(pid, ("acquire", d.symbol), call, "PERMIT", d.entry_ms))
        o = first_order.get(pid)
        fails = facts.failed_takes(pid)
        if o is not None:
            if not o.executed:
                ops.append(Operation(pid, ("release", d.symbol), o.wall_ms, "ok"))
        elif fails:
            ops.append(Operation(pid, ("release", d.symbol), min(fails), "ok"))
        else:
            ops.append(Operation(pid, ("release", d.symbol),
                                 d.entry_ms + cfg.capital_reservation_ttl_ms, "ok"))
    held: dict[str, int] = defaultdict(int)
    initial = 0
    for o in facts.orders:
        if not o.executed:
            continue
        if o.action == "OPEN" and o.effect in ("open", "add"):
            held[o.symbol] += 1
            if o.plan_id in permitted_open:
                continue
            if o.plan_id.startswith("initial-") or o.wall_ms < first_decision_ms:
                initial += 1
            else:
                ops.append(Operation(o.plan_id, ("adopt", o.symbol), o.wall_ms, "ok"))
        elif o.effect == "flip":
            held[o.symbol] += 1
            ops.append(Operation(o.plan_id, ("adopt", o.symbol), o.wall_ms, "ok"))
        elif o.effect == "close":
            for _ in range(held.pop(o.symbol, 0)):
                ops.append(Operation(o.plan_id, ("release", o.symbol), o.wall_ms, "ok"))
    for k, (inv, done, regime, typ) in enumerate(facts.regimes):
        if typ == "fail":
            continue
        ops.append(Operation(f"regime-{k}", ("regime", regime), inv,
                             "ok" if typ == "ok" else UNKNOWN, done))
    return SlotsModel(cfg, initial, facts.initial_regime), ops


def exit_lock_ops(facts: Facts) -> tuple[ExitLockModel, list[Operation]]:
    ttl = facts.config.permit_ttl_ms
    first_order = facts.first_order()
    ops: list[Operation] = []
    for o in facts.orders:
        if o.action == "OPEN" and o.executed and o.effect in ("open", "add"):
            ops.append(Operation(o.plan_id, ("opened", o.symbol), o.wall_ms, "ok",
                                 o.wall_ms + 1))
    for pid, d, call in _permitted(facts, "CLOSE", BUSY, "busy", ops):
        ops.append(Operation(pid, ("lock", d.symbol), call, "PERMIT", d.entry_ms))
        o = first_order.get(pid)
        ends = [o.wall_ms] if o is not None else []
        ends += facts.failed_takes(pid)
        ends += [ms for ms, _status in facts.aborts.get(pid, ())]
        end = max(min(ends) if ends else d.entry_ms + ttl, d.entry_ms)
        effect = o.effect if o is not None and o.wall_ms == end else "none"
        ops.append(Operation(pid, ("unlock", d.symbol, effect), end, "ok"))
    return ExitLockModel(), ops


def _result(name: str, res: LinResult, n_ops: int, seconds: float) -> CheckResult:
    stats = {"ops": n_ops, "ops_checked": res.ops_checked, "seconds": round(seconds, 3)}
    if res.valid is False:
        first = res.failed_ops[-1] if res.failed_ops else None
        sym = first.input[1] if first is not None and len(first.input) > 1 else None
        wall = int(first.return_ms if first and first.return_ms != INF else
                   first.call_ms if first else 0)
        v = Violation(name, wall, sym, tuple(op.client for op in res.failed_ops),
                      "a linearizable history", "none found",
                      f"{name}: partition {res.partition_failed}"
                      f"{f' (symbol {sym})' if sym else ''}: {res.explanation}",
                      tuple({"client": op.client, "input": list(op.input),
                             "output": str(op.output), "call_ms": op.call_ms,
                             "return_ms": None if op.return_ms == INF else op.return_ms}
                            for op in res.failed_ops))
        return CheckResult(name, False, [v], stats, res.explanation.splitlines()[0])
    return CheckResult(name, res.valid, [], stats, res.explanation)


def check_model(facts: Facts, timeout_s: float = 10.0) -> dict[str, CheckResult]:
    """Both governor models over a run's facts: ``slots_model`` and ``exit_lock_model``."""
    out: dict[str, CheckResult] = {}
    for name, build in (("slots_model", slots_ops), ("exit_lock_model", exit_lock_ops)):
        t0 = time.perf_counter()
        model, ops = build(facts)
        res = check(model, ops, timeout_s)
        out[name] = _result(name, res, len(ops), time.perf_counter() - t0)
    return out

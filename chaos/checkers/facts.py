"""What a run did, gathered in one pass over its history and its exchange ledger.

The checkers judge these facts, not the raw files: the history is streamed
once (never held whole), each line decoded only as far as a checker needs
(msgspec skips the rest unread), and each plan keeps only the few fields a
checker needs. Long histories are scanned file by file in worker processes
(the facts of one plan do not depend on the order of the files: a submit's
invoke and completion are paired by their monotonic times, and lists are
sorted by time at the end), and the rare operations that do depend on order
(operator, fault, probe, phase, governor) are replayed in time order.

The ledger is the ground truth of what executed; the history is the evidence
of what was asked, decided and when.

Times: ``*_ms`` are epoch milliseconds. Decision, plan and result times are
Redis stream ids (the server's clock); order times are the exchange host's
clock; operator and fault times are the harness host's clock. With an
embedded Redis these are one clock.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
from bisect import bisect_right
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from itertools import compress, repeat, starmap
from operator import attrgetter, is_
from pathlib import Path
from typing import Any, ClassVar, Literal, get_args, get_origin

import msgspec

from chaos.history import F, OpType, history_files
from governor_ref.protocol import GovernorConfig

# Per-plan records are msgspec Structs, decoded straight from the history lines: built in
# C, a third of a dataclass's memory, untracked by the cyclic GC (gc=False: they hold no
# containers). Unknown fields of a line are skipped unread. Fields with a few known values
# are Literals: msgspec hands out one shared string per value instead of building one per
# line; any other value is kept as it is, by the lenient path (see ``_lenient``).
_OpTypeLit = Literal["invoke", "ok", "fail", "info"]


class Decision(msgspec.Struct, gc=False):
    """A PERMIT or BLOCK as the governor published it (one decision event)."""

    plan_id: str = ""
    symbol: str = ""
    # "" also stands for an action outside the protocol (the entry is then in
    # ``Facts.bad_decisions`` as written): the checkers judge OPEN and CLOSE only.
    action: Literal["OPEN", "CLOSE", ""] = ""
    decision: Literal["PERMIT", "BLOCK"] = ""  # type: ignore[assignment]
    reason: str = ""
    governor: str = ""
    entry_ms: int = 0  # the event's stream id time (Redis's clock)
    entry_id: str = ""
    fence: str = ""
    decided_at_ms: Any = None  # the governor's clock; checked for form only


class BadDecision(msgspec.Struct, gc=False):
    """A PERMIT or BLOCK entry that breaks the protocol, as written, with what is wrong.

    ``problems`` are "; "-joined. An entry with a plan id is in ``Facts.decisions`` too
    (it still answers its plan), with ``action`` "" when its action was not OPEN/CLOSE.
    ``odd_action`` tells the checker that the action is the problem: for a BLOCK it is
    one only when the plan it answers was a well-formed plan the harness sent."""

    plan_id: Any = None
    symbol: Any = None
    action: Any = None
    decision: str = ""
    reason: Any = None
    governor: Any = None
    decided_at_ms: Any = None
    entry_ms: int = 0
    entry_id: str = ""
    problems: str = ""
    odd_action: bool = False


class LedgerOrder(msgspec.Struct, frozen=True, gc=False):
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


class _PlanFields(msgspec.Struct, gc=False):
    # The raw field values as sent: a malformed plan may carry anything.
    plan_id: Any = None
    symbol: Any = None
    notional: Any = None
    intent_created_at_ms: Any = None


class Submit(msgspec.Struct, gc=False):
    """A plan a producer sent, as the producer recorded it (the plan may be malformed)."""

    status: str  # invoke (no completion) / ok / info / fail
    wall_ms: int
    plan_id: Any = None
    symbol: Any = None
    notional: Any = None
    intent_created_at_ms: Any = None
    malformed: Any = None
    time_ns: int = 0  # of the invoke (monotonic): the last invoke of a plan id stands
    completed_ns: int = -1  # of the completion that gave ``status`` (the last one after it)


class PlanEntry(msgspec.Struct, gc=False):
    """The first entry of a plan id in the plan stream, as the recorder read it."""

    entry_ms: int = 0  # the entry's stream id time
    source: Any = None
    action: Any = None  # as written (OPEN / CLOSE, or anything): for chaos.analysis
    intent_created_at_ms: Any = None
    notional: Any = None


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
    plans: dict[str, PlanEntry] = field(default_factory=dict)
    decisions: dict[str, list[Decision]] = field(default_factory=lambda: defaultdict(list))
    # when the apply layer found a plan's permit gone (each failed take), in time order
    take_fails: dict[str, list[int]] = field(default_factory=dict)
    # (entry_ms, status) of each apply.result entry of a plan other than ``executed``
    aborts: dict[str, list[tuple[int, Any]]] = field(default_factory=dict)
    # The plan id and entry time of each ``executed`` result, as two lists (no object per
    # result): the checkers judge executions from the ledger; chaos.analysis shows them
    executed_keys: list[Any] = field(default_factory=list)
    executed_ms: list[int] = field(default_factory=list)
    # PERMIT / BLOCK entries that break the protocol (the ``protocol`` checker's), by time
    bad_decisions: list[BadDecision] = field(default_factory=list)
    faults: list[FaultWindow] = field(default_factory=list)
    # anchored faults whose event never came (the nemesis's ``not_fired`` fault ops)
    faults_not_fired: list[dict[str, Any]] = field(default_factory=list)
    probes: dict[str, dict[str, Any]] = field(default_factory=dict)
    phases: dict[str, dict[str, int]] = field(default_factory=dict)
    governor_events: list[dict[str, Any]] = field(default_factory=list)
    stream_resets: int = 0
    ops: int = 0
    orders: list[LedgerOrder] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    first_ms: int | None = None
    last_ms: int | None = None
    _first_order: dict[str, LedgerOrder] | None = field(default=None, repr=False)
    _permits: dict[str, Decision] | None = field(default=None, repr=False)

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
            # Done before ms: the new regime; in flight at ms (its completion in the same
            # millisecond too: the write may have landed after ms within it) or unknown
            # outcome: either may hold.
            current = {regime} if done < ms and typ == "ok" else current | {regime}
        return current

    def permits(self) -> dict[str, Decision]:
        """Each permitted plan's (first) PERMIT decision (built once)."""
        if self._permits is None:
            self._permits = {}
            for pid, ds in self.decisions.items():
                for d in ds:
                    if d.decision == "PERMIT":
                        self._permits[pid] = d
                        break
        return self._permits

    def permit(self, plan_id: str) -> Decision | None:
        """The plan's PERMIT decision, if it got one."""
        return self.permits().get(plan_id)

    def _plan_field(self, plan_id: str, name: str) -> Any:
        """A field of the plan as sent, else as read from the plan stream."""
        s = self.submits.get(plan_id)
        raw = getattr(s, name) if s is not None else None
        if raw is None:
            p = self.plans.get(plan_id)
            raw = getattr(p, name) if p is not None else None
        return raw

    def _plan_number(self, plan_id: str, name: str, kind: type[Any]) -> Any:
        raw = self._plan_field(plan_id, name)
        try:
            return kind(raw) if raw is not None else None
        except (TypeError, ValueError):
            return None

    def notional(self, plan_id: str) -> float | None:
        """The plan's notional as sent (else as read from the stream); None if not a number."""
        return self._plan_number(plan_id, "notional", float)

    def created_ms(self, plan_id: str) -> int | None:
        """The plan's ``intent_created_at_ms`` as sent; None if absent or not a number."""
        return self._plan_number(plan_id, "intent_created_at_ms", int)

    def first_order(self) -> dict[str, LedgerOrder]:
        """Each plan's first order reaching the exchange (built once; C-level loops)."""
        if self._first_order is None:
            rev = self.orders[::-1]  # the first of a plan's orders is the one a dict keeps
            self._first_order = dict(zip(map(_PLAN_ID, rev), rev, strict=True))
        return self._first_order

    def failed_takes(self, plan_id: str) -> list[int]:
        """When the apply layer found the plan's permit gone (each failed take)."""
        return list(self.take_fails.get(plan_id, ()))

    def close_permit_spans(self) -> Iterator[tuple[Decision, int, bool]]:
        """Each CLOSE permit with the time it stopped being outstanding.

        Yields ``(permit, end_ms, lapsed)``: the end is the first of its order
        reaching the exchange, a failed take (the permit was gone), or a result
        other than ``executed``; with none of these the permit lapsed at
        ``permit_ttl_ms`` (``lapsed`` True). Never before the permit itself.
        """
        ttl = self.config.permit_ttl_ms
        first_order = self.first_order()
        take_fails, aborts = self.take_fails, self.aborts
        for pid, d in self.permits().items():
            if d.action != "CLOSE":
                continue
            o = first_order.get(pid)
            if o is not None and pid not in take_fails and pid not in aborts:
                yield d, max(o.wall_ms, d.entry_ms), False  # the common case: it executed
                continue
            ends = list(take_fails.get(pid, ()))
            ends += [ms for ms, _status in aborts.get(pid, ())]
            if o is not None:
                ends.append(o.wall_ms)
            end = min(ends) if ends else d.entry_ms + ttl
            yield d, max(end, d.entry_ms), not ends


def load_ledger(run_dir: Path) -> list[LedgerOrder]:
    path = run_dir / "ledger.sqlite"
    if not path.exists():
        return []
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        cols = {r[1] for r in con.execute("PRAGMA table_info(orders)")}
        wall = "wall_ms" if "wall_ms" in cols else "t_wall_ms"
        # Conversions in SQL, then one C-level loop building the records.
        rows = con.execute(
            f"SELECT CAST(seq AS INTEGER), COALESCE(plan_id, ''), COALESCE(symbol, ''), "
            f"COALESCE(action, ''), COALESCE(side, ''), CAST(COALESCE(notional, 0) AS REAL), "
            f"COALESCE(CAST(fence AS TEXT), ''), COALESCE(effect, ''), "
            f"COALESCE(position_id, ''), CAST(COALESCE(open_count_after, 0) AS INTEGER), "
            f"CAST(COALESCE({wall}, 0) AS INTEGER), CAST(issued_at_ms AS INTEGER) "
            f"FROM orders ORDER BY seq").fetchall()
    finally:
        con.close()
    return list(starmap(LedgerOrder, rows))


class HistoryError(ValueError):
    """A history line that is not an operation (named by file and line)."""


# The operations as the scan decodes them: one class per ``f`` (msgspec picks it by the
# tag), each with only the fields a checker reads: every field decoded is an object to
# build, and the hot kinds are a million lines in a long run.
class _Op(msgspec.Struct, tag_field="f", gc=False):
    # The scan groups a block's operations by kind (a stable sort on this) and takes each
    # group in bulk; 6: replayed in time order, 7: only counted.
    kind: ClassVar[int] = 7
    wall_ms: int = 0


class _Keyed(_Op):
    key: Any = None


class _SubmitVal(msgspec.Struct, gc=False):
    plan: _PlanFields | None = None
    malformed: Any = None


class _ResultVal(msgspec.Struct, gc=False):
    entry_ms: int = 0
    status: Literal["executed", "rejected", "expired"] | None = None


class _DecisionOp(_Keyed, tag=str(F.DECISION)):
    kind: ClassVar[int] = 2
    value: Decision | None = None


class _SubmitOp(_Keyed, tag=str(F.SUBMIT)):
    kind: ClassVar[int] = 0
    type: _OpTypeLit = ""  # type: ignore[assignment]
    time_ns: int = 0
    value: _SubmitVal | None = None


class _PlanOp(_Keyed, tag=str(F.PLAN)):
    kind: ClassVar[int] = 1
    value: PlanEntry | None = None


class _TakeOp(_Keyed, tag=str(F.TAKE)):
    kind: ClassVar[int] = 3
    type: _OpTypeLit = ""  # type: ignore[assignment]  # only a failed take matters


class _ResultOp(_Keyed, tag=str(F.RESULT)):
    kind: ClassVar[int] = 5
    value: _ResultVal | None = None


class _OrderOp(_Op, tag=str(F.ORDER)):
    kind: ClassVar[int] = 4
    pass  # orders are judged from the ledger


class _OrderedOp(_Keyed):
    """Operations whose meaning depends on the order of others: replayed in time order."""

    kind: ClassVar[int] = 6
    type: _OpTypeLit = ""  # type: ignore[assignment]
    time_ns: int = 0
    process: str = ""
    symbol: Any = None
    value: dict[str, Any] | None = None


class _OperatorOp(_OrderedOp, tag=str(F.OPERATOR)):
    pass


class _FaultOp(_OrderedOp, tag=str(F.FAULT)):
    pass


class _ProbeOp(_OrderedOp, tag=str(F.PROBE)):
    pass


class _PhaseOp(_OrderedOp, tag=str(F.PHASE)):
    pass


class _GovernorOp(_OrderedOp, tag=str(F.GOVERNOR)):
    pass


class _OtherOp(_Op, tag="?"):
    pass  # an ``f`` no checker reads: counted only


_KINDS = (_DecisionOp, _SubmitOp, _PlanOp, _TakeOp, _ResultOp, _OrderOp, _OperatorOp,
          _FaultOp, _ProbeOp, _PhaseOp, _GovernorOp)
_BY_F = {c.__struct_config__.tag: c for c in _KINDS}
_AnyOp = _DecisionOp | _SubmitOp | _PlanOp | _TakeOp | _ResultOp | _OrderOp | _OperatorOp \
    | _FaultOp | _ProbeOp | _PhaseOp | _GovernorOp
_AnyOrdered = _OperatorOp | _FaultOp | _ProbeOp | _PhaseOp | _GovernorOp


@dataclass
class _Scan:
    """What one worker gathered from some history files (merged by :func:`_merge`)."""

    ops: int = 0
    first_ms: int | None = None
    last_ms: int | None = None
    # Keyed by plan id (Any: a hand-written history may use numbers). The types are exact:
    # a worker's scan travels to the parent as msgpack, decoded against them.
    invokes: dict[Any, Submit] = field(default_factory=dict)  # the last invoke
    completions: dict[Any, tuple[int, str, int]] = field(default_factory=dict)  # last one
    plans: dict[Any, PlanEntry] = field(default_factory=dict)
    decisions: dict[Any, list[Decision]] = field(default_factory=dict)
    take_fails: dict[Any, list[int]] = field(default_factory=dict)
    aborts: dict[Any, list[tuple[int, Any]]] = field(default_factory=dict)
    executed_keys: list[Any] = field(default_factory=list)
    executed_ms: list[int] = field(default_factory=list)
    bad_decisions: list[BadDecision] = field(default_factory=list)
    ordered: list[tuple[int, str, _AnyOrdered]] = field(default_factory=list)


_SCAN_DECODER = msgspec.msgpack.Decoder(_Scan)


def encode_scan(sc: _Scan) -> bytes:
    """A worker's scan as msgpack (five times faster than pickling the Structs)."""
    return msgspec.msgpack.encode(sc)


def decode_scan(data: bytes) -> _Scan:
    return _SCAN_DECODER.decode(data)


# A part of a history file: path, first byte, end byte (None: to the end of the file).
# Parts of one file may be scanned by different workers: a plan's facts do not depend on
# the order they are read in (see the module's docstring).
Segment = tuple[str, int, int | None]


# A block's operations are gone over several times (grouped, then taken in bulk): small
# enough that they stay in the CPU's cache. 256 KiB scans 1.75x faster than 4 MiB.
BLOCK_BYTES = 256 << 10


def _blocks(seg: Segment, block: int = BLOCK_BYTES) -> Iterator[tuple[int, bytes]]:
    """A part of a history file in blocks of complete lines, each with its offset in the
    file (a torn last line, which only the end of a file can have, is left out)."""
    path, start, end = seg
    with open(path, "rb") as fh:
        fh.seek(start)
        left = -1 if end is None else end - start
        rest = b""
        at = start  # the offset of ``rest``
        while left != 0 and (chunk := fh.read(block if left < 0 else min(block, left))):
            if left > 0:
                left -= len(chunk)
            chunk = rest + chunk
            cut = chunk.rfind(b"\n") + 1
            rest = chunk[cut:]
            if cut:
                yield at, chunk[:cut]
                at += cut
        # ``rest`` is the torn last line of a killed writer: everything before it stands.


class _BadLine(Exception):
    def __init__(self, n: int, msg: str) -> None:
        super().__init__(msg)
        self.n, self.msg = n, msg


def _line_error(path: str, offset: int, bad: _BadLine) -> HistoryError:
    """The error of a bad line, named by its file and line (``bad.n`` counts from the
    block at ``offset``)."""
    with open(path, "rb") as fh:
        base = fh.read(offset).count(b"\n") if offset else 0
    return HistoryError(f"{path}:{base + bad.n}: {bad.msg}")


class _Decoders:
    # Built once, at import: a decoder's construction resolves every annotation it covers.
    one = msgspec.json.Decoder(_AnyOp)
    generic = msgspec.json.Decoder()

    def decode(self, block: bytes, first_line: int = 1) -> list[_Op]:
        """A block of lines at once; line by line (and leniently) when that fails."""
        try:
            return self.one.decode_lines(block)
        except msgspec.MsgspecError:
            pass
        lines = block.split(b"\n")[:-1]
        out: list[_Op] = []
        for n, line in enumerate(lines, first_line):
            if not line.strip():
                continue
            try:
                out.append(self.one.decode(line))
            except msgspec.ValidationError:
                out.append(self._loose(line, n))
            except msgspec.DecodeError as exc:
                raise _BadLine(n, f"not a history operation: {exc}") from None
        return out

    def _loose(self, line: bytes, n: int) -> _Op:
        """A line with an unknown ``f`` or fields of unexpected types (hand-written,
        imported): keep what can be read, field by field."""
        d = self.generic.decode(line)
        if not isinstance(d, dict) or "f" not in d or "type" not in d:
            raise _BadLine(n, "not a history operation (needs 'type' and 'f')")
        cls = _BY_F.get(str(d["f"]), _OtherOp)
        kw: dict[str, Any] = {}
        for fld in msgspec.structs.fields(cls):
            if fld.name in d and d[fld.name] is not None:
                try:
                    kw[fld.name] = _lenient(d[fld.name], fld.type)
                except msgspec.ValidationError:
                    if fld.name in ("time_ns", "wall_ms"):
                        raise _BadLine(n, f"bad {fld.name} {d[fld.name]!r}") from None
        return cls(**kw)


def _lenient(x: Any, typ: Any) -> Any:
    """``x`` as ``typ``; a struct is filled field by field, skipping fields it cannot read.

    A Literal field takes any string: the Literal only makes the known values cheap."""
    args = get_args(typ)
    if args and any(get_origin(a) is Literal for a in (typ, *args)):
        if isinstance(x, str):
            return x
        raise msgspec.ValidationError(f"expected a string, got {type(x).__name__}")
    if args:  # X | None
        typ = next(a for a in args if a is not type(None))
    if isinstance(typ, type) and issubclass(typ, msgspec.Struct):
        if not isinstance(x, dict):
            raise msgspec.ValidationError(f"expected an object, got {type(x).__name__}")
        kw = {}
        for fld in msgspec.structs.fields(typ):
            if x.get(fld.name) is not None:
                with suppress(msgspec.ValidationError):
                    kw[fld.name] = _lenient(x[fld.name], fld.type)
        return typ(**kw)
    return msgspec.convert(x, typ, strict=False)


_PB = frozenset(("PERMIT", "BLOCK"))
_OC = frozenset(("OPEN", "CLOSE"))
_ACTION = attrgetter("action")
_SYMBOL = attrgetter("symbol")
_DECIDED_AT = attrgetter("decided_at_ms")
_WALL_MS = attrgetter("wall_ms")
_PLAN_ID = attrgetter("plan_id")


_KIND = attrgetter("kind")
_KEY = attrgetter("key")
_VALUE = attrgetter("value")
_TYPE = attrgetter("type")
_TIME_NS = attrgetter("time_ns")
_ENTRY_MS = attrgetter("entry_ms")
_DECISION = attrgetter("decision")
_STATUS = attrgetter("status")
_PLAN = attrgetter("plan")
_SUBMIT_FIELDS = attrgetter("plan_id", "symbol", "notional", "intent_created_at_ms")
_MALFORMED = attrgetter("malformed")
_IS_INVOKE = "invoke".__eq__
_IS_EXECUTED = "executed".__eq__


def _some_none(xs: list[Any]) -> bool:
    return any(map(is_, xs, repeat(None)))


def _fresh(keys: list[Any], seen: dict[Any, Any]) -> bool:
    """Whether ``keys`` are distinct, true, and none of them in ``seen`` yet."""
    return all(keys) and len(set(keys)) == len(keys) and seen.keys().isdisjoint(keys)


class _Scanner:
    """Folds decoded operations into a :class:`_Scan`, a block at a time.

    A block's operations are grouped by kind (a stable sort, so each group keeps the order
    of the file) and each group is taken in bulk with C-level maps and dict updates when
    it is plain: keys new and distinct, values present, nothing to fill in. Anything
    else (a duplicate decision, a failed take, a missing value...) takes the op-by-op path,
    which gives the same facts. On a million-line history this is four times faster.
    """

    def __init__(self) -> None:
        self.sc = _Scan()
        self.first, self.last = 2**63, -(2**63)

    def add(self, objs: list[_Op]) -> None:
        sc = self.sc
        sc.ops += len(objs)
        walls = list(map(_WALL_MS, objs))
        self.first = min(self.first, min(walls))
        self.last = max(self.last, max(walls))
        objs.sort(key=_KIND)
        kinds = list(map(_KIND, objs))
        start = 0
        while start < len(objs):
            k = kinds[start]
            end = bisect_right(kinds, k, start)
            _BULK[k](sc, objs[start:end])
            start = end

    def scan(self) -> _Scan:
        if self.sc.ops:
            self.sc.first_ms, self.sc.last_ms = self.first, self.last
        return self.sc


def _submits(sc: _Scan, ops: list[_SubmitOp]) -> None:
    types = list(map(_TYPE, ops))
    n_inv = types.count("invoke")
    if n_inv:
        inv = ops if n_inv == len(ops) else list(compress(ops, map(_IS_INVOKE, types)))
        keys = list(map(_KEY, inv))
        vals = list(map(_VALUE, inv))
        plans = None if _some_none(vals) else list(map(_PLAN, vals))
        if (plans is not None and not _some_none(plans) and _fresh(keys, sc.invokes)
                and sc.completions.keys().isdisjoint(keys)):
            fields = zip(*map(_SUBMIT_FIELDS, plans), strict=True)
            sc.invokes.update(zip(keys, starmap(Submit, zip(
                repeat("invoke"), map(_WALL_MS, inv), *fields, map(_MALFORMED, vals),
                map(_TIME_NS, inv), strict=False)), strict=True))
        else:
            for o in inv:
                v = o.value
                p = (v.plan if v is not None else None) or _NO_PLAN
                _put_invoke(sc, "" if o.key is None else o.key, Submit(
                    "invoke", o.wall_ms, p.plan_id, p.symbol, p.notional,
                    p.intent_created_at_ms, v.malformed if v is not None else None, o.time_ns))
        if n_inv == len(ops):
            return
        ops = [o for o in ops if o.type != "invoke"]
    keys = list(map(_KEY, ops))
    if _fresh(keys, sc.completions):
        sc.completions.update(zip(keys, zip(map(_TIME_NS, ops), map(_TYPE, ops),
                                            map(_WALL_MS, ops), strict=True), strict=True))
    else:
        keys = ["" if k is None else k for k in keys]
        for key, o in zip(keys, ops, strict=True):
            seen = sc.completions.get(key)
            if seen is None or o.time_ns >= seen[0]:
                sc.completions[key] = (o.time_ns, o.type, o.wall_ms)
    # Completed: the invokes of this scan take their status now, while in the CPU's cache.
    invokes = sc.invokes
    for key, o in zip(keys, ops, strict=True):
        s = invokes.get(key)
        if s is not None and o.time_ns >= s.time_ns and o.time_ns >= s.completed_ns:
            s.status, s.wall_ms, s.completed_ns = o.type, o.wall_ms, o.time_ns


def _put_invoke(sc: _Scan, key: Any, s: Submit) -> None:
    """An invoke, unless a later one of its plan id was seen (with the completion seen
    for it so far)."""
    seen = sc.invokes.get(key)
    if seen is None or s.time_ns >= seen.time_ns:
        c = sc.completions.get(key)
        if c is not None and c[0] >= s.time_ns:
            s.status, s.wall_ms, s.completed_ns = c[1], c[2], c[0]
        sc.invokes[key] = s


def _plans(sc: _Scan, ops: list[_PlanOp]) -> None:
    keys = list(map(_KEY, ops))
    vals = list(map(_VALUE, ops))
    if not _some_none(vals) and all(map(_ENTRY_MS, vals)) and _fresh(keys, sc.plans):
        sc.plans.update(zip(keys, vals, strict=True))
        return
    for key, e, o in zip(keys, vals, ops, strict=True):
        if key and e is not None:
            if not e.entry_ms:
                e.entry_ms = o.wall_ms
            seen = sc.plans.get(key)
            if seen is None or e.entry_ms < seen.entry_ms:
                sc.plans[key] = e


def _decisions(sc: _Scan, ops: list[_DecisionOp]) -> None:
    keys = list(map(_KEY, ops))
    vals = list(map(_VALUE, ops))
    if (not _some_none(vals) and _PB.issuperset(map(_DECISION, vals))
            and _OC.issuperset(map(_ACTION, vals)) and all(map(_SYMBOL, vals))
            and _all_ms(list(filter(None, map(_DECIDED_AT, vals))))
            and all(map(_ENTRY_MS, vals)) and keys == list(map(_PLAN_ID, vals))
            and _fresh(keys, sc.decisions)):
        sc.decisions.update(zip(keys, map(list, zip(vals, strict=True)), strict=True))
        return
    for key, d, o in zip(keys, vals, ops, strict=True):
        if d is None or d.decision not in _PB:
            continue  # informational: the protocol says to skip it, whatever it holds
        if not d.entry_ms:
            d.entry_ms = o.wall_ms
        bad = _breaches(key, d)
        if bad is not None:
            sc.bad_decisions.append(bad)
        if not key:
            continue  # answers no plan
        if d.plan_id != key:
            d.plan_id = key
        ds = sc.decisions.get(key)
        if ds is None:
            sc.decisions[key] = [d]
        else:
            ds.append(d)


def _all_ms(xs: list[Any]) -> bool:
    """Whether every one of ``xs`` (none empty) is written as epoch ms: ASCII digits."""
    try:
        joined = "".join(xs)
    except TypeError:  # not all strings (a hand-written history): the op-by-op path
        return False
    return joined.isascii() and joined.isdigit()


def _breaches(key: Any, d: Decision) -> BadDecision | None:
    """What a PERMIT or BLOCK entry gets wrong against the protocol's decision fields
    (docs/protocol.md, "Decisions"), or None. An action outside OPEN/CLOSE is set to ""
    on ``d``, so that every later reader sees only the protocol's values."""
    problems = []
    if not key:
        problems.append("no plan_id")
    odd = d.action not in _OC
    if odd:
        problems.append(f"action {d.action!r} (OPEN or CLOSE)")
    if d.decision == "PERMIT" and not d.symbol:
        problems.append("PERMIT without a symbol")
    t = d.decided_at_ms
    if t is not None and t != "" and not (
            (isinstance(t, str) and t.isascii() and t.isdigit())
            or (isinstance(t, int) and not isinstance(t, bool) and t >= 0)):
        problems.append(f"decided_at_ms {t!r} (epoch milliseconds)")
    if not problems:
        return None
    bad = BadDecision(key or None, d.symbol, d.action, d.decision, d.reason, d.governor, t,
                      d.entry_ms, d.entry_id, "; ".join(problems), odd)
    if odd:
        d.action = ""
    return bad


def _takes(sc: _Scan, ops: list[_TakeOp]) -> None:
    if "fail" in map(_TYPE, ops):
        for o in ops:
            if o.type == "fail" and o.key:
                sc.take_fails.setdefault(o.key, []).append(o.wall_ms)


def _orders(sc: _Scan, ops: list[_OrderOp]) -> None:
    pass  # judged from the ledger


def _results(sc: _Scan, ops: list[_ResultOp]) -> None:
    vals = list(map(_VALUE, ops))
    if not _some_none(vals) and all(map(_IS_EXECUTED, map(_STATUS, vals))):
        # executed: the ledger says it all to the checkers; kept for chaos.analysis
        sc.executed_keys.extend(map(_KEY, ops))
        ms = list(map(_ENTRY_MS, vals))
        if 0 in ms:  # no entry time: the time the recorder read it
            ms = [m or o.wall_ms for m, o in zip(ms, ops, strict=True)]
        sc.executed_ms.extend(ms)
        return
    for o, v in zip(ops, vals, strict=True):
        if not o.key:
            continue
        if v is not None and v.status == "executed":
            sc.executed_keys.append(o.key)
            sc.executed_ms.append(v.entry_ms or o.wall_ms)
        elif v is None:
            sc.aborts.setdefault(o.key, []).append((o.wall_ms, None))
        elif v.status != "executed":
            sc.aborts.setdefault(o.key, []).append((v.entry_ms or o.wall_ms, v.status))


def _ordered(sc: _Scan, ops: list[_OrderedOp]) -> None:
    sc.ordered.extend((o.time_ns, o.process, o) for o in ops)


def _others(sc: _Scan, ops: list[_Op]) -> None:
    pass  # an ``f`` no checker reads


_BULK = (_submits, _plans, _decisions, _takes, _orders, _results, _ordered, _others)


def _scan(segments: Iterable[Segment]) -> _Scan:
    decoders = _Decoders()
    scanner = _Scanner()
    for seg in segments:
        for offset, block in _blocks(seg):
            try:
                objs = decoders.decode(block)
            except _BadLine as bad:
                raise _line_error(seg[0], offset, bad) from None
            if objs:
                scanner.add(objs)
    return scanner.scan()


_NO_PLAN = _PlanFields()


def _merge(facts: Facts, scans: list[_Scan]) -> list[tuple[int, str, _OrderedOp]]:
    """One set of facts from the scans of parts of the history.

    The biggest scan's dicts are taken over as they are and the others' added to them,
    in bulk where their keys are apart (always, unless a plan id is in two parts)."""
    scans = sorted(scans, key=lambda sc: sc.ops, reverse=True)
    base, others = (scans[0], scans[1:]) if scans else (_Scan(), [])
    submits, completions = base.invokes, base.completions
    # Plan ids submitted in more than one part: resolved below from every part's view.
    cross: set[Any] = set()
    for i, sc in enumerate(others):
        for d in (sc.invokes, sc.completions):
            for seen in scans[:i + 1]:
                cross |= d.keys() & seen.invokes.keys()
                cross |= d.keys() & seen.completions.keys()
    facts.plans, facts.take_fails, facts.aborts = base.plans, base.take_fails, base.aborts
    facts.bad_decisions = [b for sc in scans for b in sc.bad_decisions]
    facts.bad_decisions.sort(key=lambda b: (b.entry_ms, b.entry_id))
    facts.decisions.update(base.decisions)
    ordered = list(base.ordered)
    for sc in others:
        if cross:
            submits.update((k, s) for k, s in sc.invokes.items() if k not in cross)
            completions.update((k, c) for k, c in sc.completions.items() if k not in cross)
        else:
            submits.update(sc.invokes)
            completions.update(sc.completions)
        if facts.plans.keys().isdisjoint(sc.plans):
            facts.plans.update(sc.plans)
        else:
            for k, p in sc.plans.items():
                seen = facts.plans.get(k)
                if seen is None or p.entry_ms < seen.entry_ms:
                    facts.plans[k] = p
        for src, dst in ((sc.decisions, facts.decisions), (sc.take_fails, facts.take_fails),
                         (sc.aborts, facts.aborts)):
            if dst.keys().isdisjoint(src):
                dst.update(src)
                continue
            for k, xs in src.items():
                if k in dst:
                    dst[k].extend(xs)
                else:
                    dst[k] = xs
        ordered.extend(sc.ordered)
    facts.executed_keys = [k for sc in scans for k in sc.executed_keys]
    facts.executed_ms = [m for sc in scans for m in sc.executed_ms]
    # A submit's status is its last completion, when that came after its last invoke (each
    # scan applied its own; a plan id in several parts is decided across them).
    for k in cross:
        s = None
        for sc in scans:
            x = sc.invokes.get(k)
            if x is not None and (s is None or x.time_ns >= s.time_ns):
                s = x
        cs = [sc.completions[k] for sc in scans if k in sc.completions]
        c = max(cs, key=lambda c: c[0]) if cs else None
        if c is not None:
            completions[k] = c
        if s is not None:
            if c is not None and c[0] >= s.time_ns:
                s.status, s.wall_ms, s.completed_ns = c[1], c[2], c[0]
            submits[k] = s
    facts.submits = submits
    for sc in scans:
        facts.ops += sc.ops
        if sc.first_ms is not None:
            facts.first_ms = sc.first_ms if facts.first_ms is None else min(facts.first_ms,
                                                                            sc.first_ms)
        if sc.last_ms is not None:
            facts.last_ms = sc.last_ms if facts.last_ms is None else max(facts.last_ms,
                                                                         sc.last_ms)
    # Files (and parts of files) are scanned in no particular order: lists in time order.
    for ds in facts.decisions.values():
        if len(ds) > 1:
            ds.sort(key=lambda d: (d.entry_ms, d.entry_id))
    for ts in facts.take_fails.values():
        if len(ts) > 1:
            ts.sort()
    for rs in facts.aborts.values():
        if len(rs) > 1:
            rs.sort(key=lambda r: r[0])
    ordered.sort(key=lambda x: (x[0], x[1]))
    return ordered


# Scan in parallel when the history is at least this big: a forked worker starts in a few
# ms, a fresh interpreter in ~0.2 s.
PARALLEL_BYTES_FORKED = 8 * 1024 * 1024
PARALLEL_BYTES = 48 * 1024 * 1024


def _can_fork() -> bool:
    """Whether workers may be forked: only when this process has no other thread (a lock
    one of them held at the fork would stay held in the child)."""
    return hasattr(os, "fork") and threading.active_count() == 1


def _plan_workers(files: list[Path], workers: int | None) -> list[list[Segment]]:
    """Split the files into ``workers`` shares of about equal bytes, cut at line ends."""
    sizes = [p.stat().st_size for p in files]
    total = sum(sizes)
    if workers is None:
        least = PARALLEL_BYTES_FORKED if _can_fork() else PARALLEL_BYTES
        workers = min(os.cpu_count() or 1, 4) if total >= least else 1
    whole: list[Segment] = [(str(p), 0, None) for p in files]
    if workers <= 1 or total == 0:
        return [whole]
    share = total // workers + 1
    groups: list[list[Segment]] = [[]]
    room = share
    for p, size in zip(files, sizes, strict=True):
        start = 0
        while size - start > room and len(groups) < workers:
            cut = _line_end(p, start + room)
            if cut >= size:
                break
            groups[-1].append((str(p), start, cut))
            start = cut
            groups.append([])
            room = share
        groups[-1].append((str(p), start, None))
        room -= size - start
    return [g for g in groups if g]


def _line_end(path: Path, at: int) -> int:
    """The offset just after the first line end at or after ``at``."""
    with open(path, "rb") as fh:
        fh.seek(at)
        fh.readline()
        return fh.tell()


def _scan_files(files: list[Path], workers: int | None,
                meanwhile: Callable[[], None] = lambda: None) -> list[_Scan]:
    """The scans of the files; ``meanwhile`` is run by this process once its own share is
    scanned, while the workers finish theirs (the ledger is read then)."""
    groups = _plan_workers(files, workers)
    if len(groups) <= 1:
        scans = [_scan(groups[0] if groups else [])]
        meanwhile()
        return scans
    if _can_fork():
        return _scan_forked(groups, meanwhile)
    return _scan_spawned(groups, meanwhile)


class ForkError(RuntimeError):
    """Work run in a forked child failed (the message is the child's error)."""


class Forked:
    """``work()`` run in a forked child (a few ms to start; only where :func:`_can_fork`).

    The child writes ``b"K"`` and the bytes ``work`` returned, or ``b"E"`` and its error,
    into a pipe and leaves with ``os._exit`` (no atexit handlers, no flushing of the
    parent's buffers). :meth:`result` waits for them; :meth:`stop` kills a child whose
    result is no longer wanted. Either way the child is reaped."""

    def __init__(self, work: Callable[[], bytes]) -> None:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child
            os.close(r)
            code = 0
            try:
                try:
                    out = b"K" + work()
                except BaseException as exc:  # noqa: BLE001 - reported to the parent
                    out = b"E" + f"{type(exc).__name__}: {exc}".encode()
                    code = 1
                with os.fdopen(w, "wb") as fh:
                    fh.write(out)
            finally:
                os._exit(code)
        os.close(w)
        self.pid: int | None = pid
        self._r = r

    def result(self) -> bytes:
        """What ``work`` returned in the child (ForkError with its error otherwise)."""
        try:
            with os.fdopen(self._r, "rb", closefd=False) as fh:
                data = fh.read()
        finally:
            self.stop()
        if data[:1] != b"K":
            raise ForkError(data[1:].decode(errors="replace") or "forked worker died")
        return data[1:]

    def stop(self) -> None:
        """Close the pipe, kill the child if it still runs, and reap it."""
        if self.pid is None:
            return
        pid, self.pid = self.pid, None
        with suppress(OSError):
            os.close(self._r)
        with suppress(ChildProcessError):
            if os.waitpid(pid, os.WNOHANG) == (0, 0):
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)


def _scan_forked(groups: list[list[Segment]],
                 meanwhile: Callable[[], None] = lambda: None) -> list[_Scan]:
    """Scan in forked children, this process taking the first share."""
    children: list[Forked] = []
    try:
        for g in groups[1:]:
            children.append(Forked(lambda g=g: encode_scan(_scan(g))))
        scans = [_scan(groups[0])]
        meanwhile()
        for child in children:
            try:
                scans.append(decode_scan(child.result()))
            except ForkError as exc:
                raise HistoryError(str(exc)) from None
        return scans
    finally:
        for child in children:
            child.stop()


def _scan_spawned(groups: list[list[Segment]],
                  meanwhile: Callable[[], None] = lambda: None) -> list[_Scan]:
    """Scan in fresh interpreters (~0.1 s to start) that write their scan to stdout."""
    procs = [subprocess.Popen([sys.executable, "-m", "chaos.checkers.scan_worker",
                               json.dumps(g)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for g in groups[1:]]
    try:
        scans = [_scan(groups[0])]  # this process takes a share too
        meanwhile()
        for proc in procs:
            out, err = proc.communicate()
            if proc.returncode != 0:
                raise HistoryError(err.decode(errors="replace").strip().splitlines()[-1]
                                   if err.strip() else f"scan worker exited {proc.returncode}")
            scans.append(decode_scan(out))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return scans


@contextmanager
def gc_paused() -> Iterator[None]:
    """No cyclic garbage collection inside: the facts are millions of acyclic objects that
    would each be traversed by every full collection (quadratic), and none of them is
    garbage until the checkers are done.

    On the way out what was made inside is frozen (``gc.freeze``: never traversed again,
    still freed by reference counting when dropped); else the first allocation after it
    would start a collection over all of it (0.15 s at a million operations)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.freeze()
            gc.enable()


def gather(run_dir: str | Path, workers: int | None = None) -> Facts:
    """The facts of a run directory (``workers``: scanning processes, default by size)."""
    with gc_paused():
        return _gather(Path(run_dir), workers)


def _gather(run_dir: Path, workers: int | None) -> Facts:
    meta: dict[str, Any] = {}
    if (run_dir / "run.json").exists():
        meta = json.loads((run_dir / "run.json").read_text())
    cfg_hash = meta.get("governor_config") or {}
    facts = Facts(run_dir=run_dir, config=GovernorConfig.from_hash(cfg_hash),
                  capital=0.0, allocation_pct=0.0, initial_regime="BASE", meta=meta)
    def read_ledger() -> None:
        facts.orders = load_ledger(run_dir)

    ordered = _merge(facts, _scan_files(history_files(run_dir), workers, read_ledger))
    open_faults: dict[str, FaultWindow] = {}
    regime_inv: dict[str, tuple[int, str]] = {}
    for _t, _p, op in ordered:
        typ, key, ms, v = op.type, op.key, op.wall_ms, op.value or {}
        f = op.__struct_config__.tag
        if f == F.OPERATOR:
            if "config" in v:
                facts.config = GovernorConfig.from_hash(v["config"])
            if "capital" in v:
                facts.capital = float(v["capital"])
                facts.allocation_pct = float(v.get("allocation_pct", 0))
            if "regime" in v:
                if v.get("initial"):
                    facts.initial_regime = v["regime"]
                elif typ == OpType.INVOKE:
                    regime_inv[key or ""] = (ms, v["regime"])
                else:
                    inv_ms, regime = regime_inv.pop(key or "", (ms, v["regime"]))
                    facts.regimes.append((inv_ms, ms, regime, str(typ)))
        elif f == F.FAULT:
            key = key or ""
            phase = v.get("phase")
            if phase == "start" and typ == OpType.INVOKE:
                open_faults[key] = FaultWindow(v.get("kind", "?"), key, ms, None,
                                               target=v.get("target"))
            elif phase == "start" and typ == OpType.FAIL and key in open_faults:
                open_faults.pop(key).ok = False
            elif phase == "stop" and typ != OpType.INVOKE and key in open_faults:
                w = open_faults.pop(key)
                w.stop_ms = ms
                facts.faults.append(w)
            elif phase == "not_fired":
                facts.faults_not_fired.append(v)
        elif f == F.PROBE and key:
            p = facts.probes.setdefault(key, {"probe": v.get("probe"),
                                              "symbol": op.symbol})
            if typ != OpType.INVOKE:
                p.update(status=str(typ), decision=v.get("decision"),
                         reason=v.get("reason", ""))
        elif f == F.PHASE and key:
            facts.phases.setdefault(key, {})[str(typ)] = ms
            if key == "stream_reset":
                facts.stream_resets += 1
        elif f == F.GOVERNOR:
            facts.governor_events.append({"ms": ms, **v})
    for inv_ms, regime in regime_inv.values():  # invoked, never completed: unknown
        facts.regimes.append((inv_ms, 2**62, regime, "info"))
    facts.regimes.sort()
    facts.faults.extend(open_faults.values())
    facts.faults.sort(key=lambda w: w.start_ms)
    if not facts.capital:
        facts.capital = float(meta.get("scenario_spec", {}).get("market", {}).get("capital", 0))
        facts.allocation_pct = float(meta.get("scenario_spec", {}).get("market", {})
                                     .get("allocation_pct", 0))
    return facts

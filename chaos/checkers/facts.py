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
from collections import defaultdict
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from itertools import starmap
from operator import attrgetter
from pathlib import Path
from typing import Any

import msgspec

from chaos.history import F, OpType, history_files
from governor_ref.protocol import GovernorConfig


# Per-plan records are msgspec Structs, decoded straight from the history lines: built in
# C, a third of a dataclass's memory. Unknown fields of a line are skipped unread.
class Decision(msgspec.Struct):
    """A PERMIT or BLOCK as the governor published it (one decision event)."""

    plan_id: str = ""
    symbol: str = ""
    action: str = ""
    decision: str = ""
    reason: str = ""
    governor: str = ""
    entry_ms: int = 0  # the event's stream id time (Redis's clock)
    entry_id: str = ""
    fence: str = ""


class LedgerOrder(msgspec.Struct, frozen=True):
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


class _PlanFields(msgspec.Struct):
    # The raw field values as sent: a malformed plan may carry anything.
    plan_id: Any = None
    symbol: Any = None
    notional: Any = None
    intent_created_at_ms: Any = None


class Submit(msgspec.Struct):
    """A plan a producer sent, as the producer recorded it (the plan may be malformed)."""

    status: str  # invoke (no completion) / ok / info / fail
    wall_ms: int
    plan_id: Any = None
    symbol: Any = None
    notional: Any = None
    intent_created_at_ms: Any = None
    malformed: Any = None


class PlanEntry(msgspec.Struct):
    """The first entry of a plan id in the plan stream, as the recorder read it."""

    entry_ms: int = 0  # the entry's stream id time
    source: Any = None
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
    takes: dict[str, list[tuple[str, int]]] = field(default_factory=lambda: defaultdict(list))
    # (entry_ms, status) of each apply.result entry of a plan
    results: dict[str, list[tuple[int, str]]] = field(default_factory=lambda: defaultdict(list))
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
            # Done: the new regime; in flight at ms or unknown outcome: either may hold.
            current = {regime} if done <= ms and typ == "ok" else current | {regime}
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

    def notional(self, plan_id: str) -> float | None:
        """The plan's notional as sent (else as read from the stream); None if not a number."""
        raw = self._plan_field(plan_id, "notional")
        try:
            return float(raw) if raw is not None else None
        except (TypeError, ValueError):
            return None

    def created_ms(self, plan_id: str) -> int | None:
        """The plan's ``intent_created_at_ms`` as sent; None if absent or not a number."""
        raw = self._plan_field(plan_id, "intent_created_at_ms")
        try:
            return int(raw) if raw is not None else None
        except (TypeError, ValueError):
            return None

    def first_order(self) -> dict[str, LedgerOrder]:
        """Each plan's first order reaching the exchange (built once; C-level loops)."""
        if self._first_order is None:
            rev = self.orders[::-1]  # the first of a plan's orders is the one a dict keeps
            self._first_order = dict(zip(map(_PLAN_ID, rev), rev, strict=True))
        return self._first_order

    def failed_takes(self, plan_id: str) -> list[int]:
        """When the apply layer found the plan's permit gone (each failed take)."""
        return [ms for status, ms in self.takes.get(plan_id, ()) if status == "fail"]

    def close_permit_spans(self) -> Iterator[tuple[Decision, int, bool]]:
        """Each CLOSE permit with the time it stopped being outstanding.

        Yields ``(permit, end_ms, lapsed)``: the end is the first of its order
        reaching the exchange, a failed take (the permit was gone), or a result
        other than ``executed``; with none of these the permit lapsed at
        ``permit_ttl_ms`` (``lapsed`` True). Never before the permit itself.
        """
        ttl = self.config.permit_ttl_ms
        first_order = self.first_order()
        for pid, d in self.permits().items():
            if d.action != "CLOSE":
                continue
            ends = self.failed_takes(pid)
            ends += [ms for ms, status in self.results.get(pid, ()) if status != "executed"]
            if pid in first_order:
                ends.append(first_order[pid].wall_ms)
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
# tag), with only the value fields a checker reads.
class _Op(msgspec.Struct, tag_field="f"):
    # Only what the hot operations need: every field decoded is a string to build.
    type: str = ""
    time_ns: int = 0
    wall_ms: int = 0
    key: Any = None


class _SubmitVal(msgspec.Struct):
    plan: _PlanFields | None = None
    malformed: Any = None


class _ResultVal(msgspec.Struct):
    entry_ms: int = 0
    status: Any = None


class _DecisionOp(_Op, tag=str(F.DECISION)):
    value: Decision | None = None


class _SubmitOp(_Op, tag=str(F.SUBMIT)):
    value: _SubmitVal | None = None


class _PlanOp(_Op, tag=str(F.PLAN)):
    value: PlanEntry | None = None


class _TakeOp(_Op, tag=str(F.TAKE)):
    pass


class _ResultOp(_Op, tag=str(F.RESULT)):
    value: _ResultVal | None = None


class _OrderOp(_Op, tag=str(F.ORDER)):
    pass  # orders are judged from the ledger


class _OrderedOp(_Op):
    """Operations whose meaning depends on the order of others: replayed in time order."""

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
    process: str = ""  # an ``f`` no checker reads: counted only


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
    invokes: dict[Any, tuple[int, Submit]] = field(default_factory=dict)  # last invoke
    completions: dict[Any, tuple[int, str, int]] = field(default_factory=dict)  # last one
    plans: dict[Any, PlanEntry] = field(default_factory=dict)
    decisions: dict[Any, list[Decision]] = field(default_factory=dict)
    takes: dict[Any, list[tuple[str, int]]] = field(default_factory=dict)
    results: dict[Any, list[tuple[int, Any]]] = field(default_factory=dict)
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


def _blocks(seg: Segment, block: int = 4 << 20) -> Iterator[bytes]:
    """A part of a history file in blocks of complete lines (a torn last line, which only
    the end of a file can have, is left out)."""
    path, start, end = seg
    with open(path, "rb") as fh:
        fh.seek(start)
        left = -1 if end is None else end - start
        rest = b""
        while left != 0 and (chunk := fh.read(block if left < 0 else min(block, left))):
            if left > 0:
                left -= len(chunk)
            chunk = rest + chunk
            cut = chunk.rfind(b"\n") + 1
            rest = chunk[cut:]
            if cut:
                yield chunk[:cut]
        # ``rest`` is the torn last line of a killed writer: everything before it stands.


class _BadLine(Exception):
    def __init__(self, n: int, msg: str) -> None:
        super().__init__(msg)
        self.n, self.msg = n, msg


def _line_error(seg: Segment, bad: _BadLine) -> HistoryError:
    path, start, _end = seg
    with open(path, "rb") as fh:
        base = fh.read(start).count(b"\n") if start else 0
    return HistoryError(f"{path}:{base + bad.n}: {bad.msg}")


class _Decoders:
    def __init__(self) -> None:
        self.block = msgspec.json.Decoder(list[_AnyOp])
        self.one = msgspec.json.Decoder(_AnyOp)
        self.generic = msgspec.json.Decoder()

    def decode(self, block: bytes, first_line: int) -> list[_Op]:
        """A block of lines at once, as one JSON array; line by line (and leniently) when
        that fails."""
        try:
            return self.block.decode(b"[" + block[:-1].replace(b"\n", b",") + b"]")
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
    """``x`` as ``typ``; a struct is filled field by field, skipping fields it cannot read."""
    args = getattr(typ, "__args__", None)
    if args:  # X | None
        typ = next(a for a in args if a is not type(None))
    if isinstance(typ, type) and issubclass(typ, msgspec.Struct):
        if not isinstance(x, dict):
            raise msgspec.ValidationError(f"expected an object, got {type(x).__name__}")
        kw = {}
        for fld in msgspec.structs.fields(typ):
            if x.get(fld.name) is not None:
                with suppress(msgspec.ValidationError):
                    kw[fld.name] = msgspec.convert(x[fld.name], fld.type, strict=False)
        return typ(**kw)
    return msgspec.convert(x, typ, strict=False)


_PB = frozenset(("PERMIT", "BLOCK"))
_WALL_MS = attrgetter("wall_ms")
_PLAN_ID = attrgetter("plan_id")


def _scan(segments: Iterable[Segment]) -> _Scan:
    decoders = _Decoders()
    sc = _Scan()
    invokes, completions, plans = sc.invokes, sc.completions, sc.plans
    decisions, takes, results, ordered = sc.decisions, sc.takes, sc.results, sc.ordered
    first, last = 2**63, -(2**63)
    ops = 0
    for seg in segments:
        line_no = 1
        for block in _blocks(seg):
            try:
                objs = decoders.decode(block, line_no)
            except _BadLine as bad:
                raise _line_error(seg, bad) from None
            line_no += block.count(b"\n")
            if not objs:
                continue
            ops += len(objs)
            first = min(first, min(map(_WALL_MS, objs)))
            last = max(last, max(map(_WALL_MS, objs)))
            for o in objs:
                cls = o.__class__
                ms = o.wall_ms
                key = o.key
                if cls is _SubmitOp:
                    if key is None:
                        key = ""
                    if o.type == "invoke":
                        v = o.value
                        p = (v.plan if v is not None else None) or _NO_PLAN
                        invokes[key] = (o.time_ns, Submit(
                            "invoke", ms, p.plan_id, p.symbol, p.notional,
                            p.intent_created_at_ms, v.malformed if v is not None else None))
                    else:
                        completions[key] = (o.time_ns, o.type, ms)
                elif cls is _DecisionOp:
                    d = o.value
                    if key and d is not None and d.decision in _PB:
                        if not d.entry_ms:
                            d.entry_ms = ms
                        if d.plan_id != key:
                            d.plan_id = key
                        ds = decisions.get(key)
                        if ds is None:
                            decisions[key] = [d]
                        else:
                            ds.append(d)
                elif cls is _PlanOp:
                    e = o.value
                    if key and e is not None:
                        if not e.entry_ms:
                            e.entry_ms = ms
                        seen = plans.get(key)
                        if seen is None or e.entry_ms < seen.entry_ms:
                            plans[key] = e
                elif cls is _TakeOp:
                    if key:
                        ts = takes.get(key)
                        if ts is None:
                            takes[key] = [(o.type, ms)]
                        else:
                            ts.append((o.type, ms))
                elif cls is _ResultOp:
                    if key:
                        v = o.value
                        r = ((v.entry_ms or ms, v.status) if v is not None else (ms, None))
                        rs = results.get(key)
                        if rs is None:
                            results[key] = [r]
                        else:
                            rs.append(r)
                elif cls is _OrderOp or cls is _OtherOp:
                    pass
                else:
                    ordered.append((o.time_ns, o.process, o))
    sc.ops = ops
    if ops:
        sc.first_ms, sc.last_ms = first, last
    return sc


_NO_PLAN = _PlanFields()


def _merge(facts: Facts, scans: list[_Scan]) -> list[tuple[int, str, _OrderedOp]]:
    invokes: dict[str, tuple[int, Submit]] = {}
    completions: dict[str, tuple[int, str, int]] = {}
    ordered: list[tuple[int, str, _OrderedOp]] = []
    for sc in scans:
        facts.ops += sc.ops
        if sc.first_ms is not None:
            facts.first_ms = sc.first_ms if facts.first_ms is None else min(facts.first_ms,
                                                                            sc.first_ms)
        if sc.last_ms is not None:
            facts.last_ms = sc.last_ms if facts.last_ms is None else max(facts.last_ms,
                                                                         sc.last_ms)
        for k, inv in sc.invokes.items():
            if k not in invokes or inv[0] >= invokes[k][0]:
                invokes[k] = inv
        for k, c in sc.completions.items():
            if k not in completions or c[0] >= completions[k][0]:
                completions[k] = c
        for k, p in sc.plans.items():
            seen = facts.plans.get(k)
            if seen is None or p.entry_ms < seen.entry_ms:
                facts.plans[k] = p
        for src, dst in ((sc.decisions, facts.decisions), (sc.takes, facts.takes),
                         (sc.results, facts.results)):
            if not dst:
                dst.update(src)
            else:
                for k, xs in src.items():
                    if k in dst:
                        dst[k].extend(xs)
                    else:
                        dst[k] = xs
        ordered.extend(sc.ordered)
    # Files (and parts of files) are scanned in no particular order: lists in time order.
    for ds in facts.decisions.values():
        if len(ds) > 1:
            ds.sort(key=lambda d: (d.entry_ms, d.entry_id))
    for ts in facts.takes.values():
        if len(ts) > 1:
            ts.sort(key=lambda t: t[1])
    for rs in facts.results.values():
        if len(rs) > 1:
            rs.sort(key=lambda r: r[0])
    # A submit's status is its last completion, when that came after its last invoke.
    for k, (t_inv, s) in invokes.items():
        c = completions.get(k)
        if c is not None and c[0] >= t_inv:
            s.status, s.wall_ms = c[1], c[2]
        facts.submits[k] = s
    ordered.sort(key=lambda x: (x[0], x[1]))
    return ordered


# Scan in parallel when the history is at least this big (a worker starts in ~0.2 s).
PARALLEL_BYTES = 48 * 1024 * 1024


def _plan_workers(files: list[Path], workers: int | None) -> list[list[Segment]]:
    """Split the files into ``workers`` shares of about equal bytes, cut at line ends."""
    sizes = [p.stat().st_size for p in files]
    total = sum(sizes)
    if workers is None:
        workers = min(os.cpu_count() or 1, 4) if total >= PARALLEL_BYTES else 1
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


def _scan_files(files: list[Path], workers: int | None) -> list[_Scan]:
    groups = _plan_workers(files, workers)
    if len(groups) <= 1:
        return [_scan(groups[0] if groups else [])]
    if hasattr(os, "fork") and threading.active_count() == 1:
        return _scan_forked(groups)
    return _scan_spawned(groups)


def _scan_forked(groups: list[list[Segment]]) -> list[_Scan]:
    """Scan in forked children (a few ms to start), this process taking the first share.

    Only when this process has no other thread, so no lock can be held at the fork. A
    child pickles ``("ok", scan)`` or ``("error", message)`` into its pipe and leaves with
    ``os._exit`` (no atexit handlers, no flushing of the parent's buffers)."""
    children: list[tuple[int, int]] = []
    try:
        for g in groups[1:]:
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:  # the child
                os.close(r)
                code = 0
                try:
                    try:
                        out = b"K" + encode_scan(_scan(g))
                    except BaseException as exc:  # noqa: BLE001 - reported to the parent
                        out = b"E" + f"{type(exc).__name__}: {exc}".encode()
                        code = 1
                    with os.fdopen(w, "wb") as fh:
                        fh.write(out)
                finally:
                    os._exit(code)
            os.close(w)
            children.append((pid, r))
        scans = [_scan(groups[0])]
        for _pid, r in children:
            with os.fdopen(r, "rb", closefd=False) as fh:
                data = fh.read()
            if data[:1] != b"K":
                raise HistoryError(data[1:].decode(errors="replace") or "scan worker died")
            scans.append(decode_scan(data[1:]))
        return scans
    finally:
        for pid, r in children:
            with suppress(OSError):
                os.close(r)
            with suppress(ChildProcessError):
                if os.waitpid(pid, os.WNOHANG) == (0, 0):
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)


def _scan_spawned(groups: list[list[Segment]]) -> list[_Scan]:
    """Scan in fresh interpreters (~0.1 s to start) that write their scan to stdout."""
    procs = [subprocess.Popen([sys.executable, "-m", "chaos.checkers.scan_worker",
                               json.dumps(g)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for g in groups[1:]]
    try:
        scans = [_scan(groups[0])]  # this process takes a share too
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
    garbage until the checkers are done."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
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
    ordered = _merge(facts, _scan_files(history_files(run_dir), workers))
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
    facts.orders = load_ledger(run_dir)
    if not facts.capital:
        facts.capital = float(meta.get("scenario_spec", {}).get("market", {}).get("capital", 0))
        facts.allocation_pct = float(meta.get("scenario_spec", {}).get("market", {})
                                     .get("allocation_pct", 0))
    return facts

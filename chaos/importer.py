"""Post-incident import: what a production Redis recorded, as a run directory to check.

Production has no harness around the governors: no producer records its
submits, there is no exchange ledger, no fault window and no liveness probe.
What it does have is what the protocol makes every part write into Redis: the
plan, decision and result streams, the position mirror and the operator's
inputs. This module reads those, and only those, with read commands only
(XRANGE in pages, SCAN, HGETALL, GET, and a PING to fail early), and writes a
run directory that the checkers and the report judge like any other:

``history/imported-*.jsonl``
    every stream entry in the recorder's shapes (``plan``, ``decision``,
    ``result``), a ``submit`` invoke + ok for every plan entry (it is on the
    stream, so it was surely submitted), the operator's inputs as read, and a
    ``cutoff`` phase one decision deadline before the last entry: plans newer
    than that are not expected to be decided yet.
``ledger.sqlite``
    derived from the executor's ``executed`` results, replayed per symbol, as
    there is no exchange to ask: the ground truth is only as good as the
    executor's reports.
``positions.json``
    the ``P:position:*`` mirror as read, compared with the replay in run.json.

Times: ``time_ns`` is derived from the stream ids (the Redis server's clock),
so that the merged history is in stream order, and ``wall_ms`` is the id's
milliseconds, as for a recorded run.

A saved dump (``--rdb``) is read the same way, from our own embedded
redis-server started on a copy of it in a temp dir, loopback only, and
always stopped again.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import re
import shutil
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, TextIO

import redis

from chaos.exchange import Exchange, plain_decimal
from chaos.history import HISTORY_DIR, F, Op, OpType, history_files, write_history
from chaos.recorder import _decode, _id_tuple
from chaos.redis_servers import (
    EmbeddedRedis,
    RedisProviderError,
    _glob_escape,
    redact_url,
)
from chaos.runner import _link_latest, default_run_dir
from governor_ref.connection import connect
from governor_ref.keys import Keys
from governor_ref.protocol import GovernorConfig, Plan, PlanError

log = logging.getLogger(__name__)

ROOT_IMPORTS = Path("reports") / "imports"
PAGE = 10_000  # entries per XRANGE
DECISION_DEADLINE_MS = 60_000  # check_one_decision's deadline: a plan is overdue after it
MAX_SEQ = 2**64 - 1
RECORDER = "recorder"  # the process of the recorder's ops, as a live run writes them
IMPORTED = "imported"  # the process of the synthesized submits
RDB_NAME = "dump.rdb"
# time_ns = ms * 10^6 + seq * 4 + step: up to 250,000 entries per ms keep their order, and a
# plan's submit invoke (step 0), entry (1) and submit ok (2) stay in that order.
_STEPS = 4
_SEQ_SLOTS = 1_000_000 // _STEPS
_ID_RE = re.compile(r"(\d+)-(\d+)")

CHECKS_SKIPPED = ["liveness"]
CAVEATS = [
    "ledger.sqlite is derived from apply.result (every 'executed' result, replayed per "
    "symbol): there is no exchange in production, so the ground truth is only as good as "
    "the executor's reports",
    "regime, config, capital and allocations were read at import time and are taken as in "
    "force for the whole window: the regime history before the import is unknown",
    "no liveness probe ran: liveness is not checked (checks_skipped)",
    "plans newer than the cutoff (last entry - 60 s) are not expected to be decided yet",
]


class ImportArgumentError(ValueError):
    """The arguments cannot work (exit 254); the message names the option."""


class SourceUnavailable(RuntimeError):
    """The Redis (or the dump) cannot be read (exit 255); the message is one line."""


# -- the window ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Bound:
    """One end of the window: a stream id, or a time (``seq`` None) that covers its whole ms."""

    ms: int
    seq: int | None = None
    text: str = ""

    def as_min(self) -> str:
        return f"{self.ms}-{self.seq or 0}"

    def as_max(self) -> str:
        return f"{self.ms}-{MAX_SEQ if self.seq is None else self.seq}"


def parse_bound(text: str) -> Bound:
    """A stream id (``1795514182279-0``), epoch milliseconds, or an ISO-8601 time (UTC when
    it names no zone); ValueError otherwise."""
    t = text.strip()
    if m := _ID_RE.fullmatch(t):
        ms, seq = int(m[1]), int(m[2])
        if ms > MAX_SEQ or seq > MAX_SEQ:  # Redis would answer "Invalid stream ID" mid-import
            raise ValueError(f"{text!r}: both parts of a stream id must be below 2^64")
        return Bound(ms, seq, t)
    if t.isdigit():
        if int(t) > MAX_SEQ:
            raise ValueError(f"{text!r}: epoch milliseconds must be below 2^64")
        return Bound(int(t), None, t)
    try:
        dt = datetime.fromisoformat(t)
    except ValueError:
        raise ValueError(f"{text!r} is not a stream id (1795514182279-0), epoch milliseconds "
                         f"or an ISO-8601 time (2026-11-20T14:03:00Z)") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    ms = int(dt.timestamp() * 1000)
    if ms < 0:
        raise ValueError(f"{text!r} is before 1970")
    return Bound(ms, None, t)


@dataclass(frozen=True)
class ImportOptions:
    prefix: str
    redis_url: str | None = None
    rdb: Path | None = None
    since: Bound | None = None
    until: Bound | None = None
    out: Path | None = None
    page: int = PAGE
    progress: Callable[[dict[str, int]], None] | None = None

    @property
    def min_id(self) -> str:
        return self.since.as_min() if self.since else "-"

    @property
    def max_id(self) -> str:
        return self.until.as_max() if self.until else "+"

    def validate(self) -> None:
        """Raise :class:`ImportArgumentError` naming the option that cannot work."""
        if (self.redis_url is None) == (self.rdb is None):
            raise ImportArgumentError("give exactly one of --redis-url URL and --rdb FILE")
        if not self.prefix or not self.prefix.strip(":"):
            raise ImportArgumentError("--prefix must not be empty")
        if self.rdb is not None and not self.rdb.is_file():
            raise ImportArgumentError(f"--rdb {self.rdb}: no such file")
        if self.since and self.until and \
                _id_tuple(self.since.as_min()) > _id_tuple(self.until.as_max()):
            raise ImportArgumentError(f"--since {self.since.text} is after --until "
                                      f"{self.until.text}")
        if self.out is not None and self.out.exists() and not self.out.is_dir():
            raise ImportArgumentError(f"--out {self.out} is not a directory")
        if self.out is not None and history_files(self.out):
            raise ImportArgumentError(f"--out {self.out} already holds a run "
                                      f"({HISTORY_DIR}/*.jsonl); give a new directory")
        if self.page < 1:
            raise ImportArgumentError("page size must be >= 1")


@dataclass
class ImportResult:
    run_dir: Path
    meta: dict[str, Any]


def default_import_dir(prefix: str) -> Path:
    """``reports/imports/<prefix>/<timestamp>/`` (the prefix made safe as a directory name)."""
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in prefix)[:80] or "prefix"
    return default_run_dir(name, root=ROOT_IMPORTS)


# -- entry points -------------------------------------------------------------------------------
def import_run(opts: ImportOptions) -> ImportResult:
    """Import one prefix from ``opts.redis_url`` or ``opts.rdb`` into a run directory."""
    opts.validate()
    if opts.rdb is not None:
        with rdb_server(opts.rdb) as url:
            return _import(opts, url, {"rdb": str(opts.rdb.resolve())})
    assert opts.redis_url is not None
    return _import(opts, opts.redis_url, {"redis_url": masked_url(opts.redis_url)})


def masked_url(url: str) -> str:
    """The URL without its password (the harness's one redaction, :func:`redact_url`)."""
    return redact_url(url)


@contextlib.contextmanager
def rdb_server(path: Path) -> Iterator[str]:
    """Our own redis-server on a copy of ``path`` (loopback only); yields its URL.

    The copy lives in a temp dir, so the dump itself is never opened for writing, and the
    server runs without persistence. It is stopped (SIGTERM to its pid, then SIGKILL) and
    the dir removed on every way out, errors and Ctrl-C included.
    """
    tmp = Path(tempfile.mkdtemp(prefix="chaos-import-"))
    server: EmbeddedRedis | None = None
    try:
        shutil.copyfile(path, tmp / RDB_NAME)
        # Loading a big dump takes a while; the server answers PING only once it is loaded.
        timeout = max(30.0, path.stat().st_size / 20e6)
        server = EmbeddedRedis(data_dir=tmp, name="import", start_timeout=timeout)
        try:
            server.start()
        except RedisProviderError as exc:
            raise SourceUnavailable(f"--rdb {path}: redis-server could not load it: "
                                    f"{_load_error(server, exc)}") from exc
        log.info("import: redis-server pid %s serves a copy of %s", server.pid, path)
        yield server.url
    finally:
        if server is not None:
            pid = server.pid
            server.stop()
            log.info("import: stopped redis-server pid %s", pid)
        shutil.rmtree(tmp, ignore_errors=True)


def _load_error(server: EmbeddedRedis, exc: Exception) -> str:
    """The line of the server's log that says why it did not load the dump."""
    lines = [ln for ln in server.log_tail(20).splitlines()
             if any(w in ln for w in ("RDB", "rdb", "Fatal", "Bad file", "Wrong"))]
    return _one_line(lines[-1] if lines else str(exc).splitlines()[0])


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _connect(url: str, shown: str) -> redis.Redis:
    try:
        r = connect(url, decode_responses=False, socket_timeout=30.0)
    except ValueError as exc:
        raise ImportArgumentError(f"--redis-url: {exc}") from None
    try:
        r.ping()
    except redis.RedisError as exc:
        r.close()
        raise SourceUnavailable(f"cannot reach Redis at {shown}: {_one_line(str(exc))}"
                                ) from None
    return r


# -- the import -----------------------------------------------------------------------------
def _import(opts: ImportOptions, url: str, source: dict[str, str]) -> ImportResult:
    shown = source.get("redis_url") or source.get("rdb", "")
    r = _connect(url, shown)
    try:
        keys = Keys(opts.prefix)
        imp = _Importer(r, keys, opts)
        try:
            if not imp.has_entries():
                raise ImportArgumentError(
                    f"no plan, decision or result entries under --prefix {opts.prefix!r}"
                    f"{' in the window' if opts.since or opts.until else ''}: check --prefix"
                    f"{' and --since/--until' if opts.since or opts.until else ''}")
        except redis.RedisError as exc:
            raise SourceUnavailable(f"reading {shown}: {_one_line(str(exc))}") from None
        run_dir = (opts.out or default_import_dir(opts.prefix)).resolve()
        run_dir.mkdir(parents=True, exist_ok=True)
        if opts.out is None:
            _link_latest(run_dir)
        meta = _Meta(run_dir)
        meta.write(kind="import", scenario=f"import:{opts.prefix}", governor="imported",
                   status="running", source=source, prefix=opts.prefix,
                   redis={"kind": "import", "url": shown, "prefix": opts.prefix},
                   started_wall_ms=_now_ms(), python=sys.version.split()[0],
                   platform=platform.platform(), checks_skipped=list(CHECKS_SKIPPED))
        try:
            imp.run(run_dir, meta)
        except redis.RedisError as exc:
            meta.write(status="harness_error", error=f"{type(exc).__name__}: {exc}",
                       ended_wall_ms=_now_ms())
            raise SourceUnavailable(f"reading {shown}: {_one_line(str(exc))}") from None
        except BaseException as exc:
            meta.write(status="interrupted" if isinstance(exc, KeyboardInterrupt)
                       else "harness_error", error=f"{type(exc).__name__}: {exc}",
                       ended_wall_ms=_now_ms())
            raise
        return ImportResult(run_dir, meta.data)
    finally:
        r.close()


def _now_ms() -> int:
    return int(time.time() * 1000)


class _Meta:
    """run.json, rewritten atomically on every update (as the runner does)."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.data: dict[str, Any] = {}

    def write(self, **updates: Any) -> None:
        self.data.update(updates)
        tmp = self.run_dir / "run.json.tmp"
        tmp.write_text(json.dumps(self.data, indent=2, default=str))
        os.replace(tmp, self.run_dir / "run.json")


def _time_ns(entry_id: str, step: int = 0) -> int:
    ms, seq = _id_tuple(entry_id)
    return ms * 1_000_000 + min(seq, _SEQ_SLOTS - 1) * _STEPS + step


def _next_id(entry_id: str) -> str:
    """The smallest id after ``entry_id`` (exclusive ranges need Redis 6.2; this works on any)."""
    ms, seq = _id_tuple(entry_id)
    return f"{ms + 1}-0" if seq >= MAX_SEQ else f"{ms}-{seq + 1}"


class _OpFile:
    """One history file, written in stream order as the entries are read (never held whole)."""

    def __init__(self, run_dir: Path, name: str) -> None:
        d = run_dir / HISTORY_DIR
        d.mkdir(parents=True, exist_ok=True)
        self._fh: TextIO = open(d / f"{name}.jsonl", "w", encoding="utf-8")  # noqa: SIM115

    def write(self, op: Op) -> None:
        self._fh.write(op.to_json() + "\n")

    def close(self) -> None:
        self._fh.close()


@dataclass
class _Window:
    first_ms: int | None = None
    last_ms: int | None = None

    def see(self, ms: int) -> None:
        self.first_ms = ms if self.first_ms is None else min(self.first_ms, ms)
        self.last_ms = ms if self.last_ms is None else max(self.last_ms, ms)


@dataclass
class _Inputs:
    """The operator's inputs and the mirror, as read (at import time)."""

    config: dict[str, str] = field(default_factory=dict)
    config_errors: dict[str, str] = field(default_factory=dict)
    regime: str | None = None
    capital: str | None = None
    exposure_pct: str | None = None
    allocations: dict[str, float | None] = field(default_factory=dict)
    mirror: dict[str, dict[str, str]] = field(default_factory=dict)
    unreadable: dict[str, str] = field(default_factory=dict)  # key -> why

    def allocation_pct(self) -> float:
        """The largest allocation: the checker has one for every symbol, and a larger one
        can only hide a violation, never invent one."""
        return max((a for a in self.allocations.values() if a is not None), default=0.0)

    def capital_value(self) -> float | None:
        try:
            return float(self.capital) if self.capital is not None else None
        except ValueError:
            return None


class _Importer:
    """Reads the streams of one prefix into history files, then derives the ledger."""

    def __init__(self, r: redis.Redis, keys: Keys, opts: ImportOptions) -> None:
        self.r = r
        self.keys = keys
        self.opts = opts
        self.counts = {"plans": 0, "decisions": 0, "results": 0}
        self.window = _Window()
        self.permits: dict[str, int] = {}  # plan id -> ms of its first PERMIT
        self.executed: list[tuple[str, dict[str, str]]] = []
        self.plans: dict[str, dict[str, str]] = {}  # fields of plans that have an order
        self.decisions_by_kind: dict[str, int] = {}
        self.results_by_status: dict[str, int] = {}
        self.malformed = 0

    def has_entries(self) -> bool:
        return any(self.r.xrange(k, self.opts.min_id, self.opts.max_id, count=1)
                   for k in (self.keys.plans, self.keys.events, self.keys.results))

    def cuts_start(self) -> bool:
        """Whether ``--since`` leaves out entries: a stream has one before the window."""
        if self.opts.since is None:
            return False
        for k in (self.keys.plans, self.keys.events, self.keys.results):
            first = self.r.xrange(k, "-", "+", count=1)
            if first and _id_tuple(_str(first[0][0])) < _id_tuple(self.opts.since.as_min()):
                return True
        return False

    def run(self, run_dir: Path, meta: _Meta) -> None:
        cut = self.cuts_start()
        # Decisions first (their PERMIT times are the ledger's issued_at_ms), then results
        # (the orders), then plans (only the fields of plans that have an order are kept).
        self._read(run_dir, "imported-decisions", self.keys.events, "decisions",
                   self._decision)
        self._read(run_dir, "imported-results", self.keys.results, "results", self._result)
        need = {f.get("plan_id", "") for _eid, f in self.executed}
        self._read(run_dir, "imported-plans", self.keys.plans, "plans",
                   lambda out, eid, raw, f: self._plan(out, eid, raw, f, need))
        self._report_progress(final=True)
        inputs = read_inputs(self.r, self.keys)
        (run_dir / "positions.json").write_text(json.dumps(
            {"read_at_ms": _now_ms(), "exposure_pct": inputs.exposure_pct,
             "positions": inputs.mirror}, indent=2, sort_keys=True))
        cutoff = self._write_operator_ops(run_dir, inputs)
        replay = derive_ledger(run_dir / "ledger.sqlite", self.executed, self.plans,
                               self.permits, window_cut=cut)
        diff = mirror_diff(inputs.mirror, replay.open_positions)
        meta.write(**self._meta(inputs, replay, diff, cut, cutoff))

    # -- streams ----------------------------------------------------------------------------
    def _read(self, run_dir: Path, name: str, key: str, what: str,
              handle: Callable[[_OpFile, str, dict[Any, Any], dict[str, str]], None]) -> None:
        out = _OpFile(run_dir, name)
        try:
            for eid, raw in self._entries(key, what):
                handle(out, eid, raw, _decode(raw))
        finally:
            out.close()

    def _entries(self, key: str, what: str) -> Iterator[tuple[str, dict[Any, Any]]]:
        """Every entry of ``key`` in the window, XRANGE page by page."""
        lo = self.opts.min_id
        while True:
            page = self.r.xrange(key, lo, self.opts.max_id, count=self.opts.page)
            for eid_raw, raw in page:
                eid = _str(eid_raw)
                self.window.see(_id_tuple(eid)[0])
                self.counts[what] += 1
                yield eid, raw
            if len(page) < self.opts.page:
                return
            lo = _next_id(_str(page[-1][0]))
            self._report_progress()

    def _report_progress(self, final: bool = False) -> None:
        if self.opts.progress is not None:
            self.opts.progress({**self.counts, "final": int(final)})

    def _decision(self, out: _OpFile, eid: str, _raw: dict[Any, Any],
                  f: dict[str, str]) -> None:
        out.write(_stream_op(F.DECISION, eid, f))
        kind = f.get("decision", "")
        self.decisions_by_kind[kind] = self.decisions_by_kind.get(kind, 0) + 1
        pid = f.get("plan_id")
        if pid and kind == "PERMIT":
            self.permits.setdefault(pid, _id_tuple(eid)[0])

    def _result(self, out: _OpFile, eid: str, _raw: dict[Any, Any],
                f: dict[str, str]) -> None:
        out.write(_stream_op(F.RESULT, eid, f))
        status = f.get("status", "")
        self.results_by_status[status] = self.results_by_status.get(status, 0) + 1
        if status == "executed":
            self.executed.append((eid, f))

    def _plan(self, out: _OpFile, eid: str, raw: dict[Any, Any], f: dict[str, str],
              need: set[str]) -> None:
        """The plan entry between a submit invoke and its ok: it is on the stream, so it was
        surely submitted. A plan that breaks the contract says how (``malformed``), so the
        checkers expect no answer to one without a usable plan id, as for a recorded run."""
        ms = _id_tuple(eid)[0]
        pid = f.get("plan_id")
        key = pid if pid is not None else f"noid-{eid}"
        invoke: dict[str, Any] = {"plan": f}
        try:
            Plan.from_fields(raw)
        except PlanError as exc:
            invoke["malformed"] = str(exc)
            self.malformed += 1
        sym = f.get("symbol")
        out.write(Op(OpType.INVOKE, str(F.SUBMIT), IMPORTED, _time_ns(eid, 0), ms, key, sym,
                     invoke))
        out.write(_stream_op(F.PLAN, eid, f))
        out.write(Op(OpType.OK, str(F.SUBMIT), IMPORTED, _time_ns(eid, 2), ms, key, sym,
                     {"entry_id": eid}))
        if pid in need and pid not in self.plans:
            self.plans[pid] = f

    # -- operator, phase, run.json ----------------------------------------------------------
    def _write_operator_ops(self, run_dir: Path, inputs: _Inputs) -> int:
        """The inputs as operator ops at the start of the window; the cutoff phase."""
        first, last = self.window.first_ms or 0, self.window.last_ms or 0
        t0 = first * 1_000_000 - _STEPS
        read_at = _now_ms()
        ops = [Op(OpType.OK, str(F.OPERATOR), "operator", t0, first, "config",
                  value={"config": inputs.config, "read_at_ms": read_at})]
        if inputs.regime is not None:
            ops.append(Op(OpType.OK, str(F.OPERATOR), "operator", t0 + 1, first,
                          "regime-initial", value={"regime": inputs.regime, "initial": True,
                                                   "read_at_ms": read_at}))
        capital = inputs.capital_value()
        if capital is not None:
            ops.append(Op(OpType.OK, str(F.OPERATOR), "operator", t0 + 2, first, "capital",
                          value={"capital": capital,
                                 "allocation_pct": inputs.allocation_pct(),
                                 "symbols": sorted(inputs.allocations),
                                 "read_at_ms": read_at}))
        # Never before the first entry's ms - 1: a window shorter than the deadline expects
        # no decision at all, and the history does not start long before its first entry.
        cutoff = max(last - DECISION_DEADLINE_MS, first - 1)
        for typ in (OpType.INVOKE, OpType.OK):
            ops.append(Op(typ, str(F.PHASE), "importer", cutoff * 1_000_000 + 999_999, cutoff,
                          "cutoff", value={"deadline_ms": DECISION_DEADLINE_MS,
                                           "last_entry_ms": last}))
        write_history(run_dir, ops, name="imported-operator")
        return cutoff

    def _meta(self, inputs: _Inputs, replay: Replay, diff: dict[str, Any], cut: bool,
              cutoff: int) -> dict[str, Any]:
        caveats = list(CAVEATS)
        if cut:
            caveats.append(
                "--since cuts the window: a CLOSE on a symbol not seen earlier in the window is "
                "read as closing a position opened before the window (in the governor's "
                "favour), not as a double close; positions opened before the window are not "
                "in the replay's open-position counts")
        if self.opts.until is not None:
            caveats.append("the position mirror was read at import time, after --until: "
                           "differences with the replay may be later trading")
        if len({a for a in inputs.allocations.values() if a is not None}) > 1:
            caveats.append("allocations differ per symbol: the capital check uses the largest "
                           "for every symbol")
        if not inputs.config:
            caveats.append(f"no config at {self.keys.config}: checked against the protocol's "
                           f"defaults")
        if inputs.regime is None:
            caveats.append(f"no regime at {self.keys.regime}: checked as BASE")
        if inputs.capital_value() is None:
            caveats.append(f"no capital at {self.keys.capital}: allocations not checked")
        o = self.opts
        return {
            "status": "complete", "ended_wall_ms": _now_ms(),
            "window": {"since": o.since.text if o.since else None,
                       "until": o.until.text if o.until else None,
                       "min_id": o.min_id, "max_id": o.max_id, "cuts_start": cut,
                       "first_entry_ms": self.window.first_ms,
                       "last_entry_ms": self.window.last_ms},
            "cutoff_ms": cutoff,
            "counts": {**self.counts, "decisions_by_kind": self.decisions_by_kind,
                       "results_by_status": self.results_by_status,
                       "malformed_plans": self.malformed, "orders": len(replay.rows),
                       "mirror_positions": len(inputs.mirror)},
            "governor_config": inputs.config,
            "config_errors": inputs.config_errors,
            "regime": {"value": inputs.regime, "initial": True,
                       "note": "read at import time; the regime history before the import "
                               "is unknown"},
            "capital": inputs.capital, "allocation_pct": inputs.allocation_pct(),
            "allocations": inputs.allocations, "exposure_pct": inputs.exposure_pct,
            "unreadable_keys": inputs.unreadable,
            "ledger": {"derived_from": "apply.result",
                       "note": "ground truth is only as good as the executor's reports",
                       **replay.stats},
            "mirror_vs_replay": diff,
            "caveats": caveats,
        }


def _str(x: Any) -> str:
    return x.decode("utf-8", "replace") if isinstance(x, bytes) else str(x)


def _stream_op(f: F, entry_id: str, fields: dict[str, str]) -> Op:
    """An entry exactly as :class:`chaos.recorder.StreamRecorder` records it."""
    ms = _id_tuple(entry_id)[0]
    return Op(OpType.OK, str(f), RECORDER, _time_ns(entry_id, 1), ms, fields.get("plan_id"),
              fields.get("symbol"), {**fields, "entry_id": entry_id, "entry_ms": ms})


# -- the operator's inputs and the mirror ----------------------------------------------------
def read_inputs(r: redis.Redis, keys: Keys) -> _Inputs:
    """Config, regime, capital, exposure, allocations and the position mirror (GET, HGETALL,
    SCAN only); a key of the wrong type is noted in ``unreadable``, never fatal."""
    inp = _Inputs()
    raw_cfg = _read_key(r, inp, keys.config, r.hgetall) or {}
    inp.config, inp.config_errors = usable_config(_decode(raw_cfg))
    inp.regime = _opt_str(_read_key(r, inp, keys.regime, r.get))
    inp.capital = _opt_str(_read_key(r, inp, keys.capital, r.get))
    inp.exposure_pct = _opt_str(_read_key(r, inp, keys.exposure_pct, r.get))
    alloc_prefix = keys.allocation("")
    for key in _scan(r, alloc_prefix):
        raw = _read_key(r, inp, key, r.get)
        if raw is not None:
            inp.allocations[key[len(alloc_prefix):]] = _allocation(_str(raw))
    pos_prefix = keys.position("")
    for key in _scan(r, pos_prefix):
        h = _read_key(r, inp, key, r.hgetall)
        if h:
            inp.mirror[key[len(pos_prefix):]] = _decode(h)
    return inp


def _scan(r: redis.Redis, key_prefix: str) -> list[str]:
    return sorted({_str(k) for k in r.scan_iter(match=_glob_escape(key_prefix) + "*",
                                                 count=1000)})


def _read_key(r: redis.Redis, inp: _Inputs, key: str, cmd: Callable[[str], Any]) -> Any:
    try:
        return cmd(key)
    except redis.ResponseError as exc:  # WRONGTYPE: someone else's key under our name
        inp.unreadable[key] = _one_line(str(exc))
        return None


def _opt_str(raw: Any) -> str | None:
    return None if raw is None else _str(raw)


def _allocation(text: str) -> float | None:
    try:
        value = json.loads(text)
        return float(value["allocation_pct"] if isinstance(value, dict) else value)
    except (ValueError, TypeError, KeyError):
        return None


def usable_config(cfg: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """The config fields the checkers can read, and the others with why: a governor fails
    closed on a bad field, the checkers then judge against the default for it."""
    try:
        GovernorConfig.from_hash(cfg)
        return cfg, {}
    except ValueError:
        pass
    good, bad = {}, {}
    for k, v in cfg.items():
        try:
            GovernorConfig.from_hash({k: v})
            good[k] = v
        except ValueError as exc:
            bad[k] = str(exc)
    return good, bad


# -- the ledger -----------------------------------------------------------------------------
@dataclass
class _Position:
    position_id: str
    side: str
    notional: str


@dataclass
class Replay:
    """What the replay of the executed results left: rows, open positions, counts."""

    rows: list[tuple[Any, ...]] = field(default_factory=list)
    open_positions: dict[str, str] = field(default_factory=dict)  # symbol -> position id
    stats: dict[str, Any] = field(default_factory=dict)


def _dec(*candidates: str | None) -> str:
    """The first candidate that is a decimal, as a plain decimal; "0" if none is."""
    for c in candidates:
        if c:
            try:
                d = Decimal(c)
            except InvalidOperation:
                continue
            if d.is_finite():
                return plain_decimal(d)
    return "0"


def _int(text: str | None) -> int | None:
    t = (text or "").strip()
    return int(t) if t.lstrip("-").isdigit() else None


def derive_ledger(path: Path, executed: list[tuple[str, dict[str, str]]],
                  plans: dict[str, dict[str, str]], permits: dict[str, int],
                  window_cut: bool = False) -> Replay:
    """Replay the ``executed`` results in stream order into an exchange ledger at ``path``.

    Per symbol, as the exchange would have done it: OPEN on a flat symbol opens, on an
    open one adds (a double open); CLOSE on an open symbol closes, on a flat one flips (a
    double close). A result repeated for a plan (delivery is at least once) is one order.
    With ``window_cut``, a CLOSE on a symbol not seen earlier in the window closes a
    position opened before it, read in the governor's favour.
    """
    Exchange.create(path)
    rp, positions = replay_results(executed, plans, permits, window_cut)
    _write_ledger(path, rp.rows, positions)
    return rp


def replay_results(executed: list[tuple[str, dict[str, str]]], plans: dict[str, dict[str, str]],
                   permits: dict[str, int], window_cut: bool = False
                   ) -> tuple[Replay, list[tuple[str, tuple[Any, ...]]]]:
    """:func:`derive_ledger` without the file: the ledger rows (in the ``orders`` table's
    column order) and the position changes. The witness minimiser derives the ledger of a
    subset of an imported history with it, as the import did for the whole."""
    rp = Replay()
    open_: dict[str, _Position] = {}
    last_side: dict[str, str] = {}
    seen: set[str] = set()
    done: set[str] = set()
    ids: set[str] = set()
    positions: list[tuple[str, tuple[Any, ...]]] = []  # ("insert" | "close" | "add", args)
    effects: dict[str, int] = {}
    duplicates = unreadable = pre_window = 0
    for eid, f in executed:
        pid = f.get("plan_id") or ""
        plan = plans.get(pid, {})
        action = f.get("action") or plan.get("action", "")
        symbol = f.get("symbol") or plan.get("symbol", "")
        if not pid or action not in ("OPEN", "CLOSE") or not symbol:
            unreadable += 1
            continue
        if pid in done:
            duplicates += 1
            continue
        done.add(pid)
        seq = len(rp.rows) + 1
        ms = _id_tuple(eid)[0]
        wall_ms = _int(f.get("executed_at_ms")) or ms
        notional = _dec(f.get("notional"), plan.get("notional"))
        pos = open_.get(symbol)
        side = sent = plan.get("side") or ""  # side: of the position it leaves or acts on
        if action == "OPEN" and pos is None:
            effect, side = "open", side or "LONG"
            position_id = _unique(ids, f.get("position_id") or "", symbol, seq)
            open_[symbol] = _Position(position_id, side, notional)
            positions.append(("insert", (position_id, symbol, side, notional, wall_ms, seq)))
        elif action == "OPEN":
            assert pos is not None
            effect, position_id, side = "add", pos.position_id, pos.side
            pos.notional = plain_decimal(Decimal(pos.notional) + Decimal(notional))
            positions.append(("add", (pos.notional, position_id)))
        elif pos is not None:
            effect, position_id, side, notional = "close", pos.position_id, pos.side, \
                pos.notional
            del open_[symbol]
            positions.append(("close", (wall_ms, seq, position_id)))
        elif window_cut and symbol not in seen:
            effect, position_id = "close", f.get("position_id") or f"pre-window-{symbol}"
            pre_window += 1
        else:
            effect = "flip"
            sent = sent or last_side.get(symbol, "LONG")
            flipped = "SHORT" if sent == "LONG" else "LONG"
            position_id = _unique(ids, "", symbol, seq)
            open_[symbol] = _Position(position_id, flipped, notional)
            positions.append(("insert", (position_id, symbol, flipped, notional, wall_ms,
                                         seq)))
            side = flipped
        seen.add(symbol)
        if side:
            last_side[symbol] = side
        effects[effect] = effects.get(effect, 0) + 1
        rp.rows.append((seq, pid, symbol, action, sent or side, notional,
                        _int(f.get("fence")), effect, position_id, side, len(open_), wall_ms,
                        _time_ns(eid, 1), 0, permits.get(pid)))
    rp.open_positions = {s: p.position_id for s, p in sorted(open_.items())}
    rp.stats = {"orders": len(rp.rows), "effects": effects,
                "duplicate_results": duplicates, "unreadable_results": unreadable,
                "pre_window_closes": pre_window,
                "peak_open_positions": max((row[10] for row in rp.rows), default=0)}
    return rp, positions


def _unique(ids: set[str], wanted: str, symbol: str, seq: int) -> str:
    """The executor's position id when it is new, else one of ours (ids key the ledger)."""
    pid = wanted if wanted and wanted not in ids else f"pos-{symbol}-{seq}"
    while pid in ids:
        pid += "'"
    ids.add(pid)
    return pid


def _write_ledger(path: Path, rows: list[tuple[Any, ...]],
                  positions: list[tuple[str, tuple[Any, ...]]]) -> None:
    con = sqlite3.connect(path, isolation_level=None)
    try:
        con.execute("BEGIN IMMEDIATE")
        con.executemany(
            "INSERT INTO orders (seq, plan_id, symbol, action, side, notional, fence, effect, "
            "position_id, position_side, open_count_after, wall_ms, mono_ns, pid, "
            "issued_at_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
        sql = {"insert": "INSERT INTO positions (position_id, symbol, side, notional, "
                         "opened_at_ms, open_seq) VALUES (?, ?, ?, ?, ?, ?)",
               "add": "UPDATE positions SET notional = ? WHERE position_id = ?",
               "close": "UPDATE positions SET closed_at_ms = ?, close_seq = ? "
                        "WHERE position_id = ?"}
        for kind, args in positions:
            con.execute(sql[kind], args)
        con.execute("COMMIT")
    finally:
        con.close()


def mirror_diff(mirror: dict[str, dict[str, str]], replay_open: dict[str, str]
                ) -> dict[str, Any]:
    """Symbols open in the mirror against symbols open after the replay."""
    m, r = set(mirror), set(replay_open)
    return {"agree": m == r, "open_in_mirror": len(m), "open_in_replay": len(r),
            "mirror_only": sorted(m - r), "replay_only": sorted(r - m),
            "position_id_differs": sorted(
                s for s in m & r if mirror[s].get("position_id") not in ("", None,
                                                                         replay_open[s]))}


# -- progress -------------------------------------------------------------------------------
class ProgressLine:
    """Entries read so far, on stderr: one line rewritten on a terminal, else a line every
    ``every`` entries (a long import in CI still shows it is moving)."""

    def __init__(self, stream: TextIO | None = None, every: int = 100_000) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.every = every
        self._next = every

    def __call__(self, counts: dict[str, int]) -> None:
        n = counts["plans"] + counts["decisions"] + counts["results"]
        line = (f"import: {n:,} entries read (decisions {counts['decisions']:,}, results "
                f"{counts['results']:,}, plans {counts['plans']:,})")
        if self.tty:
            self.stream.write("\r" + line + ("\n" if counts.get("final") else ""))
        elif n >= self._next and not counts.get("final"):
            self.stream.write(line + "\n")
            self._next = n + self.every
        else:
            return
        self.stream.flush()

"""Jepsen-style histories: every operation as an invoke and a completion.

A run's history is the evidence the checkers judge, so it is written as the
run goes and survives the run being killed: each process appends JSON lines
to its own file (``history/<process>-<pid>.jsonl``) and flushes after every
operation, so nothing interleaves and nothing waits in a buffer. Reading
merges the files by monotonic time (``CLOCK_MONOTONIC`` is one clock for
every process on a host).

Operation functions (``f``) and who writes them:

=============  ==============  ===================================================
f              process         value
=============  ==============  ===================================================
``submit``     producers       plan fields; invoke before XADD, ok with entry id,
                               fail when surely not added, info when unknown
``plan``       recorder        a plan entry as read from the plan stream (all plans,
                               including rotation plans that governors add)
``decision``   recorder        a decision event as read from the events stream
``take``       apply layer     permit taken (ok) or missing (fail)
``order``      apply layer     an order sent to the exchange and its fill
``result``     recorder        an apply.result entry as read from the stream
``operator``   operator        regime / config / capital / allocation writes
``fault``      nemesis         fault windows: invoke/ok at start and at stop
``governor``   supervisor      process lifecycle: start, crash, kill, pause...
``probe``      liveness probe  probe plans and their outcome
``phase``      runner          run phases (workload, heal, probe, end)
=============  ==============  ===================================================

Completions pair with their invoke by ``(process, key)`` where ``key`` is
the plan id (or a fault id), as Jepsen pairs by process.
"""

from __future__ import annotations

import heapq
import json
import os
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, TextIO


class OpType(StrEnum):
    INVOKE = "invoke"
    OK = "ok"
    FAIL = "fail"
    INFO = "info"  # outcome unknown (timeout, crash): could have happened or not


class F(StrEnum):
    SUBMIT = "submit"
    PLAN = "plan"
    DECISION = "decision"
    TAKE = "take"
    ORDER = "order"
    RESULT = "result"
    OPERATOR = "operator"
    FAULT = "fault"
    GOVERNOR = "governor"
    PROBE = "probe"
    PHASE = "phase"


HISTORY_DIR = "history"


@dataclass(frozen=True)
class Op:
    type: OpType
    f: str
    process: str
    time_ns: int  # time.monotonic_ns() when recorded
    wall_ms: int  # time.time() in ms, for people and for joining with Redis ids
    key: str | None = None  # plan id, fault id...: pairs an invoke with its completion
    symbol: str | None = None
    value: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        d: dict[str, Any] = {"type": str(self.type), "f": self.f, "process": self.process,
                             "time_ns": self.time_ns, "wall_ms": self.wall_ms}
        if self.key is not None:
            d["key"] = self.key
        if self.symbol is not None:
            d["symbol"] = self.symbol
        if self.value:
            d["value"] = self.value
        return json.dumps(d, separators=(",", ":"), default=str)

    @classmethod
    def from_json(cls, line: str) -> Op:
        d = json.loads(line)
        return cls(type=OpType(d["type"]), f=d["f"], process=d["process"],
                   time_ns=int(d["time_ns"]), wall_ms=int(d["wall_ms"]), key=d.get("key"),
                   symbol=d.get("symbol"), value=d.get("value") or {})


class HistoryWriter:
    """Appends one process's operations to its own file, flushed per operation.

    Thread-safe: the time is taken under the lock, so each file is in time
    order, which lets :func:`iter_history` merge files without sorting them.
    Open it in the process that writes (after fork).
    """

    def __init__(self, run_dir: str | os.PathLike[str], process: str,
                 fsync_every: int = 0) -> None:
        self.process = process
        d = Path(run_dir) / HISTORY_DIR
        d.mkdir(parents=True, exist_ok=True)
        self.path = d / f"{_safe(process)}-{os.getpid()}.jsonl"
        self._fh: TextIO | None = open(self.path, "a", encoding="utf-8")  # noqa: SIM115
        self._lock = threading.Lock()
        self._fsync_every = fsync_every
        self._n = 0

    def record(self, type_: OpType, f: str, key: str | None = None,
               symbol: str | None = None, value: dict[str, Any] | None = None,
               process: str | None = None) -> Op:
        with self._lock:
            op = Op(type_, str(f), process or self.process, time.monotonic_ns(),
                    int(time.time() * 1000), key, symbol, value or {})
            if self._fh is None:
                return op
            self._fh.write(op.to_json() + "\n")
            self._fh.flush()
            self._n += 1
            if self._fsync_every and self._n % self._fsync_every == 0:
                os.fsync(self._fh.fileno())
        return op

    def record_many(self, entries: Iterable[tuple[OpType, str, str | None, str | None,
                                                  dict[str, Any]]]) -> list[Op]:
        """Record several operations with one write and one flush: ``(type, f, key, symbol,
        value)`` each, timed in order under the lock. For a producer that sends a batch of
        plans in one round trip: every invoke is in the file (the kernel's page cache, as
        with :meth:`record`) before the batch is sent, every completion after its reply,
        at two writes per batch instead of two per plan."""
        with self._lock:
            ops = [Op(t, str(f), self.process, time.monotonic_ns(), int(time.time() * 1000),
                      key, symbol, value or {}) for t, f, key, symbol, value in entries]
            if self._fh is None or not ops:
                return ops
            self._fh.write("".join(op.to_json() + "\n" for op in ops))
            self._fh.flush()
            before = self._n
            self._n += len(ops)
            if self._fsync_every and self._n // self._fsync_every > before // self._fsync_every:
                os.fsync(self._fh.fileno())
        return ops

    # Shorthands, Jepsen's vocabulary.
    def invoke(self, f: str, key: str | None = None, symbol: str | None = None,
               **value: Any) -> Op:
        return self.record(OpType.INVOKE, f, key, symbol, value)

    def ok(self, f: str, key: str | None = None, symbol: str | None = None, **value: Any) -> Op:
        return self.record(OpType.OK, f, key, symbol, value)

    def fail(self, f: str, key: str | None = None, symbol: str | None = None,
             **value: Any) -> Op:
        return self.record(OpType.FAIL, f, key, symbol, value)

    def info(self, f: str, key: str | None = None, symbol: str | None = None,
             **value: Any) -> Op:
        return self.record(OpType.INFO, f, key, symbol, value)

    def close(self) -> None:
        with self._lock:
            if self._fh is not None:
                self._fh.flush()
                os.fsync(self._fh.fileno())
                self._fh.close()
                self._fh = None

    def __enter__(self) -> HistoryWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:80] or "proc"


def _iter_file(path: Path) -> Iterator[Op]:
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if not line.endswith("\n"):
                return  # torn last line of a killed writer: everything before it stands
            line = line.strip()
            if line:
                yield Op.from_json(line)


def history_files(run_dir: str | os.PathLike[str]) -> list[Path]:
    return sorted((Path(run_dir) / HISTORY_DIR).glob("*.jsonl"))


def iter_history(run_dir: str | os.PathLike[str]) -> Iterator[Op]:
    """All operations of a run in time order, streamed (one op per file in memory)."""
    return heapq.merge(*(_iter_file(p) for p in history_files(run_dir)),
                       key=lambda op: (op.time_ns, op.process))


def read_history(run_dir: str | os.PathLike[str]) -> list[Op]:
    return list(iter_history(run_dir))


def write_history(run_dir: str | os.PathLike[str], ops: Iterable[Op],
                  name: str = "imported") -> Path:
    """Write ops (e.g. a hand-written or imported history) as one history file."""
    d = Path(run_dir) / HISTORY_DIR
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"{_safe(name)}.jsonl"
    with open(path, "w", encoding="utf-8") as fh:
        for op in sorted(ops, key=lambda o: (o.time_ns, o.process)):
            fh.write(op.to_json() + "\n")
    return path

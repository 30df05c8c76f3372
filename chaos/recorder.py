"""Bring what the system did into the history as it happens.

* :class:`StreamRecorder` tails the decision and result streams (plain XREAD,
  no consumer group: it observes, it does not take part) and records every
  entry with its stream id, which is the Redis server's time of the entry.
* :func:`apply_hook` turns the apply layer's records into ``take`` and
  ``order`` operations; :func:`supervisor_hook` turns governor lifecycle
  events (start, crash, kill, pause...) into ``governor`` operations.

After a Redis restart that lost its data the streams start again from low
ids; the recorder notices (the stream's last id is below its cursor), records
a ``phase`` op ``stream_reset`` and reads the new stream from the start.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any, Self

import redis

from chaos.history import F, HistoryWriter, OpType
from governor_ref.governor import Backoff
from governor_ref.keys import Keys

log = logging.getLogger(__name__)


def _id_tuple(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


class StreamTail:
    """Tails streams from ``cursors`` (stream -> last id seen) with plain XREAD BLOCK on a
    connection of its own, handing each entry to :meth:`on_entry`; reconnects with backoff
    and reads a stream again from the start when Redis lost it (:meth:`on_reset`).

    ``client_factory`` must return a client with ``decode_responses=False``:
    plans may carry bytes that are not UTF-8 (bad input is a scenario), and a
    decoding client would fail on them; fields are decoded here, leniently.
    """

    name = "stream-tail"

    def __init__(self, client_factory: Callable[[], redis.Redis], cursors: dict[str, str],
                 block_ms: int = 200) -> None:
        self.client_factory = client_factory
        self.block_ms = block_ms
        self.cursors = dict(cursors)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._r: redis.Redis | None = None

    def on_entry(self, stream: str, entry_id: str, fields: dict[str, str]) -> None:
        raise NotImplementedError

    def on_reset(self, stream: str, cursor: str, last: str) -> None:  # noqa: B027 - optional
        pass

    def start(self) -> Self:
        self._thread = threading.Thread(target=self.run, name=self.name, daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def run(self) -> None:
        backoff = Backoff()
        while not self._stop.is_set():
            try:
                if self._r is None:
                    self._r = self.client_factory()
                    self._check_reset(self._r)
                self.poll(self._r, self.block_ms)
                backoff.ok()
            except (redis.ConnectionError, redis.TimeoutError, OSError,
                    redis.ResponseError) as exc:
                log.debug("%s: %s; retrying", self.name, exc)
                self._r = None
                backoff.fail(self._stop)
            except Exception:  # noqa: BLE001 - a dead recorder would make evidence vanish
                log.exception("%s: unexpected error; retrying", self.name)
                self._r = None
                backoff.fail(self._stop)

    def poll(self, r: redis.Redis, block_ms: int | None = None) -> int:
        """Read what is new on both streams; returns the number of entries recorded."""
        resp = r.xread(dict(self.cursors), count=1000, block=block_ms)
        n = 0
        for stream, entries in resp or []:
            stream = stream.decode() if isinstance(stream, bytes) else stream
            for entry_id, fields in entries:
                entry_id = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
                self.on_entry(stream, entry_id, _decode(fields))
                self.cursors[stream] = entry_id
                n += 1
        return n

    def drain(self, r: redis.Redis, timeout_polls: int = 50) -> None:
        """Read until caught up with both streams (used at the end of a run)."""
        for _ in range(timeout_polls):
            if self.poll(r, None) == 0:
                return

    def _check_reset(self, r: redis.Redis) -> None:
        for stream, cursor in list(self.cursors.items()):
            if cursor == "0-0":
                continue
            try:
                last = r.xinfo_stream(stream)["last-generated-id"]
            except redis.ResponseError:  # no such key: the stream is gone
                last = "0-0"
            last = last.decode() if isinstance(last, bytes) else str(last)
            if _id_tuple(last) < _id_tuple(cursor):
                log.warning("%s: %s restarted below our cursor (data lost); rereading",
                            self.name, stream)
                self.on_reset(stream, cursor, last)
                self.cursors[stream] = "0-0"


class StreamRecorder(StreamTail):
    """Tails the plan, decision and result streams into the history, from their start."""

    name = "recorder"

    def __init__(self, client_factory: Callable[[], redis.Redis], keys: Keys,
                 history: HistoryWriter, block_ms: int = 200) -> None:
        super().__init__(client_factory, dict.fromkeys((keys.plans, keys.events, keys.results),
                                                       "0-0"), block_ms)
        self.keys = keys
        self.history = history
        self.counts = {keys.plans: 0, keys.events: 0, keys.results: 0}

    def on_reset(self, stream: str, cursor: str, last: str) -> None:
        self.history.info(F.PHASE, key="stream_reset", stream=stream, cursor=cursor,
                          last_id=last)

    def on_entry(self, stream: str, entry_id: str, fields: dict[str, str]) -> None:
        self.counts[stream] += 1
        f = {self.keys.events: F.DECISION, self.keys.results: F.RESULT}.get(stream, F.PLAN)
        self.history.record(OpType.OK, f, key=fields.get("plan_id"), symbol=fields.get("symbol"),
                            value={**fields, "entry_id": entry_id,
                                   "entry_ms": _id_tuple(entry_id)[0]})


def _decode(fields: dict[Any, Any]) -> dict[str, str]:
    return {(k.decode("utf-8", "replace") if isinstance(k, bytes) else str(k)):
            (v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v))
            for k, v in fields.items()}


def apply_hook(history: HistoryWriter) -> Callable[[dict[str, Any]], None]:
    """The apply layer's ``on_record``: permits taken or missing, orders executed, PERMIT
    entries passed over."""

    def hook(rec: dict[str, Any]) -> None:
        kind = rec.get("type")
        pid = rec.get("plan_id")
        if kind == "permit_taken":
            permit = rec.get("permit") or {}
            history.ok(F.TAKE, key=pid, symbol=permit.get("symbol"), permit=permit,
                       entry_id=rec.get("entry_id"), consumer=rec.get("consumer"))
        elif kind == "permit_missing":
            history.fail(F.TAKE, key=pid, entry_id=rec.get("entry_id"),
                         consumer=rec.get("consumer"))
        elif kind == "duplicate_decision":
            history.info(F.TAKE, key=pid, duplicate=True, owner=rec.get("owner"),
                         entry_id=rec.get("entry_id"))
        elif kind == "unreadable_decision":
            # A PERMIT entry the apply layer could not execute and passed over (acked).
            history.info(F.TAKE, key=pid, unreadable=rec.get("problem"),
                         entry_id=rec.get("entry_id"), fields=rec.get("fields"),
                         consumer=rec.get("consumer"))
        elif kind == "order_executed":
            fill = rec.get("fill") or {}
            history.ok(F.ORDER, key=pid, symbol=fill.get("symbol"), fill=fill,
                       consumer=rec.get("consumer"))

    return hook


def supervisor_hook(history: HistoryWriter) -> Callable[[dict[str, Any]], None]:
    """The supervisor's ``on_event``: governor starts, crashes, kills, pauses..."""

    def hook(event: dict[str, Any]) -> None:
        typ = OpType.INFO if event.get("type") in ("crash", "crash_loop", "gave_up",
                                                   "start_failed") else OpType.OK
        value = {k: v for k, v in event.items() if k not in ("t_mono_ns", "t_wall_ms")}
        history.record(typ, F.GOVERNOR, key=event.get("consumer"), value=value)

    return hook

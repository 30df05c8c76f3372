"""Faults anchored to events: watch what the system does, fire on the N-th matching event.

A fault with ``after = { event = "permit", action = "OPEN", instance = "gov-1", n = 3 }``
(:class:`chaos.scenario.AnchorSpec`) starts right after the third OPEN PERMIT that gov-1
decided, counted from the workload start, instead of at a time. A failure that depends on
*where in the protocol* a fault strikes is then reproduced run after run, although no two
runs share their timing.

:class:`AnchorWatcher` sees the events in two ways, both pushed, never polled:

* the streams, on a connection of its own with ``XREAD BLOCK`` (:class:`StreamTail`, as
  the recorder): ``submit`` on ``P:stream:apply.plan`` (every plan entry but a governor's
  rotation plans), ``decision`` / ``permit`` / ``block`` / ``exit_lock`` on
  ``P:stream:governor.events``, ``result`` on ``P:stream:apply.result``. The event's time
  is its entry id (the Redis server's clock, in whole ms);
* the harness's own apply layer, in process: ``take`` (the permit was taken with GETDEL),
  through its ``on_record`` hook, timed on the monotonic clock.

Each match is counted per anchor; the N-th calls ``fire(slot, event)`` from the watcher's
thread (the nemesis starts the fault there, or after the anchor's ``delay``). Events are
counted from the streams' last ids when the watcher starts, i.e. from the workload start.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import redis

from chaos.recorder import StreamTail, _id_tuple
from chaos.scenario import ANCHOR_EVENTS, AnchorSpec
from governor_ref.keys import Keys

log = logging.getLogger(__name__)

STREAM_EVENTS = {"submit": "plans", "decision": "events", "permit": "events",
                 "block": "events", "exit_lock": "events", "result": "results"}
"""Which stream (a :class:`Keys` attribute) shows each stream-borne event."""
HOOK_EVENTS = frozenset({"take"})
"""Events seen through the harness's apply layer."""


@dataclass(frozen=True)
class AnchorEvent:
    """One event as the watcher saw it: what the fault's start op records."""

    event: str  # the anchor's event it matched as (permit, take...)
    entry_id: str | None = None  # stream entry id (None for a hook event)
    plan_id: str | None = None
    symbol: str | None = None
    action: str | None = None
    instance: str | None = None  # the governor consumer that decided
    reason: str | None = None
    status: str | None = None
    wall_ms: float = 0.0  # when it happened (the entry id's ms for a stream entry)
    mono_ns: int | None = None  # when it happened, monotonic (hook events only)
    seen_ns: int = 0  # monotonic: when the watcher had it

    def record(self) -> dict[str, Any]:
        """The non-empty fields, for the history."""
        return {k: v for k, v in asdict(self).items() if v is not None}

    def lag_ms(self, now_wall_ns: int, now_mono_ns: int) -> float:
        """Milliseconds from the event to ``now``: on the monotonic clock when the event's
        time is known there, else from the entry id (whole ms: up to 1 ms too much)."""
        if self.mono_ns is not None:
            return round((now_mono_ns - self.mono_ns) / 1e6, 3)
        return round(now_wall_ns / 1e6 - self.wall_ms, 3)


def events_of(stream_kind: str, fields: dict[str, str]) -> tuple[str, ...]:
    """The anchor events one stream entry is (a CLOSE PERMIT is a decision, a permit and
    an exit lock); an informational or unreadable entry is none."""
    if stream_kind == "plans":
        return () if fields.get("source") == "rotation" else ("submit",)
    if stream_kind == "results":
        return ("result",)
    decision = fields.get("decision")
    if decision == "PERMIT":
        return ("decision", "permit", "exit_lock") if fields.get("action") == "CLOSE" \
            else ("decision", "permit")
    if decision == "BLOCK":
        return ("decision", "block")
    return ()


def matches(anchor: AnchorSpec, ev: AnchorEvent) -> bool:
    """Whether ``ev`` passes every filter the anchor sets."""
    return all(getattr(ev, k) == v for k, v in anchor.filters().items())


class AnchorWatcher(StreamTail):
    """Counts the events of ``anchors`` (``(slot, AnchorSpec)``) and calls ``fire(slot,
    event)`` on each one's N-th match, once. :meth:`on_apply_record` is the apply layer's
    hook for ``take``. ``start()`` snapshots the streams' ends (events before it do not
    count), then tails them in a thread; without a stream-borne anchor no thread runs."""

    name = "anchors"

    def __init__(self, client_factory: Callable[[], redis.Redis], keys: Keys,
                 anchors: Sequence[tuple[int, AnchorSpec]],
                 fire: Callable[[int, AnchorEvent], None], block_ms: int = 100) -> None:
        self.keys = keys
        self.anchors = dict(anchors)
        self.kinds = {getattr(keys, STREAM_EVENTS[a.event]): STREAM_EVENTS[a.event]
                      for a in self.anchors.values() if a.event in STREAM_EVENTS}
        super().__init__(client_factory, dict.fromkeys(self.kinds, "0-0"), block_ms)
        self.fire = fire
        self.seen = dict.fromkeys(self.anchors, 0)  # matches so far, per anchor
        self.fired: dict[int, AnchorEvent] = {}
        self._lock = threading.Lock()

    def start(self) -> AnchorWatcher:
        if not self.kinds:
            return self
        try:
            r = self.client_factory()
            try:
                for stream in self.cursors:
                    try:
                        last = r.xinfo_stream(stream)["last-generated-id"]
                    except redis.ResponseError:  # no stream yet: everything counts
                        continue
                    self.cursors[stream] = last.decode() if isinstance(last, bytes) else last
            finally:
                r.close()
        except (redis.RedisError, OSError) as exc:
            log.warning("anchors: could not read the streams' ends (%s); counting from their "
                        "start", exc)
        return super().start()

    def on_entry(self, stream: str, entry_id: str, fields: dict[str, str]) -> None:
        seen = time.monotonic_ns()
        kinds = events_of(self.kinds[stream], fields)
        if kinds:
            base = AnchorEvent("", entry_id, fields.get("plan_id"), fields.get("symbol"),
                               fields.get("action"), fields.get("governor"),
                               fields.get("reason"), fields.get("status"),
                               float(_id_tuple(entry_id)[0]), None, seen)
            self._offer(kinds, base)

    def on_apply_record(self, rec: dict[str, Any]) -> None:
        """The apply layer's ``on_record`` (chained after the history's): ``take``."""
        if rec.get("type") != "permit_taken":
            return
        permit = rec.get("permit") or {}
        self._offer(("take",), AnchorEvent(
            "", rec.get("entry_id"), rec.get("plan_id"), permit.get("symbol"),
            permit.get("action"), wall_ms=float(rec.get("wall_ms", time.time() * 1000)),
            mono_ns=rec.get("mono_ns"), seen_ns=time.monotonic_ns()))

    def _offer(self, kinds: tuple[str, ...], base: AnchorEvent) -> None:
        due: list[tuple[int, AnchorEvent]] = []
        with self._lock:
            for slot, a in self.anchors.items():
                if slot in self.fired or a.event not in kinds:
                    continue
                ev = AnchorEvent(a.event, *list(asdict(base).values())[1:])
                if not matches(a, ev):
                    continue
                self.seen[slot] += 1
                if self.seen[slot] == a.n:
                    self.fired[slot] = ev
                    due.append((slot, ev))
        for slot, ev in due:
            try:
                self.fire(slot, ev)
            except Exception:  # noqa: BLE001 - one bad fault must not blind the others
                log.exception("anchors: firing fault slot %d failed", slot)

    def pending(self) -> dict[int, int]:
        """Anchors not fired yet, with the matches seen so far."""
        with self._lock:
            return {s: self.seen[s] for s in self.anchors if s not in self.fired}


assert set(STREAM_EVENTS) | HOOK_EVENTS == set(ANCHOR_EVENTS), "every anchor event needs a source"

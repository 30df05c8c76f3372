"""The governor protocol as a Locust ``User``: paced plans, one sender and one events reader
per process.

Per Locust process there is one :class:`Plane`: the sender's Redis connection pool, the
history writer (``history/locust-<pid>-<pid>.jsonl``, ``submit`` invoke/ok as the chaos
workloads write them, with their code: :func:`chaos.workloads.submit_plans`, so the
checkers judge the run), the plan generators of :mod:`chaos.workloads` (``open_storm``,
``duplicate_close``, ``stale``, ``malformed``), the schedule, the plans waiting for a
decision, and four greenlets: the **sender**, which hands the plans that came due to one
of up to ``SENDERS`` pipelines in flight (invokes written before it leaves, completions
after its replies: two history writes per batch, not two per plan; at a low rate each
plan leaves alone and at once, as soon as it is due); the **reader**, the only one
that reads ``P:stream:governor.events`` (XREAD BLOCK from the last entry id taken before
the first plan was sent) and completes the waiting plans; the **expirer**, which fails the
plans with no decision within ``--decision-deadline-s``; and the **mirror** follower,
which rereads ``P:position:*`` for the duplicate closes, so that no user waits on a read.

Open model: ``--rate`` plans/s per process, on a fixed schedule (slot *k* is due at
``t0 + k / rate``) that the process's users share. A user takes the next slot, builds the
plan, sleeps until it is due, hands it to the sender (no I/O in the user) and takes the
next one without waiting for the decision. Every latency is measured from the plan's
*scheduled* time, not from when it was sent: when Redis, the governor or this process
stalls, the slots keep coming due, the plans behind the stall are sent late and their
latency includes the wait (no coordinated omission), rather than the load test quietly
sending fewer plans.
"""

from __future__ import annotations

import logging
import os
import random
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import gevent
import gevent.event
import gevent.lock
import gevent.pool
import redis
from locust import User, task
from locust.env import Environment

from chaos.history import HistoryWriter
from chaos.loadtest.latency import LatencyRecorder
from chaos.scenario import WorkloadSpec
from chaos.workloads import (
    DuplicateClose,
    Malformed,
    MarketView,
    NotSent,
    OpenStorm,
    Stale,
    SubmitPlan,
    WorkloadContext,
    _Sender,
    submit_plans,
)
from governor_ref.keys import Keys

log = logging.getLogger(__name__)

# Malformed plans whose plan_id stays usable: the governor answers them (BLOCK
# invalid_plan) and the reader can match the answer. The id-breaking ways of
# chaos.workloads (no_plan_id, plan_id_spaces, plan_id_too_long) get no decision a
# load test could time, so they are left to the chaos scenarios.
MALFORMED_WAYS = ("lowercase_symbol", "missing_side", "negative_notional",
                  "exponent_notional", "text_notional", "unknown_action", "binary_field",
                  "extra_field")
DECISIONS = (b"PERMIT", b"BLOCK")
MIRROR_TTL_S = 0.2  # the mirror greenlet rereads P:position:* at most this often
READ_BLOCK_MS = 200
READ_COUNT = 5000  # entries per XREAD: a second of decisions at 5,000 plans/s
MAX_BATCH = 500  # plans per XADD pipeline
SENDERS = 3  # pipelines out at once per process (sender greenlets, connections)
END_QUIET_S = 0.25  # a timed run sends nothing in its last quarter second (Plane)


class DecisionTimeout(Exception):
    """No decision on the events stream within the deadline."""


class SendFailed(Exception):
    """The XADD surely did not add the plan (no connection, an error reply)."""


def symbols(n: int) -> list[str]:
    """The market's symbols, as :meth:`chaos.runner.Run.symbols` names them."""
    return [f"S{i:03d}USDT" for i in range(n)]


class Pacer:
    """The process's fixed schedule: slot k is due at ``t0 + k / rate`` (perf_counter)."""

    def __init__(self, rate: float) -> None:
        self.interval = 1.0 / rate
        self.t0: float | None = None
        self.k = 0

    def claim(self, n: int = 1) -> float:
        """Take ``n`` consecutive slots; returns when the first is due."""
        if self.t0 is None:
            self.t0 = time.perf_counter()
        at = self.t0 + self.k * self.interval
        self.k += n
        return at


@dataclass
class Waiter:
    scheduled: float  # perf_counter seconds
    action: str  # OPEN | CLOSE: Locust's request_type


class Plane:
    """Everything one Locust process shares; see the module docstring."""

    def __init__(self, env: Environment, *, redis_url: str, prefix: str, run_dir: str,
                 mix: Mapping[str, float], rate: float, n_symbols: int,
                 deadline_s: float, latency: LatencyRecorder,
                 run_time_s: float | None = None) -> None:
        self.env = env
        # A timed run (-t) sends nothing in its last END_QUIET_S: Locust's own shutdown
        # then holds the process's loop (stopping users, writing stats: 30-40 ms of CPU)
        # while no decision is still to be read, instead of adding itself to the latency
        # of the plans sent just before it.
        self.send_until = (time.perf_counter() + run_time_s - END_QUIET_S
                           if run_time_s and run_time_s > 2 * END_QUIET_S else None)
        self.keys = Keys(prefix)
        self.deadline_s = deadline_s
        self.latency = latency
        self.client = redis.Redis.from_url(redis_url, decode_responses=True,
                                           encoding_errors="replace", socket_timeout=5,
                                           socket_connect_timeout=2,
                                           retry=redis.retry.Retry(redis.backoff.NoBackoff(), 0))
        # One connection held for the reader's every XREAD (no pool borrow per read).
        self.reader_client = redis.Redis.from_url(redis_url, decode_responses=False,
                                                  socket_timeout=READ_BLOCK_MS / 1000 + 5,
                                                  single_connection_client=True)
        self.send = _Sender(self.client)  # a connection from the pool per pipeline
        self.senders = gevent.lock.BoundedSemaphore(SENDERS)  # pipelines out at once
        self.in_flight = gevent.pool.Group()
        self.name = f"locust-{os.getpid()}"
        self.hist = HistoryWriter(run_dir, self.name)
        self.tasks = [t for t, w in mix.items() if w > 0]
        self.weights = [mix[t] for t in self.tasks]
        self.rng = random.Random()
        self.pacer = Pacer(rate)
        self.symbols = symbols(n_symbols)
        config = self.client.hgetall(self.keys.config)
        ctx = WorkloadContext(redis_url=redis_url, prefix=prefix, run_dir=run_dir, seed=0,
                              duration_s=0.0, symbols=self.symbols, config=dict(config))
        base = secrets.randbelow(10**8) * 10  # plan ids unique across processes/machines

        def spec(kind: str, **params: Any) -> WorkloadSpec:
            return WorkloadSpec(kind, symbols=n_symbols, params=params)

        self.gen_open = OpenStorm(spec("open_storm"), base, ctx, self.rng)
        self.gen_close = DuplicateClose(spec("duplicate_close"), base + 1, ctx, self.rng)
        self.gen_stale = Stale(spec("stale", stale_fraction=1.0), base + 2, ctx, self.rng)
        self.gen_bad = Malformed(spec("malformed", bad_fraction=1.0), base + 3, ctx, self.rng)
        self.bad = 0
        self.view = MarketView()
        self.mirror_wanted = False  # a close burst used the view since the last read
        self.waiting: dict[str, Waiter] = {}
        self.due: list[tuple[SubmitPlan, dict[str, Any]]] = []  # for the sender, in order
        self.has_due = gevent.event.Event()
        self.sent = self.decided = self.timeouts = self.send_failures = 0
        self.batches = 0
        # Where the reader starts: the stream's last entry *before* the first plan is sent.
        last = self.reader_client.xrevrange(self.keys.events, "+", "-", count=1)
        self.last_id: bytes = last[0][0] if last else b"0-0"
        self.running = True
        self.greenlets = {"reader": gevent.spawn(self._read),
                          "sender": gevent.spawn(self._send_loop),
                          "expirer": gevent.spawn(self._expire)}
        if "close" in self.tasks:
            self._read_mirror()
            self.greenlets["mirror"] = gevent.spawn(self._follow_mirror)

    # -- one task: a slot of the schedule -----------------------------------------------
    def step(self) -> None:
        at = self.pacer.claim()
        if self.send_until is not None and at > self.send_until:
            gevent.sleep(END_QUIET_S)  # the run's quiet end: Locust stops the users
            return
        kind = self.rng.choices(self.tasks, self.weights)[0]
        now_ms = time.time_ns() // 1_000_000
        if kind == "open":
            ems = self.gen_open.next("plan", now_ms, self.view)
        elif kind == "stale":
            ems = self.gen_stale.next("plan", now_ms, self.view)
        elif kind == "malformed":
            way = MALFORMED_WAYS[self.bad % len(MALFORMED_WAYS)]
            self.bad += 1
            ems = [self.gen_bad.breach(way, now_ms)]
        else:
            self.mirror_wanted = True
            ems = self.gen_close.next("burst", now_ms, self.view)
            if len(ems) > 1:
                self.pacer.claim(len(ems) - 1)  # the rate counts plans, not bursts
        _sleep_until(at)
        for em in ems:
            if isinstance(em, SubmitPlan):
                scheduled = at + em.delay_ms / 1000.0
                _sleep_until(scheduled)
                self._enqueue(em, scheduled, kind)

    def _enqueue(self, em: SubmitPlan, scheduled: float, kind: str) -> None:
        """Hand a plan that is due to the sender. No I/O and no greenlet switch here: a
        user killed by Locust (the end of the load) never leaves a plan half-handed."""
        action = str(em.fields.get("action", "OPEN"))
        if action not in ("OPEN", "CLOSE"):
            action = "OPEN"  # a malformed OPEN (unknown_action)
        self.waiting[em.key] = Waiter(scheduled, action)
        self.sent += 1
        self.due.append((em, {"workload": f"loadtest-{kind}"}))
        self.has_due.set()

    # -- the sender: what came due, in one pipeline ----------------------------------------
    def _send_loop(self) -> None:
        """Hand the plans that came due, oldest first, at most MAX_BATCH, to a sender
        greenlet (at most SENDERS at once, each on a connection of the pool), which sends
        them in one pipeline. At a low rate a due plan finds a sender free and leaves at
        once; when every sender has a pipeline out, the plans coming due meanwhile wait
        for the first to come back (their latency still runs from their scheduled time),
        then leave together: one round trip and two history writes per batch instead of
        per plan."""
        while self.running or self.due:
            if not self.due:
                self.has_due.clear()
                self.has_due.wait(timeout=0.2)
                continue
            self.senders.acquire()  # waits while SENDERS pipelines are out
            batch, self.due = self.due[:MAX_BATCH], self.due[MAX_BATCH:]
            self.batches += 1
            self.in_flight.spawn(self._submit, batch)

    def _submit(self, batch: list[tuple[SubmitPlan, dict[str, Any]]]) -> None:
        try:
            replies = submit_plans(self.send, self.hist, self.keys.plans, batch)
        finally:
            self.senders.release()
        for (em, _extra), reply in zip(batch, replies, strict=True):
            if isinstance(reply, NotSent):
                w = self.waiting.pop(em.key, None)
                if w is not None:
                    self.send_failures += 1
                    self._fire(w.action, "XADD", w.scheduled, SendFailed(str(reply)))
            # Unknown: it may have been added, so its decision may still come.

    def _read_mirror(self) -> None:
        """The ``P:position:*`` mirror the duplicate closes pick their symbols from."""
        try:
            pipe = self.client.pipeline(transaction=False)
            for s in self.symbols:
                pipe.hgetall(self.keys.position(s))
            hashes = pipe.execute()
            self.view = MarketView(positions={s: h for s, h in zip(self.symbols, hashes,
                                                                   strict=True) if h})
        except (redis.RedisError, OSError) as exc:
            log.debug("mirror read failed: %s", exc)

    def _follow_mirror(self) -> None:
        """Reread the mirror apart from the users, so that a user never waits on a read
        (that wait would count in its plan's latency): every MIRROR_TTL_S while duplicate
        closes use it, not at all while none does, so a shared Redis gets at most one read
        per close burst and 1/MIRROR_TTL_S per second. A burst picks from the last read:
        at most MIRROR_TTL_S old under load, as old as the previous burst when they are
        rare."""
        while self.running:
            gevent.sleep(MIRROR_TTL_S)
            if self.mirror_wanted:
                self.mirror_wanted = False
                self._read_mirror()

    # -- completing -----------------------------------------------------------------------
    def _fire(self, action: str, name: str, scheduled: float,
              exc: Exception | None = None) -> None:
        ms = (time.perf_counter() - scheduled) * 1000.0
        self.latency.record_ms(ms)
        self.env.events.request.fire(request_type=action, name=name, response_time=ms,
                                     response_length=0, exception=exc, context={})

    def _read(self) -> None:
        """The process's one reader of the events stream (bytes: only the plan id, the
        decision and a BLOCK's reason are decoded)."""
        events, waiting = self.keys.events, self.waiting
        while self.running:
            try:
                resp = self.reader_client.xread({events: self.last_id}, count=READ_COUNT,
                                                block=READ_BLOCK_MS)
            except (redis.RedisError, OSError) as exc:
                if self.running:
                    log.warning("events reader: %s", exc)
                    gevent.sleep(0.1)
                continue
            for _stream, entries in resp or ():
                for _entry_id, fields in entries:
                    decision = fields.get(b"decision")
                    if decision not in DECISIONS:
                        continue  # informational entries
                    w = waiting.pop(fields.get(b"plan_id", b"").decode("utf-8", "replace"),
                                    None)
                    if w is None:
                        continue  # another process's plan, or a rotation plan
                    self.decided += 1
                    name = "PERMIT" if decision == b"PERMIT" else \
                        f"BLOCK {(fields.get(b'reason') or b'?').decode('utf-8', 'replace')}"
                    self._fire(w.action, name, w.scheduled)
                # After the batch: a reader stopped half-way (Ctrl-C) is replaced by one
                # that reads the batch again (the plans it completed are no longer waiting).
                self.last_id = entries[-1][0]

    def _expire(self) -> None:
        while self.running:
            gevent.sleep(0.1)
            self.expire(self.deadline_s, "no decision within the deadline")

    def expire(self, older_than_s: float, why: str) -> int:
        cutoff = time.perf_counter() - older_than_s
        late = [(k, w) for k, w in self.waiting.items() if w.scheduled <= cutoff]
        for k, w in late:
            if self.waiting.pop(k, None) is not None:
                self.timeouts += 1
                self._fire(w.action, "NO DECISION", w.scheduled,
                           DecisionTimeout(f"{why} ({older_than_s:g}s)"))
        return len(late)

    def drain(self, timeout: float) -> None:
        """At the end: wait (bounded) for the decisions of what was sent, then fail the
        rest."""
        # A reader or sender that died (an error; a KeyboardInterrupt, had SIGINT not been
        # routed to the main greenlet: chaos.loadtest.hooks) is replaced by one that
        # finishes its job (the plans already due are still sent).
        for name, run in (("reader", self._read), ("sender", self._send_loop)):
            if self.greenlets[name].dead:
                self.greenlets[name] = gevent.spawn(run)
        deadline = time.monotonic() + timeout
        while self.waiting and time.monotonic() < deadline:
            gevent.sleep(0.05)
        self.expire(0.0, "no decision before the end")

    def close(self) -> None:
        self.running = False
        self.has_due.set()
        gevent.joinall([*self.greenlets.values(), *self.in_flight],
                       timeout=READ_BLOCK_MS / 1000 + 1)
        gevent.killall([*self.greenlets.values(), *self.in_flight], timeout=1)
        self.hist.close()
        for c in (self.client, self.reader_client):
            try:
                c.close()
            except Exception:  # noqa: BLE001 - closing at the end, nothing to do about it
                log.debug("closing a client failed", exc_info=True)

    def counts(self) -> dict[str, int]:
        elapsed = time.perf_counter() - self.pacer.t0 if self.pacer.t0 is not None else 0.0
        return {"sent": self.sent, "decided": self.decided, "timeouts": self.timeouts,
                "send_failures": self.send_failures, "waiting": len(self.waiting),
                "batches": self.batches,
                "slots": self.pacer.k, "slots_due": int(elapsed / self.pacer.interval)}


def _sleep_until(at: float) -> None:
    delay = at - time.perf_counter()
    if delay > 0:
        gevent.sleep(delay)


# The process's plane, set at test_start by the locustfile (None on the master).
PLANE: Plane | None = None


class GovernorUser(User):
    """One producer of the process's schedule: each task run is one slot (or a
    duplicate-close burst of three), handed to the process's sender when due. The
    process's ``--rate`` is shared by its users, so more users only help when one cannot
    keep up (a burst's spread, a late wake-up)."""

    def wait_time(self) -> float:
        return 0.0

    @task
    def plan(self) -> None:
        if PLANE is None:
            gevent.sleep(0.05)  # the plane is set at test_start
            return
        PLANE.step()

"""The apply layer of the protocol: PERMIT decisions in, orders on the exchange, results out.

It plays the part of the trading system's executor, so that a governor can be
judged on what actually reached the venue. Per PERMIT entry of
``P:stream:governor.events`` (consumer group ``apply``):

1. record the take in the exchange ledger (:meth:`Exchange.take`), so that a
   duplicated decision entry, or one reclaimed from a slow apply consumer, is
   recognised as handled instead of being reported ``expired`` while its
   order is still on the way (a governor that trusts the first result would
   then release the exit lock of a close that is about to execute);
2. take the permit with GETDEL: single use, so an order runs at most once
   whatever happens to the stream (a missing permit means ``expired``);
3. after a simulated order latency, execute on the :class:`Exchange`;
4. write the ``P:position:{symbol}`` mirror, THEN the result entry, then ack
   the decision (result and ack in one MULTI). A governor that sees a result
   can therefore trust the mirror to show it already.

Orders wait out their latency on a timer heap, not in a worker thread, so a
slow order never holds up a fast one and the number of orders in flight is
unbounded. A taken permit whose outcome a crash makes unknown is lost: that is
at-most-once execution, which is the point of single-use permits. After a
restart under the same consumer name, a decision whose order the ledger shows
executed gets its result written again (at-least-once results).

Failure-injection knobs (``duplicate_result_prob``, ``late_duplicate_ms``)
exercise the governors' idempotency on results.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import random
import signal
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from enum import StrEnum
from typing import Any, Protocol

import redis

from governor_ref.connection import connect
from governor_ref.decisions import Mirror
from governor_ref.governor import Backoff, Settings, StreamReader, decode_fields, is_transient
from governor_ref.keys import GROUP_APPLY, Keys
from governor_ref.protocol import (
    Action,
    Decision,
    DecisionEvent,
    ExecutionResult,
    Permit,
    ResultStatus,
)

from .exchange import Effect, Exchange, Fill, Order

log = logging.getLogger(__name__)

ClientFactory = Callable[[], redis.Redis]
OnRecord = Callable[[dict[str, Any]], None]

# Plans handled by this process that are remembered to tell a duplicated decision entry
# from a restart; older ones fall back on the ledger, which gives the same answer.
_HANDLED_MEMORY = 100_000

# A decision entry whose handling fails this many times with an error that is not Redis
# being unavailable is recorded, acknowledged and passed over: one entry must never stall
# the layer (it would execute nothing more and the run would look calm).
_POISON_ATTEMPTS = 3

# Keys the mirror loop's SCAN for stray ``P:position:*`` keys walks at most per pass after
# the first (SCAN walks the whole keyspace, which grows with every decision record and,
# on a shared Redis, holds every other system's keys too).
_MIRROR_SCAN_KEYS = 10_000


class StopFlag(Protocol):
    """``threading.Event`` or ``multiprocessing.Event``."""

    def is_set(self) -> bool: ...

    def wait(self, timeout: float | None = None) -> bool: ...


class ApplyEvent(StrEnum):
    """Kinds of record passed to ``on_record`` (the harness's history)."""

    PERMIT_TAKEN = "permit_taken"
    PERMIT_MISSING = "permit_missing"
    DUPLICATE_DECISION = "duplicate_decision"
    UNREADABLE_DECISION = "unreadable_decision"
    ORDER_EXECUTED = "order_executed"
    RESULT_WRITTEN = "result_written"


@dataclass(frozen=True)
class ApplyConfig:
    """Knobs of one apply-layer instance. Latency = base + uniform(0, jitter), in ms."""

    consumer: str = "apply-1"
    open_latency_ms: float = 20.0
    open_jitter_ms: float = 10.0
    close_latency_ms: float = 20.0
    close_jitter_ms: float = 10.0
    seed: int | None = 0
    workers: int = 16
    batch: int = 128
    block_ms: int = 100
    # Take over decisions another apply consumer left pending this long (it died).
    claim_idle_ms: int = 30_000
    claim_interval_s: float = 1.0
    duplicate_result_prob: float = 0.0
    late_duplicate_ms: int = 0
    mirror_interval_s: float = 1.0
    capital: float | None = None  # for exposure_pct; default: the exchange's, then Redis's
    # On stop, orders already taken still execute when due, for at most this long.
    drain_timeout_s: float = 5.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.duplicate_result_prob <= 1.0:
            raise ValueError("duplicate_result_prob must be within [0, 1]")
        if self.workers < 1 or self.batch < 1:
            raise ValueError("workers and batch must be >= 1")
        if (
            min(
                self.open_latency_ms,
                self.open_jitter_ms,
                self.close_latency_ms,
                self.close_jitter_ms,
                self.late_duplicate_ms,
            )
            < 0
        ):
            raise ValueError("latencies must be >= 0")

    def latency_s(self, action: str, rng: random.Random) -> float:
        if action == Action.CLOSE:
            base, jitter = self.close_latency_ms, self.close_jitter_ms
        else:
            base, jitter = self.open_latency_ms, self.open_jitter_ms
        return max(0.0, base + (rng.uniform(0.0, jitter) if jitter > 0 else 0.0)) / 1000.0


def result_for_fill(fill: Fill) -> ExecutionResult:
    """The result entry for an order the exchange handled.

    ``reason`` is empty for a plain open or close and names the effect otherwise
    (``add``, ``flip``, ``rejected_stale_fence``...), so a double open or close is
    visible on the wire too.
    """
    effect = Effect(fill.effect)
    return ExecutionResult(
        plan_id=fill.plan_id,
        symbol=fill.symbol,
        action=fill.action,
        status=ResultStatus.EXECUTED if effect.executed else ResultStatus.REJECTED,
        position_id=fill.position_id,
        notional=fill.notional,
        fence="" if fill.fence is None else str(fill.fence),
        reason="" if effect in (Effect.OPEN, Effect.CLOSE) else str(effect),
        executed_at_ms=fill.wall_ms,
    )


class _Timers:
    """Callbacks due at monotonic times, run by one thread; drains on close."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._cv = threading.Condition()
        self._seq = itertools.count()
        self._closed = False

    def call_later(self, delay_s: float, fn: Callable[[], None]) -> None:
        with self._cv:
            heapq.heappush(self._heap, (time.monotonic() + delay_s, next(self._seq), fn))
            self._cv.notify()

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()

    def run(self, abandon: threading.Event) -> None:
        while True:
            with self._cv:
                while True:
                    if abandon.is_set():
                        if self._heap:
                            log.warning(
                                "apply: %d taken orders dropped at stop (never sent)",
                                len(self._heap),
                            )
                        return
                    if self._closed and not self._heap:
                        return
                    now = time.monotonic()
                    if self._heap and self._heap[0][0] <= now:
                        fn = heapq.heappop(self._heap)[2]
                        break
                    wait = self._heap[0][0] - now if self._heap else None
                    # Bounded so an abandon without a notify is still seen.
                    self._cv.wait(0.1 if wait is None else min(wait, 0.1))
            try:
                fn()
            except Exception:  # noqa: BLE001 - a timer callback must not kill the timer thread
                log.exception("apply: timer callback failed")


class ApplyLayer:
    """One apply-layer consumer: ``run(stop)`` blocks; ``start_thread()`` / ``stop()`` wrap it.

    One run per instance (its timers and pool do not restart); a restart is a new instance,
    under the same consumer name if it is to pick up the old one's pending decisions.
    ``on_record`` is called from several threads, with plain dicts.
    """

    def __init__(
        self,
        redis_url_or_client_factory: str | ClientFactory,
        keys: Keys,
        exchange: Exchange,
        config: ApplyConfig | None = None,
        *,
        on_record: OnRecord | None = None,
    ) -> None:
        if isinstance(redis_url_or_client_factory, str):
            url = redis_url_or_client_factory
            # "replace": a decision entry that is not UTF-8 (the governor under test wrote
            # it) must not make every read of the stream fail.
            self._factory: ClientFactory = lambda: connect(url, decode_responses=True,
                                                           encoding_errors="replace")
        else:
            self._factory = redis_url_or_client_factory
        self.keys = keys
        self.exchange = exchange
        self.config = config or ApplyConfig()
        self.on_record = on_record
        self._rng = random.Random(self.config.seed)
        self._lock = threading.Lock()
        self._knobs_lock = threading.Lock()
        self._inflight: dict[str, str] = {}  # plan_id -> decision entry id
        self._handled: OrderedDict[str, None] = OrderedDict()
        self._attempts: dict[str, int] = {}  # decision entry id -> failed handlings
        self._abandon = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._r: redis.Redis | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._timers = _Timers()
        self.started = threading.Event()

    # -- runtime knobs (the nemesis turns them during fault windows) ----------------------------
    KNOBS = (
        "open_latency_ms",
        "open_jitter_ms",
        "close_latency_ms",
        "close_jitter_ms",
        "duplicate_result_prob",
        "late_duplicate_ms",
    )

    def knobs(self) -> dict[str, float]:
        """The current values of the runtime knobs (:attr:`KNOBS`)."""
        cfg = self.config
        return {name: getattr(cfg, name) for name in self.KNOBS}

    def set_knobs(
        self,
        *,
        open_latency_ms: float | None = None,
        open_jitter_ms: float | None = None,
        close_latency_ms: float | None = None,
        close_jitter_ms: float | None = None,
        duplicate_result_prob: float | None = None,
        late_duplicate_ms: float | None = None,
    ) -> dict[str, float]:
        """Change order latency and result duplication while running; thread-safe.

        Returns the previous values of the knobs given (not None), so that
        ``layer.set_knobs(**previous)`` restores them. Values are validated like
        :class:`ApplyConfig`'s (``ValueError``, nothing changed). The config is replaced as a
        whole, and every order reads it once when its permit is taken (its latency and
        whether its result is duplicated); the lateness of a duplicate is read when the
        result is written.
        """
        given = {
            "open_latency_ms": open_latency_ms,
            "open_jitter_ms": open_jitter_ms,
            "close_latency_ms": close_latency_ms,
            "close_jitter_ms": close_jitter_ms,
            "duplicate_result_prob": duplicate_result_prob,
            "late_duplicate_ms": late_duplicate_ms,
        }
        changes: dict[str, Any] = {k: v for k, v in given.items() if v is not None}
        if "late_duplicate_ms" in changes:
            changes["late_duplicate_ms"] = int(changes["late_duplicate_ms"])
        with self._knobs_lock:
            old = self.config
            self.config = replace(old, **changes)  # __post_init__ validates
        previous = {name: getattr(old, name) for name in changes}
        log.info("apply %s: knobs %s (were %s)", old.consumer, changes, previous)
        return previous

    # -- lifecycle ------------------------------------------------------------------------
    def start_thread(self) -> threading.Thread:
        """Run in a daemon thread until :meth:`stop`."""
        self._thread = threading.Thread(
            target=self.run, args=(self._stop,), name=f"apply-{self.config.consumer}", daemon=True
        )
        self._thread.start()
        return self._thread

    def stop(self, timeout: float | None = None) -> None:
        """Stop reading, let taken orders finish (up to ``drain_timeout_s``), join."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout if timeout is not None else self.config.drain_timeout_s + 15)
            if self._thread.is_alive():
                log.error("apply %s did not stop in time", self.config.consumer)

    def run(self, stop: StopFlag) -> None:
        """Consume decisions until ``stop`` is set; never raises on Redis errors."""
        cfg = self.config
        self._r = r = self._factory()
        reader = StreamReader(
            r,
            self.keys.events,
            GROUP_APPLY,
            cfg.consumer,
            Settings(
                redis_url="",
                consumer=cfg.consumer,
                batch=cfg.batch,
                block_ms=cfg.block_ms,
                claim_idle_ms=cfg.claim_idle_ms,
                claim_interval_s=cfg.claim_interval_s,
            ),
        )
        backoff = Backoff()
        self._pool = ThreadPoolExecutor(cfg.workers, thread_name_prefix=f"{cfg.consumer}-order")
        timers = threading.Thread(
            target=self._timers.run,
            args=(self._abandon,),
            name=f"{cfg.consumer}-timers",
            daemon=True,
        )
        mirror = threading.Thread(
            target=self._mirror_loop, args=(stop,), name=f"{cfg.consumer}-mirror", daemon=True
        )
        timers.start()
        mirror.start()
        try:
            self._until_up(reader.ensure_group, stop, backoff)
            self.started.set()
            log.info("apply %s consuming %s", cfg.consumer, self.keys.events)
            while not stop.is_set():
                try:
                    self._dispatch(reader.read())
                    backoff.ok()
                except Exception as exc:  # noqa: BLE001 - back off and retry, never crash
                    self._log_retry(exc, "decisions")
                    backoff.fail(stop)  # type: ignore[arg-type]
                    reader.restart()
        finally:
            self._timers.close()
            timers.join(cfg.drain_timeout_s)
            self._abandon.set()  # from here a failed write is not retried
            timers.join()
            self._pool.shutdown(wait=True)
            mirror.join()
            with contextlib.suppress(Exception):
                r.close()
            log.info("apply %s stopped", cfg.consumer)

    # -- decisions --------------------------------------------------------------------------
    def _dispatch(self, raw: list[tuple[str, dict[Any, Any] | None]]) -> None:
        to_ack: list[str] = []
        try:
            for entry_id, fields in raw:
                if fields is None:  # trimmed away while pending
                    to_ack.append(entry_id)
                    continue
                if self._handle(entry_id, fields):
                    to_ack.append(entry_id)
        finally:
            # What was handled is acked even when a later entry of the batch failed: the
            # failed one is read again (pending), the others are not.
            if to_ack:
                self._require_r().xack(self.keys.events, GROUP_APPLY, *to_ack)

    def _handle(self, entry_id: str, fields: dict[Any, Any]) -> bool:
        """One decision entry; True when it is to be acked at once.

        Only a PERMIT is read beyond its ``decision`` field: BLOCKs and informational
        entries (any other decision, which the protocol says to ignore) are acked whatever
        else they hold. A PERMIT without a plan id cannot be executed: it is recorded and
        acked. An entry whose handling keeps failing (not because Redis is unavailable:
        that is retried as long as it lasts) is recorded and acked after
        ``_POISON_ATTEMPTS`` tries.
        """
        f = decode_fields(fields)
        if f.get("decision") != Decision.PERMIT:
            return True  # BLOCK or informational: nothing to execute
        event = permit_event(f, entry_id)
        if event is None:
            self._unreadable(entry_id, f, "PERMIT without a plan_id")
            return True
        try:
            done = self._on_permit(event)
        except Exception as exc:
            if is_transient(exc):
                raise  # Redis is down: the whole batch is read again once it is back
            n = self._attempts.get(entry_id, 0) + 1
            if n < _POISON_ATTEMPTS:
                self._attempts[entry_id] = n
                raise
            self._attempts.pop(entry_id, None)
            self._unreadable(entry_id, f, f"handling failed {n} times: "
                                          f"{type(exc).__name__}: {exc}")
            return True
        self._attempts.pop(entry_id, None)
        return done

    def _unreadable(self, entry_id: str, fields: dict[str, str], problem: str) -> None:
        """A PERMIT entry passed over: in the history (the checkers judge the entry itself
        from the recorder's copy) and in the log, then acked by the caller."""
        log.warning("apply: decision entry %s passed over (%s): %s", entry_id, problem, fields)
        self._record(ApplyEvent.UNREADABLE_DECISION, plan_id=fields.get("plan_id") or None,
                     entry_id=entry_id, problem=problem, fields=fields)

    def _on_permit(self, event: DecisionEvent) -> bool:
        """Handle one PERMIT entry; True when the entry is to be acked at once."""
        plan_id, entry_id = event.plan_id, str(event.entry_id)
        with self._lock:
            inflight = self._inflight.get(plan_id)
            handled_here = plan_id in self._handled
        if inflight == entry_id:
            return False  # our own entry read again (reclaim, re-read): acked when done
        if inflight is not None or handled_here:
            return self._duplicate_decision(plan_id, entry_id, self.config.consumer)
        owner = self.exchange.take(plan_id, self.config.consumer)
        if owner is not None and owner != self.config.consumer:
            return self._duplicate_decision(plan_id, entry_id, owner)
        if owner is not None:
            # Taken by this consumer in an earlier life: report what the ledger says, if
            # the order got that far; otherwise the permit may still be there.
            fills = self.exchange.orders_for(plan_id)
            if fills:
                self._start(plan_id, entry_id, self._publish_fill, entry_id, fills[-1], False)
                return False
        raw = self._require_r().getdel(self.keys.permit(plan_id))
        now_ms = time.time_ns() // 1_000_000
        if raw is None:
            self._record(ApplyEvent.PERMIT_MISSING, plan_id=plan_id, entry_id=entry_id)
            result = ExecutionResult(
                plan_id=plan_id,
                symbol=event.symbol,
                action=event.action,
                status=ResultStatus.EXPIRED,
                fence=event.fence or "",
                reason="permit_expired",
                executed_at_ms=now_ms,
            )
            self._start(plan_id, entry_id, self._publish, entry_id, result, None, False)
            return False
        try:
            permit = Permit.from_json(raw)
            order = Order.from_permit(permit)
            Action(order.action)
        except (ValueError, KeyError, TypeError) as exc:
            log.error("apply: unreadable permit for %s: %s", plan_id, exc)
            result = ExecutionResult(
                plan_id=plan_id,
                symbol=event.symbol,
                action=event.action,
                status=ResultStatus.REJECTED,
                fence=event.fence or "",
                reason="invalid_permit",
                executed_at_ms=now_ms,
            )
            self._start(plan_id, entry_id, self._publish, entry_id, result, None, False)
            return False
        self._record(
            ApplyEvent.PERMIT_TAKEN, plan_id=plan_id, entry_id=entry_id, permit=asdict(permit)
        )
        # Drawn here, in the reader thread, so a seed gives the same run every time.
        cfg = self.config  # one snapshot: set_knobs may replace it at any time
        delay = cfg.latency_s(order.action, self._rng)
        duplicate = self._rng.random() < cfg.duplicate_result_prob
        with self._lock:
            self._inflight[plan_id] = entry_id
        self._timers.call_later(
            delay, lambda: self._submit(self._execute, entry_id, order, duplicate)
        )
        return False

    def _duplicate_decision(self, plan_id: str, entry_id: str, owner: str) -> bool:
        """Another decision entry for a permit already taken: ack it, write nothing."""
        self._record(ApplyEvent.DUPLICATE_DECISION, plan_id=plan_id, entry_id=entry_id, owner=owner)
        log.info("apply: decision %s for %s already taken by %s", entry_id, plan_id, owner)
        return True

    def _start(self, plan_id: str, entry_id: str, fn: Callable[..., None], *args: Any) -> None:
        """Mark the plan in flight (so a re-read of its entry is ignored) and hand it over."""
        with self._lock:
            self._inflight[plan_id] = entry_id
        self._submit(fn, *args)

    # -- orders and results (worker threads) ------------------------------------------------
    def _submit(self, fn: Callable[..., None], *args: Any) -> None:
        assert self._pool is not None
        self._pool.submit(self._guarded, fn, *args)

    @staticmethod
    def _guarded(fn: Callable[..., None], *args: Any) -> None:
        try:
            fn(*args)
        except Exception:  # noqa: BLE001 - one order's failure must not go unseen
            log.exception("apply: %s failed", getattr(fn, "__name__", fn))

    def _execute(self, entry_id: str, order: Order, duplicate: bool) -> None:
        # A failure here leaves the outcome unknown: the order is lost (at most once) and
        # the decision stays pending, so a restart reports it from the ledger if it ran.
        fill = self.exchange.execute(order)
        self._record(
            ApplyEvent.ORDER_EXECUTED, plan_id=order.plan_id, entry_id=entry_id, fill=asdict(fill)
        )
        self._publish_fill(entry_id, fill, duplicate)

    def _publish_fill(self, entry_id: str, fill: Fill, duplicate: bool) -> None:
        self._publish(entry_id, result_for_fill(fill), fill.symbol, duplicate)

    def _publish(
        self, entry_id: str, result: ExecutionResult, mirror_symbol: str | None, duplicate: bool
    ) -> None:
        """Mirror (when an order ran), then result + ack; retried until done or abandoned."""
        r, backoff = self._require_r(), Backoff()
        done_mirror = mirror_symbol is None
        fields = result.to_fields()
        while True:
            try:
                if not done_mirror:
                    assert mirror_symbol is not None
                    self.exchange.mirror_symbol(r, self.keys, mirror_symbol, self.config.capital)
                    done_mirror = True
                pipe = r.pipeline(transaction=True)
                pipe.xadd(self.keys.results, fields)
                pipe.xack(self.keys.events, GROUP_APPLY, entry_id)
                result_id = pipe.execute()[0]
                break
            except Exception as exc:  # noqa: BLE001
                self._log_retry(exc, f"result of {result.plan_id}")
                if self._abandon.is_set():
                    log.error("apply: result of %s not written (stopping)", result.plan_id)
                    return
                backoff.fail(self._abandon)
        self._record(
            ApplyEvent.RESULT_WRITTEN,
            plan_id=result.plan_id,
            entry_id=entry_id,
            result_id=str(result_id),
            result=fields,
            duplicate=False,
        )
        with self._lock:
            self._inflight.pop(result.plan_id, None)
            self._handled[result.plan_id] = None
            while len(self._handled) > _HANDLED_MEMORY:
                self._handled.popitem(last=False)
        if duplicate:
            late = self.config.late_duplicate_ms / 1000.0
            if late > 0:
                self._timers.call_later(late, lambda: self._submit(self._duplicate, fields))
            else:
                self._duplicate(fields)

    def _duplicate(self, fields: dict[str, str]) -> None:
        """At-least-once delivery made visible: the same result entry once more."""
        try:
            result_id = self._require_r().xadd(self.keys.results, fields)
        except Exception as exc:  # noqa: BLE001 - a lost duplicate is only a lost test case
            self._log_retry(exc, f"duplicate result of {fields['plan_id']}")
            return
        self._record(
            ApplyEvent.RESULT_WRITTEN,
            plan_id=fields["plan_id"],
            result_id=str(result_id),
            result=fields,
            duplicate=True,
        )

    # -- the mirror ---------------------------------------------------------------------------
    def _mirror_loop(self, stop: StopFlag) -> None:
        """Rewrite the whole mirror from the ledger now and then: after a Redis restart
        this is what brings ``P:position:*`` back."""
        r = self._require_r()
        cursor: int | None = None  # None: the first pass looks for strays everywhere
        while True:
            try:
                strays, cursor = self._stray_sweep(r, cursor)
                self.exchange.mirror(r, self.keys, self.config.capital, strays=strays)
            except Exception as exc:  # noqa: BLE001
                self._log_retry(exc, "mirror sync")
            if stop.wait(self.config.mirror_interval_s) or stop.is_set():
                return

    def _stray_sweep(self, r: redis.Redis, cursor: int | None) -> tuple[list[str], int]:
        """The ``P:position:*`` keys of the next share of a SCAN sweep: all of them when
        ``cursor`` is None, else at most _MIRROR_SCAN_KEYS keys walked from ``cursor`` on
        (a full sweep per pass on a small keyspace, one every keys/_MIRROR_SCAN_KEYS
        passes on a large one). Returns them and the cursor to go on from."""
        symbols, c = Mirror(r, self.keys).sweep(
            cursor or 0, None if cursor is None else _MIRROR_SCAN_KEYS)
        return [self.keys.position(s) for s in sorted(symbols)], c

    # -- helpers ----------------------------------------------------------------------------
    def _require_r(self) -> redis.Redis:
        assert self._r is not None, "ApplyLayer.run has not started"
        return self._r

    def _record(self, kind: ApplyEvent, **data: Any) -> None:
        if self.on_record is None:
            return
        rec = {
            "type": str(kind),
            "consumer": self.config.consumer,
            "wall_ms": time.time_ns() // 1_000_000,
            "mono_ns": time.monotonic_ns(),
            **data,
        }
        try:
            self.on_record(rec)
        except Exception:  # noqa: BLE001 - the recorder must not break execution
            log.exception("apply: on_record hook failed")

    def _until_up(self, step: Callable[[], Any], stop: StopFlag, backoff: Backoff) -> None:
        while not stop.is_set():
            try:
                step()
                backoff.ok()
                return
            except Exception as exc:  # noqa: BLE001
                self._log_retry(exc, "startup")
                backoff.fail(stop)  # type: ignore[arg-type]

    @staticmethod
    def _log_retry(exc: BaseException, where: str) -> None:
        if is_transient(exc):
            log.warning(
                "apply %s: Redis unavailable (%s: %s); retrying", where, type(exc).__name__, exc
            )
        else:
            log.exception("apply %s: unexpected error; retrying", where)


def permit_event(fields: dict[str, str], entry_id: str) -> DecisionEvent | None:
    """A PERMIT entry as the apply layer needs it, or None without a plan id.

    Lenient on purpose: the apply layer needs the plan id (for the permit key) and passes
    on symbol, action and fence to an ``expired`` result; the order itself is built from
    the permit. ``decided_at_ms`` is not needed here, so one that is not a number (a
    protocol breach the ``protocol`` checker reports) does not stop the execution.
    """
    plan_id = fields.get("plan_id", "")
    if not plan_id:
        return None
    try:
        decided = int(fields.get("decided_at_ms") or 0)
    except ValueError:
        decided = 0
    return DecisionEvent(plan_id=plan_id, symbol=fields.get("symbol", ""),
                         action=fields.get("action", ""), decision=str(Decision.PERMIT),
                         reason=fields.get("reason", ""), governor=fields.get("governor", ""),
                         decided_at_ms=decided, fence=fields.get("fence") or None,
                         entry_id=entry_id)


def run_apply_process(
    redis_url: str,
    keys: Keys,
    exchange: Exchange,
    config: ApplyConfig | None = None,
    stop: StopFlag | None = None,
) -> None:
    """``multiprocessing`` target: every connection (Redis, SQLite) is made in the child.

    Without ``stop``, runs until SIGTERM or SIGINT.
    """
    flag: StopFlag
    if stop is None:
        event = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: event.set())
        flag = event
    else:
        flag = stop
    ApplyLayer(redis_url, keys, exchange, config).run(flag)

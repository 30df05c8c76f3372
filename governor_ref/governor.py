"""The governor process: stream loop shared by every variant.

One process per instance; several instances form consumer group
``governor`` on the plan stream and ``governor-results`` on the result
stream. The loop owns everything that is protocol, not policy: reading plans
(own pending entries first, after a restart), parsing them, reclaiming the
entries of a dead or paused consumer (XAUTOCLAIM), reading results, retrying
through Redis outages with bounded backoff, and metrics. A variant
(:class:`DecisionLogic`) only decides and settles.

Fail closed: a decision is written only by the variant's decide step; when
Redis errors, nothing is acknowledged and the entry is read again later.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import redis
from redis.exceptions import BusyLoadingError, OutOfMemoryError, ReadOnlyError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .connection import connect
from .keys import GROUP_GOVERNOR, GROUP_GOVERNOR_RESULTS, Keys
from .metrics import Metrics
from .protocol import Plan, PlanError

log = logging.getLogger(__name__)

# Server replies that mean "not now" rather than "never": retry after backoff.
TRANSIENT_PREFIXES = ("OOM", "LOADING", "BUSY", "READONLY", "MASTERDOWN", "TRYAGAIN",
                      "CLUSTERDOWN", "NOREPLICAS", "MISCONF")


def is_transient(exc: BaseException) -> bool:
    # redis-py maps -OOM, -READONLY and -LOADING to classes and strips the prefix.
    if isinstance(exc, RedisConnectionError | RedisTimeoutError | OSError | OutOfMemoryError
                  | ReadOnlyError | BusyLoadingError):
        return True
    if not isinstance(exc, ResponseError):
        return False
    msg = str(exc)
    # Wrapped forms: 6.2 in a script "Error running script ... -OOM command ...", and a
    # discarded MULTI "Transaction discarded because of: OOM command ...".
    return msg.startswith(TRANSIENT_PREFIXES) or any(
        f"-{p} " in msg or f"because of: {p} " in msg for p in TRANSIENT_PREFIXES)


@dataclass(frozen=True)
class Settings:
    redis_url: str
    prefix: str = "quantum"
    consumer: str = "gov-1"
    variant: str = "reference"
    batch: int = 128
    block_ms: int = 200
    claim_idle_ms: int = 3000
    claim_interval_s: float = 0.5
    reconcile_interval_s: float = 1.0
    # Keys a periodic reconcile walks at most (SCAN of P:position:* continued from where
    # the last one stopped): the sweep's cost stays bounded as the keyspace grows.
    reconcile_scan_keys: int = 10_000
    metrics_port: int | None = None
    plan_threads: int = 2


@dataclass(frozen=True)
class PlanEntry:
    """A plan stream entry as read: parsed, or the reason it could not be."""

    entry_id: str
    plan: Plan | None
    error: PlanError | None = None


@dataclass(frozen=True)
class Outcome:
    plan_id: str | None
    decision: str  # PERMIT, BLOCK, DUP (decided before), or NONE (unanswerable)
    reason: str = ""


@dataclass(frozen=True)
class ResultEntry:
    entry_id: str
    fields: dict[str, str]


class DecisionLogic(Protocol):
    """What differs between the reference, the seed design and the legacy one."""

    name: str
    # True when decide() may run in several threads at once and a plan decided
    # twice is harmless (atomic, idempotent steps): the loop then overlaps batches.
    thread_safe: bool

    def start(self) -> None:
        """Start-up work (reconcile, initialise counters), once per process start."""

    def decide(self, entries: list[PlanEntry]) -> list[Outcome]:
        """Decide and acknowledge each entry (one Outcome per entry, in order)."""

    def settle(self, entries: list[ResultEntry]) -> None:
        """Apply and acknowledge execution results (idempotently where the design allows)."""

    def periodic(self) -> None:
        """Housekeeping run from the results thread (reconcile, reaping)."""


@dataclass
class Context:
    """What a DecisionLogic gets: connections, keys and identity."""

    settings: Settings
    keys: Keys
    r: redis.Redis  # bytes in, bytes out (plans may carry bad UTF-8)
    metrics: Metrics

    @property
    def consumer(self) -> str:
        return self.settings.consumer


def decode_fields(raw: dict[Any, Any] | None) -> dict[str, str]:
    if not raw:
        return {}
    return {
        (k.decode("utf-8", "replace") if isinstance(k, bytes) else str(k)):
        (v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v))
        for k, v in raw.items()
    }


def _sid(x: Any) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


class Backoff:
    """Bounded exponential backoff: 50 ms doubling to 2 s."""

    def __init__(self, first: float = 0.05, cap: float = 2.0) -> None:
        self.first, self.cap, self.delay = first, cap, 0.0

    def fail(self, stop: threading.Event) -> None:
        self.delay = self.first if self.delay == 0 else min(self.cap, self.delay * 2)
        stop.wait(self.delay)

    def ok(self) -> None:
        self.delay = 0.0


class StreamReader:
    """Reads one stream for one consumer: pending first, then new, plus reclaims."""

    def __init__(self, r: redis.Redis, stream: str, group: str, consumer: str,
                 settings: Settings, pending_first: bool = True) -> None:
        self.r, self.stream, self.group, self.consumer = r, stream, group, consumer
        self.settings = settings
        # Re-read own pending entries first (after a restart they are this consumer's).
        self.pending_from: str | None = "0" if pending_first else None
        self.claim_cursor = "0-0"
        self.next_claim = 0.0

    def ensure_group(self) -> None:
        try:
            self.r.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def restart(self) -> None:
        """After a Redis error: entries read but not acked are pending; read them again."""
        self.pending_from = "0"

    def read(self) -> list[tuple[str, dict[Any, Any] | None]]:
        try:
            return self._read()
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            # The stream or group is gone (Redis lost its data): recreate and go on.
            log.warning("%s: group %s missing on %s; recreating", self.consumer, self.group,
                        self.stream)
            self.ensure_group()
            self.restart()
            return []

    def _read(self) -> list[tuple[str, dict[Any, Any] | None]]:
        out: list[tuple[str, dict[Any, Any] | None]] = []
        now = time.monotonic()
        if now >= self.next_claim:
            self.next_claim = now + self.settings.claim_interval_s
            out.extend(self._claim())
        if self.pending_from is not None:
            resp = self.r.xreadgroup(self.group, self.consumer, {self.stream: self.pending_from},
                                     count=self.settings.batch)
            entries = resp[0][1] if resp else []
            if entries:
                self.pending_from = _sid(entries[-1][0])
                return out + [(_sid(i), f) for i, f in entries]
            self.pending_from = None
        block = None if out else self.settings.block_ms
        resp = self.r.xreadgroup(self.group, self.consumer, {self.stream: ">"},
                                 count=self.settings.batch, block=block)
        for _stream, entries in resp or []:
            out.extend((_sid(i), f) for i, f in entries)
        return out

    def _claim(self) -> list[tuple[str, dict[Any, Any] | None]]:
        """Take over entries idle longer than claim_idle_ms (dead or paused consumers)."""
        resp = self.r.xautoclaim(self.stream, self.group, self.consumer,
                                 min_idle_time=self.settings.claim_idle_ms,
                                 start_id=self.claim_cursor, count=self.settings.batch)
        self.claim_cursor = _sid(resp[0]) if resp else "0-0"
        claimed = resp[1] if resp and len(resp) > 1 else []
        if claimed:
            log.info("%s reclaimed %d idle entries of %s", self.consumer, len(claimed),
                     self.stream)
        return [(_sid(i), f) for i, f in claimed if i is not None]


def group_drained(r: redis.Redis, stream: str, group: str) -> bool:
    """True when ``group`` has been delivered every entry of ``stream`` and acked them all.

    For whoever waits on governors (harness, tests, benchmarks): a stream or group
    that does not exist yet is not drained.
    """
    try:
        groups = r.xinfo_groups(stream)
        last = r.xinfo_stream(stream)["last-generated-id"]
    except ResponseError:
        return False
    for g in groups:
        name = g["name"].decode() if isinstance(g["name"], bytes) else g["name"]
        if name == group:
            return g["pending"] == 0 and g["last-delivered-id"] == last
    return False


LogicFactory = Callable[[Context], DecisionLogic]


class Governor:
    """One governor instance: a plan loop in the calling thread, a results thread."""

    def __init__(self, settings: Settings, logic_factory: LogicFactory) -> None:
        self.settings = settings
        self.keys = Keys(settings.prefix)
        self.metrics = Metrics(settings.variant)
        self.stop = threading.Event()
        self.ctx = Context(settings, self.keys, self._client(), self.metrics)
        self.logic = logic_factory(self.ctx)
        self.started = threading.Event()

    def _client(self) -> redis.Redis:
        return connect(self.settings.redis_url, decode_responses=False)

    # -- plan loop ---------------------------------------------------------------
    def run(self) -> None:
        if self.settings.metrics_port:
            self.metrics.serve(self.settings.metrics_port)
        log.info("governor %s (%s) starting on prefix %s", self.settings.consumer,
                 self.logic.name, self.settings.prefix)
        reader = StreamReader(self.ctx.r, self.keys.plans, GROUP_GOVERNOR,
                              self.settings.consumer, self.settings)
        backoff = Backoff()
        self._until_up(lambda: (reader.ensure_group(), self.logic.start()), backoff)
        results = threading.Thread(target=self._results_loop, name="results", daemon=True)
        results.start()
        # More than one plan loop only for a logic whose every step is idempotent and
        # atomic (the reference): while one loop waits on Redis, the other parses.
        extra = self.settings.plan_threads - 1 if getattr(self.logic, "thread_safe", False) else 0
        loops = [threading.Thread(target=self._plan_loop, name=f"plans-{i + 2}", daemon=True,
                                  args=(StreamReader(self.ctx.r, self.keys.plans, GROUP_GOVERNOR,
                                                     self.settings.consumer, self.settings,
                                                     pending_first=False),))
                 for i in range(extra)]
        for t in loops:
            t.start()
        self.started.set()
        self._plan_loop(reader, backoff)
        for t in [*loops, results]:
            t.join(timeout=5)
        log.info("governor %s stopped", self.settings.consumer)

    def _plan_loop(self, reader: StreamReader, backoff: Backoff | None = None) -> None:
        backoff = backoff or Backoff()
        while not self.stop.is_set():
            try:
                raw = reader.read()
                if raw:
                    self._decide(raw)
                backoff.ok()
            except Exception as exc:  # noqa: BLE001 - every failure must back off, not crash
                self._retry(exc, "plans", backoff)
                reader.restart()

    def _decide(self, raw: list[tuple[str, dict[Any, Any] | None]]) -> None:
        t0 = time.perf_counter()
        entries = []
        for entry_id, fields in raw:
            if fields is None:  # deleted from the stream while pending
                self.ctx.r.xack(self.keys.plans, GROUP_GOVERNOR, entry_id)
                continue
            try:
                entries.append(PlanEntry(entry_id, Plan.from_fields(fields)))
            except PlanError as err:
                log.warning("invalid plan %s (%s): %s", entry_id, err.plan_id, err)
                entries.append(PlanEntry(entry_id, None, err))
        if not entries:
            return
        outcomes = self.logic.decide(entries)
        elapsed = time.perf_counter() - t0
        for o in outcomes:
            if o.decision in ("PERMIT", "BLOCK"):
                self.metrics.decided(o.decision, o.reason, elapsed)

    # -- results loop ------------------------------------------------------------
    def _results_loop(self) -> None:
        r = self._client()
        reader = StreamReader(r, self.keys.results, GROUP_GOVERNOR_RESULTS,
                              self.settings.consumer, self.settings)
        backoff = Backoff()
        next_periodic = 0.0
        self._until_up(reader.ensure_group, backoff)
        while not self.stop.is_set():
            try:
                raw = reader.read()
                entries = [ResultEntry(i, decode_fields(f)) for i, f in raw]
                if entries:
                    self.logic.settle(entries)
                if time.monotonic() >= next_periodic:
                    next_periodic = time.monotonic() + self.settings.reconcile_interval_s
                    self.logic.periodic()
                backoff.ok()
            except Exception as exc:  # noqa: BLE001
                self._retry(exc, "results", backoff)
                reader.restart()

    # -- failure handling -----------------------------------------------------------
    def _until_up(self, step: Callable[[], Any], backoff: Backoff) -> None:
        while not self.stop.is_set():
            try:
                step()
                backoff.ok()
                return
            except Exception as exc:  # noqa: BLE001
                self._retry(exc, "startup", backoff)

    def _retry(self, exc: BaseException, where: str, backoff: Backoff) -> None:
        kind = type(exc).__name__
        self.metrics.retries.labels(self.settings.variant, kind).inc()
        if is_transient(exc):
            log.warning("%s: Redis unavailable (%s: %s); retrying", where, kind, exc)
        else:
            log.exception("%s: unexpected error; retrying", where)
        backoff.fail(self.stop)

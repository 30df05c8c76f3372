"""Jepsen's nemesis: faults as operations in the history.

A :class:`Nemesis` runs a scenario's ``[[fault]]`` list (:class:`chaos.scenario.FaultSpec`)
against the processes and servers of a run: each fault starts ``at`` seconds after the
workload's t0, stays on for ``duration`` seconds, and comes back every ``every`` seconds
when that is > 0, until :meth:`Nemesis.stop`. Every start and every stop is an operation
of process ``nemesis`` in the history, paired by the fault id::

    invoke  fault  key=latency-3  kind=latency phase=start target=random latency_ms=80
    ok      fault  key=latency-3  kind=latency phase=start ... (what was actually done)
    invoke  fault  key=latency-3  kind=latency phase=stop  target=random
    ok      fault  key=latency-3  kind=latency phase=stop  ...

A fault that cannot be applied (a url Redis that must not be killed, no proxy, libfaketime
not installed, a latency that would break the protocol's timing bound, another fault
already holding the same resource...) completes its start with ``fail`` and an ``error``,
logs a warning, and the run goes on: a missing fault is a weaker test, never a crash.
A ``fail`` at start means the fault did not happen (anything it had half done is undone
first); no stop is recorded for it.

Fault kinds (``chaos.scenario.FAULT_KINDS``); ``target`` is a governor consumer name,
``"random"`` (the nemesis's rng picks one of the supervisor's consumers not already under a
fault), ``"all"``, or for an anchored fault ``"anchor"`` (the governor that decided the
event it started on); Redis, proxy and apply-layer faults ignore it:

``kill_governor``
    :meth:`Supervisor.kill` (SIGKILL to the process group); the supervisor restarts it.
    The stop waits (``restart_wait_s``, default 10) for the restart and records the new pid.
``pause_governor``
    SIGSTOP for ``duration``, then SIGCONT. Scenarios set ``duration`` above
    ``exit_lock_ttl_ms`` (and the other TTLs they mean to lapse): the nemesis does not
    pick it.
``restart_governor``
    :meth:`Supervisor.stop_instance` (SIGTERM, SIGKILL after the supervisor's timeout),
    :meth:`Supervisor.start_instance` after ``duration``.
``kill_redis``
    SIGKILL the server (the current primary of a Sentinel topology, without waiting for
    the failover), restart it after ``duration``. The provider's durability decides what is
    lost: without ``appendonly`` every write since the start, with ``appendfsync always``
    nothing acknowledged.
``pause_redis``
    SIGSTOP the server (the primary) for ``duration`` -- scenarios pick durations past the
    clients' socket timeouts -- then SIGCONT.
``failover``
    ``SentinelTopology.failover()``; records the old and the new primary address.
``latency`` / ``drop`` / ``partition``
    :class:`chaos.proxy.FaultProxy` ``set_latency(latency_ms, jitter_ms)``,
    ``set_drop(prob)``, ``partition(mode)`` (``mode`` default ``freeze``) for the window;
    then that fault alone is switched off.
``memory_pressure``
    ``CONFIG SET maxmemory`` to ``used_memory + headroom_kb`` (default 64 KB) and
    ``maxmemory-policy`` to ``policy`` (default ``noeviction``; scenarios also use
    ``allkeys-lru``), then ballast keys are written until Redis is at its limit (an OOM
    reply, or a first eviction; ``fill = false`` leaves the headroom to the workload). At
    stop the previous maxmemory and policy are restored and the ballast deleted. Never on a
    url Redis.
``redelivery``
    The apply layer writes each result twice, the copy ``late_ms`` later (``dup_prob``
    default 1.0, ``late_ms`` default 500), and the nemesis re-adds recent plans with their
    own ids: ``XREVRANGE`` of the plan stream (``readd`` entries, default 20) at the start
    and every ``interval_s`` (0.5) during the window, each plan id re-added at most once per
    window, fields unchanged. The re-added plan ids are in the start and stop records.
``slow_exchange``
    Apply-layer order latency (open and close) raised to ``latency_ms`` (+ up to
    ``jitter_ms``, default 0) for the window. The default lies above ``exit_lock_ttl_ms``
    and below the protocol's timing bound (``capital_reservation_ttl_ms -
    permit_ttl_ms``): ``min(1.5 x exit_lock_ttl_ms, midpoint)``. A value whose worst case
    reaches :data:`TIMING_BOUND_USE` of the bound (the rest is left for the time between
    the permit's issue and its take) is refused: ``docs/protocol.md``, "Timing assumption".
``clock_skew``
    Restart the target governor(s) under libfaketime (``LD_PRELOAD`` +
    ``FAKETIME="+<offset_s>s"``, default 30 s; ``CLOCK_MONOTONIC`` is left alone) and, at
    stop, restart them without. Without libfaketime the start fails with "libfaketime not
    installed". Only the governor's own clock moves: Redis ``TIME`` (which the reference
    governor's scripts use) does not.

Anchors: a fault with ``after`` (:class:`chaos.scenario.AnchorSpec`) has no time; it starts
once, ``delay`` seconds after the ``n``-th matching event (:mod:`chaos.anchors` watches the
streams and the apply layer). Its start invoke carries ``after`` (the anchor), ``anchor_event``
(the event: entry id, plan id, symbol, governor, its time) and ``anchor_lag_ms`` (event to
fault start). An anchor whose event never came by :meth:`Nemesis.stop` is recorded as an
``info`` fault op with ``phase=not_fired`` (and the matches seen), and warned about.

Resources: two faults that would fight over one thing (two pauses of one governor, two
``slow_exchange`` windows, a ``kill_redis`` during a ``pause_redis``...) never overlap; the
later one fails with "conflicts with active fault ...". :meth:`Nemesis.heal_all` ends every
active fault (recording its stop) and then restores whatever a failed stop left behind.
"""

from __future__ import annotations

import contextlib
import glob
import heapq
import itertools
import logging
import os
import random
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import redis
from redis import Redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from governor_ref.keys import Keys
from governor_ref.protocol import GovernorConfig

from .anchors import AnchorEvent, AnchorWatcher
from .apply_layer import ApplyLayer
from .history import F, HistoryWriter
from .proxy import PARTITION_MODES, FaultProxy
from .redis_servers import (
    MAXMEMORY_POLICIES,
    EmbeddedRedis,
    RedisProvider,
    SentinelTopology,
    UrlRedis,
)
from .scenario import FAULT_KINDS, FaultSpec
from .supervisor import Supervisor

log = logging.getLogger(__name__)

PROCESS = "nemesis"
"""The history process of fault operations."""

TIMING_BOUND_USE = 0.9
"""slow_exchange may use this share of ``capital_reservation_ttl_ms - permit_ttl_ms`` for an
order's latency (worst case, jitter included); the rest covers the permit's trip through
the events stream to the apply layer."""

DEFAULT_FAKETIME_LIBS: tuple[str, ...] = (
    "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
    "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1",
    "/usr/lib/faketime/libfaketime.so.1",
    "/usr/local/lib/faketime/libfaketime.so.1",
)

_RESERVED = frozenset({"f", "key", "symbol", "kind", "phase", "target", "error", "after",
                       "anchor_event", "anchor_lag_ms"})


class FaultUnavailable(RuntimeError):
    """The fault cannot be applied in this setup (recorded as a ``fail`` op)."""


class FaultConflict(FaultUnavailable):
    """Another active fault holds a resource this one needs."""


class FaultWindow(NamedTuple):
    """When a fault was (possibly) in force: from the invoke of its start to the completion
    of its stop, in ``time.monotonic_ns()`` like the history; ``stop_ns`` is None while it
    is on."""

    kind: str
    start_ns: int
    stop_ns: int | None


@dataclass(frozen=True)
class ActiveFault:
    """A fault that is starting, on, or stopping."""

    fault_id: str
    kind: str
    target: str
    targets: tuple[str, ...]
    state: str  # "starting", "active" or "stopping"
    start_ns: int
    params: dict[str, Any]


# --------------------------------------------------------------------------- helpers


def ballast_key(keys: Keys, n: int) -> str:
    """Name of the ``n``-th memory_pressure ballast key.

    Deliberately not in :class:`governor_ref.keys.Keys`: no governor may read it, and it
    must not be mistaken for protocol state. It stays under the run's prefix so that a url
    provider's cleanup (and a reader of the keyspace) sees whose it is.
    """
    return f"{keys.prefix}:nemesis:ballast:{n}"


def find_libfaketime(search: Sequence[str] | None = None) -> str | None:
    """Path of ``libfaketime.so.1``, or None when libfaketime is not installed.

    With ``search``, only those paths are tried (tests point it at a missing file).
    Otherwise: ``$FAKETIME_LIB``, :data:`DEFAULT_FAKETIME_LIBS`, then the library that
    belongs to a ``faketime`` found on PATH (``<prefix>/lib[/<arch>]/faketime/``).
    """
    if search is not None:
        candidates = list(search)
    else:
        candidates = [p for p in (os.environ.get("FAKETIME_LIB"),) if p]
        candidates += DEFAULT_FAKETIME_LIBS
        exe = shutil.which("faketime")
        if exe:
            prefix = os.path.dirname(os.path.dirname(os.path.realpath(exe)))
            candidates += sorted(glob.glob(os.path.join(prefix, "lib*", "faketime",
                                                        "libfaketime.so.1")))
            candidates += sorted(glob.glob(os.path.join(prefix, "lib*", "*", "faketime",
                                                        "libfaketime.so.1")))
    for path in candidates:
        if path and os.path.isfile(path):
            return path
    return None


def faketime_env(lib: str, offset_s: float) -> dict[str, str]:
    """Environment that runs a process ``offset_s`` seconds off the real wall clock."""
    value = float(offset_s)
    offset = f"{int(value):+d}" if value.is_integer() else f"{value:+g}"
    preload = ":".join(p for p in (lib, os.environ.get("LD_PRELOAD", "")) if p)
    return {
        "LD_PRELOAD": preload,
        "FAKETIME": f"{offset}s",
        # Skew is a wall-clock fault: timeouts and sleeps keep running on real time.
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
    }


def _addr(addr: tuple[str, int] | None) -> str | None:
    return None if addr is None else f"{addr[0]}:{addr[1]}"


def _err(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _num(params: dict[str, Any], name: str, default: float) -> float:
    value = params.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise FaultUnavailable(f"params.{name} must be a number, got {value!r}")
    return float(value)


def _attempt(what: str, fn: Callable[..., Any], *args: Any) -> bool:
    """Run one restoring step; log and go on when it fails."""
    try:
        fn(*args)
    except Exception as exc:  # noqa: BLE001 - heal as much as possible
        log.warning("nemesis: heal_all could not %s: %s", what, _err(exc))
        return False
    return True


def _anchor_record(a: Any) -> dict[str, Any]:
    """An AnchorSpec as the history shows it: the fields that are set."""
    return {k: v for k, v in vars(a).items() if v is not None}


def _flat(params: dict[str, Any]) -> dict[str, Any]:
    """Spec params as history fields; names that would clash with ours get ``param_``."""
    return {(f"param_{k}" if k in _RESERVED else k): v for k, v in params.items()}


# --------------------------------------------------------------------------- context


def _no_retry_client(provider: RedisProvider) -> Redis:
    return provider.client(socket_timeout=5.0, socket_connect_timeout=5.0,
                           retry=Retry(NoBackoff(), 0))


@dataclass(kw_only=True)
class NemesisContext:
    """What the nemesis may act on. Everything but ``history`` is optional: a fault whose
    tool is missing fails (recorded) instead of running.

    ``admin`` returns a new ``decode_responses=True`` client to the *current* primary; by
    default the provider's own (a Sentinel topology's follows failovers). ``faketime_search``
    overrides where libfaketime is looked for (see :func:`find_libfaketime`).
    """

    history: HistoryWriter
    supervisor: Supervisor | None = None
    redis: RedisProvider | None = None
    proxy: FaultProxy | None = None
    apply_layer: ApplyLayer | None = None
    keys: Keys = field(default_factory=Keys)
    config: GovernorConfig = field(default_factory=GovernorConfig)
    admin: Callable[[], Redis] | None = None
    raw_admin: Callable[[], Redis] | None = None  # bytes in and out: the anchor watcher's
    rng: random.Random = field(default_factory=lambda: random.Random(0))
    faketime_search: Sequence[str] | None = None

    def admin_client(self) -> Redis:
        if self.admin is not None:
            return self.admin()
        if self.redis is None:
            raise FaultUnavailable("no Redis provider and no admin client factory")
        return _no_retry_client(self.redis)

    def raw_client(self) -> Redis:
        if self.raw_admin is not None:
            return self.raw_admin()
        if self.redis is None:
            raise FaultUnavailable("no Redis provider and no raw client factory")
        return self.redis.client(decode_responses=False, socket_timeout=5.0,
                                 socket_connect_timeout=5.0, retry=Retry(NoBackoff(), 0))


# --------------------------------------------------------------------------- fault kinds


class _Fault:
    """One kind of fault. ``start`` returns what it did (for the ok record) or raises after
    undoing anything half done; ``stop`` undoes it. Both run under the occurrence's lock."""

    tick_interval: float | None = None

    def __init__(self, nem: Nemesis, occ: _Occurrence) -> None:
        self.nem = nem
        self.ctx = nem.ctx
        self.occ = occ
        self.spec = occ.spec
        self.params = dict(occ.spec.params)

    def start(self) -> dict[str, Any]:
        raise NotImplementedError

    def stop(self) -> dict[str, Any]:
        return {}

    def tick(self) -> None:  # noqa: B027 - optional hook
        pass

    # -- needs
    def claim(self, *resources: str) -> None:
        self.nem._claim(self.occ, resources)

    def supervisor(self) -> Supervisor:
        if self.ctx.supervisor is None:
            raise FaultUnavailable(f"{self.spec.kind} needs a governor supervisor")
        return self.ctx.supervisor

    def provider(self) -> RedisProvider:
        if self.ctx.redis is None:
            raise FaultUnavailable(f"{self.spec.kind} needs a Redis provider")
        return self.ctx.redis

    def proxy(self) -> FaultProxy:
        if self.ctx.proxy is None or not self.ctx.proxy.running:
            raise FaultUnavailable(f"{self.spec.kind} needs the fault proxy (redis.proxy = true)")
        return self.ctx.proxy

    def apply_layer(self) -> ApplyLayer:
        if self.ctx.apply_layer is None:
            raise FaultUnavailable(f"{self.spec.kind} needs the harness's apply layer")
        return self.ctx.apply_layer

    def targets(self) -> list[str]:
        """Resolve ``target`` to consumer names and claim them (``gov:<name>``)."""
        sup = self.supervisor()
        consumers = list(sup.consumers)
        target = self.spec.target
        if target == "anchor":  # the governor that decided the anchoring event
            ev = self.occ.anchor_event
            target = ev.instance if ev is not None and ev.instance else ""
            if target not in consumers:
                raise FaultUnavailable(f"target 'anchor': the event names no governor of "
                                       f"this run ({target or 'none'})")
        if target == "all":
            chosen = consumers
        elif target == "random":
            free = [c for c in consumers if not self.nem._is_held(f"gov:{c}")]
            if not free:
                raise FaultConflict("every governor is already under a fault")
            chosen = [self.ctx.rng.choice(free)]
        elif target in consumers:
            chosen = [target]
        else:
            raise FaultUnavailable(f"unknown target {target!r}; governors: {', '.join(consumers)}"
                                   " (or 'random', 'all')")
        self.claim(*(f"gov:{c}" for c in chosen))
        self.occ.targets = tuple(chosen)
        return chosen


class _KillGovernor(_Fault):
    def start(self) -> dict[str, Any]:
        sup = self.supervisor()
        self.killed: dict[str, int] = {}
        for c in self.targets():
            pid = sup.kill(c)
            if pid is not None:
                self.killed[c] = pid
        if not self.killed:
            raise FaultUnavailable(f"no target running: {', '.join(self.occ.targets)}")
        return {"targets": list(self.occ.targets), "killed_pids": self.killed}

    def stop(self) -> dict[str, Any]:
        sup = self.supervisor()
        deadline = time.monotonic() + _num(self.params, "restart_wait_s", 10.0)
        new: dict[str, int | None] = {}
        while True:
            pids, status = sup.pids(), sup.status()
            new = {c: pids.get(c) if pids.get(c) != old else None
                   for c, old in self.killed.items()}
            waiting = [c for c, pid in new.items() if pid is None
                       and status[c].state not in ("stopped", "gave_up")]
            if not waiting or time.monotonic() >= deadline:
                return {"new_pids": new, "restarted": all(p is not None for p in new.values())}
            time.sleep(0.02)


class _PauseGovernor(_Fault):
    def start(self) -> dict[str, Any]:
        sup = self.supervisor()
        pids = sup.pids()
        self.paused: list[str] = []
        for c in self.targets():
            if sup.pause(c):
                self.paused.append(c)
        if not self.paused:
            raise FaultUnavailable(f"no target could be paused: {', '.join(self.occ.targets)}")
        return {"targets": list(self.occ.targets), "paused": self.paused,
                "pids": {c: pids.get(c) for c in self.paused}}

    def stop(self) -> dict[str, Any]:
        sup = self.supervisor()
        return {"resumed": [c for c in self.paused if sup.resume(c)]}


class _RestartGovernor(_Fault):
    def start(self) -> dict[str, Any]:
        sup = self.supervisor()
        pids = sup.pids()
        self.stopped: list[str] = []
        codes: dict[str, int | None] = {}
        for c in self.targets():
            codes[c] = sup.stop_instance(c)
            self.stopped.append(c)
            self.nem._stopped_instances.add(c)
        return {"targets": self.stopped, "old_pids": {c: pids.get(c) for c in self.stopped},
                "returncodes": codes}

    def stop(self) -> dict[str, Any]:
        sup = self.supervisor()
        new = {}
        for c in self.stopped:
            new[c] = sup.start_instance(c)
            self.nem._stopped_instances.discard(c)
        return {"new_pids": new}


class _KillRedis(_Fault):
    def start(self) -> dict[str, Any]:
        provider = self.provider()
        self.claim("redis-process")
        if isinstance(provider, SentinelTopology):
            old, pid = provider.master_address(), provider.pid
            self.nem._redis_down = True
            provider.kill_primary(wait=False)
            return {"primary": _addr(old), "pid": pid}
        pid = provider.pid
        self.nem._redis_down = True
        try:
            provider.kill()  # UrlRedis: UnsupportedFault
        except BaseException:
            self.nem._redis_down = False
            raise
        return {"pid": pid}

    def stop(self) -> dict[str, Any]:
        provider = self.provider()
        provider.restart()
        self.nem._redis_down = False
        out: dict[str, Any] = {"pid": provider.pid}
        if isinstance(provider, SentinelTopology):
            with contextlib.suppress(Exception):
                out["primary"] = _addr(provider.master_address())
        return out


class _PauseRedis(_Fault):
    def start(self) -> dict[str, Any]:
        provider = self.provider()
        self.claim("redis-process")
        pid = provider.pid
        provider.pause()  # UrlRedis: UnsupportedFault
        self.nem._redis_paused = True
        return {"pid": pid}

    def stop(self) -> dict[str, Any]:
        self.provider().resume()
        self.nem._redis_paused = False
        return {}


class _Failover(_Fault):
    def start(self) -> dict[str, Any]:
        provider = self.provider()
        if not isinstance(provider, SentinelTopology):
            raise FaultUnavailable(f"failover needs a Sentinel topology, not {provider.kind}")
        self.claim("redis-process")
        old = provider.master_address()
        new = provider.failover(timeout=_num(self.params, "timeout_s", 30.0))
        return {"old_primary": _addr(old), "new_primary": _addr(new)}


class _Latency(_Fault):
    def start(self) -> dict[str, Any]:
        proxy = self.proxy()
        self.claim("proxy-latency")
        ms, jitter = _num(self.params, "latency_ms", 100.0), _num(self.params, "jitter_ms", 0.0)
        proxy.set_latency(ms, jitter)
        return {"latency_ms": ms, "jitter_ms": jitter}

    def stop(self) -> dict[str, Any]:
        self.proxy().set_latency(0, 0)
        return {}


class _Drop(_Fault):
    def start(self) -> dict[str, Any]:
        proxy = self.proxy()
        self.claim("proxy-drop")
        prob = _num(self.params, "prob", 0.1)
        proxy.set_drop(prob)
        return {"prob": prob}

    def stop(self) -> dict[str, Any]:
        self.proxy().set_drop(0)
        return {}


class _Partition(_Fault):
    def start(self) -> dict[str, Any]:
        proxy = self.proxy()
        mode = self.params.get("mode", "freeze")
        if mode not in PARTITION_MODES:
            raise FaultUnavailable(f"params.mode must be one of {PARTITION_MODES}, got {mode!r}")
        self.claim("proxy-partition")
        proxy.partition(mode)
        return {"mode": mode}

    def stop(self) -> dict[str, Any]:
        self.proxy().heal()
        return {}


class _MemoryPressure(_Fault):
    def start(self) -> dict[str, Any]:
        provider = self.ctx.redis
        if isinstance(provider, UrlRedis):
            raise FaultUnavailable("memory_pressure is never applied to a url Redis "
                                   "(someone else's server)")
        policy = str(self.params.get("policy", "noeviction"))
        if policy not in MAXMEMORY_POLICIES:
            raise FaultUnavailable(f"params.policy must be one of {sorted(MAXMEMORY_POLICIES)}")
        headroom = int(_num(self.params, "headroom_kb", 64) * 1024)
        fill = bool(self.params.get("fill", True))
        chunk = int(_num(self.params, "chunk_kb", max(4, headroom // 1024 // 16)) * 1024)
        cap = int(_num(self.params, "max_ballast_kb", 4 * headroom // 1024 + 1024) * 1024)
        self.claim("redis-memory")
        self.r = self.ctx.admin_client()
        self.ballast: list[str] = []
        try:
            prev = self.r.config_get("maxmemory")
            prev.update(self.r.config_get("maxmemory-policy"))
            self.prev = {"maxmemory": str(prev.get("maxmemory", "0")),
                         "maxmemory-policy": str(prev.get("maxmemory-policy", "noeviction"))}
            self.nem._memory_baseline.setdefault("config", dict(self.prev))
            used = int(self.r.info("memory")["used_memory"])
            limit = used + headroom
            self.r.config_set("maxmemory-policy", policy)
            self.r.config_set("maxmemory", str(limit))
            at_limit, reason = (self._fill(chunk, cap) if fill else (False, "fill off"))
        except BaseException:
            with contextlib.suppress(Exception):
                self._restore()
            raise
        return {"maxmemory": limit, "policy": policy, "used_memory_before": used,
                "previous_maxmemory": self.prev["maxmemory"],
                "previous_policy": self.prev["maxmemory-policy"],
                "ballast_keys": len(self.ballast), "ballast_bytes": len(self.ballast) * chunk,
                "at_limit": at_limit, "stopped_filling": reason}

    def _fill(self, chunk: int, cap: int) -> tuple[bool, str]:
        """Write ballast until Redis says it is full (OOM) or starts evicting."""
        evicted0 = int(self.r.info("stats").get("evicted_keys", 0))
        value = b"\0" * chunk
        while len(self.ballast) * chunk < cap:
            key = ballast_key(self.ctx.keys, next(self.nem._ballast_seq))
            try:
                self.r.set(key, value)
            except redis.ResponseError as exc:
                # redis-py strips the "OOM" prefix into OutOfMemoryError; Redis 6.2 inside a
                # script (not here, but alike) keeps it in the message.
                if isinstance(exc, redis.exceptions.OutOfMemoryError) or "OOM" in str(exc):
                    return True, "oom"
                raise
            self.ballast.append(key)
            self.nem._ballast.add(key)
            if int(self.r.info("stats").get("evicted_keys", 0)) > evicted0:
                return True, "evicting"
        return False, "max_ballast_kb reached"

    def _restore(self) -> None:
        self.r.config_set("maxmemory", self.prev["maxmemory"])
        self.r.config_set("maxmemory-policy", self.prev["maxmemory-policy"])
        for i in range(0, len(self.ballast), 500):
            batch = self.ballast[i:i + 500]
            self.r.unlink(*batch)
            self.nem._ballast.difference_update(batch)
        self.r.close()

    def stop(self) -> dict[str, Any]:
        self._restore()
        return {"maxmemory": self.prev["maxmemory"], "policy": self.prev["maxmemory-policy"],
                "ballast_deleted": len(self.ballast)}


class _Redelivery(_Fault):
    def start(self) -> dict[str, Any]:
        self.tick_interval = _num(self.params, "interval_s", 0.5)
        self.count = int(_num(self.params, "readd", 20))
        dup, late = _num(self.params, "dup_prob", 1.0), _num(self.params, "late_ms", 500)
        self.layer = self.ctx.apply_layer
        self.prev_knobs: dict[str, float] | None = None
        if self.layer is not None:
            self.claim("apply-duplicates")
            self.nem._save_knobs(self.layer)
            self.prev_knobs = self.layer.set_knobs(duplicate_result_prob=dup,
                                                   late_duplicate_ms=late)
        self.seen: set[str] = set()
        self.ours: set[str] = set()
        self.readded: list[str] = []
        try:
            self.r = self.ctx.admin_client()
            first = self._readd()
        except BaseException:
            if self.layer is not None and self.prev_knobs is not None:
                self.layer.set_knobs(**self.prev_knobs)
            raise
        return {"dup_prob": dup if self.layer else None, "late_ms": late if self.layer else None,
                "duplicate_results": self.layer is not None, "readded": first}

    def _readd(self) -> list[str]:
        plans = self.ctx.keys.plans
        done = []
        for entry_id, fields in reversed(self.r.xrevrange(plans, count=self.count)):
            ident = fields.get("plan_id") or entry_id
            if entry_id in self.ours or ident in self.seen or not fields:
                continue
            self.ours.add(str(self.r.xadd(plans, fields)))
            self.seen.add(ident)
            done.append(ident)
        self.readded.extend(done)
        return done

    def tick(self) -> None:
        try:
            self._readd()
        except Exception as exc:  # noqa: BLE001 - Redis may be down under another fault
            log.info("nemesis %s: re-adding plans failed: %s", self.occ.fault_id, _err(exc))

    def stop(self) -> dict[str, Any]:
        if self.layer is not None and self.prev_knobs is not None:
            self.layer.set_knobs(**self.prev_knobs)
        with contextlib.suppress(Exception):
            self.r.close()
        return {"readded_total": len(self.readded), "readded": self.readded}


def slow_exchange_latency(config: GovernorConfig, latency_ms: float | None = None,
                          jitter_ms: float = 0.0) -> tuple[float, float]:
    """The order latency a slow_exchange window uses, and the protocol bound it must stay
    under; raises :class:`FaultUnavailable` for a value that would break the bound."""
    bound = float(config.capital_reservation_ttl_ms - config.permit_ttl_ms)
    usable = bound * TIMING_BOUND_USE
    exit_lock = float(config.exit_lock_ttl_ms)
    if latency_ms is None:
        if usable <= exit_lock + jitter_ms:
            raise FaultUnavailable(
                f"no order latency fits between exit_lock_ttl_ms ({exit_lock:g}) and the "
                f"timing bound capital_reservation_ttl_ms - permit_ttl_ms ({bound:g} ms)")
        latency_ms = min(exit_lock * 1.5, (exit_lock + usable - jitter_ms) / 2)
    if latency_ms < 0 or jitter_ms < 0:
        raise FaultUnavailable("latency_ms and jitter_ms must be >= 0")
    if latency_ms + jitter_ms >= usable:
        raise FaultUnavailable(
            f"latency_ms {latency_ms:g} + jitter_ms {jitter_ms:g} breaks the protocol's timing "
            f"bound: orders must finish within capital_reservation_ttl_ms - permit_ttl_ms = "
            f"{bound:g} ms of the permit (at most {usable:g} ms of it for the order)")
    return latency_ms, bound


class _SlowExchange(_Fault):
    def start(self) -> dict[str, Any]:
        layer = self.apply_layer()
        raw = self.params.get("latency_ms")
        latency = None if raw is None else _num(self.params, "latency_ms", 0)
        jitter = _num(self.params, "jitter_ms", 0.0)
        latency, bound = slow_exchange_latency(self.ctx.config, latency, jitter)
        self.claim("apply-latency")
        self.nem._save_knobs(layer)
        self.prev = layer.set_knobs(open_latency_ms=latency, open_jitter_ms=jitter,
                                    close_latency_ms=latency, close_jitter_ms=jitter)
        return {"latency_ms": latency, "jitter_ms": jitter, "bound_ms": bound,
                "exit_lock_ttl_ms": self.ctx.config.exit_lock_ttl_ms, "previous": self.prev}

    def stop(self) -> dict[str, Any]:
        self.apply_layer().set_knobs(**self.prev)
        return {"restored": self.prev}


class _ClockSkew(_Fault):
    def start(self) -> dict[str, Any]:
        lib = find_libfaketime(self.ctx.faketime_search)
        if lib is None:
            raise FaultUnavailable("libfaketime not installed (apt-get install faketime); "
                                   "clock_skew skipped")
        sup = self.supervisor()
        offset = _num(self.params, "offset_s", 30.0)
        env = faketime_env(lib, offset)
        self.skewed: list[str] = []
        pids = {}
        try:
            for c in self.targets():
                sup.set_instance_env(c, env)
                self.skewed.append(c)
                self.nem._skewed.add(c)
                pids[c] = sup.restart(c)
        except BaseException:
            with contextlib.suppress(Exception):
                self._unskew()
            raise
        return {"offset_s": offset, "faketime": env["FAKETIME"], "lib": lib,
                "targets": self.skewed, "pids": pids}

    def _unskew(self) -> dict[str, int]:
        sup = self.supervisor()
        pids = {}
        for c in self.skewed:
            sup.set_instance_env(c, None)
            pids[c] = sup.restart(c)
            self.nem._skewed.discard(c)
        return pids

    def stop(self) -> dict[str, Any]:
        return {"pids": self._unskew()}


_KINDS: dict[str, type[_Fault]] = {
    "kill_governor": _KillGovernor,
    "pause_governor": _PauseGovernor,
    "restart_governor": _RestartGovernor,
    "kill_redis": _KillRedis,
    "pause_redis": _PauseRedis,
    "failover": _Failover,
    "latency": _Latency,
    "drop": _Drop,
    "partition": _Partition,
    "memory_pressure": _MemoryPressure,
    "redelivery": _Redelivery,
    "slow_exchange": _SlowExchange,
    "clock_skew": _ClockSkew,
}
assert set(_KINDS) == set(FAULT_KINDS), "every scenario fault kind needs an implementation"


# --------------------------------------------------------------------------- the nemesis


@dataclass(eq=False)
class _Occurrence:
    fault_id: str
    spec: FaultSpec
    slot: int | None  # index in the schedule (None: injected by hand)
    state: str = "pending"  # pending, starting, active, stopping, stopped, failed, cancelled
    targets: tuple[str, ...] = ()
    start_ns: int | None = None
    stop_ns: int | None = None
    handler: _Fault | None = None
    resources: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)
    cancel: threading.Event = field(default_factory=threading.Event)
    healing: bool = False  # ended by heal_all, whichever thread records the stop
    thread: threading.Thread | None = None
    anchor_event: AnchorEvent | None = None  # what an anchored fault started on
    anchor_lag_ms: float | None = None  # from that event to the start's invoke


class Nemesis:
    """Runs ``faults`` on a schedule and records every start and stop (module docstring).

    ``start(t0)`` schedules relative to ``t0`` (``time.monotonic()``, default now);
    ``stop()`` schedules nothing more (faults already on end at their time);
    ``heal_all()`` also ends every active fault at once and restores everything. Use as a
    context manager to get ``heal_all()`` on exit.
    """

    def __init__(self, ctx: NemesisContext, faults: Sequence[FaultSpec] = ()) -> None:
        for i, spec in enumerate(faults):
            if spec.kind not in _KINDS:
                raise ValueError(f"fault[{i}].kind: unknown fault {spec.kind!r}")
        self.ctx = ctx
        self.faults = tuple(faults)
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._seq = itertools.count(1)
        self._occurrences: list[_Occurrence] = []
        self._held: dict[str, _Occurrence] = {}
        self._last_by_slot: dict[int, _Occurrence] = {}
        self._heal_lock = threading.Lock()
        # What heal_all must restore if a stop failed.
        self._stopped_instances: set[str] = set()
        self._skewed: set[str] = set()
        self._redis_down = False
        self._redis_paused = False
        self._knob_baseline: dict[str, float] | None = None
        self._memory_baseline: dict[str, Any] = {}
        self._ballast: set[str] = set()
        self._ballast_seq = itertools.count(1)
        self._watcher: AnchorWatcher | None = None
        self._not_fired: dict[int, int] | None = None  # slot -> matches seen, at stop

    # -- context manager
    def __enter__(self) -> Nemesis:
        return self

    def __exit__(self, *exc: object) -> None:
        self.heal_all()

    # -- schedule
    def start(self, t0_monotonic: float | None = None) -> Nemesis:
        """Run the schedule in a daemon thread, times relative to ``t0_monotonic``."""
        with self._lock:
            if self._thread is not None:
                raise RuntimeError("nemesis already started")
            if self._stop.is_set():
                raise RuntimeError("nemesis already stopped")
            t0 = time.monotonic() if t0_monotonic is None else t0_monotonic
            anchored = [(i, f.after) for i, f in enumerate(self.faults) if f.after is not None]
            if anchored:
                self._watcher = AnchorWatcher(self.ctx.raw_client, self.ctx.keys, anchored,
                                              self._fire).start()
            self._thread = threading.Thread(target=self._schedule, args=(t0,),
                                            name="nemesis", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Start no more faults. Active ones end at their time (or at :meth:`heal_all`).
        Anchored faults whose event has not come are recorded as not fired."""
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        watcher = self._watcher
        if watcher is not None:
            watcher.stop(timeout)
        with self._lock:
            if watcher is None or self._not_fired is not None:
                return
            self._not_fired = watcher.pending()
        for slot, seen in self._not_fired.items():
            after = self.faults[slot].after
            assert after is not None
            self._record_not_fired(slot, seen, f"its event came {seen} time(s) of {after.n}")

    def _record_not_fired(self, slot: int, seen: int, why: str) -> None:
        spec = self.faults[slot]
        assert spec.after is not None
        self.ctx.history.info(F.FAULT, key=f"{spec.kind}-anchor{slot}", kind=spec.kind,
                              phase="not_fired", target=spec.target, slot=slot,
                              after=_anchor_record(spec.after), matched=seen, why=why)
        log.warning("nemesis: fault[%d] %s (after %s) never fired: %s", slot, spec.kind,
                    spec.after.describe(), why)

    def on_apply_record(self, rec: dict[str, Any]) -> None:
        """The apply layer's ``on_record`` (after the history's): ``take`` anchors."""
        if self._watcher is not None:
            self._watcher.on_apply_record(rec)

    def _fire(self, slot: int, ev: AnchorEvent) -> None:
        """An anchor's event came (the watcher's thread): start its fault, now or after its
        delay, unless the nemesis is stopping."""
        spec = self.faults[slot]
        after = spec.after
        assert after is not None
        late = "its event came as the workload ended"
        if self._stop.is_set():
            self._record_not_fired(slot, after.n, late)
            return
        if after.delay <= 0:
            self._launch(spec, slot, ev)
            return

        def later() -> None:
            if self._stop.wait(after.delay):
                self._record_not_fired(slot, after.n, f"{late} (within its delay)")
            else:
                self._launch(spec, slot, ev)

        threading.Thread(target=later, name=f"nemesis-anchor{slot}", daemon=True).start()

    def anchor_report(self) -> list[dict[str, Any]]:
        """Per anchored fault: its anchor, whether it fired, on which event, how late the
        fault started (run.json's ``anchors``)."""
        out = []
        with self._lock:
            occs = {o.slot: o for o in self._occurrences if o.anchor_event is not None}
        for slot, spec in enumerate(self.faults):
            if spec.after is None:
                continue
            occ = occs.get(slot)
            row: dict[str, Any] = {"fault": slot, "kind": spec.kind,
                                   "after": _anchor_record(spec.after), "fired": occ is not None}
            if occ is not None and occ.anchor_event is not None:
                row.update(fault_id=occ.fault_id, state=occ.state,
                           event=occ.anchor_event.record(), lag_ms=occ.anchor_lag_ms)
            elif self._watcher is not None:
                row["matched"] = self._watcher.seen.get(slot, 0)
            out.append(row)
        return out

    def inject(self, spec: FaultSpec) -> str:
        """Start one fault now, outside the schedule (same records); returns its id."""
        if spec.kind not in _KINDS:
            raise ValueError(f"unknown fault {spec.kind!r}")
        return self._launch(spec, None).fault_id

    def _schedule(self, t0: float) -> None:
        due = [(t0 + spec.at, i) for i, spec in enumerate(self.faults) if spec.after is None]
        heapq.heapify(due)
        while due and not self._stop.is_set():
            when, i = due[0]
            if self._stop.wait(max(0.0, when - time.monotonic())):
                return
            heapq.heappop(due)
            spec = self.faults[i]
            if spec.every > 0:
                heapq.heappush(due, (when + spec.every, i))
            prev = self._last_by_slot.get(i)
            if prev is not None and prev.state in ("pending", "starting", "active", "stopping"):
                log.info("nemesis: %s still on at its next period; this one is skipped",
                         prev.fault_id)
                continue
            try:
                self._launch(spec, i)
            except Exception:  # noqa: BLE001 - the schedule must outlive one bad fault
                log.exception("nemesis: could not launch %s", spec.kind)

    def _launch(self, spec: FaultSpec, slot: int | None,
                anchor_event: AnchorEvent | None = None) -> _Occurrence:
        occ = _Occurrence(f"{spec.kind}-{next(self._seq)}", spec, slot,
                          anchor_event=anchor_event)
        with self._lock:
            self._occurrences.append(occ)
            if slot is not None:
                self._last_by_slot[slot] = occ
        occ.thread = threading.Thread(target=self._run, args=(occ,), daemon=True,
                                      name=f"nemesis-{occ.fault_id}")
        occ.thread.start()
        return occ

    # -- one occurrence
    def _run(self, occ: _Occurrence) -> None:
        with occ.lock:
            if occ.state != "pending":  # healed before it began
                return
            if occ.cancel.is_set():
                occ.state = "cancelled"
                return
            started = self._begin(occ)
        if not started:
            return
        deadline = time.monotonic() + occ.spec.duration
        handler = occ.handler
        assert handler is not None
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            interval = handler.tick_interval
            if occ.cancel.wait(min(remaining, interval) if interval else remaining):
                break
            if interval and time.monotonic() < deadline:
                with occ.lock:
                    if occ.state == "active":
                        handler.tick()
        self._finish(occ)

    def _begin(self, occ: _Occurrence) -> bool:
        """Record and apply the start (occ.lock held); False when it failed."""
        spec, h = occ.spec, self.ctx.history
        occ.state = "starting"
        anchor: dict[str, Any] = {}
        ev = occ.anchor_event
        if ev is not None and spec.after is not None:
            lag = ev.lag_ms(time.time_ns(), time.monotonic_ns())
            occ.anchor_lag_ms = lag
            anchor = {"after": _anchor_record(spec.after), "anchor_event": ev.record(),
                      "anchor_lag_ms": lag}
        op = h.invoke(F.FAULT, key=occ.fault_id, **_flat(spec.params), **anchor,
                      kind=spec.kind, phase="start", target=spec.target)
        occ.start_ns = op.time_ns
        occ.handler = _KINDS[spec.kind](self, occ)
        try:
            details = occ.handler.start()
        except Exception as exc:  # noqa: BLE001 - a fault that cannot happen is recorded
            self._release(occ)
            occ.state = "failed"
            h.fail(F.FAULT, key=occ.fault_id, kind=spec.kind, phase="start",
                   target=spec.target, error=_err(exc))
            log.warning("nemesis: %s (%s) could not be applied: %s", occ.fault_id, spec.kind,
                        _err(exc))
            return False
        occ.state = "active"
        h.ok(F.FAULT, key=occ.fault_id, **_flat(details), kind=spec.kind, phase="start",
             target=spec.target)
        log.info("nemesis: %s on (%s)", occ.fault_id, details)
        return True

    def _finish(self, occ: _Occurrence, healed: bool = False) -> None:
        """Record and apply the stop, exactly once (waits for a start in progress)."""
        with occ.lock:
            if occ.state == "pending":
                occ.state = "cancelled"
                return
            if occ.state != "active":
                return
            spec, h = occ.spec, self.ctx.history
            occ.state = "stopping"
            h.invoke(F.FAULT, key=occ.fault_id, kind=spec.kind, phase="stop",
                     target=spec.target, healed=healed or occ.healing)
            assert occ.handler is not None
            try:
                details = occ.handler.stop()
            except Exception as exc:  # noqa: BLE001
                op = h.fail(F.FAULT, key=occ.fault_id, kind=spec.kind, phase="stop",
                            target=spec.target, error=_err(exc))
                log.warning("nemesis: %s (%s) could not be undone: %s; heal_all will retry",
                            occ.fault_id, spec.kind, _err(exc))
            else:
                op = h.ok(F.FAULT, key=occ.fault_id, **_flat(details), kind=spec.kind,
                          phase="stop", target=spec.target)
                log.info("nemesis: %s off", occ.fault_id)
            occ.stop_ns = op.time_ns
            occ.state = "stopped"
            self._release(occ)

    # -- resources
    def _is_held(self, resource: str) -> bool:
        with self._lock:
            return resource in self._held

    def _claim(self, occ: _Occurrence, resources: Iterable[str]) -> None:
        with self._lock:
            wanted = list(resources)
            for r in wanted:
                holder = self._held.get(r)
                if holder is not None and holder is not occ:
                    raise FaultConflict(f"conflicts with active fault {holder.fault_id} ({r})")
            for r in wanted:
                self._held[r] = occ
                occ.resources.add(r)

    def _release(self, occ: _Occurrence) -> None:
        with self._lock:
            for r in occ.resources:
                if self._held.get(r) is occ:
                    del self._held[r]
            occ.resources.clear()

    def _save_knobs(self, layer: ApplyLayer) -> None:
        with self._lock:
            if self._knob_baseline is None:
                self._knob_baseline = layer.knobs()

    # -- views
    def active(self) -> list[ActiveFault]:
        with self._lock:
            occs = [o for o in self._occurrences if o.state in ("starting", "active", "stopping")]
        return [ActiveFault(o.fault_id, o.spec.kind, o.spec.target, o.targets, o.state,
                            o.start_ns or 0, dict(o.spec.params)) for o in occs]

    def windows(self) -> list[FaultWindow]:
        """Windows of the faults that started (a failed start is no window), in start order."""
        with self._lock:
            occs = [o for o in self._occurrences if o.start_ns is not None
                    and (o.stop_ns is not None or o.state in ("active", "stopping"))]
        return [FaultWindow(o.spec.kind, o.start_ns, o.stop_ns) for o in occs
                if o.start_ns is not None]

    def fault_ids(self) -> list[str]:
        with self._lock:
            return [o.fault_id for o in self._occurrences]

    # -- healing
    def heal_all(self, timeout: float = 60.0) -> None:
        """End every active fault (recording its stop, ``healed=True``), stop the schedule,
        then restore whatever is still off: resume paused governors and Redis, restart
        stopped / skewed governors and a killed Redis, clear the proxy, restore the apply
        layer's knobs, delete ballast and restore maxmemory. Idempotent; never raises."""
        with self._heal_lock:
            self.stop()
            with self._lock:
                occs = list(self._occurrences)
            for occ in occs:
                occ.healing = True
                occ.cancel.set()
            for occ in occs:
                try:
                    self._finish(occ, healed=True)
                except Exception:  # noqa: BLE001
                    log.exception("nemesis: healing %s failed", occ.fault_id)
            deadline = time.monotonic() + timeout
            for occ in occs:
                if occ.thread is not None and occ.thread is not threading.current_thread():
                    occ.thread.join(max(0.0, deadline - time.monotonic()))
            self._sweep()

    def _sweep(self) -> None:
        steps: list[tuple[str, Callable[[], None]]] = [
            ("governors", self._sweep_governors),
            ("redis", self._sweep_redis),
            ("proxy", self._sweep_proxy),
            ("apply layer", self._sweep_apply),
            ("memory", self._sweep_memory),
        ]
        for name, step in steps:
            try:
                step()
            except Exception as exc:  # noqa: BLE001 - restore as much as possible
                log.warning("nemesis: heal_all could not restore the %s: %s", name, _err(exc))

    def _sweep_governors(self) -> None:
        sup = self.ctx.supervisor
        if sup is None:
            return
        for c, st in sup.status().items():
            if st.state == "paused":
                _attempt(f"resume {c}", sup.resume, c)
        for c in sorted(self._skewed):
            sup.set_instance_env(c, None)
            if _attempt(f"restart {c} without faketime", sup.restart, c):
                self._skewed.discard(c)
        for c in sorted(self._stopped_instances):
            if _attempt(f"start {c}", sup.start_instance, c):
                self._stopped_instances.discard(c)

    def _sweep_redis(self) -> None:
        provider = self.ctx.redis
        if provider is None or isinstance(provider, UrlRedis):
            return
        if self._redis_paused:
            if isinstance(provider, EmbeddedRedis):
                if provider.paused:
                    provider.resume()
            else:
                with contextlib.suppress(Exception):
                    provider.resume()
            self._redis_paused = False
        if self._redis_down:
            provider.restart()
            self._redis_down = False

    def _sweep_proxy(self) -> None:
        proxy = self.ctx.proxy
        if proxy is not None and proxy.running:
            proxy.clear()

    def _sweep_apply(self) -> None:
        layer = self.ctx.apply_layer
        baseline = self._knob_baseline
        if layer is not None and baseline is not None and layer.knobs() != baseline:
            layer.set_knobs(**baseline)

    def _sweep_memory(self) -> None:
        baseline = self._memory_baseline.get("config")
        if baseline is None and not self._ballast:
            return
        r = self.ctx.admin_client()
        try:
            if baseline is not None:
                current = r.config_get("maxmemory")
                current.update(r.config_get("maxmemory-policy"))
                for name, value in baseline.items():
                    if str(current.get(name)) != value:
                        r.config_set(name, value)
            if self._ballast:
                keys = sorted(self._ballast)
                for i in range(0, len(keys), 500):
                    r.unlink(*keys[i:i + 500])
                self._ballast.clear()
        finally:
            r.close()

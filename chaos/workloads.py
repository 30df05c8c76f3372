"""Workloads: the producers (and one operator) that load a governor during a chaos run.

Each workload process plays one client of the protocol, Jepsen style: it
generates operations, sends them to the Redis under test one at a time, and
records every one in the run's history as an ``invoke`` before the command
and a completion after it (``chaos/history.py``). The completion is
``ok`` with the stream entry id, ``fail`` only when the command surely never
reached Redis (the connection could not even be made, or the server answered
with an error reply, which means it did nothing), and ``info`` when the outcome
is unknown (a timeout, a connection dropped mid-command). The client never
retries on its own (redis-py would by default): a retried XADD could add a
plan twice and the history would then lie about what was sent.

The code has two layers, as in Jepsen:

* **generators** (pure): given a seeded ``random.Random``, their own state,
  the time and a :class:`MarketView` of what the producer read, they return
  the next :class:`Emission`\\s. No I/O, so they are unit-tested without Redis.
* **the runner** (:func:`run_worker`): paces the generator's streams on a
  deadline schedule, reads what a generator needs (the position mirror, the
  regime, the exchange ledger), performs the emissions against Redis and the
  exchange, and records the history. :func:`start_workloads` runs one runner
  per ``(WorkloadSpec, index)`` in its own process ("spawn" context: Redis
  clients and the history writer are created in the child).

Workers are numbered across the whole run (``index``), so that process names
(``<kind>-<index>``), plan ids (``<kind[:4]>-<index>-<n>``) and random streams
(``random.Random(seed + index)``) are unique even when two specs share a kind.
A worker stops by itself after ``ctx.duration_s`` or ``max_plans`` plans, when
the group's stop event is set, or when its parent died.

Kinds and their ``params`` (defaults in brackets). Every plan kind draws its
symbols from the first ``spec.symbols`` of the market's and sends plans at
``spec.rate`` plans/s per process (0 = as fast as it can):

``open_storm``
    OPENs on random symbols, random side, fresh ``intent_created_at_ms``.
    ``notional_min`` [10], ``notional_max`` [150]: USD, uniform.
``same_symbol``
    OPENs racing on the first ``hot`` [2] symbols, in bursts of ``burst`` [5]
    back-to-back plans on one of them (bursts are paced so that the plan rate
    is still ``spec.rate``). ``notional_min`` / ``notional_max`` as above.
``duplicate_close``
    Every ``period_ms`` [100] (``spec.rate`` is not used): pick a symbol the
    ``P:position:*`` mirror shows open and send CLOSEs from ``harvest_brain``,
    ``exit_monitor`` and ``kill_switch`` (shuffled) within ``spread_ms`` [3] of
    each other; ``with_position_id`` [true] adds the mirror's position id.
    With nothing open it sends one OPEN instead, so it also works alone.
    ``notional_min`` / ``notional_max`` for those OPENs.
``rotation_pressure``
    OPENs at the rate, and every ``pnl_period_ms`` [300] a random pnl
    (uniform in [``pnl_min`` [-5], ``pnl_max`` [5]]) on a random open position
    of the exchange ledger (``Exchange.set_pnl``; the apply layer's mirror sync
    carries it to ``P:position:{s}.pnl_pct``). No pnl updates without
    ``ctx.ledger_path``. pnl writes are recorded as ``operator`` ops with
    ``target="pnl"``. ``notional_min`` / ``notional_max`` as above.
``stale``
    A fraction ``stale_fraction`` [0.5] of OPENs carry ``intent_created_at_ms``
    older than ``max_intent_age_ms`` (from ``ctx.config``) by
    uniform(1, ``extra_ms`` [5000]) ms; invoke value ``stale=True``.
``drift``
    OPENs whose ``snapshot_position_count`` is the mirror's open count plus
    randint(-``drift_max`` [5], ``drift_max``) (clipped at 0) and whose
    ``snapshot_exposure_pct`` is ``P:portfolio:exposure_pct`` plus
    uniform(-``exposure_drift`` [0.3], ``exposure_drift``) (clipped at 0).
    The invoke records what was observed (``observed_count``,
    ``observed_exposure``).
``regime_flip``
    An operator, not a producer: every ``period_s`` [1.0] it SETs
    ``P:slots:regime`` to another of BASE, TREND_STRONG, CHOP (an ``operator``
    op, key ``regime-<index>-<n>``, value ``regime``, ``previous``); the regime it
    read at start is recorded as an ``ok`` with ``initial=True`` (key
    ``regime-initial``), and not at all if that first read failed.
``malformed``
    A fraction ``bad_fraction`` [0.3] of plans break the contract, in turn:
    see :data:`MALFORMED_WAYS`. The invoke records ``malformed=<way>`` and
    ``invalid`` (False only for ``extra_field``, an unknown extra field on a
    valid plan). A plan without a plan id is recorded under key
    ``noid-<index>-<n>``. The rest are valid OPENs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import multiprocessing as mp
import os
import random
import signal
import sqlite3
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from itertools import chain
from multiprocessing.context import SpawnProcess
from pathlib import Path
from typing import Any, ClassVar, Protocol

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from chaos import reaper
from chaos.exchange import Exchange, plain_decimal
from chaos.history import F, HistoryWriter, OpType
from chaos.scenario import WORKLOAD_KINDS, WorkloadSpec
from governor_ref.connection import connect
from governor_ref.keys import Keys
from governor_ref.protocol import Action, GovernorConfig, Plan, Regime, Side

log = logging.getLogger(__name__)

DEFAULT_MAX_PLANS = 10_000_000
SUMMARY_DIR = "workloads"
CLOSE_SOURCES = ("harvest_brain", "exit_monitor", "kill_switch")
OPEN_SOURCE = "intent_bridge"
REGIMES = tuple(str(r) for r in Regime)

# Ways a ``malformed`` plan breaks the contract, used in turn. Only ``extra_field``
# stays valid (the protocol says unknown fields are ignored).
MALFORMED_WAYS = (
    "lowercase_symbol",
    "missing_side",
    "negative_notional",
    "exponent_notional",
    "text_notional",
    "unknown_action",
    "plan_id_spaces",
    "plan_id_too_long",
    "no_plan_id",
    "binary_field",
    "extra_field",
)
MALFORMED_VALID = frozenset({"extra_field"})

# The runner never catches up more than this behind its schedule: after a stall (Redis
# down, backoff) missed slots are skipped instead of sent as a burst.
_MIN_MAX_LAG_S = 0.1
# How often the stop event and the parent are checked in a tight loop.
_CHECK_EVERY_S = 0.01
# Backoff after a failed emission: 50 ms doubling up to 500 ms, reset by a success.
_BACKOFF_START_S = 0.05
_BACKOFF_MAX_S = 0.5


class WorkloadError(ValueError):
    """A workload that cannot run (bad params, bad context); the message names the field."""


# ======================================================================== the context
@dataclass(frozen=True)
class WorkloadContext:
    """What every workload process of a run shares; picklable, so it crosses "spawn".

    ``symbols`` are the market's (a workload uses the first ``spec.symbols``);
    ``config`` is ``P:governor:config`` as written (for ``max_intent_age_ms``);
    ``ledger_path`` is the exchange's SQLite file (``rotation_pressure`` sets
    pnl through it). ``record_history=False`` exists for benchmarks only: it
    measures what recording costs.
    """

    redis_url: str
    prefix: str
    run_dir: str
    seed: int
    duration_s: float
    symbols: list[str]
    config: dict[str, str] = field(default_factory=dict)
    ledger_path: str | None = None
    capital: float = 100_000.0
    record_history: bool = True
    socket_timeout_s: float = 2.0
    connect_timeout_s: float = 1.0
    # time.monotonic() of the workload start (one clock for every process of a host): a
    # replay's offsets count from it, not from when its process came up.
    start_monotonic: float | None = None

    def governor_config(self) -> GovernorConfig:
        return GovernorConfig.from_hash(GovernorConfig().to_hash() | dict(self.config))


# ======================================================================== generators
@dataclass(frozen=True)
class MarketView:
    """What a producer read before generating: stale by nature, like a real producer's.

    ``positions`` is the ``P:position:*`` mirror (symbol -> hash, open ones only),
    ``exposure_pct`` is ``P:portfolio:exposure_pct`` (None when unknown),
    ``regime`` is ``P:slots:regime``, ``ledger_open`` the exchange's open symbols.
    """

    positions: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    exposure_pct: float | None = None
    regime: str | None = None
    ledger_open: tuple[str, ...] = ()


@dataclass(frozen=True)
class SubmitPlan:
    """XADD one plan. ``fields`` may hold bytes (malformed); ``meta`` goes into the invoke."""

    key: str
    symbol: str | None
    fields: dict[str, str | bytes]
    meta: dict[str, Any] = field(default_factory=dict)
    delay_ms: float = 0.0  # after the start of its batch (duplicate_close spreads a burst)


@dataclass(frozen=True)
class SetRegime:
    key: str
    regime: str
    previous: str | None


@dataclass(frozen=True)
class InitialRegime:
    """Not a write: the regime found at start, recorded as a completed operator op."""

    regime: str


@dataclass(frozen=True)
class SetPnl:
    key: str
    symbol: str
    pnl_pct: float


Emission = SubmitPlan | SetRegime | InitialRegime | SetPnl


@dataclass(frozen=True)
class Stream:
    """One timed activity of a generator: ``interval_s`` between ticks (0 = back-to-back),
    the first tick ``first_s`` after the start, and what must be read before each tick."""

    name: str
    interval_s: float
    first_s: float = 0.0
    needs: frozenset[str] = frozenset()  # of "mirror", "regime", "ledger"
    once: bool = False  # a single tick at first_s
    # Ticks at these offsets from the workload start instead (a replay), every one sent
    # even when late: a replay skips nothing.
    times: tuple[float, ...] | None = None


# Inclusive ranges of the generators' params (their names and defaults are each class's
# PARAMS); relations between params (notional_min <= notional_max...) are each _check's.
# Upper bounds are far above any useful run: they refuse typos before anything starts.
PARAM_RANGES: dict[str, tuple[float, float]] = {
    "notional_min": (0.01, 1e9), "notional_max": (0.01, 1e9),
    "hot": (1, 1000), "burst": (1, 1000),
    "period_ms": (0.1, 3_600_000), "spread_ms": (0, 60_000),
    "pnl_period_ms": (1, 3_600_000), "pnl_min": (-1e6, 1e6), "pnl_max": (-1e6, 1e6),
    "stale_fraction": (0, 1), "extra_ms": (1, 86_400_000),
    "drift_max": (0, 1_000_000), "exposure_drift": (0, 1000),
    "period_s": (0.001, 3600), "bad_fraction": (0, 1),
}
MAX_REPLAY_OPS = 1_000_000
# A producer runs duration_s from its own start, which comes up to seconds after the
# workload's (process start-up), so a recording holds ops after duration_s: a replay sends
# them at their offsets too, up to this long after it (the runner waits 15 s for producers).
REPLAY_TAIL_S = 10.0


def _number(kind: str, name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise WorkloadError(f"workload {kind}: param {name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise WorkloadError(f"workload {kind}: param {name} must be finite, got {value!r}")
    lo, hi = PARAM_RANGES.get(name, (-math.inf, math.inf))
    if not lo <= value <= hi:
        raise WorkloadError(f"workload {kind}: param {name} must be in [{lo:g}, {hi:g}], "
                            f"got {value!r}")
    return float(value)


class Generator:
    """Base of the pure plan generators: params, plan ids, and valid OPENs.

    Subclasses set ``kind`` and ``PARAMS`` (name -> default) and implement
    :meth:`streams` and :meth:`next`. ``next`` must not do I/O: everything it
    knows of the world comes in the :class:`MarketView`.
    """

    kind: ClassVar[str] = ""
    PARAMS: ClassVar[dict[str, Any]] = {}
    writes_ledger = False  # sets pnl on the exchange without reading it first (a replay)

    def __init__(self, spec: WorkloadSpec, index: int, ctx: WorkloadContext,
                 rng: random.Random) -> None:
        self.spec = spec
        self.index = index
        self.rng = rng
        self.p = self._params(spec.params)
        if not ctx.symbols:
            raise WorkloadError(f"workload {self.kind}: the market has no symbols")
        self.symbols = list(ctx.symbols[: max(1, spec.symbols)])
        try:
            self.max_intent_age_ms = ctx.governor_config().max_intent_age_ms
        except ValueError as exc:
            raise WorkloadError(f"workload {self.kind}: {exc}") from None
        self.plans = 0  # plan ids handed out
        self._check()

    # -- params
    def _params(self, raw: Mapping[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(raw) - set(self.PARAMS))
        if unknown:
            known = ", ".join(sorted(self.PARAMS)) or "none"
            raise WorkloadError(f"workload {self.kind}: unknown param {unknown[0]!r}; "
                                f"known: {known}")
        out = dict(self.PARAMS)
        for name, value in raw.items():
            default = self.PARAMS[name]
            if isinstance(default, bool):
                if not isinstance(value, bool):
                    raise WorkloadError(f"workload {self.kind}: param {name} must be true or "
                                        f"false, got {value!r}")
                out[name] = value
            elif isinstance(default, int):
                number = _number(self.kind, name, value)
                if not number.is_integer():
                    raise WorkloadError(f"workload {self.kind}: param {name} must be an "
                                        f"integer, got {value!r}")
                out[name] = int(number)
            else:
                out[name] = _number(self.kind, name, value)
        return out

    def _check(self) -> None:
        """Range checks of the params; subclasses extend."""
        if "notional_min" in self.p:
            lo, hi = self.p["notional_min"], self.p["notional_max"]
            if not 0 < lo <= hi:
                raise WorkloadError(f"workload {self.kind}: need 0 < notional_min <= "
                                    f"notional_max, got {lo} and {hi}")

    def _require(self, ok: bool, what: str) -> None:
        if not ok:
            raise WorkloadError(f"workload {self.kind}: {what}")

    # -- building blocks
    @property
    def rate_interval_s(self) -> float:
        return 1.0 / self.spec.rate if self.spec.rate > 0 else 0.0

    def next_plan_id(self) -> str:
        n = self.plans
        self.plans += 1
        return f"{self.kind[:4]}-{self.index}-{n}"

    def notional(self) -> str:
        return f"{self.rng.uniform(self.p['notional_min'], self.p['notional_max']):.2f}"

    def open_plan(self, now_ms: int, symbol: str | None = None, *,
                  created_ms: int | None = None, **meta: Any) -> SubmitPlan:
        """A valid OPEN (built with :class:`Plan`, so it has the contract's shape)."""
        symbol = symbol or self.rng.choice(self.symbols)
        side = self.rng.choice((Side.LONG, Side.SHORT))
        plan = Plan(plan_id=self.next_plan_id(), symbol=symbol, action=Action.OPEN,
                    source=OPEN_SOURCE, intent_created_at_ms=now_ms if created_ms is None
                    else created_ms, side=side, notional=self.notional())
        return SubmitPlan(plan.plan_id, symbol, dict(plan.to_fields()), meta)

    # -- the generator interface
    def streams(self) -> list[Stream]:
        return [Stream("plan", self.rate_interval_s)]

    def next(self, stream: str, now_ms: int, view: MarketView) -> list[Emission]:
        raise NotImplementedError


_NOTIONAL = {"notional_min": 10.0, "notional_max": 150.0}


class OpenStorm(Generator):
    kind = "open_storm"
    PARAMS = dict(_NOTIONAL)

    def next(self, stream: str, now_ms: int, view: MarketView) -> list[Emission]:
        return [self.open_plan(now_ms)]


class SameSymbol(Generator):
    kind = "same_symbol"
    PARAMS = {"hot": 2, "burst": 5, **_NOTIONAL}

    def _check(self) -> None:
        super()._check()
        self._require(self.p["hot"] >= 1, "hot must be >= 1")
        self._require(self.p["burst"] >= 1, "burst must be >= 1")
        # Every process races on the same symbols: the first `hot` of the workload's.
        self.hot = self.symbols[: self.p["hot"]]
        self.bursts = 0

    def streams(self) -> list[Stream]:
        return [Stream("burst", self.p["burst"] * self.rate_interval_s)]

    def next(self, stream: str, now_ms: int, view: MarketView) -> list[Emission]:
        symbol = self.rng.choice(self.hot)
        burst = f"{self.index}-{self.bursts}"
        self.bursts += 1
        return [self.open_plan(now_ms, symbol, burst=burst) for _ in range(self.p["burst"])]


class DuplicateClose(Generator):
    kind = "duplicate_close"
    PARAMS = {"period_ms": 100.0, "spread_ms": 3.0, "with_position_id": True, **_NOTIONAL}

    def _check(self) -> None:
        super()._check()
        self._require(self.p["period_ms"] > 0, "period_ms must be > 0")
        self._require(self.p["spread_ms"] >= 0, "spread_ms must be >= 0")
        self.bursts = 0

    def streams(self) -> list[Stream]:
        return [Stream("burst", self.p["period_ms"] / 1000.0, needs=frozenset({"mirror"}))]

    def next(self, stream: str, now_ms: int, view: MarketView) -> list[Emission]:
        open_ = sorted((s, pos) for s, pos in view.positions.items() if pos)
        if not open_:
            return [self.open_plan(now_ms, seeding=True)]  # make something to close
        symbol, pos = self.rng.choice(open_)
        sources = list(CLOSE_SOURCES)
        self.rng.shuffle(sources)
        spread = self.p["spread_ms"]
        delays = sorted([0.0] + [self.rng.uniform(0.0, spread) for _ in sources[1:]])
        position_id = (pos.get("position_id") or None) if self.p["with_position_id"] else None
        burst = f"{self.index}-{self.bursts}"
        self.bursts += 1
        out: list[Emission] = []
        for source, delay in zip(sources, delays, strict=True):
            plan = Plan(plan_id=self.next_plan_id(), symbol=symbol, action=Action.CLOSE,
                        source=source, intent_created_at_ms=now_ms + int(delay),
                        position_id=position_id)
            out.append(SubmitPlan(plan.plan_id, symbol, dict(plan.to_fields()),
                                  {"burst": burst, "delay_ms": round(delay, 3)}, delay))
        return out


class RotationPressure(Generator):
    kind = "rotation_pressure"
    PARAMS = {"pnl_period_ms": 300.0, "pnl_min": -5.0, "pnl_max": 5.0, **_NOTIONAL}

    def __init__(self, spec: WorkloadSpec, index: int, ctx: WorkloadContext,
                 rng: random.Random) -> None:
        super().__init__(spec, index, ctx, rng)
        self.with_ledger = ctx.ledger_path is not None
        self.pnl_updates = 0

    def _check(self) -> None:
        super()._check()
        self._require(self.p["pnl_period_ms"] > 0, "pnl_period_ms must be > 0")
        self._require(self.p["pnl_min"] <= self.p["pnl_max"], "pnl_min must be <= pnl_max")

    def streams(self) -> list[Stream]:
        out = [Stream("plan", self.rate_interval_s)]
        if self.with_ledger:
            period = self.p["pnl_period_ms"] / 1000.0
            out.append(Stream("pnl", period, first_s=period, needs=frozenset({"ledger"})))
        return out

    def next(self, stream: str, now_ms: int, view: MarketView) -> list[Emission]:
        if stream == "plan":
            return [self.open_plan(now_ms)]
        if not view.ledger_open:
            return []
        symbol = self.rng.choice(sorted(view.ledger_open))
        pnl = round(self.rng.uniform(self.p["pnl_min"], self.p["pnl_max"]), 2)
        key = f"pnl-{self.index}-{self.pnl_updates}"
        self.pnl_updates += 1
        return [SetPnl(key, symbol, pnl)]


class Stale(Generator):
    kind = "stale"
    PARAMS = {"stale_fraction": 0.5, "extra_ms": 5000.0, **_NOTIONAL}

    def _check(self) -> None:
        super()._check()
        self._require(0.0 <= self.p["stale_fraction"] <= 1.0, "stale_fraction must be in [0, 1]")
        self._require(self.p["extra_ms"] >= 1.0, "extra_ms must be >= 1")

    def next(self, stream: str, now_ms: int, view: MarketView) -> list[Emission]:
        if self.rng.random() < self.p["stale_fraction"]:
            # Strictly older than the limit, by at least 1 ms after rounding down.
            age = self.max_intent_age_ms + int(self.rng.uniform(1.0, self.p["extra_ms"])) + 1
            return [self.open_plan(now_ms, created_ms=now_ms - age, stale=True, age_ms=age)]
        return [self.open_plan(now_ms, stale=False)]


class Drift(Generator):
    kind = "drift"
    PARAMS = {"drift_max": 5, "exposure_drift": 0.3, **_NOTIONAL}

    def _check(self) -> None:
        super()._check()
        self._require(self.p["drift_max"] >= 0, "drift_max must be >= 0")
        self._require(self.p["exposure_drift"] >= 0, "exposure_drift must be >= 0")

    def streams(self) -> list[Stream]:
        return [Stream("plan", self.rate_interval_s, needs=frozenset({"mirror"}))]

    def next(self, stream: str, now_ms: int, view: MarketView) -> list[Emission]:
        count = sum(1 for pos in view.positions.values() if pos)
        exposure = view.exposure_pct
        dm = self.p["drift_max"]
        snap_count = max(0, count + self.rng.randint(-dm, dm))
        ed = self.p["exposure_drift"]
        snap_exp = max(0.0, (exposure or 0.0) + self.rng.uniform(-ed, ed))
        em = self.open_plan(now_ms, observed_count=count, observed_exposure=exposure)
        em.fields["snapshot_position_count"] = str(snap_count)
        em.fields["snapshot_exposure_pct"] = plain_decimal(round(snap_exp, 6))
        return [em]


class RegimeFlip(Generator):
    kind = "regime_flip"
    PARAMS = {"period_s": 1.0}

    def _check(self) -> None:
        self._require(self.p["period_s"] > 0, "period_s must be > 0")
        self.current: str | None = None
        self.flips = 0

    def streams(self) -> list[Stream]:
        need = frozenset({"regime"})
        return [Stream("initial", 0.0, needs=need, once=True),
                Stream("flip", self.p["period_s"], first_s=self.p["period_s"], needs=need)]

    def next(self, stream: str, now_ms: int, view: MarketView) -> list[Emission]:
        if view.regime is not None:
            self.current = view.regime
        if stream == "initial":
            # Only a regime read at start is "initial": one read later (Redis was down at
            # start) would tell checkers a wrong starting regime, so then none is recorded.
            return [InitialRegime(view.regime)] if view.regime is not None else []
        new = self.rng.choice([r for r in REGIMES if r != self.current])
        self.flips += 1
        # Keys carry the worker index: unique even when several operators flip.
        em = SetRegime(f"regime-{self.index}-{self.flips}", new, self.current)
        self.current = new
        return [em]


class Malformed(Generator):
    kind = "malformed"
    PARAMS = {"bad_fraction": 0.3, **_NOTIONAL}

    def _check(self) -> None:
        super()._check()
        self._require(0.0 <= self.p["bad_fraction"] <= 1.0, "bad_fraction must be in [0, 1]")
        self.bad = 0

    def next(self, stream: str, now_ms: int, view: MarketView) -> list[Emission]:
        if self.rng.random() >= self.p["bad_fraction"]:
            return [self.open_plan(now_ms, malformed=None, invalid=False)]
        way = MALFORMED_WAYS[self.bad % len(MALFORMED_WAYS)]
        self.bad += 1
        return [self.breach(way, now_ms)]

    def breach(self, way: str, now_ms: int) -> SubmitPlan:
        """A valid OPEN broken in one way; exposed so tests can check every way."""
        base = self.open_plan(now_ms)
        f: dict[str, str | bytes] = dict(base.fields)
        key, symbol = base.key, base.symbol
        if way == "lowercase_symbol":
            f["symbol"] = symbol = str(f["symbol"]).lower()
        elif way == "missing_side":
            del f["side"]
        elif way == "negative_notional":
            f["notional"] = "-5"
        elif way == "exponent_notional":
            f["notional"] = "1e3"
        elif way == "text_notional":
            f["notional"] = "abc"
        elif way == "unknown_action":
            f["action"] = "HOLD"
        elif way == "plan_id_spaces":
            f["plan_id"] = key = key.replace("-", " ")
        elif way == "plan_id_too_long":
            f["plan_id"] = key = (key + "-").ljust(300, "x")
        elif way == "no_plan_id":
            del f["plan_id"]
            key = "noid-" + key.split("-", 1)[1]
        elif way == "binary_field":
            f["symbol"] = b"\xff\xfe" + str(f["symbol"]).encode() + b"\xc3"
            symbol = None
        elif way == "extra_field":
            f["unknown_field"] = "ignored-by-contract"
        else:
            raise WorkloadError(f"workload malformed: unknown way {way!r}")
        return SubmitPlan(key, symbol, f, {"malformed": way, "invalid": way not in MALFORMED_VALID})


class Replay(Generator):
    """A recorded producer's operations, sent again in order at their offsets.

    ``params``: ``producer`` (the original process, informational) and ``ops``, each a
    table with ``t`` (seconds from the workload start) and one of:

    * ``plan = { field = "text" | { hex = "..." }, ... }`` (bytes, for plans that carried
      them), with ``key`` (the history key when it is not the plan id), ``age_ms``
      (``intent_created_at_ms`` is rewritten to the send time minus it, so each plan is as
      old as it was) and ``meta`` (recorded in the submit invoke, as the original's was);
    * ``regime = "CHOP"`` (a SET of P:slots:regime), with ``key`` and ``previous``;
    * ``pnl = 1.5, symbol = "S001USDT"`` (the exchange's pnl of an open position), ``key``;
    * ``initial_regime = true`` (the regime read at start, recorded as regime_flip does).
    """

    kind = "replay"
    PARAMS = {"producer": "", "ops": []}
    OP_KINDS = ("plan", "regime", "pnl", "initial_regime")
    OP_FIELDS = frozenset({"t", "key", "age_ms", "meta", "previous", "symbol", *OP_KINDS})

    def __init__(self, spec: WorkloadSpec, index: int, ctx: WorkloadContext,
                 rng: random.Random) -> None:
        self.duration_s = ctx.duration_s
        super().__init__(spec, index, ctx, rng)

    def _params(self, raw: Mapping[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(raw) - set(self.PARAMS))
        self._require(not unknown, f"unknown param {unknown[0]!r}; known: ops, producer"
                      if unknown else "")
        self._require(isinstance(raw.get("producer", ""), str), "producer must be a string")
        ops = raw.get("ops", [])
        self._require(isinstance(ops, list), "ops must be an array of tables")
        self._require(len(ops) <= MAX_REPLAY_OPS, f"at most {MAX_REPLAY_OPS} ops")
        return {"producer": raw.get("producer", ""), "ops": ops}

    def _check(self) -> None:
        self._require(self.spec.processes == 1, "processes must be 1 (one list of operations "
                      "is one producer)")
        # One stream keeps the order of plans, regime and pnl writes; the regime read at
        # start needs a read before it, so it has its own.
        self.by_stream: dict[str, list[tuple[float, Emission | dict[str, Any]]]] = {
            "ops": [], "initial": []}
        last = -1.0
        for i, op in enumerate(self.p["ops"]):
            where = f"ops[{i}]"
            self._require(isinstance(op, dict), f"{where}: must be a table")
            extra = sorted(set(op) - self.OP_FIELDS)
            self._require(not extra, f"{where}.{extra[0] if extra else ''}: unknown field; "
                          f"known: {', '.join(sorted(self.OP_FIELDS))}")
            t = op.get("t")
            self._require(not isinstance(t, bool) and isinstance(t, int | float)
                          and math.isfinite(t) and 0 <= t < self.duration_s + REPLAY_TAIL_S,
                          f"{where}.t: must be a number in [0, duration_s + "
                          f"{REPLAY_TAIL_S:g} = {self.duration_s + REPLAY_TAIL_S:g}), got {t!r}")
            self._require(t >= last, f"{where}.t: ops must be in time order ({t!r} after "
                          f"{last!r})")
            last = float(t)
            kinds = [k for k in self.OP_KINDS if k in op]
            self._require(len(kinds) == 1, f"{where}: needs exactly one of "
                          f"{', '.join(self.OP_KINDS)}, got {', '.join(kinds) or 'none'}")
            stream, item = self._op(kinds[0], op, where)
            self.by_stream[stream].append((float(t), item))
        self.sent = dict.fromkeys(self.by_stream, 0)

    def _op(self, kind: str, op: dict[str, Any], where: str
            ) -> tuple[str, Emission | dict[str, Any]]:
        """The stream an op goes to and its emission (a plan's is built at send time)."""
        key = op.get("key")
        self._require(key is None or (isinstance(key, str) and key), f"{where}.key: must be "
                      f"a non-empty string")
        if kind == "plan":
            plan = op["plan"]
            self._require(isinstance(plan, dict) and plan, f"{where}.plan: must be a table "
                          f"of plan fields")
            fields: dict[str, str | bytes] = {}
            for k, v in plan.items():
                if isinstance(v, dict) and set(v) == {"hex"} and isinstance(v["hex"], str):
                    try:
                        fields[k] = bytes.fromhex(v["hex"])
                    except ValueError:
                        self._require(False, f"{where}.plan.{k}.hex: not hexadecimal")
                else:
                    self._require(isinstance(v, str), f"{where}.plan.{k}: must be a string "
                                  f"or {{ hex = \"...\" }}, got {v!r}")
                    fields[k] = v
            key = key or fields.get("plan_id")
            self._require(isinstance(key, str) and bool(key), f"{where}: a plan without a "
                          f"text plan_id needs `key`")
            age = op.get("age_ms")
            self._require(age is None or (isinstance(age, int) and not isinstance(age, bool)),
                          f"{where}.age_ms: must be an integer")
            meta = op.get("meta", {})
            self._require(isinstance(meta, dict), f"{where}.meta: must be a table")
            clash = sorted({"plan", "workload", "producer"} & set(meta))
            self._require(not clash, f"{where}.meta.{clash[0] if clash else ''}: the history "
                          f"sets it itself")
            symbol = op.get("symbol", fields.get("symbol"))
            return "ops", {"key": key, "fields": fields, "age_ms": age, "meta": meta,
                           "symbol": symbol if isinstance(symbol, str) else None}
        for k in ("age_ms", "meta"):
            self._require(k not in op, f"{where}.{k}: only a plan op has it")
        if kind == "regime":
            regime, previous = op["regime"], op.get("previous")
            self._require(regime in REGIMES, f"{where}.regime: must be one of "
                          f"{', '.join(REGIMES)}, got {regime!r}")
            self._require(previous is None or isinstance(previous, str),
                          f"{where}.previous: must be a string")
            return "ops", SetRegime(key or f"regime-{self.index}-r{len(self.by_stream['ops'])}",
                                    regime, previous)
        if kind == "pnl":
            pnl, symbol = op["pnl"], op.get("symbol")
            self._require(not isinstance(pnl, bool) and isinstance(pnl, int | float)
                          and math.isfinite(pnl), f"{where}.pnl: must be a finite number")
            self._require(isinstance(symbol, str) and bool(symbol),
                          f"{where}.symbol: a pnl op needs the symbol")
            self.writes_ledger = True
            return "ops", SetPnl(key or f"pnl-{self.index}-r{len(self.by_stream['ops'])}",
                                 symbol, float(pnl))
        self._require(op["initial_regime"] is True, f"{where}.initial_regime: must be true")
        return "initial", {}

    def streams(self) -> list[Stream]:
        needs = {"ops": frozenset(), "initial": frozenset({"regime"})}
        return [Stream(name, 0.0, needs=needs[name], times=tuple(t for t, _ in items))
                for name, items in self.by_stream.items() if items]

    @property
    def plan_ops(self) -> int:
        """Plans this replay sends (what coverage asks of it)."""
        return sum(1 for _, it in self.by_stream["ops"] if isinstance(it, dict))

    def next(self, stream: str, now_ms: int, view: MarketView) -> list[Emission]:
        k = self.sent[stream]
        self.sent[stream] = k + 1
        _, item = self.by_stream[stream][k]
        if stream == "initial":
            return [InitialRegime(view.regime)] if view.regime is not None else []
        if not isinstance(item, dict):
            return [item]
        fields = dict(item["fields"])
        if item["age_ms"] is not None:
            fields["intent_created_at_ms"] = str(now_ms - item["age_ms"])
        return [SubmitPlan(item["key"], item["symbol"], fields,
                           {"producer": self.p["producer"], **item["meta"]})]


GENERATORS: dict[str, type[Generator]] = {
    g.kind: g for g in (OpenStorm, SameSymbol, DuplicateClose, RotationPressure, Stale, Drift,
                        RegimeFlip, Malformed, Replay)
}
assert set(GENERATORS) == set(WORKLOAD_KINDS), "workload kinds and generators disagree"


def make_generator(spec: WorkloadSpec, index: int, ctx: WorkloadContext,
                   rng: random.Random | None = None) -> Generator:
    """The generator of ``spec`` for worker ``index``; raises :class:`WorkloadError`."""
    cls = GENERATORS.get(spec.kind)
    if cls is None:
        raise WorkloadError(f"unknown workload {spec.kind!r}; known: "
                            f"{', '.join(sorted(GENERATORS))}")
    return cls(spec, index, ctx, rng if rng is not None else random.Random(ctx.seed + index))


# ======================================================================== Redis without lies
class NotSent(Exception):
    """The command surely had no effect: no connection, or the server refused it."""


class Unknown(Exception):
    """The command may or may not have taken effect (timeout, connection lost mid-way)."""


class _Sender:
    """One command at a time, telling "surely not done" apart from "unknown".

    ``execute_command`` cannot tell a refused connection from one dropped after
    the command left, so the connection is taken from the pool (which connects
    it) before anything is sent: an error there is :class:`NotSent`, an error
    after is :class:`Unknown`, and an error reply is :class:`NotSent` (XADD and
    SET are atomic: an error reply means nothing was written).
    """

    def __init__(self, client: redis.Redis) -> None:
        self.client = client

    def _borrow(self) -> Any:
        pool = self.client.connection_pool
        try:
            return pool.get_connection()
        except TypeError:  # redis-py < 5.3 wants a command name
            return pool.get_connection("_")

    def __call__(self, *args: Any) -> Any:
        pool = self.client.connection_pool
        try:
            conn = self._borrow()
        except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
            raise NotSent(f"{type(exc).__name__}: {exc}") from exc
        try:
            conn.send_command(*args)
            return conn.read_response()
        except redis.ResponseError as exc:
            raise NotSent(f"error reply: {exc}") from exc
        except (redis.RedisError, OSError) as exc:
            conn.disconnect()
            raise Unknown(f"{type(exc).__name__}: {exc}") from exc
        except BaseException:
            conn.disconnect()  # e.g. KeyboardInterrupt mid-read: the socket is out of sync
            raise
        finally:
            pool.release(conn)

    def many(self, commands: Sequence[Sequence[Any]]) -> list[Any]:
        """Several commands in one round trip (a pipeline without MULTI), each judged as
        :meth:`__call__` judges one: its reply, or a :class:`NotSent` (no connection, an
        error reply) or :class:`Unknown` (the connection failed after sending: this reply
        and every later one) in its place."""
        pool = self.client.connection_pool
        try:
            conn = self._borrow()
        except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
            return [NotSent(f"{type(exc).__name__}: {exc}")] * len(commands)
        out: list[Any] = []
        try:
            try:
                conn.send_packed_command(conn.pack_commands(commands))
            except (redis.RedisError, OSError) as exc:
                conn.disconnect()
                return [Unknown(f"{type(exc).__name__}: {exc}")] * len(commands)
            for _ in commands:
                try:
                    out.append(conn.read_response())
                except redis.ResponseError as exc:
                    out.append(NotSent(f"error reply: {exc}"))
                except (redis.RedisError, OSError) as exc:
                    conn.disconnect()
                    return out + [Unknown(f"{type(exc).__name__}: {exc}")] * (
                        len(commands) - len(out))
        except BaseException:
            conn.disconnect()  # stopped mid-read: the socket is out of sync
            raise
        finally:
            pool.release(conn)
        return out


def submit_plans(send: _Sender, hist: _History, plans_key: str,
                 batch: Sequence[tuple[SubmitPlan, dict[str, Any]]]) -> list[Any]:
    """XADD plans to ``plans_key`` as a producer must: every ``submit`` invoke recorded
    (with the plan and ``extra``, e.g. the workload) before the plans are sent, in one
    pipeline, then each completion: ``ok`` with the entry id, ``fail`` (surely not added),
    ``info`` (unknown). Returns each plan's entry id, or its :class:`NotSent` /
    :class:`Unknown`. The chaos workloads send batches of one; the load test sends the
    plans that came due together."""
    hist.record_many((OpType.INVOKE, F.SUBMIT, em.key, em.symbol,
                      {"plan": _jsonable(em.fields), **extra, **em.meta})
                     for em, extra in batch)
    commands = [["XADD", plans_key, "*", *chain.from_iterable(em.fields.items())]
                for em, _extra in batch]
    replies = send.many(commands)
    hist.record_many(
        (OpType.FAIL if isinstance(r, NotSent) else OpType.INFO, F.SUBMIT, em.key, em.symbol,
         {"error": str(r)}) if isinstance(r, NotSent | Unknown) else
        (OpType.OK, F.SUBMIT, em.key, em.symbol, {"entry_id": _text(r)})
        for (em, _extra), r in zip(batch, replies, strict=True))
    return replies


def make_client(ctx: WorkloadContext) -> redis.Redis:
    """A client with short timeouts and NO automatic retries (see the module docstring)."""
    return connect(ctx.redis_url, decode_responses=True, socket_timeout=ctx.socket_timeout_s,
                   socket_connect_timeout=ctx.connect_timeout_s, retry=Retry(NoBackoff(), 0))


class _History(Protocol):
    def invoke(self, f: str, key: str | None = None, symbol: str | None = None,
               **value: Any) -> Any: ...

    def ok(self, f: str, key: str | None = None, symbol: str | None = None,
           **value: Any) -> Any: ...

    def fail(self, f: str, key: str | None = None, symbol: str | None = None,
             **value: Any) -> Any: ...

    def info(self, f: str, key: str | None = None, symbol: str | None = None,
             **value: Any) -> Any: ...

    def record_many(self, entries: Iterable[tuple[OpType, str, str | None, str | None,
                                                  dict[str, Any]]]) -> Any: ...

    def close(self) -> None: ...


class _NoHistory:
    """Stands in for the writer when recording is off (benchmarks only)."""

    def invoke(self, f: str, key: str | None = None, symbol: str | None = None,
               **value: Any) -> None:
        return None

    ok = fail = info = invoke

    def record_many(self, entries: Iterable[Any]) -> None:
        for _ in entries:  # generators passed in are consumed, as the writer would
            pass

    def close(self) -> None:
        return None


def _jsonable(fields: Mapping[str, str | bytes]) -> dict[str, str]:
    """Plan fields for the history: bytes shown with backslash escapes, never dropped."""
    return {k: v.decode("utf-8", "backslashreplace") if isinstance(v, bytes) else v
            for k, v in fields.items()}


# ======================================================================== the runner
@dataclass
class WorkerStats:
    """Counts of one worker, written to ``<run_dir>/workloads/<name>.json`` at exit."""

    name: str
    kind: str
    index: int
    pid: int
    plans: int = 0  # plan submissions attempted (each one invoke)
    ok: int = 0
    fail: int = 0
    info: int = 0
    operator_ops: int = 0
    observe_errors: int = 0
    elapsed_s: float = 0.0
    stopped_by: str = ""

    @property
    def plans_per_s(self) -> float:
        return self.ok / self.elapsed_s if self.elapsed_s > 0 else 0.0


class StopFlag(Protocol):
    """:class:`StopSignal`, or a ``threading.Event`` when a worker runs in-process."""

    def is_set(self) -> bool: ...

    def wait(self, timeout: float | None = None) -> bool: ...


class StopSignal:
    """The group's shared stop event: one byte of shared memory, polled.

    Not ``multiprocessing.Event``: its ``set()`` waits for every process asleep
    in ``wait()`` to wake up and acknowledge, so one SIGSTOPped worker (or one
    stopped while holding the event's lock) would hang the parent's ``stop()``
    for ever. A lock-free flag polled every few ms cannot block the parent.
    """

    POLL_S = 0.01

    def __init__(self, ctx: Any) -> None:
        self._flag = ctx.RawValue("b", 0)

    def set(self) -> None:
        self._flag.value = 1

    def is_set(self) -> bool:
        return bool(self._flag.value)

    def wait(self, timeout: float | None = None) -> bool:
        """Sleep until set or ``timeout``; True when set."""
        end = None if timeout is None else time.monotonic() + timeout
        while not self._flag.value:
            left = self.POLL_S if end is None else end - time.monotonic()
            if left <= 0:
                return False
            time.sleep(min(left, self.POLL_S))
        return True


class StartGate:
    """Holds a group's workers, up and connected, until the workload starts (a replay: its
    first ops are due tens of ms after the start, sooner than a process comes up).

    Each worker marks itself ready and waits; :meth:`release` gives them all the start
    (``time.monotonic()``, one clock for the host's processes) at once. Shared memory
    polled, like :class:`StopSignal`, so a stopped worker can never block the parent."""

    POLL_S = 0.001

    def __init__(self, ctx: Any, workers: int) -> None:
        self._origin = ctx.RawValue("d", 0.0)
        self._ready = ctx.RawArray("b", max(1, workers))

    def mark_ready(self, index: int) -> None:
        self._ready[index] = 1

    def ready(self) -> int:
        return sum(self._ready)

    def release(self, t0: float) -> None:
        self._origin.value = t0

    def wait(self, stop: Any) -> float | None:
        """The start once released; None when ``stop()`` says to give up first."""
        while not self._origin.value:
            if stop():
                return None
            time.sleep(self.POLL_S)
        return float(self._origin.value)


class _Worker:
    """Runs one generator against Redis, recording the history; see :func:`run_worker`."""

    def __init__(self, spec: WorkloadSpec, index: int, ctx: WorkloadContext,
                 stop: StopFlag | None, max_plans: int, parent_pid: int | None,
                 gate: StartGate | None = None) -> None:
        self.spec, self.index, self.ctx = spec, index, ctx
        self.gate = gate
        self.name = f"{spec.kind}-{index}"
        self.gen = make_generator(spec, index, ctx)
        self.keys = Keys(ctx.prefix)
        self.stop_flag = stop
        self.max_plans = max_plans
        self.parent_pid = parent_pid
        self.client = make_client(ctx)
        self.send = _Sender(self.client)
        self.hist: _History = (HistoryWriter(ctx.run_dir, self.name) if ctx.record_history
                               else _NoHistory())
        self.exchange: Exchange | None = None
        if ctx.ledger_path is not None and (self.gen.writes_ledger or any(
                "ledger" in s.needs for s in self.gen.streams())):
            if Path(ctx.ledger_path).is_file():
                self.exchange = Exchange(ctx.ledger_path, capital=ctx.capital)
            else:
                log.warning("%s: no ledger at %s: no pnl updates", self.name, ctx.ledger_path)
        self.view = MarketView()
        self.stats = WorkerStats(self.name, spec.kind, index, os.getpid())
        self._failures = 0
        self._next_check = 0.0
        self._stop_reason = ""

    # -- stopping
    def _should_stop(self, now: float, deadline: float) -> bool:
        if self._stop_reason:
            return True
        if now >= deadline:
            self._stop_reason = "duration"
        elif self.stats.plans >= self.max_plans:
            self._stop_reason = "max_plans"
        elif now >= self._next_check:
            self._next_check = now + _CHECK_EVERY_S
            if self.stop_flag is not None and self.stop_flag.is_set():
                self._stop_reason = "stop"
            elif self.parent_pid is not None and os.getppid() != self.parent_pid:
                self._stop_reason = "orphaned"
        return bool(self._stop_reason)

    def _sleep(self, seconds: float) -> None:
        if seconds <= 0:
            return
        if self.stop_flag is not None:
            if self.stop_flag.wait(seconds):
                self._stop_reason = "stop"
        else:
            time.sleep(seconds)

    # -- the loop
    def run(self) -> WorkerStats:
        streams = self.gen.streams()
        start: float | None = self.ctx.start_monotonic
        if self.gate is not None:
            self.gate.mark_ready(self.index)
            start = self.gate.wait(lambda: self._should_stop(time.monotonic(), math.inf))
            if start is None:
                self.stats.stopped_by = self._stop_reason or "stop"
                self.close()
                return self.stats
        t0 = time.monotonic() if self.gate is None or start is None else start
        deadline = t0 + self.ctx.duration_s
        # Timed streams (a replay) count from the run's workload start, when it is known.
        origin = start if start is not None else t0
        ticks = {s.name: 0 for s in streams}
        if any(s.times for s in streams):  # a replay ends when its last op is sent
            deadline = max(deadline, origin + max(max(s.times or (0.0,)) for s in streams)
                           + 1.0)
        due = {s.name: (origin + s.times[0]) if s.times is not None else t0 + s.first_s
               for s in streams if s.times is None or s.times}
        by_name = {s.name: s for s in streams}
        log.info("%s: started (pid %d, %s)", self.name, os.getpid(),
                 ", ".join(f"{s.name} every {s.interval_s:g}s" for s in streams))
        try:
            while due:
                now = time.monotonic()
                if self._should_stop(now, deadline):
                    break
                name = min(due, key=due.__getitem__)
                at = due[name]
                if at > now:
                    self._sleep(min(at, deadline) - now)
                    continue
                s = by_name[name]
                if s.times is not None:
                    ticks[name] += 1
                    if ticks[name] < len(s.times):
                        due[name] = origin + s.times[ticks[name]]
                    else:
                        del due[name]
                elif s.once:
                    del due[name]
                else:
                    nxt = at + s.interval_s
                    # A deadline schedule (no drift), but no catch-up burst after a stall.
                    if now - nxt > max(2 * s.interval_s, _MIN_MAX_LAG_S):
                        nxt = now
                    due[name] = nxt
                view = self._observe(s.needs) if s.needs else self.view
                emissions = self.gen.next(s.name, time.time_ns() // 1_000_000, view)
                errors = self._perform(emissions)
                if errors:
                    self._failures += 1
                    self._sleep(min(_BACKOFF_START_S * 2 ** (self._failures - 1),
                                    _BACKOFF_MAX_S))
                elif emissions:
                    self._failures = 0
        finally:
            self.stats.elapsed_s = time.monotonic() - t0
            self.stats.stopped_by = self._stop_reason or "done"
            self.close()
        log.info("%s: stopped by %s after %.2fs: %d plans (%d ok, %d fail, %d info)",
                 self.name, self.stats.stopped_by, self.stats.elapsed_s, self.stats.plans,
                 self.stats.ok, self.stats.fail, self.stats.info)
        return self.stats

    def close(self) -> None:
        self.hist.close()
        with contextlib.suppress(Exception):
            self.client.close()
        if self.exchange is not None:
            self.exchange.close()

    # -- reading the world
    def _observe(self, needs: frozenset[str]) -> MarketView:
        """Read what the generator needs; on errors keep the last view (producers act on
        stale views anyway) and count the error."""
        view = self.view
        try:
            if "mirror" in needs:
                pipe = self.client.pipeline(transaction=False)
                for symbol in self.ctx.symbols:
                    pipe.hgetall(self.keys.position(symbol))
                pipe.get(self.keys.exposure_pct)
                *hashes, exposure = pipe.execute()
                positions = {s: h for s, h in zip(self.ctx.symbols, hashes, strict=True) if h}
                view = replace(view, positions=positions, exposure_pct=_float(exposure))
            if "regime" in needs:
                view = replace(view, regime=self.client.get(self.keys.regime))
        except (redis.RedisError, OSError) as exc:
            self.stats.observe_errors += 1
            log.debug("%s: read failed: %s", self.name, exc)
        if "ledger" in needs and self.exchange is not None:
            try:
                view = replace(view, ledger_open=tuple(sorted(self.exchange.open_positions())))
            except sqlite3.Error as exc:
                self.stats.observe_errors += 1
                log.warning("%s: ledger read failed: %s", self.name, exc)
        self.view = view
        return view

    # -- acting on it
    def _perform(self, emissions: Sequence[Emission]) -> int:
        """Perform a batch, honouring each emission's delay; returns the number of errors."""
        errors = 0
        start = time.monotonic()
        for em in emissions:
            if isinstance(em, SubmitPlan):
                if self.stats.plans >= self.max_plans:
                    break
                if em.delay_ms > 0:
                    self._sleep(start + em.delay_ms / 1000.0 - time.monotonic())
                    if self._stop_reason:
                        break
                errors += not self._submit(em)
            elif isinstance(em, SetRegime):
                errors += not self._set_regime(em)
            elif isinstance(em, InitialRegime):
                self.hist.ok(F.OPERATOR, key="regime-initial", regime=em.regime, initial=True,
                             target="regime")
                self.stats.operator_ops += 1
            elif isinstance(em, SetPnl):
                self._set_pnl(em)
        return errors

    def _submit(self, em: SubmitPlan) -> bool:
        self.stats.plans += 1
        [reply] = submit_plans(self.send, self.hist, self.keys.plans,
                               [(em, {"workload": self.spec.kind})])
        if isinstance(reply, NotSent):
            self.stats.fail += 1
            return False
        if isinstance(reply, Unknown):
            self.stats.info += 1
            return False
        self.stats.ok += 1
        return True

    def _set_regime(self, em: SetRegime) -> bool:
        self.stats.operator_ops += 1
        self.hist.invoke(F.OPERATOR, key=em.key, regime=em.regime, previous=em.previous,
                         target="regime")
        try:
            self.send("SET", self.keys.regime, em.regime)
        except NotSent as exc:
            self.hist.fail(F.OPERATOR, key=em.key, regime=em.regime, error=str(exc))
            return False
        except Unknown as exc:
            self.hist.info(F.OPERATOR, key=em.key, regime=em.regime, error=str(exc))
            return False
        self.hist.ok(F.OPERATOR, key=em.key, regime=em.regime)
        return True

    def _set_pnl(self, em: SetPnl) -> None:
        """On the ledger, not Redis: the apply layer's mirror sync carries it to Redis."""
        assert self.exchange is not None
        self.stats.operator_ops += 1
        self.hist.invoke(F.OPERATOR, key=em.key, symbol=em.symbol, pnl_pct=em.pnl_pct,
                         target="pnl")
        try:
            done = self.exchange.set_pnl(em.symbol, em.pnl_pct)
        except sqlite3.Error as exc:  # the transaction rolled back
            self.hist.fail(F.OPERATOR, key=em.key, symbol=em.symbol, error=str(exc))
            log.warning("%s: set_pnl failed: %s", self.name, exc)
            return
        if done:
            self.hist.ok(F.OPERATOR, key=em.key, symbol=em.symbol, pnl_pct=em.pnl_pct)
        else:
            self.hist.fail(F.OPERATOR, key=em.key, symbol=em.symbol, error="flat")


def _float(raw: Any) -> float | None:
    try:
        return float(raw) if raw is not None else None
    except ValueError:
        return None


def _text(raw: Any) -> str:
    return raw.decode() if isinstance(raw, bytes) else str(raw)


def run_worker(spec: WorkloadSpec, index: int, ctx: WorkloadContext,
               stop: StopFlag | None = None, *, max_plans: int = DEFAULT_MAX_PLANS,
               parent_pid: int | None = None, gate: StartGate | None = None) -> WorkerStats:
    """Run one workload in this process until its duration, ``max_plans``, ``stop`` or the
    death of ``parent_pid`` (after ``gate`` releases it, when given); write its summary and
    return its counts."""
    worker = _Worker(spec, index, ctx, stop, max_plans, parent_pid, gate)
    stats = worker.run()
    _write_summary(ctx, stats)
    return stats


def _write_summary(ctx: WorkloadContext, stats: WorkerStats) -> None:
    d = Path(ctx.run_dir) / SUMMARY_DIR
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / f".{stats.name}.json.tmp"
    tmp.write_text(json.dumps(asdict(stats) | {"plans_per_s": stats.plans_per_s}, indent=1))
    tmp.replace(d / f"{stats.name}.json")


def read_summaries(run_dir: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """Worker summaries of a run (only workers that exited cleanly wrote one)."""
    out = {}
    for p in sorted((Path(run_dir) / SUMMARY_DIR).glob("*.json")):
        out[p.stem] = json.loads(p.read_text())
    return out


def _child_main(spec: WorkloadSpec, index: int, ctx: WorkloadContext, stop: StopFlag,
                max_plans: int, parent_pid: int, log_level: int,
                gate: StartGate | None = None) -> None:
    """Entry point of a spawned worker process."""
    # Ctrl-C reaches the whole process group: let the parent stop us in order instead.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with contextlib.suppress(OSError):
        os.setsid()  # and leave the terminal's group: only the harness gets its signals
    logging.basicConfig(level=log_level,
                        format="%(asctime)s %(processName)s %(levelname)s %(name)s: %(message)s")
    run_worker(spec, index, ctx, stop, max_plans=max_plans, parent_pid=parent_pid, gate=gate)


# ======================================================================== the group
class WorkloadGroup:
    """The worker processes of a run. ``stop()`` always leaves none alive."""

    def __init__(self, processes: list[SpawnProcess], stop_event: StopSignal,
                 gate: StartGate | None = None) -> None:
        self.processes = processes
        self._stop_event = stop_event
        self.gate = gate

    def wait_ready(self, timeout: float) -> bool:
        """With a start gate: until every worker is up and waiting (or ``timeout``, or one
        died); True when all are. Without one: True at once."""
        if self.gate is None:
            return True
        end = time.monotonic() + timeout
        while self.gate.ready() < len(self.processes):
            if time.monotonic() >= end or any(p.exitcode is not None for p in self.processes):
                return False
            time.sleep(0.01)
        return True

    def release(self, t0: float) -> None:
        """Open the start gate: the workers' workload starts at ``t0`` (monotonic)."""
        if self.gate is not None:
            self.gate.release(t0)

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.processes]

    def pids(self) -> dict[str, int | None]:
        return {p.name: p.pid for p in self.processes}

    def alive(self) -> list[str]:
        """Names of the workers still running."""
        return [p.name for p in self.processes if p.is_alive()]

    def exitcodes(self) -> dict[str, int | None]:
        """Exit code per worker: 0 clean, 1 crashed, -N killed by signal N, None running."""
        return {p.name: p.exitcode for p in self.processes}

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the workers to finish by themselves; True when none is left running."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for p in self.processes:
            p.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return not self.alive()

    def stop(self, timeout: float = 10.0) -> dict[str, int | None]:
        """Ask every worker to stop, wait up to ``timeout``, then SIGTERM and SIGKILL the
        stragglers (a worker stuck in a socket wait, or SIGSTOPped). Idempotent."""
        self._stop_event.set()
        self.join(timeout)
        stragglers = [p for p in self.processes if p.is_alive()]
        for p in stragglers:
            log.warning("workload %s (pid %s) did not stop in %.1fs: terminating",
                        p.name, p.pid, timeout)
            p.terminate()
        for p in stragglers:
            p.join(1.0)
        for p in stragglers:
            if p.is_alive():
                log.warning("workload %s (pid %s) survived SIGTERM: killing", p.name, p.pid)
                p.kill()
                p.join(5.0)
        still = self.alive()
        for p in self.processes:
            if p.pid is not None and p.exitcode is not None:
                reaper.forget(p.pid)
        if still:  # pragma: no cover - SIGKILL of our own child does not fail
            log.error("workload processes still alive after SIGKILL: %s", still)
        return self.exitcodes()

    def __enter__(self) -> WorkloadGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def validate(specs: Iterable[WorkloadSpec], ctx: WorkloadContext) -> None:
    """Build every generator once, so a bad param fails here, in the parent, by name."""
    for i, spec in enumerate(specs):
        if spec.processes < 1:
            raise WorkloadError(f"workload {spec.kind}: processes must be >= 1")
        if spec.rate < 0:
            raise WorkloadError(f"workload {spec.kind}: rate must be >= 0")
        make_generator(spec, i, ctx)
    if not ctx.redis_url:
        raise WorkloadError("workloads need a Redis URL")
    if ctx.duration_s <= 0:
        raise WorkloadError("workloads need duration_s > 0")


def start_workloads(specs: Sequence[WorkloadSpec], ctx: WorkloadContext, *,
                    max_plans: int = DEFAULT_MAX_PLANS, log_level: int | None = None,
                    hold: bool = False) -> WorkloadGroup:
    """Start ``spec.processes`` worker processes per spec, numbered across all specs.
    ``hold``: each waits, up and connected, for :meth:`WorkloadGroup.release`."""
    validate(specs, ctx)
    mpctx = mp.get_context("spawn")
    stop_event = StopSignal(mpctx)
    level = log_level if log_level is not None else logging.getLogger().getEffectiveLevel()
    processes: list[SpawnProcess] = []
    gate = StartGate(mpctx, sum(s.processes for s in specs)) if hold else None
    group = WorkloadGroup(processes, stop_event, gate)
    index = 0
    try:
        for spec in specs:
            for _ in range(spec.processes):
                p = mpctx.Process(
                    name=f"{spec.kind}-{index}", target=_child_main, daemon=True,
                    args=(spec, index, ctx, stop_event, max_plans, os.getpid(), level, gate))
                with reaper.sigint_ignored_while_spawning():
                    p.start()
                processes.append(p)
                if p.pid is not None:
                    reaper.watch(p.pid, group=True)  # dies with the harness, however it dies
                index += 1
    except BaseException:
        group.stop(timeout=2.0)
        raise
    log.info("started %d workload process(es): %s", len(processes), ", ".join(group.names))
    return group

"""Scenarios as data: TOML files naming workloads, faults, config and durations.

A scenario file is validated field by field; every error names the field
(``fault[2].kind: unknown fault 'kil_governor'; known: ...``) so that a typo
is a clear message and exit 254, never a run that silently tests something
else. Built-in scenarios live in ``chaos/scenarios/*.toml``.
"""

from __future__ import annotations

import math
import re
import tomllib
from dataclasses import dataclass, field, fields, replace
from importlib import resources
from pathlib import Path
from typing import Any

from governor_ref.protocol import GovernorConfig

WORKLOAD_KINDS = {
    "open_storm": "OPEN plans across many symbols",
    "same_symbol": "OPEN plans racing on a few symbols",
    "duplicate_close": "harvest_brain, exit_monitor and kill_switch close one position within ms",
    "rotation_pressure": "OPENs against full slots while positions carry pnl, forcing rotation",
    "stale": "plans created long before they are sent (intent_created_at_ms in the past)",
    "drift": "plans whose snapshot_position_count / snapshot_exposure_pct lag reality",
    "regime_flip": "the operator flips P:slots:regime between BASE, TREND_STRONG and CHOP",
    "malformed": "plans that break the contract, mixed with valid ones",
    "replay": "one producer sending a recorded list of operations at their offsets",
}

FAULT_KINDS = {
    "kill_governor": "SIGKILL a governor instance (the supervisor restarts it)",
    "pause_governor": "SIGSTOP a governor instance for `duration`, then SIGCONT",
    "restart_governor": "stop a governor instance and start it again after `duration`",
    "kill_redis": "SIGKILL redis-server and restart it after `duration`",
    "pause_redis": "SIGSTOP redis-server for `duration` (past client timeouts), then SIGCONT",
    "failover": "Sentinel failover of the primary (needs redis.topology = 'sentinel')",
    "latency": "add `latency_ms` (+ `jitter_ms`) between governors and Redis",
    "drop": "reset governor connections with probability `prob` per chunk",
    "partition": "partition governors from Redis for `duration`",
    "memory_pressure": "fill Redis up to maxmemory for `duration`",
    "redelivery": "write apply results twice and late; re-add plans with the same id",
    "slow_exchange": "order latency above exit_lock_ttl_ms (below the protocol's bound)",
    "clock_skew": "run governors under libfaketime with `offset_s` (skipped if not installed)",
}

REDIS_KINDS = ("embedded", "docker", "url")
TOPOLOGIES = ("single", "sentinel")

# -- limits ------------------------------------------------------------------------------
# Every number of a scenario is checked against a range here, at load time, so that a bad
# value is exit 254 naming its field before any Redis or governor starts -- never a run
# that spins (100 million seeded positions), never ends (an infinite duration), writes NaN
# into run.json, or silently tests something else (a fault lasting 0 ms). The upper bounds
# are far above anything a useful run needs on one host; they exist to refuse typos.
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # a directory name, never a path
MAX_DURATION_S = 86_400.0  # one day of workload
MAX_GOVERNORS = 64  # governor processes on one host
MAX_PROCESSES = 64  # producer processes per [[workload]]
MAX_RATE = 100_000.0  # plans/s per producer process
MAX_SYMBOLS = 1000
MAX_SEED = 2**63 - 1
MAX_CAPITAL = 1e12
MAX_LATENCY_MS = 600_000.0  # apply-layer order latency, jitter, late duplicates: 10 min
MAX_FAULT_TIME_S = MAX_DURATION_S  # at, duration, every
MAX_DESCRIPTION = 2000
MAXMEMORY_RE = re.compile(r"(?i)\d{1,15}(b|k|kb|m|mb|g|gb)?")
TARGET_RE = re.compile(r"gov-([1-9]\d{0,4})")


@dataclass(frozen=True)
class Param:
    """One parameter of a fault kind: its type and (inclusive) range, or its choices.

    ``choices`` may be a callable so that the fault's own module stays the source of
    the allowed values (the proxy's partition modes, Redis's maxmemory policies).
    """

    type: str  # "number", "int", "bool" or "choice"
    lo: float | None = None
    hi: float | None = None
    choices: Any = ()

    def check(self, v: Any, where: str) -> Any:
        if self.type == "bool":
            return _coerce(v, "bool", where)
        if self.type == "choice":
            allowed = tuple(self.choices() if callable(self.choices) else self.choices)
            if v not in allowed:
                raise ScenarioError(f"{where}: must be one of {', '.join(map(str, allowed))}, "
                                    f"got {v!r}")
            return v
        x = _coerce(v, "int" if self.type == "int" else "float", where)
        return _within(x, where, self.lo, self.hi)


def _partition_modes() -> tuple[str, ...]:
    from chaos.proxy import PARTITION_MODES

    return tuple(PARTITION_MODES)


def _maxmemory_policies() -> tuple[str, ...]:
    from chaos.redis_servers import MAXMEMORY_POLICIES

    return tuple(sorted(MAXMEMORY_POLICIES))


_MS = Param("number", 0, MAX_LATENCY_MS)
_PROB = Param("number", 0, 1)

# The parameters each fault kind reads (chaos/nemesis.py reads them with these names; its
# docstring says what each does and its default). Anything else under a [[fault]] is a typo.
FAULT_PARAMS: dict[str, dict[str, Param]] = {
    "kill_governor": {"restart_wait_s": Param("number", 0, 600)},
    "pause_governor": {},
    "restart_governor": {},
    "kill_redis": {},
    "pause_redis": {},
    "failover": {"timeout_s": Param("number", 1, 600)},
    "latency": {"latency_ms": _MS, "jitter_ms": _MS},
    "drop": {"prob": _PROB},
    "partition": {"mode": Param("choice", choices=_partition_modes)},
    "memory_pressure": {"policy": Param("choice", choices=_maxmemory_policies),
                        "headroom_kb": Param("number", 1, 1_048_576),
                        "fill": Param("bool"),
                        "chunk_kb": Param("number", 1, 65_536),
                        "max_ballast_kb": Param("number", 1, 4_194_304)},
    "redelivery": {"interval_s": Param("number", 0.01, 3600), "readd": Param("int", 0, 100_000),
                   "dup_prob": _PROB, "late_ms": _MS},
    "slow_exchange": {"latency_ms": _MS, "jitter_ms": _MS},
    "clock_skew": {"offset_s": Param("number", -MAX_DURATION_S * 365, MAX_DURATION_S * 365)},
}
# Faults that act on governors: only they use ``target``.
GOVERNOR_FAULTS = frozenset({"kill_governor", "pause_governor", "restart_governor",
                             "clock_skew"})
assert set(FAULT_PARAMS) == set(FAULT_KINDS), "fault kinds and their parameters disagree"

# Ranges of the fixed fields of each section ("where" as an error names it).
FIELD_RANGES: dict[str, tuple[float, float]] = {
    "duration_s": (1e-3, MAX_DURATION_S),
    "seed": (0, MAX_SEED),
    "governors": (1, MAX_GOVERNORS),
    "market.symbols": (1, MAX_SYMBOLS),
    "market.capital": (1e-6, MAX_CAPITAL),
    "market.allocation_pct": (1e-9, 1.0),
    "market.initial_positions": (0, MAX_SYMBOLS),
    "apply.open_latency_ms": (0, MAX_LATENCY_MS),
    "apply.open_jitter_ms": (0, MAX_LATENCY_MS),
    "apply.close_latency_ms": (0, MAX_LATENCY_MS),
    "apply.close_jitter_ms": (0, MAX_LATENCY_MS),
    "apply.duplicate_result_prob": (0, 1),
    "apply.late_duplicate_ms": (0, MAX_LATENCY_MS),
    "workload.processes": (1, MAX_PROCESSES),
    "workload.rate": (0, MAX_RATE),
    "workload.symbols": (1, MAX_SYMBOLS),
    "fault.at": (0, MAX_FAULT_TIME_S),
    "fault.duration": (0, MAX_FAULT_TIME_S),
    "fault.every": (0, MAX_FAULT_TIME_S),
    "after.n": (1, 10_000_000),
    "after.delay": (0, MAX_FAULT_TIME_S),
}

# Events a fault can be anchored to (``after = { event = ... }``), what each is, and the
# filters that apply to it. Which process sees each, and how fast, is chaos/anchors.py's.
ANCHOR_EVENTS: dict[str, str] = {
    "submit": "a producer's XADD of a plan returned (the plan is in P:stream:apply.plan)",
    "decision": "a PERMIT or BLOCK entry on P:stream:governor.events",
    "permit": "a PERMIT entry on P:stream:governor.events",
    "block": "a BLOCK entry on P:stream:governor.events",
    "take": "the apply layer took a permit (GETDEL found it)",
    "result": "an entry on P:stream:apply.result",
    "exit_lock": "a CLOSE PERMIT: the symbol reached its exit lock",
}
_DECIDED = ("decision", "permit", "block", "exit_lock")
ANCHOR_FILTERS: dict[str, tuple[str, ...]] = {
    "action": ("submit", *_DECIDED, "take", "result"),
    "instance": _DECIDED,  # the governor consumer that decided
    "symbol": tuple(ANCHOR_EVENTS),
    "plan_id": tuple(ANCHOR_EVENTS),
    "reason": ("decision", "block", "result"),
    "status": ("result",),  # executed, rejected, expired
}


class ScenarioError(ValueError):
    """A scenario that cannot be run; the message names the field."""


@dataclass(frozen=True)
class WorkloadSpec:
    kind: str
    processes: int = 1
    rate: float = 100.0  # plans/s per process; 0 = as fast as possible
    symbols: int = 40
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class AnchorSpec:
    """``after = {...}`` of a fault: start on the ``n``-th event matching the filters
    (counted from the workload start), ``delay`` seconds after it, instead of at a time.

    A fault anchored to an event reproduces a failure that depends on *when* in the
    protocol it strikes (after the third permit of gov-1), not on the wall clock, which
    no two runs share. ``None`` filters match anything.
    """

    event: str
    n: int = 1
    delay: float = 0.0
    action: str | None = None
    instance: str | None = None
    symbol: str | None = None
    reason: str | None = None
    plan_id: str | None = None
    status: str | None = None

    def filters(self) -> dict[str, str]:
        """The filters that are set, by name."""
        return {k: v for k in ANCHOR_FILTERS if (v := getattr(self, k)) is not None}

    def describe(self) -> str:
        """``permit #3 (action=OPEN, instance=gov-1) + 0.1s``: for logs and reports."""
        flt = ", ".join(f"{k}={v}" for k, v in self.filters().items())
        return (f"{self.event} #{self.n}" + (f" ({flt})" if flt else "")
                + (f" + {self.delay:g}s" if self.delay else ""))


@dataclass(frozen=True)
class FaultSpec:
    kind: str
    at: float = 0.0  # seconds after the workload starts
    duration: float = 0.0  # how long the fault stays on (0 = instant)
    every: float = 0.0  # repeat period (0 = once)
    target: str = "random"  # governor consumer name, "random", "all" (or "anchor", below)
    params: dict[str, Any] = field(default_factory=dict)
    # Start on an event instead of at ``at``; with it, target "anchor" is the governor that
    # decided that event.
    after: AnchorSpec | None = None


@dataclass(frozen=True)
class RedisSpec:
    kind: str = "embedded"
    topology: str = "single"
    appendonly: bool = False
    appendfsync: str = "everysec"
    maxmemory: str | None = None
    maxmemory_policy: str = "noeviction"
    proxy: bool = False  # route governors through a fault proxy
    url: str | None = None  # for kind = "url"


@dataclass(frozen=True)
class MarketSpec:
    symbols: int = 40
    capital: float = 100_000.0
    allocation_pct: float = 0.05
    regime: str = "BASE"
    initial_positions: int = 0


@dataclass(frozen=True)
class ApplySpec:
    open_latency_ms: float = 20.0
    open_jitter_ms: float = 20.0
    close_latency_ms: float = 20.0
    close_jitter_ms: float = 20.0
    reduce_only: bool = False
    fenced: bool = False
    duplicate_result_prob: float = 0.0
    late_duplicate_ms: int = 0


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str = ""
    exposure: bool = False  # no governor can survive it on this setup: outside pass/fail
    duration_s: float = 10.0
    seed: int = 1
    governors: int = 3
    redis: RedisSpec = field(default_factory=RedisSpec)
    market: MarketSpec = field(default_factory=MarketSpec)
    apply: ApplySpec = field(default_factory=ApplySpec)
    config: dict[str, str] = field(default_factory=dict)  # P:governor:config overrides
    workloads: tuple[WorkloadSpec, ...] = ()
    faults: tuple[FaultSpec, ...] = ()
    source: str | None = None  # file it came from

    def governor_config(self) -> GovernorConfig:
        return GovernorConfig.from_hash(GovernorConfig().to_hash() | self.config)

    def with_overrides(self, *, seed: int | None = None, duration_s: float | None = None,
                       governors: int | None = None) -> Scenario:
        """The scenario with command-line overrides, checked like the file's own values
        (and the fault targets re-checked against an overridden governor count)."""
        s = self
        if seed is not None:
            _within(seed, "--seed", *FIELD_RANGES["seed"])
            s = replace(s, seed=seed)
        if duration_s is not None:
            _within(duration_s, "--duration", *FIELD_RANGES["duration_s"])
            s = replace(s, duration_s=duration_s)
            for i, w in enumerate(s.workloads):  # a replay's ops must fit the new duration
                _check_workload_params(w, f"workload[{i}] (with --duration)", s.market.symbols,
                                       s.seed, duration_s, s.config)
        if governors is not None:
            _within(governors, "--governors", *FIELD_RANGES["governors"])
            s = replace(s, governors=governors)
            for i, f in enumerate(s.faults):
                if f.target != "anchor":
                    _check_target(f.target, s.governors, f"fault[{i}].target",
                                  " (with --governors)")
                inst = f.after.instance if f.after is not None else None
                if inst is not None:
                    _check_target(inst, s.governors, f"fault[{i}].after.instance",
                                  " (with --governors)")
        return s


# -- loading ----------------------------------------------------------------------------
def builtin_dir() -> Path:
    return Path(str(resources.files("chaos") / "scenarios"))


def builtin_names() -> list[str]:
    return sorted(p.stem for p in builtin_dir().glob("*.toml"))


def load(name_or_path: str | Path) -> Scenario:
    """A built-in scenario by name, or a TOML file by path."""
    p = Path(name_or_path)
    if p.suffix == ".toml" or p.exists():
        if not p.is_file():
            raise ScenarioError(f"scenario file not found: {p}")
        return parse(_read(p), source=str(p))
    path = builtin_dir() / f"{name_or_path}.toml"
    if not path.is_file():
        raise ScenarioError(f"unknown scenario {str(name_or_path)!r}; known: "
                            f"{', '.join(builtin_names())}")
    return parse(path.read_text(encoding="utf-8"), source=str(path))


def _read(p: Path) -> str:
    """The file's text; an unreadable or non-UTF-8 file is a ScenarioError naming it."""
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ScenarioError(f"{p}: not UTF-8 text (byte {exc.start}); a scenario is a TOML "
                            f"file") from None
    except OSError as exc:
        raise ScenarioError(f"{p}: cannot read: {exc.strerror or exc}") from None


def parse(text: str, source: str | None = None) -> Scenario:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(f"{source or 'scenario'}: not valid TOML: {exc}") from None
    return from_dict(raw, source)


def _section(cls: type, raw: Any, where: str) -> Any:
    if raw is None:
        return cls()
    if not isinstance(raw, dict):
        raise ScenarioError(f"{where}: must be a table")
    known = {f.name: f for f in fields(cls)}
    kwargs: dict[str, Any] = {}
    params: dict[str, Any] = {}
    for k, v in raw.items():
        f = known.get(k)
        if f is None or k == "params":
            if "params" in known:
                params[k] = v  # kind-specific parameters (checked by the kind)
                continue
            raise ScenarioError(f"{where}.{k}: unknown field; known: {', '.join(sorted(known))}")
        kwargs[k] = _coerce(v, f.type, f"{where}.{k}")
    if params:
        kwargs["params"] = params
    return cls(**kwargs)


def _coerce(v: Any, typ: Any, where: str) -> Any:
    t = str(typ)
    if t.startswith("bool"):
        if not isinstance(v, bool):
            raise ScenarioError(f"{where}: must be true or false, got {v!r}")
        return v
    if t.startswith("int"):
        if isinstance(v, bool) or not isinstance(v, int):
            raise ScenarioError(f"{where}: must be an integer, got {v!r}")
        return v
    if t.startswith("float"):
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise ScenarioError(f"{where}: must be a number, got {v!r}")
        if not math.isfinite(v):
            raise ScenarioError(f"{where}: must be a finite number, got {v!r}")
        return float(v)
    if t.startswith("str"):
        if not isinstance(v, str):
            raise ScenarioError(f"{where}: must be a string, got {v!r}")
        return v
    return v


def _within(v: Any, where: str, lo: float | None, hi: float | None) -> Any:
    """``v`` if it is a finite number within [lo, hi]; a ScenarioError naming ``where``."""
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise ScenarioError(f"{where}: must be a finite number, got {v!r}")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        lo_s = "" if lo is None else _fmt(lo)
        hi_s = "" if hi is None else _fmt(hi)
        raise ScenarioError(f"{where}: must be within {lo_s}..{hi_s}, got {v!r}")
    return v


def _fmt(x: float) -> str:
    return str(x) if isinstance(x, int) else f"{x:g}"


def _check_ranges(obj: Any, section: str, where: str | None = None) -> None:
    """Every field of a section dataclass that has a range in FIELD_RANGES (``where``
    names the table in errors, e.g. ``workload[1]``; by default the section)."""
    for f in fields(obj):
        rng = FIELD_RANGES.get(f"{section}.{f.name}")
        if rng is not None:
            _within(getattr(obj, f.name), f"{where or section}.{f.name}", *rng)


def _check_target(target: str, governors: int, where: str, why: str = "") -> None:
    """``random``, ``all`` or ``gov-1`` .. ``gov-N``: a name no governor has never fires."""
    if target in ("random", "all"):
        return
    m = TARGET_RE.fullmatch(target)
    if m is None or int(m[1]) > governors:
        raise ScenarioError(f"{where}: must be 'random', 'all' or gov-1..gov-{governors}{why}, "
                            f"got {target!r}")


def _check_workload_params(spec: WorkloadSpec, where: str, sc_symbols: int, seed: int,
                           duration_s: float, config: dict[str, str]) -> None:
    """Build the workload's generator once, as the run will: the generator's PARAMS and
    ranges (chaos/workloads.py) are the one place a kind's parameters are declared."""
    from chaos.workloads import WorkloadContext, WorkloadError, make_generator

    ctx = WorkloadContext(redis_url="redis://validate", prefix="validate", run_dir="",
                          seed=seed, duration_s=duration_s,
                          symbols=[f"S{i:03d}USDT" for i in range(sc_symbols)], config=config,
                          ledger_path=None)
    try:
        make_generator(spec, 0, ctx)
    except WorkloadError as exc:
        msg = str(exc).removeprefix(f"workload {spec.kind}: ")
        raise ScenarioError(f"{where}: {msg}") from None


def _anchor(spec: FaultSpec, where: str, governors: int) -> AnchorSpec:
    """The ``after`` table of a fault, checked: a known event, filters that apply to it,
    n and delay in range, and no ``at`` or ``every`` beside it (one start, on the event)."""
    raw = spec.after
    if isinstance(raw, AnchorSpec):
        raw = {k: v for k, v in vars(raw).items() if v is not None}
    if not isinstance(raw, dict):
        raise ScenarioError(f"{where}: must be a table like {{ event = \"permit\", n = 3 }}, "
                            f"got {raw!r}")
    known = {f.name for f in fields(AnchorSpec)}
    for k in raw:
        if k not in known:
            raise ScenarioError(f"{where}.{k}: unknown field; known: {', '.join(sorted(known))}")
    event = raw.get("event")
    if event not in ANCHOR_EVENTS:
        what = "required" if event is None else f"unknown event {event!r}"
        raise ScenarioError(f"{where}.event: {what}; known: {', '.join(ANCHOR_EVENTS)}")
    kw: dict[str, Any] = {"event": event}
    if "n" in raw:
        kw["n"] = _within(_coerce(raw["n"], "int", f"{where}.n"), f"{where}.n",
                          *FIELD_RANGES["after.n"])
    if "delay" in raw:
        kw["delay"] = _within(_coerce(raw["delay"], "float", f"{where}.delay"),
                              f"{where}.delay", *FIELD_RANGES["after.delay"])
    for k, events in ANCHOR_FILTERS.items():
        if k not in raw:
            continue
        v = _coerce(raw[k], "str", f"{where}.{k}")
        if event not in events:
            raise ScenarioError(f"{where}.{k}: does not apply to event {event!r}; it filters "
                                f"{', '.join(events)}")
        if not v:
            raise ScenarioError(f"{where}.{k}: must not be empty (leave it out to match any)")
        kw[k] = v
    if kw.get("action") not in (None, "OPEN", "CLOSE"):
        raise ScenarioError(f"{where}.action: must be OPEN or CLOSE, got {kw['action']!r}")
    if event == "exit_lock" and kw.get("action") == "OPEN":
        raise ScenarioError(f"{where}.action: an exit lock is taken by a CLOSE permit only")
    if kw.get("status") not in (None, "executed", "rejected", "expired"):
        raise ScenarioError(f"{where}.status: must be executed, rejected or expired, "
                            f"got {kw['status']!r}")
    if "instance" in kw:
        m = TARGET_RE.fullmatch(kw["instance"])
        if m is None or int(m[1]) > governors:
            raise ScenarioError(f"{where}.instance: must be gov-1..gov-{governors}, "
                                f"got {kw['instance']!r}")
    fault = where.removesuffix(".after")
    if spec.at:
        raise ScenarioError(f"{fault}.at: a fault with `after` starts on its event; leave "
                            f"`at` out (or 0), got {spec.at:g}")
    if spec.every:
        raise ScenarioError(f"{fault}.every: a fault with `after` starts once, on its event; "
                            f"`every` is not allowed with it")
    return AnchorSpec(**kw)


def from_dict(raw: dict[str, Any], source: str | None = None) -> Scenario:
    raw = dict(raw)
    top = {f.name for f in fields(Scenario)} - {"workloads", "faults", "source"}
    allowed = top | {"workload", "fault"}
    for k in raw:
        if k not in allowed:
            raise ScenarioError(f"{k}: unknown field; known: {', '.join(sorted(allowed))}")
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise ScenarioError("name: required, a non-empty string")
    if not NAME_RE.fullmatch(name):
        # The name is a directory under reports/runs: "../../x" would write outside it.
        raise ScenarioError(f"name: letters, digits, '.', '_' and '-' only, starting with a "
                            f"letter or digit, at most 64 characters; got {name!r}")
    kwargs: dict[str, Any] = {"name": name, "source": source}
    for k in ("description",):
        if k in raw:
            kwargs[k] = _coerce(raw[k], "str", k)
            if len(kwargs[k]) > MAX_DESCRIPTION:
                raise ScenarioError(f"{k}: at most {MAX_DESCRIPTION} characters")
    if "exposure" in raw:
        kwargs["exposure"] = _coerce(raw["exposure"], "bool", "exposure")
    for k in ("duration_s",):
        if k in raw:
            kwargs[k] = _within(_coerce(raw[k], "float", k), k, *FIELD_RANGES[k])
    for k in ("seed", "governors"):
        if k in raw:
            kwargs[k] = _within(_coerce(raw[k], "int", k), k, *FIELD_RANGES[k])
    kwargs["redis"] = _section(RedisSpec, raw.get("redis"), "redis")
    kwargs["market"] = _section(MarketSpec, raw.get("market"), "market")
    kwargs["apply"] = _section(ApplySpec, raw.get("apply"), "apply")
    r: RedisSpec = kwargs["redis"]
    if r.kind not in REDIS_KINDS:
        raise ScenarioError(f"redis.kind: must be one of {', '.join(REDIS_KINDS)}")
    if r.topology not in TOPOLOGIES:
        raise ScenarioError(f"redis.topology: must be one of {', '.join(TOPOLOGIES)}")
    if r.appendfsync not in ("always", "everysec", "no"):
        raise ScenarioError("redis.appendfsync: must be always, everysec or no")
    if r.maxmemory is not None and not MAXMEMORY_RE.fullmatch(r.maxmemory):
        raise ScenarioError(f"redis.maxmemory: a size like 64mb, got {r.maxmemory!r}")
    if r.maxmemory_policy not in _maxmemory_policies():
        raise ScenarioError(f"redis.maxmemory_policy: must be one of "
                            f"{', '.join(_maxmemory_policies())}")
    if r.url is not None:
        from chaos.redis_servers import check_url

        try:
            check_url(r.url)
        except ValueError as exc:
            raise ScenarioError(f"redis.url: {exc}") from None
    m: MarketSpec = kwargs["market"]
    if m.regime not in ("BASE", "TREND_STRONG", "CHOP"):
        raise ScenarioError("market.regime: must be BASE, TREND_STRONG or CHOP")
    _check_ranges(m, "market")
    _check_ranges(kwargs["apply"], "apply")
    cfg = raw.get("config") or {}
    if not isinstance(cfg, dict):
        raise ScenarioError("config: must be a table")
    config = {str(k): str(v).lower() if isinstance(v, bool) else str(v) for k, v in cfg.items()}
    known_cfg = {f.name for f in fields(GovernorConfig)} - {"extra"}
    for k in config:
        if k not in known_cfg:
            raise ScenarioError(f"config.{k}: unknown governor config field; known: "
                                f"{', '.join(sorted(known_cfg))}")
    try:
        GovernorConfig.from_hash(config)
    except ValueError as exc:
        raise ScenarioError(str(exc).replace("config field ", "config.")) from None
    kwargs["config"] = config
    gcfg = GovernorConfig.from_hash(GovernorConfig().to_hash() | config)
    slots = gcfg.slots_for(m.regime)
    if m.initial_positions > min(slots, m.symbols):
        # The harness seeds these positions before any governor runs: more than the
        # initial regime's slots (slots_for already caps them at max_positions) would be
        # slot violations of the harness's own making, blamed on the governor.
        raise ScenarioError(f"market.initial_positions: at most the initial regime's slots "
                            f"({m.regime}: {slots}, max_positions {gcfg.max_positions}) and "
                            f"market.symbols ({m.symbols}), got {m.initial_positions}")
    duration_s = kwargs.get("duration_s", Scenario.duration_s)
    governors = kwargs.get("governors", Scenario.governors)
    wl = raw.get("workload") or []
    if not isinstance(wl, list):
        raise ScenarioError("workload: must be an array of tables ([[workload]])")
    workloads = []
    for i, w in enumerate(wl):
        spec = _section(WorkloadSpec, w, f"workload[{i}]")
        if spec.kind not in WORKLOAD_KINDS:
            raise ScenarioError(f"workload[{i}].kind: unknown workload {spec.kind!r}; known: "
                                f"{', '.join(sorted(WORKLOAD_KINDS))}")
        _check_ranges(spec, "workload", f"workload[{i}]")
        _check_workload_params(spec, f"workload[{i}]", m.symbols, kwargs.get("seed", 1),
                               duration_s, config)
        workloads.append(spec)
    fl = raw.get("fault") or []
    if not isinstance(fl, list):
        raise ScenarioError("fault: must be an array of tables ([[fault]])")
    faults = []
    for i, f in enumerate(fl):
        spec = _section(FaultSpec, f, f"fault[{i}]")
        if spec.kind not in FAULT_KINDS:
            raise ScenarioError(f"fault[{i}].kind: unknown fault {spec.kind!r}; known: "
                                f"{', '.join(sorted(FAULT_KINDS))}")
        where = f"fault[{i}]"
        for name in ("at", "duration", "every"):
            _within(getattr(spec, name), f"{where}.{name}", *FIELD_RANGES[f"fault.{name}"])
        if spec.after is not None:
            spec = replace(spec, after=_anchor(spec, f"{where}.after", governors))
        if spec.at >= duration_s:
            raise ScenarioError(f"{where}.at: must be before the end of the workload "
                                f"(duration_s = {duration_s:g}), got {spec.at:g}: it would "
                                f"never fire")
        if 0 < spec.every < spec.duration:
            raise ScenarioError(f"{where}.every: must be 0 (once) or >= duration "
                                f"({spec.duration:g}), got {spec.every:g}")
        if spec.target == "anchor":  # the governor that decided the anchoring event
            if spec.after is None or spec.after.event not in _DECIDED:
                raise ScenarioError(f"{where}.target: 'anchor' (the governor that decided the "
                                    f"anchoring event) needs after.event = one of "
                                    f"{', '.join(_DECIDED)}")
        else:
            _check_target(spec.target, governors, f"{where}.target")
        if spec.target != "random" and spec.kind not in GOVERNOR_FAULTS:
            raise ScenarioError(f"{where}.target: {spec.kind} does not act on a governor; "
                                f"target applies to {', '.join(sorted(GOVERNOR_FAULTS))}")
        known = FAULT_PARAMS[spec.kind]
        for k, v in spec.params.items():
            if k not in known:
                fixed = "after, at, duration, every, kind, target"
                extra = f", {', '.join(sorted(known))}" if known else ""
                raise ScenarioError(f"{where}.{k}: unknown parameter of {spec.kind}; known: "
                                    f"{fixed}{extra}")
            known[k].check(v, f"{where}.{k}")  # values kept as written (history shows them)
        if spec.kind == "failover" and r.topology != "sentinel":
            raise ScenarioError(f"fault[{i}].kind: failover needs redis.topology = 'sentinel'")
        if spec.kind in ("latency", "drop", "partition") and not r.proxy:
            raise ScenarioError(f"fault[{i}].kind: {spec.kind} needs redis.proxy = true")
        faults.append(spec)
    kwargs["workloads"] = tuple(workloads)
    kwargs["faults"] = tuple(faults)
    return Scenario(**kwargs)


# -- writing ----------------------------------------------------------------------------
def dump(sc: Scenario) -> str:
    """The scenario as TOML that :func:`parse` reads back to an equal Scenario
    (``parse(dump(sc), source=sc.source) == sc``): what ``chaos shrink`` writes as
    repro.toml and ``chaos run --replay`` runs. Fields at their defaults are left out;
    ``source`` is not written (it is where a scenario was read from)."""
    lines: list[str] = []
    top: dict[str, Any] = {"name": sc.name}
    for f in fields(Scenario):
        if f.name in ("name", "redis", "market", "apply", "config", "workloads", "faults",
                      "source"):
            continue
        v = getattr(sc, f.name)
        if f.name in ("duration_s", "seed", "governors") or v != f.default:
            top[f.name] = v
    lines += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in top.items()]
    for name in ("redis", "market", "apply"):
        body = _non_default(getattr(sc, name))
        if body:
            lines += ["", f"[{name}]", *(f"{_toml_key(k)} = {_toml_value(v)}"
                                          for k, v in body.items())]
    if sc.config:
        lines += ["", "[config]", *(f"{_toml_key(k)} = {_toml_value(v)}"
                                    for k, v in sorted(sc.config.items()))]
    for w in sc.workloads:
        body = _non_default(w, keep=("kind",))
        params = body.pop("params", {})
        lines += ["", "[[workload]]"]
        lines += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in body.items()]
        for k, v in params.items():
            if k == "ops" and w.kind == "replay" and isinstance(v, list):
                # One operation per line: a long replay stays readable and diffable.
                lines.append("ops = [")
                lines += [f"  {_toml_value(op)}," for op in v]
                lines.append("]")
            else:
                lines.append(f"{_toml_key(k)} = {_toml_value(v)}")
    for fl in sc.faults:
        body = _non_default(fl, keep=("kind",))
        params = body.pop("params", {})
        after = body.pop("after", None)
        lines += ["", "[[fault]]"]
        lines += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in {**body, **params}.items()]
        if after is not None:
            lines.append(f"after = {_toml_value(_non_default(after, keep=('event',)))}")
    return "\n".join(lines) + "\n"


def _non_default(obj: Any, keep: tuple[str, ...] = ()) -> dict[str, Any]:
    """A section's fields that differ from their defaults (and are not None), in order."""
    out: dict[str, Any] = {}
    for f in fields(obj):
        v = getattr(obj, f.name)
        if v is None:
            continue
        default = f.default_factory() if callable(f.default_factory) else f.default
        if f.name in keep or v != default:
            out[f.name] = v
    return out


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _toml_key(k: str) -> str:
    return k if _BARE_KEY.fullmatch(k) else _toml_str(k)


def _toml_str(s: str) -> str:
    # JSON's escapes are TOML's basic-string escapes; DEL must be escaped in TOML too.
    import json

    return json.dumps(s, ensure_ascii=False).replace("\x7f", "\\u007f")


def _toml_value(v: Any) -> str:
    """One TOML value, inline (tables as inline tables). Only what a scenario holds:
    strings, booleans, integers, finite floats, arrays and tables."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            raise ScenarioError(f"cannot write a non-finite number ({v!r}) to a scenario")
        return repr(v)  # shortest text that reads back to the same float
    if isinstance(v, str):
        return _toml_str(v)
    if isinstance(v, AnchorSpec):
        return _toml_value(_non_default(v, keep=("event",)))
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{_toml_key(str(k))} = {_toml_value(x)}"
                                 for k, x in v.items()) + " }" if v else "{}"
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise ScenarioError(f"cannot write {type(v).__name__} {v!r} to a scenario")

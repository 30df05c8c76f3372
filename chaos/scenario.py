"""Scenarios as data: TOML files naming workloads, faults, config and durations.

A scenario file is validated field by field; every error names the field
(``fault[2].kind: unknown fault 'kil_governor'; known: ...``) so that a typo
is a clear message and exit 254, never a run that silently tests something
else. Built-in scenarios live in ``chaos/scenarios/*.toml``.
"""

from __future__ import annotations

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
class FaultSpec:
    kind: str
    at: float = 0.0  # seconds after the workload starts
    duration: float = 0.0  # how long the fault stays on (0 = instant)
    every: float = 0.0  # repeat period (0 = once)
    target: str = "random"  # governor consumer name, "random" or "all"
    params: dict[str, Any] = field(default_factory=dict)


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
        s = self
        if seed is not None:
            s = replace(s, seed=seed)
        if duration_s is not None:
            if duration_s <= 0:
                raise ScenarioError("--duration must be > 0")
            s = replace(s, duration_s=duration_s)
        if governors is not None:
            if governors < 1:
                raise ScenarioError("--governors must be >= 1")
            s = replace(s, governors=governors)
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
        return parse(p.read_text(encoding="utf-8"), source=str(p))
    path = builtin_dir() / f"{name_or_path}.toml"
    if not path.is_file():
        raise ScenarioError(f"unknown scenario {str(name_or_path)!r}; known: "
                            f"{', '.join(builtin_names())}")
    return parse(path.read_text(encoding="utf-8"), source=str(path))


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
        return float(v)
    if t.startswith("str"):
        if not isinstance(v, str):
            raise ScenarioError(f"{where}: must be a string, got {v!r}")
        return v
    return v


def from_dict(raw: dict[str, Any], source: str | None = None) -> Scenario:
    raw = dict(raw)
    top = {f.name for f in fields(Scenario)} - {"workloads", "faults", "source"}
    allowed = top | {"workload", "fault"}
    for k in raw:
        if k not in allowed:
            raise ScenarioError(f"{k}: unknown field; known: {', '.join(sorted(allowed))}")
    if not isinstance(raw.get("name"), str) or not raw["name"]:
        raise ScenarioError("name: required, a non-empty string")
    kwargs: dict[str, Any] = {"name": raw["name"], "source": source}
    for k in ("description",):
        if k in raw:
            kwargs[k] = _coerce(raw[k], "str", k)
    if "exposure" in raw:
        kwargs["exposure"] = _coerce(raw["exposure"], "bool", "exposure")
    for k in ("duration_s",):
        if k in raw:
            kwargs[k] = _coerce(raw[k], "float", k)
            if kwargs[k] <= 0:
                raise ScenarioError(f"{k}: must be > 0")
    for k in ("seed", "governors"):
        if k in raw:
            kwargs[k] = _coerce(raw[k], "int", k)
    if kwargs.get("governors", 1) < 1:
        raise ScenarioError("governors: must be >= 1")
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
    m: MarketSpec = kwargs["market"]
    if m.regime not in ("BASE", "TREND_STRONG", "CHOP"):
        raise ScenarioError("market.regime: must be BASE, TREND_STRONG or CHOP")
    if not 1 <= m.symbols <= 1000:
        raise ScenarioError("market.symbols: must be within 1..1000")
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
    wl = raw.get("workload") or []
    if not isinstance(wl, list):
        raise ScenarioError("workload: must be an array of tables ([[workload]])")
    workloads = []
    for i, w in enumerate(wl):
        spec = _section(WorkloadSpec, w, f"workload[{i}]")
        if spec.kind not in WORKLOAD_KINDS:
            raise ScenarioError(f"workload[{i}].kind: unknown workload {spec.kind!r}; known: "
                                f"{', '.join(sorted(WORKLOAD_KINDS))}")
        if spec.processes < 1 or spec.rate < 0 or spec.symbols < 1:
            raise ScenarioError(f"workload[{i}]: processes >= 1, rate >= 0, symbols >= 1")
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
        if spec.at < 0 or spec.duration < 0 or spec.every < 0:
            raise ScenarioError(f"fault[{i}]: at, duration and every must be >= 0")
        if spec.kind == "failover" and r.topology != "sentinel":
            raise ScenarioError(f"fault[{i}].kind: failover needs redis.topology = 'sentinel'")
        if spec.kind in ("latency", "drop", "partition") and not r.proxy:
            raise ScenarioError(f"fault[{i}].kind: {spec.kind} needs redis.proxy = true")
        faults.append(spec)
    kwargs["workloads"] = tuple(workloads)
    kwargs["faults"] = tuple(faults)
    return Scenario(**kwargs)

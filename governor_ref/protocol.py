"""Records of the wire contract (docs/PROTOCOL.md) and the plan parser.

Everything that crosses a process boundary is a frozen dataclass with
explicit ``to_fields`` / ``from_fields`` (Redis stream fields) or
``to_json`` / ``from_json``. Enums name decisions, reasons, actions and
result statuses so that no component spells them on its own.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from decimal import Decimal, InvalidOperation
from enum import StrEnum
from typing import Any


class Action(StrEnum):
    OPEN = "OPEN"
    CLOSE = "CLOSE"


class Side(StrEnum):
    LONG = "LONG"
    SHORT = "SHORT"


class Decision(StrEnum):
    PERMIT = "PERMIT"
    BLOCK = "BLOCK"


class Reason(StrEnum):
    """Canonical block reasons (the seed's), plus the reference's own."""

    ACTIVE_SLOTS = "active_slots_waiting_rotation_close"
    CAPITAL_ALLOCATION = "capital_allocation_exceeded"
    NOTIONAL_CAP = "notional_cap_exceeded"
    TOTAL_NOTIONAL_CAP = "total_notional_cap_exceeded"
    EXIT_LOCK_BUSY = "exit_lock_busy_double_close_prevention"
    DRIFT_POSITION_COUNT = "state_drift_position_count"
    DRIFT_EXPOSURE = "state_drift_exposure"
    INTENT_STALE = "intent_stale"
    DUPLICATE_OPEN = "duplicate_open"
    NO_OPEN_POSITION = "no_open_position"
    INVALID_PLAN = "invalid_plan"
    # Reference extension: the governor cannot read numeric limits from its config.
    CONFIG_INVALID = "config_invalid"


class ResultStatus(StrEnum):
    EXECUTED = "executed"
    REJECTED = "rejected"
    EXPIRED = "expired"


class Regime(StrEnum):
    BASE = "BASE"
    TREND_STRONG = "TREND_STRONG"
    CHOP = "CHOP"


PLAN_ID_RE = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
SYMBOL_RE = re.compile(r"[A-Z0-9]{2,20}")
DECIMAL_RE = re.compile(r"-?[0-9]+(\.[0-9]+)?")
INT_RE = re.compile(r"[0-9]{1,18}")
SOURCE_RE = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
# A plan id this long or longer is not worth answering: it cannot be a key.
MAX_BLOCKABLE_PLAN_ID = 256


class PlanError(ValueError):
    """A plan that breaks the contract. ``plan_id`` is set when it can still be answered."""

    def __init__(self, message: str, plan_id: str | None = None, symbol: str = "",
                 action: str = "") -> None:
        super().__init__(message)
        self.plan_id = plan_id
        # As given, when printable and short: echoed in the BLOCK event for people to read.
        self.symbol = symbol if symbol.isprintable() and len(symbol) <= 64 else ""
        self.action = action if action.isprintable() and len(action) <= 16 else ""


def _decode(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8")  # UnicodeDecodeError is a ValueError
    return str(value)


def _decimal(name: str, raw: str, *, positive: bool = False) -> str:
    if not DECIMAL_RE.fullmatch(raw):
        raise ValueError(f"{name} is not a plain decimal: {raw[:40]!r}")
    try:
        value = Decimal(raw)
    except InvalidOperation as exc:  # pragma: no cover - the regex rules it out
        raise ValueError(f"{name} is not a decimal: {raw[:40]!r}") from exc
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0, got {raw[:40]!r}")
    if not math.isfinite(float(value)):
        raise ValueError(f"{name} is out of range")
    return raw


@dataclass(frozen=True)
class Plan:
    """One entry of ``P:stream:apply.plan``."""

    plan_id: str
    symbol: str
    action: Action
    source: str
    intent_created_at_ms: int
    side: Side | None = None
    notional: str | None = None
    snapshot_position_count: int | None = None
    snapshot_exposure_pct: str | None = None
    position_id: str | None = None

    def to_fields(self) -> dict[str, str]:
        out: dict[str, str] = {
            "plan_id": self.plan_id,
            "symbol": self.symbol,
            "action": str(self.action),
            "source": self.source,
            "intent_created_at_ms": str(self.intent_created_at_ms),
        }
        if self.side is not None:
            out["side"] = str(self.side)
        if self.notional is not None:
            out["notional"] = self.notional
        if self.snapshot_position_count is not None:
            out["snapshot_position_count"] = str(self.snapshot_position_count)
        if self.snapshot_exposure_pct is not None:
            out["snapshot_exposure_pct"] = self.snapshot_exposure_pct
        if self.position_id is not None:
            out["position_id"] = self.position_id
        return out

    @classmethod
    def from_fields(cls, raw: Mapping[Any, Any]) -> Plan:
        """Parse and validate stream fields; raise :class:`PlanError` on any breach."""
        plan_id: str | None = None
        try:
            fields_ = {_decode(k): _decode(v) for k, v in raw.items()}
        except (UnicodeDecodeError, ValueError) as exc:
            pid = raw.get(b"plan_id", raw.get("plan_id"))
            try:
                plan_id = _decode(pid) if pid is not None else None
            except ValueError:
                plan_id = None
            raise PlanError(f"undecodable field: {exc}", _blockable(plan_id)) from exc
        plan_id = fields_.get("plan_id")
        try:
            return cls._parse(fields_)
        except (ValueError, KeyError) as exc:
            msg = f"missing field {exc}" if isinstance(exc, KeyError) else str(exc)
            raise PlanError(msg, _blockable(plan_id), fields_.get("symbol", ""),
                            fields_.get("action", "")) from exc

    @classmethod
    def _parse(cls, f: dict[str, str]) -> Plan:
        plan_id = f["plan_id"]
        if not PLAN_ID_RE.fullmatch(plan_id):
            raise ValueError(f"plan_id does not match {PLAN_ID_RE.pattern}")
        symbol = f["symbol"]
        if not SYMBOL_RE.fullmatch(symbol):
            raise ValueError(f"symbol does not match {SYMBOL_RE.pattern}: {symbol[:40]!r}")
        action = Action(f["action"])
        source = f["source"]
        if not SOURCE_RE.fullmatch(source):
            raise ValueError(f"source is not a name: {source[:40]!r}")
        created = f["intent_created_at_ms"]
        if not INT_RE.fullmatch(created):
            raise ValueError(f"intent_created_at_ms is not an integer: {created[:40]!r}")
        side = notional = None
        if action is Action.OPEN:
            side = Side(f["side"])
            notional = _decimal("notional", f["notional"], positive=True)
        elif "side" in f and f["side"] not in ("", *Side):
            raise ValueError(f"side is not LONG or SHORT: {f['side'][:40]!r}")
        snap_count = None
        if f.get("snapshot_position_count", "") != "":
            raw_count = f["snapshot_position_count"]
            if not INT_RE.fullmatch(raw_count):
                raise ValueError("snapshot_position_count is not a non-negative integer")
            snap_count = int(raw_count)
        snap_exp = None
        if f.get("snapshot_exposure_pct", "") != "":
            snap_exp = _decimal("snapshot_exposure_pct", f["snapshot_exposure_pct"])
        position_id = f.get("position_id") or None
        if position_id is not None and not PLAN_ID_RE.fullmatch(position_id):
            raise ValueError("position_id is not an id")
        return cls(
            plan_id=plan_id,
            symbol=symbol,
            action=action,
            source=source,
            intent_created_at_ms=int(created),
            side=side,
            notional=notional,
            snapshot_position_count=snap_count,
            snapshot_exposure_pct=snap_exp,
            position_id=position_id,
        )


def _blockable(plan_id: str | None) -> str | None:
    if plan_id and len(plan_id) <= MAX_BLOCKABLE_PLAN_ID and plan_id.isprintable():
        return plan_id
    return None


@dataclass(frozen=True)
class DecisionEvent:
    """One entry of ``P:stream:governor.events``."""

    plan_id: str
    symbol: str
    action: str
    decision: str
    reason: str
    governor: str
    decided_at_ms: int
    fence: str | None = None
    entry_id: str | None = None  # the stream id: Redis time of the decision

    @classmethod
    def from_fields(cls, raw: Mapping[str, str], entry_id: str | None = None) -> DecisionEvent:
        return cls(
            plan_id=raw.get("plan_id", ""),
            symbol=raw.get("symbol", ""),
            action=raw.get("action", ""),
            decision=raw.get("decision", ""),
            reason=raw.get("reason", ""),
            governor=raw.get("governor", ""),
            decided_at_ms=int(raw.get("decided_at_ms", "0") or 0),
            fence=raw.get("fence") or None,
            entry_id=entry_id,
        )

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> DecisionEvent:
        return cls(**json.loads(text))


@dataclass(frozen=True)
class Permit:
    """``P:permit:{plan_id}``: written by the governor, taken once by the apply layer."""

    plan_id: str
    symbol: str
    action: str
    side: str
    notional: str
    fence: str
    issued_at_ms: int

    @classmethod
    def from_json(cls, text: str | bytes) -> Permit:
        d = json.loads(text)
        return cls(
            plan_id=d["plan_id"],
            symbol=d["symbol"],
            action=d["action"],
            side=d.get("side") or "",
            notional=str(d.get("notional") or "0"),
            fence=str(d.get("fence") or ""),
            issued_at_ms=int(d["issued_at_ms"]),
        )

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))


@dataclass(frozen=True)
class ExecutionResult:
    """One entry of ``P:stream:apply.result``."""

    plan_id: str
    symbol: str
    action: str
    status: ResultStatus
    position_id: str = ""
    notional: str = ""
    fence: str = ""
    reason: str = ""
    executed_at_ms: int = 0

    def to_fields(self) -> dict[str, str]:
        return {f.name: str(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_fields(cls, raw: Mapping[str, str]) -> ExecutionResult:
        return cls(
            plan_id=raw["plan_id"],
            symbol=raw.get("symbol", ""),
            action=raw.get("action", ""),
            status=ResultStatus(raw["status"]),
            position_id=raw.get("position_id", ""),
            notional=raw.get("notional", ""),
            fence=raw.get("fence", ""),
            reason=raw.get("reason", ""),
            executed_at_ms=int(raw.get("executed_at_ms") or 0),
        )


@dataclass(frozen=True)
class GovernorConfig:
    """``P:governor:config``. Defaults are the seed's; ``decision_memory_ms`` is ours.

    The Lua prelude (``lua/lib.lua``, ``DEFAULTS``) carries the same defaults;
    tests/test_keys.py checks that they agree.
    """

    mode: str = "testnet"
    slots_BASE: int = 4  # noqa: N815 - field names are the protocol's
    slots_TREND_STRONG: int = 6  # noqa: N815
    slots_CHOP: int = 3  # noqa: N815
    max_positions: int = 10
    max_notional_per_trade: float = 200
    max_total_notional: float = 2000
    enforce_allocation: int = 1
    max_intent_age_ms: int = 30000
    max_position_drift: int = 2
    max_exposure_drift: float = 0.15
    permit_ttl_ms: int = 60000
    exit_lock_ttl_ms: int = 120000
    rotation_lock_ttl_ms: int = 120000
    capital_reservation_ttl_ms: int = 600000
    # How long the governor remembers a decision and an applied result
    # (idempotency against redelivery). Extension of the contract.
    decision_memory_ms: int = 604_800_000
    extra: dict[str, str] = field(default_factory=dict, compare=False)

    def slots_for(self, regime: str) -> int:
        value = {"BASE": self.slots_BASE, "TREND_STRONG": self.slots_TREND_STRONG,
                 "CHOP": self.slots_CHOP}.get(regime)
        if value is None:
            value = min(self.slots_BASE, self.slots_TREND_STRONG, self.slots_CHOP)
        return min(value, self.max_positions)

    def to_hash(self) -> dict[str, str]:
        out = {}
        for f in fields(self):
            if f.name == "extra":
                continue
            v = getattr(self, f.name)
            out[f.name] = _num_str(v) if not isinstance(v, str) else v
        out.update(self.extra)
        return out

    @classmethod
    def from_hash(cls, raw: Mapping[Any, Any]) -> GovernorConfig:
        """Parse a config hash; raise ``ValueError`` naming the bad field."""
        data = {_decode(k): _decode(v) for k, v in raw.items()}
        kwargs: dict[str, Any] = {}
        extra: dict[str, str] = {}
        known = {f.name: f for f in fields(cls) if f.name != "extra"}
        for name, value in data.items():
            f = known.get(name)
            if f is None:
                extra[name] = value
                continue
            if name == "mode":
                if value not in ("testnet", "production"):
                    raise ValueError(f"config field mode must be testnet or production: {value!r}")
                kwargs[name] = value
                continue
            try:
                num = float(value)
            except ValueError:
                raise ValueError(f"config field {name} is not a number: {value!r}") from None
            if not math.isfinite(num) or num < 0:
                raise ValueError(f"config field {name} must be a finite number >= 0: {value!r}")
            kwargs[name] = int(num) if f.type in ("int", int) else num
        return cls(**kwargs, extra=extra)


def _num_str(v: float | int) -> str:
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)

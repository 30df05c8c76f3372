"""Deciding from Python, one Redis command at a time: the base of the designs under audit.

The reference governor decides in one Lua step. The seed design and the
legacy governor it replaced are Python services that read and write Redis in
separate round trips; that non-atomicity is exactly what the audit is about,
so nothing here may wrap their steps in MULTI, a pipeline transaction or
Lua. What is shared by both designs lives here:

* :class:`DecisionWriter`: the protocol's output order (permit key, then the
  decision event, then the XACK), as three plain commands;
* :class:`Mirror`: the exchange's positions as the harness mirrors them
  (``P:position:*``), the seed's "real Binance position count";
* :class:`StepwiseLogic`: the plan loop of a Python governor (config per
  batch, invalid plans, one decision per entry) and the gates that predate
  the seed's fixes and that both designs therefore share (duplicate open,
  close of a flat symbol, the testnet fund caps, the P2.9 allocation check,
  rotation of the weakest position).
"""

from __future__ import annotations

import json
import logging
import time

import redis

from .governor import Context, Outcome, PlanEntry, ResultEntry, decode_fields
from .keys import GROUP_GOVERNOR, GROUP_GOVERNOR_RESULTS, Keys
from .protocol import Action, Decision, ExecutionResult, GovernorConfig, Permit, Plan, Reason

log = logging.getLogger(__name__)


def now_ms() -> int:
    """The governor host's clock, as the seed's ``time.time()`` (not Redis TIME)."""
    return int(time.time() * 1000)


def _text(value: bytes | str | None) -> str | None:
    if value is None:
        return None
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def load_config(r: redis.Redis, keys: Keys) -> GovernorConfig:
    """``P:governor:config`` with the seed's defaults.

    The seed hard-codes its limits (10 positions, $200/trade, 30 s...), so a
    config that cannot be parsed falls back to those constants rather than
    stopping the governor: the seed has no notion of an unreadable config.
    """
    raw = r.hgetall(keys.config)
    try:
        return GovernorConfig.from_hash(raw)
    except ValueError as exc:
        log.warning("governor config unreadable (%s); using the seed's built-in limits", exc)
        return GovernorConfig()


def as_float(value: str | bytes | None) -> float | None:
    """A number read from Redis, or None when it is missing or not a number."""
    text = _text(value)
    if text is None:
        return None
    try:
        return float(text)
    except ValueError:
        return None


SCAN_COUNT = 500  # keys a SCAN call walks


class Mirror:
    """The exchange's open positions as mirrored in ``P:position:{symbol}`` (read by SCAN)."""

    def __init__(self, r: redis.Redis, keys: Keys) -> None:
        self.r, self.keys = r, keys
        self._strip = len(keys.position(""))

    def symbols(self) -> list[str]:
        return sorted(self.sweep()[0])

    def sweep(self, cursor: int = 0, budget: int | None = None) -> tuple[set[str], int]:
        """The symbols of the mirror keys a SCAN finds from ``cursor`` on, to the end of
        the sweep or, with ``budget``, once about that many keys were walked (SCAN walks
        the whole keyspace whatever its MATCH: every decision record, every other
        system's key on a shared Redis). Returns them and the cursor to go on from (0:
        the sweep is complete)."""
        found: set[str] = set()
        walked = 0
        while True:
            cursor, batch = self.r.scan(cursor, match=self.keys.position_pattern,
                                        count=SCAN_COUNT)
            found.update((_text(k) or "")[self._strip:] for k in batch)
            walked += SCAN_COUNT
            if cursor == 0 or (budget is not None and walked >= budget):
                return found, int(cursor)

    def count(self) -> int:
        return len(self.symbols())

    def exists(self, symbol: str) -> bool:
        return bool(self.r.exists(self.keys.position(symbol)))

    def position(self, symbol: str) -> dict[str, str]:
        return decode_fields(self.r.hgetall(self.keys.position(symbol)))

    def positions(self) -> dict[str, dict[str, str]]:
        symbols = self.symbols()
        pipe = self.r.pipeline(transaction=False)  # reads only; each HGETALL stands alone
        for s in symbols:
            pipe.hgetall(self.keys.position(s))
        return {s: decode_fields(h) for s, h in zip(symbols, pipe.execute(), strict=True) if h}

    def total_notional(self) -> float:
        return sum(as_float(p.get("notional")) or 0.0 for p in self.positions().values())


class DecisionWriter:
    """Writes one decision in the protocol's order, each step its own round trip.

    Permit key before the decision event (the apply layer must find the permit
    when it sees the PERMIT), event before the XACK (a governor killed in
    between leaves the plan pending, to be decided again: the designs under
    audit keep no decision record, so that second decision is theirs to get
    right or wrong).
    """

    def __init__(self, r: redis.Redis, keys: Keys, consumer: str) -> None:
        self.r, self.keys, self.consumer = r, keys, consumer

    def permit(self, entry_id: str, plan: Plan, side: str, notional: str,
               cfg: GovernorConfig) -> Outcome:
        now = now_ms()
        permit = Permit(plan_id=plan.plan_id, symbol=plan.symbol, action=str(plan.action),
                        side=side, notional=notional, fence="", issued_at_ms=now)
        self.r.set(self.keys.permit(plan.plan_id), permit.to_json(),
                   px=max(1, cfg.permit_ttl_ms))
        self._event(plan.plan_id, plan.symbol, str(plan.action), Decision.PERMIT, "", now)
        self.ack(entry_id)
        return Outcome(plan.plan_id, str(Decision.PERMIT))

    def block(self, entry_id: str, plan_id: str, symbol: str, action: str,
              reason: str) -> Outcome:
        self._event(plan_id, symbol, action, Decision.BLOCK, reason, now_ms())
        self.ack(entry_id)
        return Outcome(plan_id, str(Decision.BLOCK), reason)

    def _event(self, plan_id: str, symbol: str, action: str, decision: Decision, reason: str,
               now: int) -> None:
        # No fence field: neither design has fencing tokens.
        self.r.xadd(self.keys.events, {
            "plan_id": plan_id, "symbol": symbol, "action": action, "decision": str(decision),
            "reason": reason, "governor": self.consumer, "decided_at_ms": str(now)})

    def ack(self, entry_id: str) -> None:
        self.r.xack(self.keys.plans, GROUP_GOVERNOR, entry_id)

    def ack_result(self, entry_id: str) -> None:
        self.r.xack(self.keys.results, GROUP_GOVERNOR_RESULTS, entry_id)


class StepwiseLogic:
    """A governor that decides in Python with one Redis round trip per step.

    Subclasses implement :meth:`evaluate` (one parsed plan, answered with
    ``self.writer.permit`` or :meth:`block`) and may override :meth:`on_result`,
    :meth:`start` and :meth:`periodic`.
    """

    thread_safe = False  # Python-side state and multi-step decisions: one plan loop

    name = "stepwise"

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.r = ctx.r
        self.keys = ctx.keys
        self.mirror = Mirror(ctx.r, ctx.keys)
        self.writer = DecisionWriter(ctx.r, ctx.keys, ctx.consumer)

    # -- DecisionLogic ---------------------------------------------------------------
    def start(self) -> None:
        """Nothing to prepare by default."""

    def periodic(self) -> None:
        """Neither design has housekeeping."""

    def decide(self, entries: list[PlanEntry]) -> list[Outcome]:
        cfg = load_config(self.r, self.keys)  # re-read per batch
        return [self._decide_one(e, cfg) for e in entries]

    def settle(self, entries: list[ResultEntry]) -> None:
        for e in entries:
            try:
                result = ExecutionResult.from_fields(e.fields)
            except (KeyError, ValueError):
                log.warning("unreadable result %s: %s", e.entry_id, e.fields)
            else:
                self.on_result(result)
            self.writer.ack_result(e.entry_id)

    # -- hooks ----------------------------------------------------------------------
    def evaluate(self, entry_id: str, plan: Plan, cfg: GovernorConfig) -> Outcome:
        raise NotImplementedError

    def block(self, entry_id: str, plan: Plan, reason: Reason, detail: str = "") -> Outcome:
        log.warning("%s: BLOCKED plan %s - %s", plan.symbol, plan.plan_id, detail or reason)
        return self.writer.block(entry_id, plan.plan_id, plan.symbol, str(plan.action),
                                 str(reason))

    def on_result(self, result: ExecutionResult) -> None:
        """What an execution result changes (nothing by default)."""

    # -- shared steps ------------------------------------------------------------------
    def _decide_one(self, e: PlanEntry, cfg: GovernorConfig) -> Outcome:
        if e.plan is not None:
            return self.evaluate(e.entry_id, e.plan, cfg)
        err = e.error
        if err is None or err.plan_id is None:
            self.writer.ack(e.entry_id)  # nothing to answer to
            return Outcome(None, "NONE")
        log.warning("%s: BLOCKED plan %s - %s (%s)", err.symbol, err.plan_id,
                    Reason.INVALID_PLAN, err)
        return self.writer.block(e.entry_id, err.plan_id, err.symbol, err.action,
                                 str(Reason.INVALID_PLAN))

    def regime(self) -> str:
        return _text(self.r.get(self.keys.regime)) or ""

    def fund_caps(self, plan: Plan, cfg: GovernorConfig) -> Reason | None:
        """The testnet fund caps ($/trade, $ total), against the mirror's open notional."""
        notional = float(plan.notional or 0)
        if notional > cfg.max_notional_per_trade:
            return Reason.NOTIONAL_CAP
        if self.mirror.total_notional() + notional > cfg.max_total_notional:
            return Reason.TOTAL_NOTIONAL_CAP
        return None

    def allocation_limit(self, symbol: str) -> float | None:
        """capital x allocation_pct (two GETs), or None when either is missing or unreadable."""
        try:
            alloc_info = json.loads(self.r.get(self.keys.allocation(symbol)) or "")
            target_pct = float(alloc_info["allocation_pct"])
        except (ValueError, KeyError, TypeError):
            return None
        capital = as_float(self.r.get(self.keys.capital))
        return None if capital is None else capital * target_pct

    def rotate(self, plan: Plan, cfg: GovernorConfig) -> str | None:
        """Emit a rotation CLOSE of the weakest open position, under a per-plan rotation lock.

        The lock is ``P:rotation:lock:{plan_id}`` as the seed names it, keyed by
        the plan that found no slot: it only stops the same plan from rotating
        twice. Every check and write here is its own round trip.
        """
        sym = plan.symbol
        lock_key = self.keys.rotation_lock_for(plan.plan_id)
        if self.r.exists(lock_key):
            log.info("%s: Rotation lock held - waiting for rotation close", sym)
            return None
        log.info("%s: No rotation lock - initiating rotation", sym)
        candidates = [(as_float(p.get("pnl_pct")) or 0.0, s, p)
                      for s, p in self.mirror.positions().items()]
        if not candidates:
            log.info("%s: No open position to rotate out", sym)
            return None
        pnl, weakest, pos = min(candidates, key=lambda c: (c[0], c[1]))
        log.info("%s: Weakest position: %s (weakness=%.4f, pnl=%.2f%%)", sym, weakest,
                 -pnl / 100, pnl)
        rot_id = f"rot_{plan.plan_id}"[:64]
        now = now_ms()
        rotation = Plan(plan_id=rot_id, symbol=weakest, action=Action.CLOSE, source="rotation",
                        intent_created_at_ms=now, position_id=pos.get("position_id") or None)
        self.r.xadd(self.keys.plans, rotation.to_fields())
        log.info("%s: ROTATION CLOSE emitted for %s (plan_id=%s)", sym, weakest, rot_id)
        ttl_ms = max(1, cfg.rotation_lock_ttl_ms)
        self.r.set(lock_key, json.dumps({"plan_id": plan.plan_id, "symbol": sym,
                                         "rotation_plan_id": rot_id, "close_symbol": weakest,
                                         "created_at_ms": now}), px=ttl_ms)
        log.info("%s: ROTATION LOCK created (TTL=%gs)", sym, ttl_ms / 1000)
        return rot_id

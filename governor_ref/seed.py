"""The seed design, exactly as ``seed/atomic-position-enforcement.md`` writes it.

This is a design under audit, not a governor to deploy. It is implemented
literally, weaknesses included, so that the harness can find on its own what
is wrong with it; nothing here is improved and nothing is made to fail. Each
step is a separate Redis command, as in the seed's Python. Method names are
the seed's; ``Lnn`` in the comments is the line of the seed document each
behaviour comes from. Where the seed is silent, docs/variants.md lists the
literal reading taken.

In one sentence: a slot counter (``P:slots:available``) set at start-up to
desired minus open, taken with DECR (rolled back with INCR when negative) and
given back with INCR when a CLOSE executes; a per-symbol capital reservation
(INCRBY ``int(notional)`` + EXPIRE) after a single-trade allocation check; an
exit lock taken with SETNX then EXPIRE and DELETEd when the close executes;
an in-memory ``reservations`` dict that rolls all of it back on BLOCK; stale
intents only logged; snapshot drift blocked.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from .decisions import StepwiseLogic, as_float, load_config
from .governor import Context, Outcome
from .protocol import Action, ExecutionResult, GovernorConfig, Plan, Reason, ResultStatus

log = logging.getLogger(__name__)


class SeedLogic(StepwiseLogic):
    name = "seed"

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx)
        # L269-276: reservation tracking per plan, in this process's memory only.
        self.reservations: dict[str, dict[str, Any]] = {}

    # -- start-up ---------------------------------------------------------------------
    def start(self) -> None:
        self._init_slot_semaphore(load_config(self.r, self.keys))

    def _init_slot_semaphore(self, cfg: GovernorConfig) -> None:
        """L26-29, L47: ``available = desired - current_open``, SET once, at start-up.

        Every instance that starts SETs the counter again, over whatever the
        running instances have reserved; a regime change takes effect only
        here, i.e. at the next start-up.
        """
        regime = self.regime()
        desired = cfg.slots_for(regime)  # L27 detect_regime -> BASE(4), TREND_STRONG(6), CHOP(3)
        current_open = self.mirror.count()  # L47 "real Binance position count"
        available = desired - current_open
        self.r.set(self.keys.slots_desired, desired)  # L240
        self.r.set(self.keys.slots_available, available)  # L29
        log.info("Slot semaphore initialized: regime=%s desired=%d open=%d available=%d",
                 regime or "?", desired, current_open, available)

    # -- plans -------------------------------------------------------------------------
    def evaluate(self, entry_id: str, plan: Plan, cfg: GovernorConfig) -> Outcome:
        return self._evaluate_plan(entry_id, plan, cfg)

    def _evaluate_plan(self, entry_id: str, plan: Plan, cfg: GovernorConfig) -> Outcome:
        sym = plan.symbol
        # L160-162: intent age is only logged, never blocked; host clock.
        intent_age = time.time() - plan.intent_created_at_ms / 1000
        if intent_age * 1000 > cfg.max_intent_age_ms:
            logged = cfg.max_intent_age_ms / 1000
            log.warning("%s: Intent stale (>%gs) - plan %s age %.1fs", sym, logged,
                        plan.plan_id, intent_age)
        drift = self._check_state_drift(plan, cfg)
        if drift is not None:
            return self._block_plan(entry_id, plan, *drift)
        if plan.action is Action.OPEN:
            return self._evaluate_open(entry_id, plan, cfg)
        return self._evaluate_close(entry_id, plan, cfg)

    def _check_state_drift(self, plan: Plan, cfg: GovernorConfig) -> tuple[Reason, str] | None:
        """L164-170, L178: drift checks, each skipped when the plan has no snapshot field."""
        sym = plan.symbol
        if plan.snapshot_position_count is not None:
            snap = plan.snapshot_position_count
            current = self.mirror.count()  # L164 _get_open_positions_snapshot()
            diff = abs(current - snap)
            if diff > cfg.max_position_drift:
                log.warning("%s: Position count drift detected! Intent snapshot: %d, Current: %d "
                            "(diff: %d) - BLOCKING (fail-closed)", sym, snap, current, diff)
                why = Reason.DRIFT_POSITION_COUNT
                return why, f"{why}:{snap}→{current}"
        if plan.snapshot_exposure_pct is not None:
            snap_exp = float(plan.snapshot_exposure_pct)
            current_exposure = as_float(self.r.get(self.keys.exposure_pct))  # L168
            if current_exposure is None:
                # L169 would raise on a missing value; L177 says the gate fails closed.
                log.warning("%s: Exposure unreadable - BLOCKING (fail-closed)", sym)
                return Reason.DRIFT_EXPOSURE, f"{Reason.DRIFT_EXPOSURE}:{snap_exp}→?"
            diff_exp = abs(current_exposure - snap_exp)
            if diff_exp > cfg.max_exposure_drift:
                log.warning("%s: Exposure drift detected! Intent snapshot: %s, Current: %s "
                            "(diff: %.4f) - BLOCKING (fail-closed)", sym, snap_exp,
                            current_exposure, diff_exp)
                why = Reason.DRIFT_EXPOSURE
                return why, f"{why}:{snap_exp}→{current_exposure}"
        return None

    def _evaluate_open(self, entry_id: str, plan: Plan, cfg: GovernorConfig) -> Outcome:
        sym, pid = plan.symbol, plan.plan_id
        if self.mirror.exists(sym):  # seed silent: the exchange's view, as for L47
            return self._block_plan(entry_id, plan, Reason.DUPLICATE_OPEN)
        log.info("%s: Active Slots enabled - checking position limits (ATOMIC)", sym)
        if not self._reserve_slot_atomic(pid):
            log.info("%s: No atomic slots available - checking rotation", sym)
            self.rotate(plan, cfg)  # L37 "Initiate rotation", L389-393
            return self._block_plan(entry_id, plan, Reason.ACTIVE_SLOTS)
        self.reservations.setdefault(pid, {})["slot"] = True  # L272
        log.info("%s: Atomic slot reserved for plan %s", sym, pid)
        # L206-210, L215: the testnet fund caps, in both modes.
        why = self.fund_caps(plan, cfg)
        if why is not None:
            return self._block_plan(entry_id, plan, why)
        # L202, L211, L216, L223: capital reservation in production, optional in testnet.
        if (cfg.mode == "production" or cfg.enforce_allocation) and \
                not self._reserve_capital_atomic(pid, sym, float(plan.notional or 0), cfg):
            return self._block_plan(entry_id, plan, Reason.CAPITAL_ALLOCATION)
        return self.writer.permit(entry_id, plan, str(plan.side or ""), plan.notional or "0", cfg)

    def _evaluate_close(self, entry_id: str, plan: Plan, cfg: GovernorConfig) -> Outcome:
        sym = plan.symbol
        position = self.mirror.position(sym)  # seed silent: the exchange's view, as for L47
        if not position:
            return self._block_plan(entry_id, plan, Reason.NO_OPEN_POSITION)
        if not self._acquire_exit_lock(sym, plan.plan_id, cfg):  # L135, L199-200
            return self._block_plan(entry_id, plan, Reason.EXIT_LOCK_BUSY)
        self.reservations.setdefault(plan.plan_id, {})["exit_lock"] = sym  # L274
        return self.writer.permit(entry_id, plan, position.get("side", ""),
                                  position.get("notional", "0"), cfg)

    # -- FIX #1: slots ---------------------------------------------------------------------
    def _reserve_slot_atomic(self, plan_id: str) -> bool:
        """L31-37: DECR; when the result is negative, INCR back (a second round trip)."""
        new_available = int(self.r.decr(self.keys.slots_available))
        if new_available >= 0:
            log.info("Slot reserved for plan %s (%d remaining)", plan_id, new_available)
            return True
        self.r.incr(self.keys.slots_available)  # L36 rollback
        log.warning("No slots available for plan %s (rollback)", plan_id)
        return False

    def _release_slot_atomic(self, plan_id: str, reason: str) -> None:
        """L39-40: INCR, unconditionally (no record of which plan holds which slot)."""
        available = int(self.r.incr(self.keys.slots_available))
        log.info("Slot released for plan %s (%d available) - reason: %s", plan_id, available,
                 reason)

    # -- FIX #2: capital -------------------------------------------------------------------
    def _reserve_capital_atomic(self, plan_id: str, symbol: str, notional: float,
                                cfg: GovernorConfig) -> bool:
        """L68-85: the single trade against capital x allocation_pct, then INCRBY + EXPIRE.

        The reserved sum is never read back by any gate (L77 compares the one
        trade only), and ``int(notional)`` drops the cents (L82).
        """
        max_notional = self.allocation_limit(symbol)  # L70-75: GET allocation, GET capital
        if max_notional is None:
            # L71/L74 would raise on a missing key; L92 says the gate fails closed.
            log.warning("%s: no P2.9 allocation target or capital - fail-closed (plan %s)",
                        symbol, plan_id)
            return False
        if notional > max_notional:  # L77
            log.warning("%s: Capital allocation exceeded: $%.2f > $%.2f (plan %s)", symbol,
                        notional, max_notional, plan_id)
            return False
        reserve_key = self.keys.capital_reserved(symbol)
        self.r.incrby(reserve_key, int(notional))  # L82
        self.r.pexpire(reserve_key, max(1, cfg.capital_reservation_ttl_ms))  # L83
        self.reservations.setdefault(plan_id, {})["capital"] = notional  # L273
        log.info("Capital reserved: $%.2f for %s (plan %s)", notional, symbol, plan_id)
        return True

    def _release_capital_atomic(self, plan_id: str, symbol: str) -> None:
        """L97: DECRBY what this process reserved for the plan (its ``reservations`` entry)."""
        reserved = self.reservations.get(plan_id, {}).get("capital")
        if reserved is None:
            return  # reserved by another process, or before a restart: left to the TTL (L91)
        self.r.decrby(self.keys.capital_reserved(symbol), int(reserved))
        log.info("Capital released: $%.2f for %s (plan %s)", reserved, symbol, plan_id)

    # -- FIX #3: exit lock -----------------------------------------------------------------
    def _acquire_exit_lock(self, symbol: str, plan_id: str, cfg: GovernorConfig) -> bool:
        """L112-122: SETNX, then EXPIRE in a second command; L130: log the holder."""
        lock_key = self.keys.exit_lock(symbol)
        if self.r.setnx(lock_key, plan_id):
            self.r.pexpire(lock_key, max(1, cfg.exit_lock_ttl_ms))  # L118
            log.info("Exit lock acquired for %s (plan %s)", symbol, plan_id)
            return True
        holder = self.r.get(lock_key)
        log.warning("Exit lock busy for %s (held by %s)", symbol,
                    holder.decode() if isinstance(holder, bytes) else holder)
        return False

    def _release_exit_lock(self, symbol: str, plan_id: str) -> None:
        """L128, L290-291: plain DELETE, whoever holds the lock now."""
        self.r.delete(self.keys.exit_lock(symbol))
        log.info("Exit lock released for %s (plan %s)", symbol, plan_id)

    # -- rollback ------------------------------------------------------------------------
    def _block_plan(self, entry_id: str, plan: Plan, reason: Reason, detail: str = "") -> Outcome:
        """L278-293: give back everything this plan reserved, then BLOCK it."""
        reservations = self.reservations.pop(plan.plan_id, None)
        if reservations:
            if reservations.get("slot"):
                self.r.incr(self.keys.slots_available)
            if "capital" in reservations:
                # L287 passes the float (150.50); Redis DECRBY takes an integer, so
                # we give back int() of it, the amount L82 INCRBY'd.
                self.r.decrby(self.keys.capital_reserved(plan.symbol),
                              int(reservations["capital"]))
            if "exit_lock" in reservations:
                self.r.delete(self.keys.exit_lock(plan.symbol))
        return self.block(entry_id, plan, reason, detail)

    # -- results (the background result monitor, L46, L54) ----------------------------------
    def on_result(self, result: ExecutionResult) -> None:
        pid, sym = result.plan_id, result.symbol
        if result.action == Action.CLOSE and result.status == ResultStatus.EXECUTED:
            # L46: release slots when closes execute; L128: exit lock released on execution.
            log.info("%s: Position CLOSED (plan %s) - releasing slot", sym, pid)
            self._release_slot_atomic(pid, "position_closed")
            self._release_exit_lock(sym, pid)
        elif result.action == Action.OPEN:
            # The reservation covered the order until it ran (or failed): release it.
            self._release_capital_atomic(pid, sym)
        self.reservations.pop(pid, None)

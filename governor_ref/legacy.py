"""The legacy governor: the design before the seed's fixes ("Problem (Original)").

A design under audit, implemented literally from the seed's descriptions of
what was wrong before (seed L17-20, L60-63, L104-107, L141-144, L190-193):

* the open-position count is a SCAN of ``P:position:*`` (L18), compared with
  the desired slots of the regime read at decision time; nothing counts an
  OPEN that is permitted but not executed yet;
* no exit lock (L105): a CLOSE is permitted whenever the mirror shows the
  symbol open, so sequential closes are safe and simultaneous ones are not
  (L107 calls the double close a race condition, which presupposes that);
* no capital pre-reservation (L61): the fund caps and the allocation check
  read only the mirror;
* state evaluated at execution time, not intent time (L142): no intent-age
  and no snapshot-drift checks.

Rotation and the duplicate-open check predate the fixes (L250-251 list the
rotation lock among "Existing Keys") and are shared with the seed variant.
"""

from __future__ import annotations

import logging

from .decisions import StepwiseLogic
from .governor import Outcome
from .protocol import Action, GovernorConfig, Plan, Reason

log = logging.getLogger(__name__)


class LegacyLogic(StepwiseLogic):
    name = "legacy"

    def evaluate(self, entry_id: str, plan: Plan, cfg: GovernorConfig) -> Outcome:
        if plan.action is Action.OPEN:
            return self._evaluate_open(entry_id, plan, cfg)
        return self._evaluate_close(entry_id, plan, cfg)

    def _evaluate_open(self, entry_id: str, plan: Plan, cfg: GovernorConfig) -> Outcome:
        sym = plan.symbol
        if self.mirror.exists(sym):
            return self.block(entry_id, plan, Reason.DUPLICATE_OPEN)
        open_count = self.mirror.count()  # L18: SCAN quantum:position:*
        desired = cfg.slots_for(self.regime())
        log.info("%s: Active Slots enabled - checking position limits (%d/%d open)", sym,
                 open_count, desired)
        if open_count >= desired:
            log.info("%s: No slots available - checking rotation", sym)
            self.rotate(plan, cfg)
            return self.block(entry_id, plan, Reason.ACTIVE_SLOTS)
        why = self.fund_caps(plan, cfg)
        if why is not None:
            return self.block(entry_id, plan, why)
        if cfg.mode == "production" or cfg.enforce_allocation:
            # L61: checked, but nothing reserved; the open notional on this symbol
            # per the mirror is zero here (an open symbol was blocked above).
            limit = self.allocation_limit(sym)
            if limit is None or float(plan.notional or 0) > limit:
                return self.block(entry_id, plan, Reason.CAPITAL_ALLOCATION)
        return self.writer.permit(entry_id, plan, str(plan.side or ""), plan.notional or "0", cfg)

    def _evaluate_close(self, entry_id: str, plan: Plan, cfg: GovernorConfig) -> Outcome:
        position = self.mirror.position(plan.symbol)
        if not position:
            return self.block(entry_id, plan, Reason.NO_OPEN_POSITION)
        # L105: no lock on exit coordination.
        return self.writer.permit(entry_id, plan, position.get("side", ""),
                                  position.get("notional", "0"), cfg)

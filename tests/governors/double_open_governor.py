#!/usr/bin/env python3
"""A governor that always breaks ``one_position_per_symbol`` in one known way, for the
shrink tests: it PERMITs the first two OPENs of every symbol (counted in Redis, so every
instance and restart agrees) and BLOCKs every later OPEN and every CLOSE.

Two OPENs on one symbol are thus a double open however they are timed: the apply layer
executes both permits, and the second order adds to the first position. Nothing else it
does can break an invariant the shrinker is asked about, so the smallest scenario that
still shows the violation is known: one producer, two OPEN plans on one symbol, no fault.
It is the legacy design's stream loop and decision writer with the gates left out.
"""

from __future__ import annotations

import os
import signal
import sys

from governor_ref.decisions import StepwiseLogic
from governor_ref.governor import Governor, Outcome, Settings
from governor_ref.protocol import Action, GovernorConfig, Plan, Reason


class DoubleOpenLogic(StepwiseLogic):
    name = "double_open"

    def evaluate(self, entry_id: str, plan: Plan, cfg: GovernorConfig) -> Outcome:
        if plan.action is not Action.OPEN:
            return self.block(entry_id, plan, Reason.NO_OPEN_POSITION)
        n = self.r.incr(f"{self.keys.prefix}:test:double_open:{plan.symbol}")
        if n > 2:
            return self.block(entry_id, plan, Reason.DUPLICATE_OPEN)
        return self.writer.permit(entry_id, plan, str(plan.side or "LONG"),
                                  plan.notional or "0", cfg)


def main() -> int:
    settings = Settings(redis_url=os.environ["REDIS_URL"], prefix=os.environ["GOVERNOR_PREFIX"],
                        consumer=os.environ["GOVERNOR_CONSUMER"], variant="double_open")
    gov = Governor(settings, DoubleOpenLogic)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: gov.stop.set())
    gov.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""A governor that permits nothing the workload sends: every plan is BLOCKed.

It lets the liveness probe's plans through (plan ids ``probe-*``), as a governor tuned to
pass a health check would, so every invariant holds (nothing executes, nothing breaks) and
the liveness probe passes: a run against it exercised no permit path at all and must not
come out VALID. Speaks the protocol with plain Redis commands.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

import redis

from governor_ref.connection import connect


def main() -> int:
    url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    p = os.environ.get("GOVERNOR_PREFIX", "quantum")
    consumer = os.environ.get("GOVERNOR_CONSUMER", f"block-{os.getpid()}")
    plans, events = f"{p}:stream:apply.plan", f"{p}:stream:governor.events"
    running = [True]
    signal.signal(signal.SIGTERM, lambda *_: running.__setitem__(0, False))
    r = connect(url, decode_responses=True, encoding_errors="replace")
    try:
        r.xgroup_create(plans, "governor", id="0", mkstream=True)
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise
    fence = 0
    start = "0"  # own pending entries first (a restart), then new ones
    while running[0]:
        try:
            resp = r.xreadgroup("governor", consumer, {plans: start}, count=100,
                                block=None if start == "0" else 200)
        except (redis.ConnectionError, redis.TimeoutError):
            time.sleep(0.2)
            continue
        entries = resp[0][1] if resp else []
        if start == "0" and not entries:
            start = ">"
        for entry_id, f in entries:
            pid, sym, action = f.get("plan_id", ""), f.get("symbol", ""), f.get("action", "")
            now = int(time.time() * 1000)
            if pid:
                fields = {"plan_id": pid, "symbol": sym, "action": action, "governor": consumer,
                          "decided_at_ms": str(now)}
                if pid.startswith("probe-") and action in ("OPEN", "CLOSE"):
                    fence += 1
                    permit = {"plan_id": pid, "symbol": sym, "action": action,
                              "side": f.get("side", ""), "notional": f.get("notional", "0"),
                              "fence": str(fence), "issued_at_ms": now}
                    r.set(f"{p}:permit:{pid}", json.dumps(permit), px=60_000)
                    fields |= {"decision": "PERMIT", "reason": "", "fence": str(fence)}
                else:
                    fields |= {"decision": "BLOCK", "reason": "closed_for_business"}
                r.xadd(events, fields)
            r.xack(plans, "governor", entry_id)
    return 0


if __name__ == "__main__":
    sys.exit(main())

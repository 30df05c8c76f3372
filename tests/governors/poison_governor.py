#!/usr/bin/env python3
"""A governor that serves, then crash-loops on one input: a poison pill.

It reads plans with a client that decodes replies as UTF-8 (``decode_responses=True``), as
many real services do, so a plan whose fields are not valid UTF-8 makes the read raise
``UnicodeDecodeError`` and the process exit (return code 1). Like a careful governor it
reads its own pending entries first (``XREADGROUP ... 0``) after every start; restarted
under the same consumer name it is given the poison again and dies again, for ever. The
other plans it BLOCKs (reason ``poison_governor_blocks_all``), one decision each.
"""

from __future__ import annotations

import os
import signal
import sys
import time

import redis

GROUP = "governor"


def main() -> int:
    url, prefix = os.environ["REDIS_URL"], os.environ["GOVERNOR_PREFIX"]
    consumer = os.environ["GOVERNOR_CONSUMER"]
    plans, events = f"{prefix}:stream:apply.plan", f"{prefix}:stream:governor.events"
    r = redis.Redis.from_url(url, decode_responses=True, socket_timeout=10)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        r.xgroup_create(plans, GROUP, id="0", mkstream=True)
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise
    print(f"poison governor {consumer} reading its pending entries first", file=sys.stderr,
          flush=True)
    cursor = "0"  # own pending entries first, then new ones
    while True:
        # A non-UTF-8 field raises UnicodeDecodeError right here: not caught, the process dies.
        resp = r.xreadgroup(GROUP, consumer, {plans: cursor}, count=10,
                            block=None if cursor == "0" else 1000)
        entries = resp[0][1] if resp else []
        if cursor == "0" and not entries:
            cursor = ">"
            continue
        for entry_id, fields in entries:
            if fields and fields.get("plan_id"):
                r.xadd(events, {
                    "plan_id": fields["plan_id"], "symbol": fields.get("symbol", ""),
                    "action": fields.get("action", ""), "decision": "BLOCK",
                    "reason": "poison_governor_blocks_all", "governor": consumer,
                    "decided_at_ms": str(int(time.time() * 1000))})
            r.xack(plans, GROUP, entry_id)


if __name__ == "__main__":
    sys.exit(main())

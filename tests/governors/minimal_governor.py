#!/usr/bin/env python3
"""A minimal governor that speaks only what docs/protocol.md asks, for the readiness tests.

It reads the plan stream with nothing but ``XREADGROUP GROUP governor <consumer> BLOCK ...
STREAMS P:stream:apply.plan >``: no XINFO, no reading its pending entries first, no
XAUTOCLAIM. On Redis 6.2 such a consumer is not listed in ``XINFO CONSUMERS`` until its
first read returns, so the harness must not require that listing to call it ready.

It BLOCKs every plan that carries a plan id (reason ``minimal_governor_blocks_all``): a
decision per plan, nothing permitted, so it never needs state. Fields are decoded
leniently: bad input is BLOCKed, never fatal. ``MINIMAL_GOVERNOR_DELAY_MS`` makes it slow:
it sleeps that long before each decision (a governor that falls behind its load).
"""

from __future__ import annotations

import os
import signal
import sys
import time

import redis

STREAM_SUFFIX = ":stream:apply.plan"
EVENTS_SUFFIX = ":stream:governor.events"
GROUP = "governor"


def _text(value: bytes | None) -> str:
    return value.decode("utf-8", "replace") if value is not None else ""


def main() -> int:
    url, prefix = os.environ["REDIS_URL"], os.environ["GOVERNOR_PREFIX"]
    consumer = os.environ["GOVERNOR_CONSUMER"]
    delay_s = float(os.environ.get("MINIMAL_GOVERNOR_DELAY_MS") or 0) / 1000
    plans, events = prefix + STREAM_SUFFIX, prefix + EVENTS_SUFFIX
    r = redis.Redis.from_url(url, decode_responses=False, socket_timeout=10)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:  # the protocol: a governor creates the group as well and ignores BUSYGROUP
        r.xgroup_create(plans, GROUP, id="0", mkstream=True)
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise
    print(f"minimal governor {consumer} reading {plans}", file=sys.stderr, flush=True)
    while True:
        resp = r.xreadgroup(GROUP, consumer, {plans: ">"}, count=100, block=1000)
        for _stream, entries in resp or []:
            for entry_id, fields in entries:
                plan_id = _text(fields.get(b"plan_id"))
                if plan_id:
                    time.sleep(delay_s)
                    r.xadd(events, {
                        "plan_id": plan_id, "symbol": _text(fields.get(b"symbol")),
                        "action": _text(fields.get(b"action")), "decision": "BLOCK",
                        "reason": "minimal_governor_blocks_all", "governor": consumer,
                        "decided_at_ms": str(int(time.time() * 1000))})
                r.xack(plans, GROUP, entry_id)


if __name__ == "__main__":
    sys.exit(main())

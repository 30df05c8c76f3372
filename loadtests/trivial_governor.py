#!/usr/bin/env python3
"""A trivial governor for the load-test benchmark: it PERMITs every plan at once.

It follows docs/protocol.md minimally and keeps no state: ``XREADGROUP GROUP governor
<consumer> COUNT 100 BLOCK 1000 STREAMS P:stream:apply.plan >``, then for each plan with
a ``plan_id``, in one pipeline, ``SET P:permit:{plan_id}`` (JSON with the protocol's
fields, expiring after 60 s), the PERMIT event on ``P:stream:governor.events`` and the
XACK. It holds no invariant at all (a run against it is INVALID: it over-opens slots):
its only use is ``loadtests/bench_load.py``, where its latency is the load test's own
floor (the harness's send, the decision XADD and the reader, with no decision logic).

    locust -f loadtests/locustfile.py --headless ... \\
        --governor-cmd "python loadtests/trivial_governor.py"
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

import redis

GROUP = "governor"
PERMIT_TTL_MS = 60_000


def _text(value: bytes | None) -> str:
    return value.decode("utf-8", "replace") if value is not None else ""


def main() -> int:
    url, prefix = os.environ["REDIS_URL"], os.environ["GOVERNOR_PREFIX"]
    consumer = os.environ["GOVERNOR_CONSUMER"]
    plans, events = prefix + ":stream:apply.plan", prefix + ":stream:governor.events"
    r = redis.Redis.from_url(url, decode_responses=False, socket_timeout=10)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:  # the protocol: a governor creates the group as well and ignores BUSYGROUP
        r.xgroup_create(plans, GROUP, id="0", mkstream=True)
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise
    print(f"trivial governor {consumer} permits everything on {plans}",
          file=sys.stderr, flush=True)
    fence = 0
    while True:
        resp = r.xreadgroup(GROUP, consumer, {plans: ">"}, count=100, block=1000)
        for _stream, entries in resp or []:
            pipe = r.pipeline(transaction=False)
            for entry_id, fields in entries:
                plan_id = _text(fields.get(b"plan_id"))
                if plan_id:
                    now = int(time.time() * 1000)
                    fence += 1
                    permit = {"plan_id": plan_id, "symbol": _text(fields.get(b"symbol")),
                              "action": _text(fields.get(b"action")),
                              "side": _text(fields.get(b"side")),
                              "notional": _text(fields.get(b"notional")),
                              "fence": fence, "issued_at_ms": now}
                    pipe.set(f"{prefix}:permit:{plan_id}", json.dumps(permit),
                             px=PERMIT_TTL_MS)
                    event = {"plan_id": plan_id, "symbol": permit["symbol"],
                             "action": permit["action"], "decision": "PERMIT",
                             "reason": "", "governor": consumer,
                             "decided_at_ms": str(now)}
                    if permit["action"] == "CLOSE":
                        event["fence"] = str(fence)
                    pipe.xadd(events, event)
                pipe.xack(plans, GROUP, entry_id)
            pipe.execute()


if __name__ == "__main__":
    sys.exit(main())

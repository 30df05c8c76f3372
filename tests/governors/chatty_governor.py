#!/usr/bin/env python3
"""A governor that also writes informational decision entries: the reference, plus chatter.

Runs the reference governor (``python -m governor_ref run``) in this process and, beside it,
adds to ``P:stream:governor.events`` entries whose ``decision`` is neither PERMIT nor BLOCK,
which the protocol says to ignore: a ``HEARTBEAT`` every 0.2 s, and an ``INFO`` entry after
every third decision of this instance, each with ``decided_at_ms`` = ``n/a``. A harness that
reads such entries as decisions (or chokes on their time) is caught by it: the run must
come out VALID with the reference's coverage.

Environment as for any governor under test: ``REDIS_URL``, ``GOVERNOR_PREFIX``,
``GOVERNOR_CONSUMER``.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time

import redis

from governor_ref import cli
from governor_ref.connection import connect
from governor_ref.keys import Keys

log = logging.getLogger("chatty")


def chatter(url: str, keys: Keys, consumer: str, stop: threading.Event) -> None:
    """Tail the decision stream; write a HEARTBEAT now and then and an INFO after every
    third decision of this instance. Errors (Redis paused or restarted) are waited out."""
    r: redis.Redis | None = None
    cursor = "$"
    seen = 0
    next_beat = 0.0
    while not stop.is_set():
        try:
            if r is None:
                r = connect(url, decode_responses=True, encoding_errors="replace")
            if time.monotonic() >= next_beat:
                next_beat = time.monotonic() + 0.2
                r.xadd(keys.events, {"decision": "HEARTBEAT", "governor": consumer,
                                     "decided_at_ms": "n/a"})
            resp = r.xread({keys.events: cursor}, count=500, block=200)
            for _stream, entries in resp or []:
                for entry_id, f in entries:
                    cursor = entry_id
                    if f.get("governor") != consumer or f.get("decision") not in (
                            "PERMIT", "BLOCK"):
                        continue
                    seen += 1
                    if seen % 3 == 0:
                        r.xadd(keys.events, {
                            "plan_id": f.get("plan_id", ""), "symbol": f.get("symbol", ""),
                            "action": f.get("action", ""), "decision": "INFO",
                            "reason": f"noted {f.get('decision')}", "governor": consumer,
                            "decided_at_ms": "n/a"})
        except (redis.RedisError, OSError) as exc:
            log.info("chatter: %s; retrying", exc)
            r = None
            stop.wait(0.2)


def main() -> int:
    url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    keys = Keys(os.environ.get("GOVERNOR_PREFIX", "quantum"))
    consumer = os.environ.get("GOVERNOR_CONSUMER", f"chatty-{os.getpid()}")
    stop = threading.Event()
    threading.Thread(target=chatter, args=(url, keys, consumer, stop), name="chatter",
                     daemon=True).start()
    try:
        return cli.main(["run"])  # the reference, until SIGTERM / SIGINT
    finally:
        stop.set()


if __name__ == "__main__":
    sys.exit(main())

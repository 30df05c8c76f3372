"""gevent's event loop with timers that fire on time, for the pacing of the load test.

Locust runs on gevent, whose default libev backend on Linux is ``epoll``. libev hands
``epoll_wait`` its timeout in whole milliseconds, rounded up, so a timer that is due in
1.3 ms fires after 2 ms: a plan's user wakes up to 1 ms after the plan's scheduled time,
and that wait counts in the plan's latency (it is measured from the schedule). libev's
``select`` backend passes the timeout in microseconds. Measured on this project's 2-core
VM, 3,000 sleeps of 1.3-1.9 ms each, oversleep p50 / p90 / p99: epoll 0.54 / 0.83 / 1.04
ms, poll 0.54 / 0.82 / 0.92 ms, select 0.13 / 0.22 / 1.19 ms.

Locust creates gevent's hub (and its loop) when it is imported, before it imports the
locustfile; :func:`precise_timers` is called by the locustfile while nothing runs on the
loop yet, and replaces the hub by one on a ``select`` loop. The hub is replaced only
then: when ``GEVENT_BACKEND`` names a backend (the user's choice is kept), when the loop
already has a backend with fine timeouts, or when it is not gevent's main-thread default
loop. ``select`` here is libev's own: on Linux it sizes its fd sets itself, so it is not
held to FD_SETSIZE (1024) file descriptors. Idle CPU is the same; readiness of a few
sockets costs no more than with epoll.
"""

from __future__ import annotations

import logging
import os

import gevent

log = logging.getLogger(__name__)

COARSE = frozenset({"epoll", "poll"})  # backends whose wait timeout is in milliseconds
PRECISE = "select"


def precise_timers() -> str:
    """Put the calling process's gevent hub on a loop with microsecond timeouts (see the
    module docstring); returns the backend in use afterwards."""
    hub = gevent.get_hub()
    backend = str(hub.loop.backend)
    if os.environ.get("GEVENT_BACKEND") or backend not in COARSE or not hub.loop.default:
        return backend
    gevent.config.libev_backend = PRECISE
    try:
        hub.destroy(destroy_loop=True)
        backend = str(gevent.get_hub().loop.backend)
    except Exception:  # noqa: BLE001 - keep whatever loop gevent gives: timers late, not wrong
        log.warning("could not move gevent to the %s loop; timers may fire up to 1 ms late",
                    PRECISE, exc_info=True)
        backend = str(gevent.get_hub().loop.backend)
    log.debug("gevent loop backend: %s", backend)
    return backend

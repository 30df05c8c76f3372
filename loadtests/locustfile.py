"""Load-test a trade governor with Locust (docs/loadtests.md).

    locust -f loadtests/locustfile.py --headless -u 20 -r 20 -t 15s --rate 500 --csv out/run

With no Redis option this starts an embedded Redis, the governors, the apply layer,
the exchange and the recorder of the chaos harness, drives them with paced plans,
and judges the run directory at the end (exit 0 valid, 1 invalid or p99 too high,
2 unknown, 254 bad option, 255 the harness failed).
"""

from chaos.loadtest.loop import precise_timers

precise_timers()  # before anything runs on gevent's loop: timers in microseconds

from chaos.loadtest import hooks  # noqa: E402, F401 - registers the event listeners
from chaos.loadtest.user import GovernorUser  # noqa: E402

__all__ = ["GovernorUser"]

"""The reference governor through Redis faults: restart, pause, out of memory.

Each test owns its redis-server (it is killed, paused or starved) and
checks two things: the governor fails closed while Redis cannot serve it,
and it goes back to deciding once Redis does, without being restarted.
"""

from __future__ import annotations

import socket
import time
import urllib.request
from collections.abc import Iterator

import pytest
import redis
from govtools import Desk

from chaos.redis_servers import EmbeddedConfig, EmbeddedRedis


@pytest.fixture
def server(request: pytest.FixtureRequest) -> Iterator[EmbeddedRedis]:
    cfg = getattr(request, "param", None) or EmbeddedConfig()
    s = EmbeddedRedis(cfg, name="faults").start()
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture
def desk(server: EmbeddedRedis) -> Iterator[Desk]:
    d = Desk(server.url, "quantum", server.client())
    d.setup()
    yield d
    d.stop_all()


DURABLE = EmbeddedConfig(appendonly=True, appendfsync="always")


@pytest.mark.parametrize("server", [DURABLE], indirect=True)
def test_decides_again_after_redis_restart_and_keeps_durable_state(
        server: EmbeddedRedis, desk: Desk) -> None:
    desk.start()
    first = desk.decide("OPEN", "S01USDT")
    assert first["decision"] == "PERMIT"
    server.kill()
    time.sleep(0.3)  # the governor now sees connection errors and backs off
    server.restart()  # script cache is empty: EVALSHA gets NOSCRIPT and reloads
    desk.r = server.client()
    # The in-flight OPEN survived in the AOF: a second open of the symbol is a duplicate.
    assert desk.decide("OPEN", "S01USDT", timeout=20)["reason"] == "duplicate_open"
    assert desk.decide("OPEN", "S02USDT")["decision"] == "PERMIT"
    assert len(desk.decisions(first["plan_id"])) == 1


def test_recovers_after_a_restart_that_lost_all_data(server: EmbeddedRedis, desk: Desk) -> None:
    desk.start()
    assert desk.decide("OPEN", "S01USDT")["decision"] == "PERMIT"
    server.kill()
    server.restart()  # no persistence: config, streams and groups are gone
    desk.r = server.client()
    desk.setup()  # the operator writes the inputs again
    # The governor recreates what it reads from (NOGROUP) and serves again.
    assert desk.decide("OPEN", "S02USDT", timeout=20)["decision"] == "PERMIT"


def test_plans_sent_before_a_redis_pause_are_decided_after_it(server: EmbeddedRedis,
                                                               desk: Desk) -> None:
    desk.start()
    assert desk.decide("OPEN", "S01USDT")["decision"] == "PERMIT"
    pids = [desk.plan("OPEN", f"S0{i}USDT") for i in range(2, 5)]
    server.pause()
    time.sleep(1.5)
    server.resume()
    for pid in pids:
        assert desk.decision(pid, timeout=20)["decision"] == "PERMIT"


def test_out_of_memory_fails_closed_then_serves_when_memory_returns(server: EmbeddedRedis,
                                                                    desk: Desk) -> None:
    admin = server.client()
    pid = desk.plan("OPEN", "S01USDT")
    admin.set("ballast", "x" * 4_000_000)
    admin.config_set("maxmemory", "2mb")  # noeviction: every write is refused
    with pytest.raises(redis.exceptions.OutOfMemoryError):
        admin.set("probe", "1")
    run = desk.start(wait=False)  # it cannot even join its group: every write is refused
    time.sleep(1.5)
    assert not run.gov.started.is_set()
    assert desk.decisions(pid) == [], "no decision may be written while writes fail"
    assert admin.get(desk.keys.permit(pid)) is None
    admin.config_set("maxmemory", "0")
    assert desk.decision(pid, timeout=20)["decision"] == "PERMIT"


def test_decide_script_under_oom_writes_nothing_at_all(server: EmbeddedRedis,
                                                       desk: Desk) -> None:
    """Memory runs out between reading a plan and deciding it: the step fails whole.

    Redis refuses a script at its first write when over maxmemory, before
    anything has changed, so there is no half-written reservation to leak.
    """
    from governor_ref.governor import is_transient
    from governor_ref.protocol import Plan
    from governor_ref.reference import plan_args
    from governor_ref.scripts import ScriptSet

    admin = server.client()
    scripts = ScriptSet()
    scripts.load(admin)
    plan = Plan.from_fields({"plan_id": "oom-1", "symbol": "S01USDT", "action": "OPEN",
                             "side": "LONG", "notional": "100", "source": "t",
                             "intent_created_at_ms": str(int(time.time() * 1000))})
    args = plan_args(desk.prefix, "g1", "", plan)
    admin.set("ballast", "x" * 4_000_000)
    admin.config_set("maxmemory", "2mb")
    before = {k: admin.dump(k) for k in admin.keys("*") if k != "ballast"}
    # 7.x raises OutOfMemoryError; 6.2 wraps it: "Error running script ... -OOM ...".
    with pytest.raises(redis.exceptions.ResponseError, match="maxmemory") as err:
        scripts.run(admin, scripts["decide_open"], [desk.keys.config], args)
    assert is_transient(err.value), "the governor must back off and retry, not give up"
    after = {k: admin.dump(k) for k in admin.keys("*") if k != "ballast"}
    assert after == before
    admin.config_set("maxmemory", "0")
    res = scripts.run(admin, scripts["decide_open"], [desk.keys.config], args)
    assert res[0] == "PERMIT"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_prometheus_metrics_count_decisions_by_reason(desk: Desk) -> None:
    port = _free_port()
    desk.start(metrics_port=port)
    desk.decide("OPEN", "S01USDT")
    desk.decide("OPEN", "S01USDT")
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert 'governor_decisions_total{decision="PERMIT",reason="",variant="reference"} 1.0' in text
    assert ('governor_decisions_total{decision="BLOCK",reason="duplicate_open",'
            'variant="reference"} 1.0') in text
    assert "governor_decision_latency_seconds_count" in text


def test_a_close_lease_does_not_lapse_while_redis_is_paused(server: EmbeddedRedis,
                                                            desk: Desk) -> None:
    """Found by the 10-seed sweep through --governor-cmd (redis-pause, seed 3).

    A CLOSE was permitted and executed at once, then Redis froze for longer than
    capital_reservation_ttl_ms, before the executor could write the mirror or the
    result. Redis's clock ran on, so the first script after the pause reaped the
    lease as lapsed; the mirror (not yet rewritten) still showed the position, so
    the lease was read as "the close never ran" and a second CLOSE was permitted:
    a double close. Leases must not age while no script can run.
    """
    desk.config.update(capital_reservation_ttl_ms=2000, permit_ttl_ms=1000,
                       exit_lock_ttl_ms=800, max_intent_age_ms=60_000)
    desk.setup()
    desk.start()
    position_id = desk.open_position("S01USDT")
    first = desk.decide("CLOSE", "S01USDT")
    assert first["decision"] == "PERMIT"
    assert desk.r.getdel(desk.keys.permit(first["plan_id"])) is not None  # the order runs
    server.pause()
    time.sleep(3.5)  # longer than the lease, and than any gap between scripts
    server.resume()
    # The executor has not written the mirror or the result yet: the close is in flight.
    second = desk.decide("CLOSE", "S01USDT", timeout=20)
    assert (second["decision"], second["reason"]) == (
        "BLOCK", "exit_lock_busy_double_close_prevention")
    # Its result arrives: the position is closed, a third CLOSE finds nothing to close.
    desk.r.delete(desk.keys.position("S01USDT"))
    desk.result(first["plan_id"], "S01USDT", "CLOSE", position_id=position_id)
    desk.settled()
    assert desk.decide("CLOSE", "S01USDT")["reason"] == "no_open_position"

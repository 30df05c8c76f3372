"""chaos.nemesis: every fault is shown to happen, against real processes and servers.

Each test checks the *effect* of one fault kind (a pid gone, a process stopped, a key lost,
a client timing out, an OOM reply, a duplicate entry, a slow order, a skewed clock), that
it is undone at the stop, and what the history says. Every test stops what it starts.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import redis
from govtools import Desk
from redis.backoff import NoBackoff
from redis.retry import Retry

from chaos.apply_layer import ApplyConfig, ApplyEvent, ApplyLayer
from chaos.exchange import Exchange
from chaos.history import F, HistoryWriter, Op, OpType, read_history
from chaos.nemesis import (
    FaultUnavailable,
    FaultWindow,
    Nemesis,
    NemesisContext,
    ballast_key,
    faketime_env,
    find_libfaketime,
    slow_exchange_latency,
)
from chaos.proxy import FaultProxy
from chaos.redis_servers import (
    EmbeddedConfig,
    EmbeddedRedis,
    SentinelTopology,
    UrlRedis,
    port_accepts_connections,
)
from chaos.scenario import FaultSpec
from chaos.supervisor import GovernorSpec, Supervisor
from governor_ref.keys import Keys
from governor_ref.protocol import GovernorConfig

GOV = "python -m governor_ref run"
NO_RETRY = Retry(NoBackoff(), 0)  # a client that reports the fault instead of waiting it out
FAST = ApplyConfig(open_latency_ms=5, open_jitter_ms=0, close_latency_ms=5, close_jitter_ms=0,
                   block_ms=50, drain_timeout_s=2)

pytestmark = pytest.mark.usefixtures("no_leftover_governors")


# --------------------------------------------------------------------------- helpers


def wait_for(pred: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


def make_ctx(tmp_path: Path, **kw: Any) -> NemesisContext:
    return NemesisContext(history=HistoryWriter(tmp_path, "nemesis"), **kw)


def fault_ops(tmp_path: Path, key: str | None = None) -> list[Op]:
    return [op for op in read_history(tmp_path)
            if op.f == F.FAULT and (key is None or op.key == key)]


def completion(tmp_path: Path, key: str, phase: str) -> Op:
    [op] = [o for o in fault_ops(tmp_path, key)
            if o.type != OpType.INVOKE and o.value.get("phase") == phase]
    return op


def wait_on(nem: Nemesis, fault_id: str, timeout: float = 20.0) -> None:
    """Until the fault is on (its start completed ok)."""
    wait_for(lambda: any(a.fault_id == fault_id and a.state == "active" for a in nem.active()),
             timeout, f"{fault_id} to start")


def wait_off(nem: Nemesis, fault_id: str, timeout: float = 20.0) -> None:
    """Until the fault is neither starting, on nor stopping."""
    wait_for(lambda: all(a.fault_id != fault_id for a in nem.active()), timeout,
             f"{fault_id} to end")


def start_failed(tmp_path: Path, nem: Nemesis, spec: FaultSpec) -> Op:
    fid = nem.inject(spec)
    return wait_for(lambda: next((o for o in fault_ops(tmp_path, fid)
                                  if o.type == OpType.FAIL), None), 20, f"{fid} to fail")


def pair_check(tmp_path: Path, fault_id: str) -> None:
    """invoke/ok at the start, then invoke/ok at the stop, nothing else."""
    ops = fault_ops(tmp_path, fault_id)
    assert [(str(o.type), o.value["phase"]) for o in ops] == [
        ("invoke", "start"), ("ok", "start"), ("invoke", "stop"), ("ok", "stop")], ops


def reaped(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.fixture
def desk(make_desk: Callable[..., Desk]) -> Desk:
    return make_desk(start=False)


def governors(desk: Desk, tmp_path: Path, count: int = 1, **env: str) -> Supervisor:
    spec = GovernorSpec(GOV, env={"GOVERNOR_LOG_LEVEL": "INFO", **env})
    return Supervisor(spec, desk.url, desk.prefix, count, tmp_path / "logs",
                      restart_backoff_s=0.1)


def grant(r: redis.Redis, keys: Keys, plan_id: str, symbol: str = "BTCUSDT") -> None:
    """Play the governor: permit key, then the PERMIT entry."""
    now = time.time_ns() // 1_000_000
    r.set(keys.permit(plan_id), json.dumps({
        "plan_id": plan_id, "symbol": symbol, "action": "OPEN", "side": "LONG",
        "notional": "100", "fence": "", "issued_at_ms": now}), px=60_000)
    r.xadd(keys.events, {"plan_id": plan_id, "symbol": symbol, "action": "OPEN",
                         "decision": "PERMIT", "reason": "", "governor": "test",
                         "decided_at_ms": str(now)})


def results_for(r: redis.Redis, keys: Keys, plan_id: str) -> list[dict[str, str]]:
    return [f for _i, f in r.xrange(keys.results) if f.get("plan_id") == plan_id]


@contextlib.contextmanager
def apply_layer(url: str, keys: Keys, ex: Exchange, **kw: Any) -> Iterator[ApplyLayer]:
    layer = ApplyLayer(url, keys, ex, FAST, **kw)
    layer.start_thread()
    try:
        assert layer.started.wait(5)
        yield layer
    finally:
        layer.stop()


# --------------------------------------------------------------------------- governors


def test_kill_governor_kills_the_pid_and_the_supervisor_restarts_it(
        desk: Desk, tmp_path: Path) -> None:
    with governors(desk, tmp_path, count=2) as sup:
        before = sup.wait_ready(timeout=30)
        ctx = make_ctx(tmp_path, supervisor=sup)
        with Nemesis(ctx, [FaultSpec("kill_governor", at=0.0, duration=0.1)]) as nem:
            nem.start()
            [w] = wait_for(lambda: [w for w in nem.windows() if w.stop_ns], 20, "the window")
            [fid] = nem.fault_ids()
        start, stop = completion(tmp_path, fid, "start"), completion(tmp_path, fid, "stop")
        [(victim, old)] = start.value["killed_pids"].items()
        assert old == before[victim] and reaped(old)
        assert stop.value["restarted"] and stop.value["new_pids"][victim] not in (None, old)
        assert sup.pids()[victim] == stop.value["new_pids"][victim]
        other = ({"gov-1", "gov-2"} - {victim}).pop()
        assert sup.pids()[other] == before[other], "only the random target was killed"
        assert [e["type"] for e in sup.events if e["consumer"] == victim].count("crash") == 0
        pair_check(tmp_path, fid)
        assert w.kind == "kill_governor" and w.start_ns < w.stop_ns


def test_pause_governor_stops_the_process_for_the_window(desk: Desk, tmp_path: Path) -> None:
    with governors(desk, tmp_path) as sup:
        pid = sup.wait_ready(timeout=30)["gov-1"]
        with Nemesis(make_ctx(tmp_path, supervisor=sup)) as nem:
            fid = nem.inject(FaultSpec("pause_governor", duration=1.0, target="gov-1"))
            wait_on(nem, fid)
            assert psutil.Process(pid).status() == psutil.STATUS_STOPPED
            wait_off(nem, fid)
            assert psutil.Process(pid).status() != psutil.STATUS_STOPPED
            assert sup.pids() == {"gov-1": pid}
        pair_check(tmp_path, fid)
        assert completion(tmp_path, fid, "stop").value["resumed"] == ["gov-1"]


def test_restart_governor_leaves_no_process_in_the_window_then_a_new_pid(
        desk: Desk, tmp_path: Path) -> None:
    with governors(desk, tmp_path) as sup:
        old = sup.wait_ready(timeout=30)["gov-1"]
        with Nemesis(make_ctx(tmp_path, supervisor=sup)) as nem:
            fid = nem.inject(FaultSpec("restart_governor", duration=0.8, target="gov-1"))
            wait_on(nem, fid)
            assert sup.pids() == {} and reaped(old)
            time.sleep(0.3)  # past the restart backoff: nobody brings it back early
            assert sup.pids() == {}
            wait_off(nem, fid)
        new = sup.pids()["gov-1"]
        assert new != old
        assert sup.wait_ready(timeout=30) == {"gov-1": new}
        pair_check(tmp_path, fid)


# --------------------------------------------------------------------------- Redis


@pytest.mark.parametrize(("appendonly", "fsync", "survives"),
                         [(False, "everysec", False), (True, "always", True)])
def test_kill_redis_loses_exactly_what_durability_does_not_keep(
        tmp_path: Path, appendonly: bool, fsync: str, survives: bool) -> None:
    config = EmbeddedConfig(appendonly=appendonly, appendfsync=fsync)
    with EmbeddedRedis(config, name="nem-kill") as server:
        c = server.client(socket_timeout=2)
        c.set("before-kill", "1")
        old_pid = server.pid
        with Nemesis(make_ctx(tmp_path, redis=server)) as nem:
            fid = nem.inject(FaultSpec("kill_redis", duration=0.3))
            wait_on(nem, fid)
            assert not server.running and not port_accepts_connections(server.port)
            wait_off(nem, fid)
        assert server.running and server.pid != old_pid
        c = server.client(socket_timeout=2)
        assert (c.get("before-kill") == "1") is survives
        pair_check(tmp_path, fid)
        assert completion(tmp_path, fid, "start").value["pid"] == old_pid


def test_pause_redis_times_clients_out_for_the_window(redis_server: EmbeddedRedis,
                                                      tmp_path: Path) -> None:
    with Nemesis(make_ctx(tmp_path, redis=redis_server)) as nem:
        fid = nem.inject(FaultSpec("pause_redis", duration=1.5))
        wait_on(nem, fid)
        c = redis_server.client(socket_timeout=0.2, socket_connect_timeout=0.2, retry=NO_RETRY)
        with pytest.raises(redis.TimeoutError):
            c.ping()
        c.close()
        wait_off(nem, fid)
    assert redis_server.client(socket_timeout=2).ping()
    pair_check(tmp_path, fid)


def test_failover_moves_the_primary(tmp_path: Path) -> None:
    with SentinelTopology(master_name="nem") as topo:
        old = topo.master_address()
        with Nemesis(make_ctx(tmp_path, redis=topo)) as nem:
            fid = nem.inject(FaultSpec("failover"))
            wait_for(lambda: nem.windows() and nem.windows()[0].stop_ns, 40, "the failover")
        new = topo.master_address()
        assert new != old
        start = completion(tmp_path, fid, "start")
        assert start.type == OpType.OK
        assert start.value["old_primary"] == f"{old[0]}:{old[1]}"
        assert start.value["new_primary"] == f"{new[0]}:{new[1]}"
        pair_check(tmp_path, fid)


# --------------------------------------------------------------------------- network


@pytest.fixture
def proxy(shared_redis: EmbeddedRedis) -> Iterator[FaultProxy]:
    with FaultProxy("127.0.0.1", shared_redis.port) as p:
        yield p


def ping_s(url: str, timeout: float = 5.0) -> float:
    c = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
    try:
        c.ping()  # connect first: measure one round trip
        t0 = time.monotonic()
        c.ping()
        return time.monotonic() - t0
    finally:
        c.close()


def test_latency_slows_a_ping_through_the_proxy(proxy: FaultProxy, tmp_path: Path) -> None:
    assert ping_s(proxy.url) < 0.05
    with Nemesis(make_ctx(tmp_path, proxy=proxy)) as nem:
        fid = nem.inject(FaultSpec("latency", duration=1.5, params={"latency_ms": 100}))
        wait_on(nem, fid)
        assert ping_s(proxy.url) >= 0.19  # one-way delay both ways
        wait_off(nem, fid)
    assert ping_s(proxy.url) < 0.05
    assert proxy.stats()["latency_ms"] == 0
    pair_check(tmp_path, fid)


def test_drop_resets_connections(proxy: FaultProxy, tmp_path: Path) -> None:
    dropped0 = proxy.stats()["connections_dropped"]
    with Nemesis(make_ctx(tmp_path, proxy=proxy)) as nem:
        fid = nem.inject(FaultSpec("drop", duration=1.0, params={"prob": 1.0}))
        wait_on(nem, fid)
        c = redis.Redis.from_url(proxy.url, socket_timeout=2, socket_connect_timeout=2,
                                 retry=NO_RETRY)
        with pytest.raises(redis.ConnectionError):
            c.ping()
        c.close()
        assert proxy.stats()["connections_dropped"] > dropped0
        wait_off(nem, fid)
    assert ping_s(proxy.url) < 0.5
    pair_check(tmp_path, fid)


def test_partition_times_clients_out_until_healed(proxy: FaultProxy, tmp_path: Path) -> None:
    with Nemesis(make_ctx(tmp_path, proxy=proxy)) as nem:
        fid = nem.inject(FaultSpec("partition", duration=1.0))
        wait_on(nem, fid)
        c = redis.Redis.from_url(proxy.url, socket_timeout=0.3, socket_connect_timeout=0.3,
                                 retry=NO_RETRY)
        with pytest.raises(redis.TimeoutError):
            c.ping()
        c.close()
        assert proxy.stats()["partitioned"]
        wait_off(nem, fid)
    assert ping_s(proxy.url) < 0.5 and not proxy.stats()["partitioned"]
    assert completion(tmp_path, fid, "start").value["mode"] == "freeze"
    pair_check(tmp_path, fid)


# --------------------------------------------------------------------------- memory


def test_memory_pressure_noeviction_refuses_writes_for_the_window(
        redis_server: EmbeddedRedis, tmp_path: Path) -> None:
    c = redis_server.client(socket_timeout=5)
    keys = Keys("mp")
    with Nemesis(make_ctx(tmp_path, redis=redis_server, keys=keys)) as nem:
        fid = nem.inject(FaultSpec("memory_pressure", duration=1.5))
        wait_on(nem, fid)
        with pytest.raises(redis.exceptions.OutOfMemoryError):
            c.set("mp:victim", "x" * 100)
        assert c.config_get("maxmemory-policy")["maxmemory-policy"] == "noeviction"
        assert int(c.config_get("maxmemory")["maxmemory"]) > 0
        assert c.exists(ballast_key(keys, 1))
        wait_off(nem, fid)
    assert c.set("mp:victim", "x" * 100)
    assert c.config_get("maxmemory")["maxmemory"] == "0"
    assert not c.keys("mp:nemesis:ballast:*")
    start = completion(tmp_path, fid, "start").value
    assert start["at_limit"] and start["stopped_filling"] == "oom" and start["ballast_keys"] > 0
    pair_check(tmp_path, fid)


def test_memory_pressure_allkeys_lru_evicts(redis_server: EmbeddedRedis, tmp_path: Path) -> None:
    c = redis_server.client(socket_timeout=5)
    for i in range(50):
        c.set(f"mp:old:{i}", "y" * 1024)
    evicted0 = int(c.info("stats")["evicted_keys"])
    with Nemesis(make_ctx(tmp_path, redis=redis_server, keys=Keys("mp"))) as nem:
        fid = nem.inject(FaultSpec("memory_pressure", duration=1.5,
                                   params={"policy": "allkeys-lru", "headroom_kb": 128}))
        wait_on(nem, fid)
        for i in range(50):  # writes still succeed: something else goes
            c.set(f"mp:new:{i}", "z" * 4096)
        assert int(c.info("stats")["evicted_keys"]) > evicted0
        wait_off(nem, fid)
    assert c.config_get("maxmemory-policy")["maxmemory-policy"] == "noeviction"
    assert c.config_get("maxmemory")["maxmemory"] == "0"
    assert not c.keys("mp:nemesis:ballast:*")
    pair_check(tmp_path, fid)


# --------------------------------------------------------------------------- apply layer


def test_redelivery_duplicates_results_and_readds_plans(
        shared_redis: EmbeddedRedis, r: redis.Redis, prefix: str, tmp_path: Path) -> None:
    keys = Keys(prefix)
    ex = Exchange.create(tmp_path / "ledger.db", capital=1000)
    plan = {"plan_id": "p1", "symbol": "BTCUSDT", "action": "OPEN", "side": "LONG",
            "notional": "100", "source": "intent_bridge",
            "intent_created_at_ms": str(time.time_ns() // 1_000_000)}
    r.xadd(keys.plans, plan)
    with apply_layer(shared_redis.url, keys, ex) as layer:
        ctx = make_ctx(tmp_path, redis=shared_redis, apply_layer=layer, keys=keys)
        with Nemesis(ctx) as nem:
            fid = nem.inject(FaultSpec("redelivery", duration=1.5, params={"late_ms": 200}))
            wait_on(nem, fid)
            copies = [f for _i, f in r.xrange(keys.plans) if f["plan_id"] == "p1"]
            assert copies == [plan, plan], "the plan re-added once, fields unchanged"
            grant(r, keys, "p1")
            dups = wait_for(lambda: (lambda rs: rs if len(rs) == 2 else None)(
                results_for(r, keys, "p1")), 5, "the duplicate result")
            assert dups[0] == dups[1]
            r.xadd(keys.plans, {**plan, "plan_id": "p2"})  # a plan of the window: re-added
            wait_off(nem, fid)
        assert layer.knobs()["duplicate_result_prob"] == 0.0
        assert len(ex.orders()) == 1
        grant(r, keys, "p3")
        wait_for(lambda: results_for(r, keys, "p3"), 5, "p3's result")
        time.sleep(0.3)
        assert len(results_for(r, keys, "p3")) == 1, "no duplicate after the window"
    start, stop = completion(tmp_path, fid, "start"), completion(tmp_path, fid, "stop")
    assert start.value["readded"] == ["p1"]
    assert "p2" in stop.value["readded"]
    assert len([f for _i, f in r.xrange(keys.plans) if f["plan_id"] == "p2"]) == 2
    pair_check(tmp_path, fid)


def test_slow_exchange_makes_orders_slower_than_the_exit_lock(
        shared_redis: EmbeddedRedis, r: redis.Redis, prefix: str, tmp_path: Path) -> None:
    keys = Keys(prefix)
    config = GovernorConfig(exit_lock_ttl_ms=300, permit_ttl_ms=1000,
                            capital_reservation_ttl_ms=3000)
    records: list[dict[str, Any]] = []
    ex = Exchange.create(tmp_path / "ledger.db", capital=1000)
    with apply_layer(shared_redis.url, keys, ex, on_record=records.append) as layer:
        ctx = make_ctx(tmp_path, apply_layer=layer, keys=keys, config=config)
        with Nemesis(ctx) as nem:
            fid = nem.inject(FaultSpec("slow_exchange", duration=2.0))
            wait_on(nem, fid)
            grant(r, keys, "slow1")
            wait_for(lambda: results_for(r, keys, "slow1"), 5, "the slow order")
            wait_off(nem, fid)
        grant(r, keys, "fast1", symbol="ETHUSDT")
        wait_for(lambda: results_for(r, keys, "fast1"), 5, "the fast order")

    def order_ms(plan_id: str) -> float:
        taken = next(x for x in records if x["type"] == ApplyEvent.PERMIT_TAKEN
                     and x["plan_id"] == plan_id)
        done = next(x for x in records if x["type"] == ApplyEvent.ORDER_EXECUTED
                    and x["plan_id"] == plan_id)
        return (done["mono_ns"] - taken["mono_ns"]) / 1e6

    assert order_ms("slow1") > config.exit_lock_ttl_ms
    assert order_ms("fast1") < 150
    start = completion(tmp_path, fid, "start").value
    assert start["latency_ms"] == 450 and start["bound_ms"] == 2000
    pair_check(tmp_path, fid)


def test_slow_exchange_refuses_a_latency_beyond_the_timing_bound(
        shared_redis: EmbeddedRedis, prefix: str, tmp_path: Path) -> None:
    config = GovernorConfig(exit_lock_ttl_ms=300, permit_ttl_ms=1000,
                            capital_reservation_ttl_ms=3000)
    ex = Exchange.create(tmp_path / "ledger.db", capital=1000)
    layer = ApplyLayer(shared_redis.url, Keys(prefix), ex, FAST)  # knobs only: not started
    before = layer.knobs()
    with Nemesis(make_ctx(tmp_path, apply_layer=layer, config=config)) as nem:
        fail = start_failed(tmp_path, nem, FaultSpec("slow_exchange", duration=1.0,
                                                     params={"latency_ms": 2500}))
        assert "timing bound" in fail.value["error"]
        fail = start_failed(tmp_path, nem, FaultSpec("slow_exchange", duration=1.0,
                                                     params={"latency_ms": 1500,
                                                             "jitter_ms": 400}))
        assert "timing bound" in fail.value["error"]
        assert nem.windows() == [] and nem.active() == []
    assert layer.knobs() == before
    with pytest.raises(FaultUnavailable, match="no order latency fits"):
        slow_exchange_latency(GovernorConfig(exit_lock_ttl_ms=5000, permit_ttl_ms=1000,
                                             capital_reservation_ttl_ms=3000))
    assert slow_exchange_latency(GovernorConfig()) == (180_000, 540_000)


# --------------------------------------------------------------------------- clock skew


def decision_skew_ms(desk: Desk, symbol: str) -> int:
    d = desk.decide("OPEN", symbol)
    secs, micros = desk.r.time()
    return int(d["decided_at_ms"]) - (secs * 1000 + micros // 1000)


def test_clock_skew_runs_the_governor_under_faketime(desk: Desk, tmp_path: Path) -> None:
    if find_libfaketime() is None:
        pytest.skip("libfaketime not installed (apt-get install faketime)")
    # The seed variant stamps decided_at_ms with the governor host's time.time().
    with (governors(desk, tmp_path, GOVERNOR_VARIANT="seed") as sup,
          contextlib.ExitStack() as stack):
        sup.wait_ready(timeout=30)
        assert abs(decision_skew_ms(desk, "S01USDT")) < 2000
        nem = Nemesis(make_ctx(tmp_path, supervisor=sup))
        stack.callback(nem.heal_all)
        fid = nem.inject(FaultSpec("clock_skew", duration=60, target="gov-1",
                                   params={"offset_s": 30}))
        wait_on(nem, fid, timeout=30)
        pid = sup.wait_ready(timeout=30)["gov-1"]
        assert psutil.Process(pid).environ()["FAKETIME"] == "+30s"
        assert 28_000 < decision_skew_ms(desk, "S02USDT") < 32_000
        nem.heal_all()  # ends the window early: restarted without faketime
        pid2 = sup.wait_ready(timeout=30)["gov-1"]
        assert pid2 != pid and "FAKETIME" not in psutil.Process(pid2).environ()
        assert sup.instance_env("gov-1") == {}
        assert abs(decision_skew_ms(desk, "S03USDT")) < 2000
    pair_check(tmp_path, fid)
    assert completion(tmp_path, fid, "stop").value  # pids of the restart
    assert fault_ops(tmp_path, fid)[2].value["healed"] is True


def test_clock_skew_without_libfaketime_is_a_fail_op(tmp_path: Path) -> None:
    missing = str(tmp_path / "missing" / "libfaketime.so.1")
    assert find_libfaketime([missing]) is None
    with Nemesis(make_ctx(tmp_path, faketime_search=[missing])) as nem:
        fail = start_failed(tmp_path, nem, FaultSpec("clock_skew", duration=5))
        assert "libfaketime not installed" in fail.value["error"]
        assert nem.windows() == [] and nem.active() == []
    ops = fault_ops(tmp_path)
    assert [(str(o.type), o.value["phase"]) for o in ops] == [("invoke", "start"),
                                                               ("fail", "start")]


def test_faketime_env_formats_offsets() -> None:
    env = faketime_env("/lib/x.so", -2.5)
    assert env["FAKETIME"] == "-2.5s" and env["LD_PRELOAD"].startswith("/lib/x.so")
    assert faketime_env("/lib/x.so", 30)["FAKETIME"] == "+30s"


# --------------------------------------------------------------------------- unsupported


def test_faults_a_url_redis_must_not_get_are_fail_ops(shared_redis: EmbeddedRedis,
                                                      prefix: str, tmp_path: Path) -> None:
    url = UrlRedis(shared_redis.url, prefix=prefix, cleanup_on_stop=False).start()
    with Nemesis(make_ctx(tmp_path, redis=url, keys=Keys(prefix))) as nem:
        errors = [start_failed(tmp_path, nem, FaultSpec(kind, duration=0.5)).value["error"]
                  for kind in ("kill_redis", "pause_redis", "memory_pressure", "failover")]
        for kind in ("latency", "kill_governor", "slow_exchange"):  # nothing to act on
            start_failed(tmp_path, nem, FaultSpec(kind, duration=0.5))
    assert errors[0].startswith("UnsupportedFault") and errors[1].startswith("UnsupportedFault")
    assert "url Redis" in errors[2] and "Sentinel" in errors[3]
    assert shared_redis.running and not shared_redis.paused
    assert shared_redis.client().config_get("maxmemory")["maxmemory"] == "0"
    url.stop()


# --------------------------------------------------------------------------- the schedule


def test_schedule_history_and_heal_all_restore_everything(
        redis_server: EmbeddedRedis, prefix: str, tmp_path: Path) -> None:
    desk = Desk(redis_server.url, prefix, redis_server.client()).setup()
    with (governors(desk, tmp_path) as sup,
          FaultProxy("127.0.0.1", redis_server.port) as proxy,
          contextlib.ExitStack() as stack):
        pid = sup.wait_ready(timeout=30)["gov-1"]
        keys = Keys(prefix)
        faults = [
            FaultSpec("pause_governor", at=0.0, duration=60, target="gov-1"),
            FaultSpec("latency", at=0.0, duration=60, params={"latency_ms": 50}),
            FaultSpec("drop", at=0.1, duration=60, params={"prob": 0.5}),
            FaultSpec("memory_pressure", at=0.2, duration=60),
            FaultSpec("partition", at=0.0, duration=0.2, every=0.5),
            FaultSpec("pause_governor", at=0.3, duration=1, target="gov-1"),  # conflicts
        ]
        ctx = make_ctx(tmp_path, supervisor=sup, redis=redis_server, proxy=proxy, keys=keys)
        nem = Nemesis(ctx, faults).start()
        stack.callback(nem.heal_all)  # also when an assertion fails
        wait_for(lambda: len([w for w in nem.windows() if w.kind == "partition"
                              and w.stop_ns]) >= 3, 10, "three partition windows")
        on = {a.kind for a in nem.active()}
        assert {"pause_governor", "latency", "drop", "memory_pressure"} <= on
        assert psutil.Process(pid).status() == psutil.STATUS_STOPPED
        c = redis_server.client(socket_timeout=5)
        assert int(c.config_get("maxmemory")["maxmemory"]) > 0

        nem.heal_all()
        assert nem.active() == []
        assert all(isinstance(w, FaultWindow) and w.stop_ns for w in nem.windows())
        assert psutil.Process(pid).status() != psutil.STATUS_STOPPED
        assert sup.status()["gov-1"].state == "running"
        stats = proxy.stats()
        assert (stats["latency_ms"], stats["drop_prob"], stats["partitioned"]) == (0, 0, False)
        assert proxy.active_faults == {}
        assert c.config_get("maxmemory")["maxmemory"] == "0"
        assert not c.keys(f"{prefix}:nemesis:*")
        n_ops = len(fault_ops(tmp_path))
        nem.heal_all()  # idempotent
        assert len(fault_ops(tmp_path)) == n_ops
        assert sup.wait_ready(timeout=30) == {"gov-1": pid}

    ops = fault_ops(tmp_path)
    by_key: dict[str, list[Op]] = {}
    for op in ops:
        by_key.setdefault(op.key or "", []).append(op)
    kinds_ok = set()
    for key, seq in by_key.items():
        shape = [(str(o.type), o.value["phase"]) for o in seq]
        if shape == [("invoke", "start"), ("fail", "start")]:
            assert "conflicts with active fault" in seq[1].value["error"], seq
            continue
        assert shape == [("invoke", "start"), ("ok", "start"),
                         ("invoke", "stop"), ("ok", "stop")], (key, shape)
        kinds_ok.add(seq[0].value["kind"])
    assert kinds_ok == {"pause_governor", "latency", "drop", "memory_pressure", "partition"}
    healed = [o for o in ops if o.type == OpType.INVOKE and o.value["phase"] == "stop"
              and o.value.get("healed")]
    assert {o.value["kind"] for o in healed} == {"pause_governor", "latency", "drop",
                                                 "memory_pressure"}


def test_set_knobs_returns_previous_values_and_validates(shared_redis: EmbeddedRedis,
                                                         prefix: str, tmp_path: Path) -> None:
    ex = Exchange.create(tmp_path / "ledger.db", capital=1000)
    layer = ApplyLayer(shared_redis.url, Keys(prefix), ex, FAST)
    prev = layer.set_knobs(open_latency_ms=900, late_duplicate_ms=250)
    assert prev == {"open_latency_ms": 5, "late_duplicate_ms": 0}
    assert layer.config.open_latency_ms == 900 and layer.config.late_duplicate_ms == 250
    with pytest.raises(ValueError):
        layer.set_knobs(duplicate_result_prob=2.0)
    assert layer.config.duplicate_result_prob == 0.0
    layer.set_knobs(**prev)
    assert layer.knobs() == ApplyLayer(shared_redis.url, Keys(prefix), ex, FAST).knobs()

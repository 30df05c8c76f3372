"""The apply layer: permits executed at most once, results after the mirror, duplicates on
demand, slow orders beside fast ones, and Redis faults survived. Against real Redis."""

from __future__ import annotations

import multiprocessing
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import redis
from govtools import wait_for

from chaos.apply_layer import (
    _MIRROR_SCAN_KEYS,
    ApplyConfig,
    ApplyEvent,
    ApplyLayer,
    run_apply_process,
)
from chaos.exchange import Exchange, Order
from governor_ref.decisions import SCAN_COUNT
from governor_ref.keys import GROUP_APPLY, Keys
from governor_ref.protocol import ExecutionResult, Permit, ResultStatus

BTC = "BTCUSDT"
FAST = ApplyConfig(open_latency_ms=5, open_jitter_ms=5, close_latency_ms=5, close_jitter_ms=5,
                   block_ms=50, drain_timeout_s=2)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def grant(r: redis.Redis, keys: Keys, plan_id: str, symbol: str = BTC, action: str = "OPEN",
          *, side: str = "LONG", notional: str = "100", fence: str = "", copies: int = 1,
          permit: bool = True) -> None:
    """Play the governor: the permit key first, then the PERMIT decision entry (copies > 1:
    the entry duplicated, as a buggy or redelivering governor would)."""
    if permit:
        p = Permit(plan_id, symbol, action, side, notional, fence, now_ms())
        r.set(keys.permit(plan_id), p.to_json(), px=60_000)
    fields = {"plan_id": plan_id, "symbol": symbol, "action": action, "decision": "PERMIT",
              "reason": "", "governor": "test", "decided_at_ms": str(now_ms())}
    if fence:
        fields["fence"] = fence
    for _ in range(copies):
        r.xadd(keys.events, fields)


def results(r: redis.Redis, keys: Keys) -> list[tuple[str, ExecutionResult]]:
    return [(i, ExecutionResult.from_fields(f)) for i, f in r.xrange(keys.results)]


def wait_results(r: redis.Redis, keys: Keys, n: int, timeout: float = 5.0
                 ) -> list[tuple[str, ExecutionResult]]:
    return wait_for(lambda: (lambda rs: rs if len(rs) >= n else None)(results(r, keys)),
                    timeout, f"{n} results")


@contextmanager
def running(*layers: ApplyLayer) -> Iterator[None]:
    for layer in layers:
        layer.start_thread()
    try:
        for layer in layers:
            assert layer.started.wait(5), "apply layer did not start"
        yield
    finally:
        for layer in layers:
            layer.stop()
        for layer in layers:
            assert layer._thread is not None and not layer._thread.is_alive()


@pytest.fixture
def keys(prefix: str) -> Keys:
    return Keys(prefix)


def test_a_permit_is_taken_executed_and_reported(shared_redis: Any, r: redis.Redis, keys: Keys,
                                                  ex: Exchange) -> None:
    with running(ApplyLayer(shared_redis.url, keys, ex, FAST)):
        grant(r, keys, "o1", notional="250", side="SHORT")
        [(_, res)] = wait_results(r, keys, 1)
        wait_for(lambda: r.xpending(keys.events, GROUP_APPLY)["pending"] == 0, what="ack")
    fill = ex.orders()[0]
    assert res == ExecutionResult("o1", BTC, "OPEN", ResultStatus.EXECUTED, fill.position_id,
                                  "250", "", "", fill.wall_ms)
    assert not r.exists(keys.permit("o1"))
    assert r.hgetall(keys.position(BTC))["position_id"] == fill.position_id
    assert r.get(keys.exposure_pct) == "0.25"


def test_a_missing_permit_is_reported_expired_and_nothing_executes(
        shared_redis: Any, r: redis.Redis, keys: Keys, ex: Exchange) -> None:
    with running(ApplyLayer(shared_redis.url, keys, ex, FAST)):
        grant(r, keys, "c1", action="CLOSE", fence="4", permit=False)
        [(_, res)] = wait_results(r, keys, 1)
    assert (res.plan_id, res.status, res.fence, res.reason) == ("c1", ResultStatus.EXPIRED, "4",
                                                                "permit_expired")
    assert ex.orders() == []


def test_block_and_informational_entries_are_acked_without_a_result(
        shared_redis: Any, r: redis.Redis, keys: Keys, ex: Exchange) -> None:
    r.xadd(keys.events, {"plan_id": "b1", "symbol": BTC, "action": "OPEN", "decision": "BLOCK",
                         "reason": "duplicate_open", "governor": "g", "decided_at_ms": "1"})
    r.xadd(keys.events, {"decision": "RECONCILE", "governor": "g"})
    with running(ApplyLayer(shared_redis.url, keys, ex, FAST)):
        wait_for(lambda: r.xinfo_groups(keys.events)[0]["last-delivered-id"] != "0-0"
                 and r.xpending(keys.events, GROUP_APPLY)["pending"] == 0, what="acks")
    assert results(r, keys) == [] and ex.orders() == []


def test_each_permit_executes_once_with_two_instances_and_duplicated_decisions(
        shared_redis: Any, r: redis.Redis, keys: Keys, ex: Exchange) -> None:
    a = ApplyLayer(shared_redis.url, keys, ex, replace(FAST, consumer="a1", seed=1))
    b = ApplyLayer(shared_redis.url, keys, ex, replace(FAST, consumer="a2", seed=2))
    plans = [f"o{i}" for i in range(30)]
    with running(a, b):
        for i, plan_id in enumerate(plans):
            grant(r, keys, plan_id, symbol=f"S{i:02d}USDT", copies=3)
        wait_results(r, keys, 30)
        wait_for(lambda: r.xpending(keys.events, GROUP_APPLY)["pending"] == 0, what="acks")
        time.sleep(0.2)  # room for a wrong extra result to show up
    orders = ex.orders()
    assert sorted(o.plan_id for o in orders) == sorted(plans)
    got = results(r, keys)
    assert sorted(res.plan_id for _, res in got) == sorted(plans)
    assert {res.status for _, res in got} == {ResultStatus.EXECUTED}


def test_a_slow_order_reclaimed_by_another_instance_is_not_reported_expired(
        shared_redis: Any, r: redis.Redis, keys: Keys, ex: Exchange) -> None:
    slow = ApplyLayer(shared_redis.url, keys, ex, ApplyConfig(
        consumer="slow", open_latency_ms=800, open_jitter_ms=0, block_ms=50, drain_timeout_s=3))
    records: list[dict[str, Any]] = []
    other = ApplyLayer(shared_redis.url, keys, ex, ApplyConfig(
        consumer="other", claim_idle_ms=100, claim_interval_s=0.05, block_ms=50),
        on_record=records.append)
    with running(slow):
        grant(r, keys, "o1")
        wait_for(lambda: not r.exists(keys.permit("o1")), what="the slow instance to take it")
        with running(other):
            wait_for(lambda: records, what="the other instance to reclaim the entry")
            [(_, res)] = wait_results(r, keys, 1)
    assert records[0]["type"] == ApplyEvent.DUPLICATE_DECISION and records[0]["owner"] == "slow"
    assert res.status == ResultStatus.EXECUTED
    assert len(results(r, keys)) == 1 and len(ex.orders()) == 1


def test_the_mirror_shows_the_order_before_its_result_is_visible(
        shared_redis: Any, r: redis.Redis, keys: Keys, ex: Exchange) -> None:
    symbols = [f"M{i:02d}USDT" for i in range(15)]
    seen: list[tuple[str, str, str | None]] = []
    # No periodic sync during the test: it must not be what puts the mirror right.
    with running(ApplyLayer(shared_redis.url, keys, ex, replace(FAST, mirror_interval_s=60))):
        last = "0-0"
        for phase in ("OPEN", "CLOSE"):
            for s in symbols:
                grant(r, keys, f"{phase}-{s}", symbol=s, action=phase)
            for _ in symbols:
                resp = r.xread({keys.results: last}, count=1, block=5000)
                assert resp, "no result"
                last, fields = resp[0][1][0]
                # Read the mirror the moment the result shows: it must already agree.
                seen.append((fields["action"], fields["position_id"],
                             r.hget(keys.position(fields["symbol"]), "position_id")))
    assert len(seen) == 30
    for action, position_id, mirrored in seen:
        assert mirrored == (position_id if action == "OPEN" else None)


def test_duplicate_results_are_written_late_when_asked(
        shared_redis: Any, r: redis.Redis, keys: Keys, ex: Exchange) -> None:
    cfg = replace(FAST, duplicate_result_prob=1.0, late_duplicate_ms=300)
    with running(ApplyLayer(shared_redis.url, keys, ex, cfg)):
        grant(r, keys, "o1")
        grant(r, keys, "o2", symbol="ETHUSDT")
        got = wait_results(r, keys, 4)
    by_plan: dict[str, list[tuple[int, ExecutionResult]]] = {}
    for entry_id, res in got:
        by_plan.setdefault(res.plan_id, []).append((int(entry_id.split("-")[0]), res))
    for (t1, first), (t2, second) in by_plan.values():
        assert first == second and t2 - t1 >= 290
    assert len(ex.orders()) == 2


def test_duplicate_results_can_follow_at_once(
        shared_redis: Any, r: redis.Redis, keys: Keys, ex: Exchange) -> None:
    cfg = replace(FAST, duplicate_result_prob=1.0)
    with running(ApplyLayer(shared_redis.url, keys, ex, cfg)):
        grant(r, keys, "o1")
        [(_, a), (_, b)] = wait_results(r, keys, 2)
    assert a == b and len(ex.orders()) == 1


def test_slow_orders_do_not_hold_up_fast_ones(
        shared_redis: Any, r: redis.Redis, keys: Keys, ex: Exchange) -> None:
    ex.execute(Order("seed", BTC, "OPEN", "LONG", "10"))
    cfg = ApplyConfig(open_latency_ms=10, open_jitter_ms=0, close_latency_ms=1500,
                      close_jitter_ms=0, workers=2, block_ms=50, drain_timeout_s=3)
    with running(ApplyLayer(shared_redis.url, keys, ex, cfg)):
        t0 = time.monotonic()
        grant(r, keys, "c1", action="CLOSE", fence="1")
        grant(r, keys, "c2", symbol="XRPUSDT", action="CLOSE", fence="2", notional="5")
        for i in range(6):
            grant(r, keys, f"o{i}", symbol=f"F{i}USDT")
        wait_results(r, keys, 6)
        fast_done = time.monotonic() - t0
        got = wait_results(r, keys, 8)
    assert fast_done < 1.0
    assert [res.action for _, res in got] == ["OPEN"] * 6 + ["CLOSE"] * 2


def test_a_restarted_consumer_reports_an_order_the_ledger_shows_executed(
        shared_redis: Any, r: redis.Redis, keys: Keys, ex: Exchange) -> None:
    # The previous life of consumer apply-1: read the decision, took and executed the
    # permit, then died before writing the result.
    grant(r, keys, "o1")
    r.xgroup_create(keys.events, GROUP_APPLY, id="0", mkstream=True)
    r.xreadgroup(GROUP_APPLY, "apply-1", {keys.events: ">"})
    assert ex.take("o1", "apply-1") is None
    fill = ex.execute(Order.from_permit(Permit.from_json(r.getdel(keys.permit("o1")) or "")))
    with running(ApplyLayer(shared_redis.url, keys, ex, FAST)):
        [(_, res)] = wait_results(r, keys, 1)
        wait_for(lambda: r.xpending(keys.events, GROUP_APPLY)["pending"] == 0, what="ack")
    assert (res.status, res.position_id, res.executed_at_ms) == (ResultStatus.EXECUTED,
                                                                 fill.position_id, fill.wall_ms)
    assert len(ex.orders()) == 1


def test_a_stale_fence_is_reported_rejected(shared_redis: Any, r: redis.Redis, keys: Keys,
                                             tmp_path: Path) -> None:
    ex = Exchange.create(tmp_path / "fenced.db", fenced=True)
    ex.execute(Order("p1", BTC, "OPEN", "LONG", "10"))
    ex.execute(Order("c9", BTC, "CLOSE", "LONG", "10", fence=9))
    ex.execute(Order("p2", BTC, "OPEN", "LONG", "10"))
    with running(ApplyLayer(shared_redis.url, keys, ex, FAST)):
        grant(r, keys, "c3", action="CLOSE", fence="3")
        [(_, res)] = wait_results(r, keys, 1)
    assert (res.status, res.reason, res.fence) == (ResultStatus.REJECTED, "rejected_stale_fence",
                                                   "3")
    assert BTC in ex.open_positions()


def test_on_record_sees_take_execution_and_result_in_order(
        shared_redis: Any, r: redis.Redis, keys: Keys, ex: Exchange) -> None:
    records: list[dict[str, Any]] = []
    with running(ApplyLayer(shared_redis.url, keys, ex, FAST, on_record=records.append)):
        grant(r, keys, "o1")
        grant(r, keys, "x1", permit=False)
        wait_results(r, keys, 2)
        wait_for(lambda: len(records) >= 5, what="records")
    o1 = [rec["type"] for rec in records if rec["plan_id"] == "o1"]
    assert o1 == ["permit_taken", "order_executed", "result_written"]
    assert [rec["type"] for rec in records if rec["plan_id"] == "x1"] == ["permit_missing",
                                                                          "result_written"]
    assert all(rec["consumer"] == "apply-1" and rec["mono_ns"] > 0 for rec in records)


def test_the_periodic_sync_restores_a_lost_mirror(
        shared_redis: Any, r: redis.Redis, keys: Keys, ex: Exchange) -> None:
    ex.execute(Order("p1", BTC, "OPEN", "LONG", "100"))
    ex.execute(Order("p2", "ETHUSDT", "OPEN", "SHORT", "50"))
    cfg = replace(FAST, mirror_interval_s=0.1)
    with running(ApplyLayer(shared_redis.url, keys, ex, cfg)):
        wait_for(lambda: r.exists(keys.position(BTC), keys.position("ETHUSDT")) == 2,
                 what="the first sync")
        r.delete(keys.position(BTC), keys.position("ETHUSDT"), keys.exposure_pct)
        wait_for(lambda: r.exists(keys.position(BTC), keys.position("ETHUSDT"),
                                  keys.exposure_pct) == 3, what="the sync after the loss")
    assert r.get(keys.exposure_pct) == "0.15"


def test_a_redis_crash_is_survived_and_the_mirror_comes_back(
        redis_server: Any, tmp_path: Path) -> None:
    ex = Exchange.create(tmp_path / "ledger.db", capital=1000)
    keys = Keys("crash")
    r = redis_server.client()
    cfg = replace(FAST, mirror_interval_s=0.2)
    try:
        with running(ApplyLayer(redis_server.url, keys, ex, cfg)):
            grant(r, keys, "o1")
            wait_results(r, keys, 1)
            redis_server.kill()
            time.sleep(0.5)
            redis_server.restart()  # no persistence: stream, group and mirror are gone
            wait_for(lambda: r.exists(keys.position(BTC)), what="the mirror after restart")
            grant(r, keys, "o2", symbol="ETHUSDT")
            [(_, res)] = wait_results(r, keys, 1, timeout=10)
        assert res.plan_id == "o2" and res.status == ResultStatus.EXECUTED
        assert [o.plan_id for o in ex.orders()] == ["o1", "o2"]
    finally:
        r.close()


def test_run_apply_process_serves_from_a_child_process(
        shared_redis: Any, r: redis.Redis, keys: Keys, ex: Exchange) -> None:
    ctx = multiprocessing.get_context("fork")
    stop = ctx.Event()
    proc = ctx.Process(target=run_apply_process, args=(shared_redis.url, keys, ex, FAST, stop))
    proc.start()
    try:
        grant(r, keys, "o1")
        [(_, res)] = wait_results(r, keys, 1, timeout=10)
        assert res.status == ResultStatus.EXECUTED
        assert [o.pid for o in ex.orders()] == [proc.pid]
    finally:
        stop.set()
        proc.join(10)
        if proc.is_alive():
            proc.kill()
            proc.join()
    assert proc.exitcode == 0


def test_stop_lets_taken_orders_finish(shared_redis: Any, r: redis.Redis, keys: Keys,
                                       ex: Exchange) -> None:
    layer = ApplyLayer(shared_redis.url, keys, ex, ApplyConfig(
        open_latency_ms=400, open_jitter_ms=0, block_ms=50, drain_timeout_s=3))
    with running(layer):
        grant(r, keys, "o1")
        wait_for(lambda: not r.exists(keys.permit("o1")), what="the take")
    assert [res.plan_id for _, res in results(r, keys)] == ["o1"]
    assert len(ex.orders()) == 1


def test_threads_are_gone_after_stop(shared_redis: Any, keys: Keys, ex: Exchange) -> None:
    before = set(threading.enumerate())
    with running(ApplyLayer(shared_redis.url, keys, ex, FAST)):
        pass
    time.sleep(0.05)
    assert [t.name for t in set(threading.enumerate()) - before] == []


def test_the_mirror_sync_looks_for_strays_a_bounded_share_of_the_keyspace_at_a_time(
        shared_redis: Any, r: redis.Redis, keys: Keys, ex: Exchange) -> None:
    """SCAN walks the whole keyspace (every decision record, every other system's key on
    a shared Redis): the mirror loop's first pass looks for stray ``P:position:*`` keys
    everywhere, later passes walk at most _MIRROR_SCAN_KEYS keys each, and a stray is
    still found and deleted."""
    filler = [keys.decision(f"fill-{i}") for i in range(30_000)]

    def scans() -> int:
        return int(r.info("commandstats").get("cmdstat_scan", {}).get("calls", 0))

    stray, late_stray = keys.position("XRPUSDT"), keys.position("ADAUSDT")
    try:
        for i in range(0, len(filler), 5_000):
            r.mset(dict.fromkeys(filler[i:i + 5_000], "BLOCK|filler"))
        r.hset(stray, mapping={"position_id": "stray"})
        layer = ApplyLayer(shared_redis.url, keys, ex, replace(FAST, mirror_interval_s=0.05))
        before = scans()
        found, cursor = layer._stray_sweep(r, None)
        assert found == [stray] and cursor == 0
        assert scans() - before >= len(filler) // SCAN_COUNT  # the first pass: everything
        passes, seen = 0, []
        while True:
            before = scans()
            found, cursor = layer._stray_sweep(r, cursor)
            assert scans() - before <= _MIRROR_SCAN_KEYS // SCAN_COUNT
            passes, seen = passes + 1, seen + found
            if cursor == 0:
                break
        assert seen == [stray] and passes > 1
        with running(layer):
            wait_for(lambda: not r.exists(stray), what="the first pass deleting the stray")
            r.hset(late_stray, mapping={"position_id": "stray"})
            wait_for(lambda: not r.exists(late_stray), timeout=20,
                     what="a later pass deleting a stray written meanwhile")
    finally:
        for i in range(0, len(filler), 5_000):
            r.delete(*filler[i:i + 5_000])
        r.delete(stray, late_stray, keys.exposure_pct)

"""Idempotent redelivery, restart recovery, lease expiry and reconciliation."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable

from govtools import Desk

from governor_ref.decisions import SCAN_COUNT
from governor_ref.governor import Governor, Settings
from governor_ref.keys import GROUP_GOVERNOR
from governor_ref.variants import factory

MakeDesk = Callable[..., Desk]




def test_plan_readded_with_same_id_gets_no_second_decision(make_desk: MakeDesk) -> None:
    desk = make_desk()
    pid = desk.plan("OPEN", "S01USDT")
    assert desk.decision(pid)["decision"] == "PERMIT"
    desk.plan("OPEN", "S01USDT", plan_id=pid)  # redelivered by its producer
    desk.plan("OPEN", "S02USDT", plan_id=pid)  # same id, different content
    desk.wait_idle()
    assert len(desk.decisions(pid)) == 1


def test_duplicated_close_result_releases_once(make_desk: MakeDesk) -> None:
    desk = make_desk(slots_BASE=2)
    desk.open_position("S01USDT")
    desk.open_position("S02USDT")
    c = desk.decide("CLOSE", "S01USDT")
    desk.execute(c["plan_id"])
    desk.result(c["plan_id"], "S01USDT", "CLOSE", "executed")  # at-least-once: twice
    desk.result(c["plan_id"], "S01USDT", "CLOSE", "executed")
    desk.settled()
    assert desk.decide("OPEN", "S03USDT")["decision"] == "PERMIT"
    # A counter released three times would now show free slots; leases do not.
    assert desk.decide("OPEN", "S04USDT")["reason"] == "active_slots_waiting_rotation_close"


def test_late_open_result_does_not_resurrect_a_closed_position(make_desk: MakeDesk) -> None:
    desk = make_desk(slots_BASE=1)
    o = desk.decide("OPEN", "S01USDT")
    desk.execute(o["plan_id"])
    desk.settled()
    c = desk.decide("CLOSE", "S01USDT")
    desk.execute(c["plan_id"])
    desk.settled()
    # the OPEN's result again, late (redelivery)
    desk.result(o["plan_id"], "S01USDT", "OPEN", "executed", f"pos-{o['plan_id']}", "100")
    desk.settled()
    assert desk.r.hlen(desk.keys.positions) == 0
    assert desk.decide("OPEN", "S02USDT")["decision"] == "PERMIT"


def test_pending_plans_of_a_crashed_instance_are_decided_on_restart(make_desk: MakeDesk) -> None:
    desk = make_desk(start=False)
    pids = [desk.plan("OPEN", f"S0{i}USDT") for i in range(3)]
    # g1 read them and died before deciding: they are pending for g1.
    desk.r.xreadgroup(GROUP_GOVERNOR, "g1", {desk.keys.plans: ">"}, count=10)
    assert desk.r.xpending(desk.keys.plans, GROUP_GOVERNOR)["pending"] == 3
    desk.start("g1", claim_idle_ms=60_000)  # no reclaim: only its own pending re-read
    for pid in pids:
        assert desk.decision(pid)["decision"] == "PERMIT"
    desk.wait_idle()


def test_entries_of_a_dead_consumer_are_reclaimed(make_desk: MakeDesk) -> None:
    desk = make_desk(start=False)
    pids = [desk.plan("OPEN", f"S0{i}USDT") for i in range(3)]
    desk.r.xreadgroup(GROUP_GOVERNOR, "dead", {desk.keys.plans: ">"}, count=10)
    desk.start("g2", claim_idle_ms=200)
    for pid in pids:
        assert desk.decision(pid)["decision"] == "PERMIT"
        assert desk.decision(pid)["governor"] == "g2"
    desk.wait_idle()


def test_open_lease_expiry_frees_slot_only_when_the_mirror_shows_no_position(
        make_desk: MakeDesk) -> None:
    desk = make_desk(slots_BASE=1, permit_ttl_ms=100, capital_reservation_ttl_ms=400)
    d = desk.decide("OPEN", "S01USDT")
    assert desk.decide("OPEN", "S02USDT")["decision"] == "BLOCK"
    time.sleep(0.5)  # permit expired unused, no result ever came
    assert desk.decide("OPEN", "S02USDT")["decision"] == "PERMIT"
    # Now an OPEN that executed but whose result was lost: the mirror shows it.
    time.sleep(0.5)
    assert d["decision"] == "PERMIT"
    d3 = desk.decide("OPEN", "S03USDT")
    assert d3["decision"] == "PERMIT"
    desk.r.hset(desk.keys.position("S03USDT"), mapping={"position_id": "pos-3", "side": "LONG",
                                                        "notional": "100", "pnl_pct": "0"})
    time.sleep(0.5)
    assert desk.decide("OPEN", "S04USDT")["reason"] == "active_slots_waiting_rotation_close"
    assert desk.r.hexists(desk.keys.positions, "S03USDT")


def test_close_lease_expiry_settles_from_the_mirror(make_desk: MakeDesk) -> None:
    desk = make_desk(slots_BASE=1, permit_ttl_ms=100, capital_reservation_ttl_ms=400)
    desk.open_position("S01USDT")
    c = desk.decide("CLOSE", "S01USDT")
    desk.r.getdel(desk.keys.permit(c["plan_id"]))
    desk.r.delete(desk.keys.position("S01USDT"))  # executed; its result is lost
    time.sleep(0.5)
    assert desk.decide("CLOSE", "S01USDT")["reason"] == "no_open_position"
    assert desk.decide("OPEN", "S02USDT")["decision"] == "PERMIT"


def test_close_lease_expiry_keeps_position_when_close_never_ran(make_desk: MakeDesk) -> None:
    desk = make_desk(permit_ttl_ms=100, capital_reservation_ttl_ms=400)
    desk.open_position("S01USDT")
    desk.decide("CLOSE", "S01USDT")  # permit expires unused, no result
    time.sleep(0.5)
    assert desk.decide("CLOSE", "S01USDT")["decision"] == "PERMIT"


def test_startup_adopts_mirror_and_keeps_in_flight_leases(make_desk: MakeDesk) -> None:
    desk = make_desk(start=False, slots_BASE=3)
    for s in ("S01USDT", "S02USDT"):
        desk.r.hset(desk.keys.position(s), mapping={"position_id": f"pos-{s}", "side": "LONG",
                                                    "notional": "50", "pnl_pct": "0"})
    run = desk.start("g1")
    inflight = desk.decide("OPEN", "S03USDT")
    assert inflight["decision"] == "PERMIT"
    run.stop()
    desk.running.clear()
    desk.start("g2")  # start-up reconcile must not reset the in-flight open
    assert desk.decide("OPEN", "S04USDT")["reason"] == "active_slots_waiting_rotation_close"
    assert desk.r.hget(desk.keys.opening, "S03USDT") == inflight["plan_id"]
    desk.execute(inflight["plan_id"])
    desk.settled()
    assert desk.r.hlen(desk.keys.positions) == 3


def test_position_closed_outside_the_governor_is_dropped_by_reconcile(
        make_desk: MakeDesk) -> None:
    desk = make_desk(slots_BASE=1)
    desk.open_position("S01USDT")
    desk.r.delete(desk.keys.position("S01USDT"))  # closed by hand on the venue
    deadline = time.monotonic() + 5
    while desk.r.hexists(desk.keys.positions, "S01USDT") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert desk.decide("OPEN", "S02USDT")["decision"] == "PERMIT"


def test_periodic_reconcile_walks_a_bounded_share_of_a_large_keyspace(
        make_desk: MakeDesk) -> None:
    """SCAN walks the whole keyspace, which grows with every decision record: the
    start-up reconcile walks all of it, a periodic one at most ``reconcile_scan_keys``
    keys, going on from where the last stopped, and a position the governor does not
    count is still adopted within one sweep."""
    desk = make_desk(start=False, slots_BASE=5)
    filler = [desk.keys.decision(f"fill-{i}") for i in range(30_000)]

    def scans() -> int:
        return int(desk.r.info("commandstats").get("cmdstat_scan", {}).get("calls", 0))

    try:
        for i in range(0, len(filler), 5_000):
            desk.r.mset(dict.fromkeys(filler[i:i + 5_000], "BLOCK|filler"))
        settings = Settings(redis_url=desk.url, prefix=desk.prefix,
                            reconcile_scan_keys=5_000)
        logic = Governor(settings, factory("reference")).logic
        before = scans()
        logic.start()
        assert scans() - before >= len(filler) // SCAN_COUNT  # start-up: everything
        desk.r.hset(desk.keys.position("S07USDT"),
                    mapping={"position_id": "pos-S07", "side": "LONG", "notional": "50",
                             "pnl_pct": "0"})
        ticks = 0
        while not desk.r.hexists(desk.keys.positions, "S07USDT"):
            before = scans()
            logic.periodic()
            ticks += 1
            assert scans() - before <= 5_000 // SCAN_COUNT, "a periodic walk went past its budget"
            assert ticks <= 40, "the sweep never reached the mirror's position"
        assert ticks >= 1
    finally:
        for i in range(0, len(filler), 5_000):
            desk.r.delete(*filler[i:i + 5_000])


def _spawn(desk: Desk, consumer: str) -> subprocess.Popen[bytes]:
    env = dict(os.environ, REDIS_URL=desk.url, GOVERNOR_PREFIX=desk.prefix,
               GOVERNOR_CONSUMER=consumer, GOVERNOR_LOG_LEVEL="WARNING")
    return subprocess.Popen([sys.executable, "-m", "governor_ref", "run"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def test_sigkilled_governor_process_restarts_and_every_plan_gets_one_decision(
        make_desk: MakeDesk) -> None:
    desk = make_desk(start=False, slots_BASE=10, max_positions=10)
    proc = _spawn(desk, "gk")
    try:
        pids = [desk.plan("OPEN", f"S{i % 60:02d}USDT") for i in range(300)]
        time.sleep(0.3)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        pids += [desk.plan("CLOSE", f"S{i:02d}USDT") for i in range(10)]
        proc = _spawn(desk, "gk")  # same consumer name
        for pid in pids:
            desk.decision(pid, timeout=20)
        desk.wait_idle()
    finally:
        proc.terminate()
        proc.wait(10)
    counts = Counter(e["plan_id"] for e in desk.events() if e["decision"] in ("PERMIT", "BLOCK"))
    assert set(counts) >= set(pids)
    assert max(counts.values()) == 1
    assert len([e for e in desk.events() if e["decision"] == "PERMIT"
                and e["action"] == "OPEN"]) <= 10

"""Each gate and block reason of the reference governor, on a real Redis."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

from govtools import Desk, now_ms

MakeDesk = Callable[..., Desk]




def test_open_is_permitted_with_permit_key_and_lease(make_desk: MakeDesk) -> None:
    desk = make_desk()
    d = desk.decide("OPEN", "S01USDT", notional="150.50")
    assert d["decision"] == "PERMIT" and d["reason"] == "" and d["governor"] == "g1"
    permit = json.loads(desk.r.get(desk.keys.permit(d["plan_id"])))
    assert permit["symbol"] == "S01USDT" and permit["notional"] == "150.50"
    assert permit["side"] == "LONG" and permit["action"] == "OPEN"
    ttl = desk.r.pttl(desk.keys.permit(d["plan_id"]))
    assert 0 < ttl <= 60000
    assert desk.r.hget(desk.keys.opening, "S01USDT") == d["plan_id"]


def test_stale_intent_is_blocked(make_desk: MakeDesk) -> None:
    desk = make_desk(max_intent_age_ms=1000)
    assert desk.decide("OPEN", "S01USDT", created=now_ms() - 1500)["reason"] == "intent_stale"
    assert desk.decide("OPEN", "S02USDT", created=now_ms() - 200)["decision"] == "PERMIT"


def test_position_count_drift_is_blocked(make_desk: MakeDesk) -> None:
    desk = make_desk()
    desk.open_position("S01USDT")
    # 1 open now; snapshot 4 -> drift 3 > 2
    d = desk.decide("OPEN", "S02USDT", snapshot_position_count=4)
    assert d["reason"] == "state_drift_position_count"
    assert desk.decide("OPEN", "S03USDT", snapshot_position_count=3)["decision"] == "PERMIT"


def test_exposure_drift_is_blocked_and_missing_exposure_fails_closed(make_desk: MakeDesk) -> None:
    desk = make_desk()
    desk.r.set(desk.keys.exposure_pct, "0.40")
    assert desk.decide("OPEN", "S01USDT", snapshot_exposure_pct="0.20")["reason"] == \
        "state_drift_exposure"
    assert desk.decide("OPEN", "S02USDT", snapshot_exposure_pct="0.30")["decision"] == "PERMIT"
    desk.r.delete(desk.keys.exposure_pct)
    assert desk.decide("OPEN", "S03USDT", snapshot_exposure_pct="0.40")["reason"] == \
        "state_drift_exposure"


def test_per_trade_notional_cap(make_desk: MakeDesk) -> None:
    desk = make_desk()
    assert desk.decide("OPEN", "S01USDT", notional="200.01")["reason"] == "notional_cap_exceeded"
    assert desk.decide("OPEN", "S01USDT", notional="200")["decision"] == "PERMIT"


def test_total_notional_counts_open_and_permitted(make_desk: MakeDesk) -> None:
    desk = make_desk(max_total_notional=450, slots_BASE=10)
    desk.open_position("S01USDT", notional="200")  # open
    assert desk.decide("OPEN", "S02USDT", notional="200")["decision"] == "PERMIT"  # permitted
    d = desk.decide("OPEN", "S03USDT", notional="100")
    assert d["reason"] == "total_notional_cap_exceeded"
    assert desk.decide("OPEN", "S03USDT", notional="50")["decision"] == "PERMIT"


def test_allocation_checked_against_capital_and_fails_closed_without_target(
        make_desk: MakeDesk) -> None:
    desk = make_desk()
    desk.r.set(desk.keys.capital, "400")  # 25% of 400 = 100
    assert desk.decide("OPEN", "S01USDT", notional="120")["reason"] == \
        "capital_allocation_exceeded"
    assert desk.decide("OPEN", "S01USDT", notional="100")["decision"] == "PERMIT"
    desk.r.delete(desk.keys.allocation("S02USDT"))
    assert desk.decide("OPEN", "S02USDT", notional="10")["reason"] == \
        "capital_allocation_exceeded"


def test_allocation_is_optional_in_testnet_and_always_on_in_production(
        make_desk: MakeDesk) -> None:
    desk = make_desk(enforce_allocation=0)
    desk.r.delete(desk.keys.allocation("S01USDT"))
    assert desk.decide("OPEN", "S01USDT", notional="10")["decision"] == "PERMIT"
    desk.set_config(mode="production")
    desk.r.delete(desk.keys.allocation("S02USDT"))
    assert desk.decide("OPEN", "S02USDT", notional="10")["reason"] == \
        "capital_allocation_exceeded"


def test_duplicate_open_blocked_while_in_flight_open_or_mirrored(make_desk: MakeDesk) -> None:
    desk = make_desk()
    first = desk.decide("OPEN", "S01USDT")
    assert first["decision"] == "PERMIT"
    assert desk.decide("OPEN", "S01USDT")["reason"] == "duplicate_open"  # in flight
    desk.execute(first["plan_id"])
    desk.settled()
    assert desk.decide("OPEN", "S01USDT")["reason"] == "duplicate_open"  # open
    desk.r.hset(desk.keys.position("S09USDT"), mapping={"position_id": "ext", "side": "LONG",
                                                        "notional": "5"})
    assert desk.decide("OPEN", "S09USDT")["reason"] == "duplicate_open"  # only in the mirror


def test_slots_follow_the_regime_in_force(make_desk: MakeDesk) -> None:
    desk = make_desk()
    for i in range(3):
        desk.open_position(f"S0{i}USDT")
    desk.r.set(desk.keys.regime, "CHOP")  # 3 slots
    assert desk.decide("OPEN", "S05USDT")["reason"] == "active_slots_waiting_rotation_close"
    desk.r.set(desk.keys.regime, "BASE")  # 4 slots
    s05 = desk.decide("OPEN", "S05USDT")
    assert s05["decision"] == "PERMIT"
    assert desk.decide("OPEN", "S06USDT")["reason"] == "active_slots_waiting_rotation_close"
    desk.execute(s05["plan_id"])  # settled: no permit of the smaller regime outstanding
    desk.settled()
    desk.r.set(desk.keys.regime, "TREND_STRONG")  # 6 slots
    assert desk.decide("OPEN", "S06USDT")["decision"] == "PERMIT"


def test_a_flip_upwards_cannot_push_an_older_permit_over_its_own_limit(
        make_desk: MakeDesk) -> None:
    """Found by the chaos sweep (regime-flip, seed 4): A permitted under BASE (4) with 3
    occupied; the regime flips to TREND_STRONG (6); B permitted with 4 occupied executes
    first, and A then executes with 4 open although its permit allowed fewer than 4."""
    desk = make_desk()
    for i in range(3):
        desk.open_position(f"S0{i}USDT")
    a = desk.decide("OPEN", "S05USDT")
    assert a["decision"] == "PERMIT"
    desk.r.set(desk.keys.regime, "TREND_STRONG")
    assert desk.decide("OPEN", "S06USDT")["reason"] == "active_slots_waiting_rotation_close"
    desk.wait_idle()
    assert not [e for e in desk.events() if e["plan_id"].startswith("rot_")], \
        "waiting for an older permit to settle needs no rotation"
    desk.execute(a["plan_id"])
    desk.settled()
    assert desk.decide("OPEN", "S06USDT")["decision"] == "PERMIT"
    assert desk.decide("OPEN", "S07USDT")["decision"] == "PERMIT"


def test_max_positions_caps_every_regime(make_desk: MakeDesk) -> None:
    desk = make_desk(slots_TREND_STRONG=20, max_positions=2)
    desk.r.set(desk.keys.regime, "TREND_STRONG")
    assert desk.decide("OPEN", "S01USDT")["decision"] == "PERMIT"
    assert desk.decide("OPEN", "S02USDT")["decision"] == "PERMIT"
    assert desk.decide("OPEN", "S03USDT")["reason"] == "active_slots_waiting_rotation_close"


def test_full_slots_emit_one_rotation_close_of_the_weakest(make_desk: MakeDesk) -> None:
    desk = make_desk(slots_BASE=2)
    desk.open_position("S01USDT", pnl_pct=1.5)
    weak = desk.open_position("S02USDT", pnl_pct=-3.2)
    a = desk.decide("OPEN", "S03USDT")
    b = desk.decide("OPEN", "S04USDT")
    assert a["reason"] == b["reason"] == "active_slots_waiting_rotation_close"
    desk.wait_idle()
    rot = [e for e in desk.events() if e["plan_id"].startswith("rot_")]
    assert len(rot) == 1, "the rotation lock allows one rotation close at a time"
    assert rot[0]["symbol"] == "S02USDT" and rot[0]["action"] == "CLOSE"
    assert rot[0]["decision"] == "PERMIT"
    plans = [f for _i, f in desk.r.xrange(desk.keys.plans) if f["plan_id"] == rot[0]["plan_id"]]
    assert plans[0]["source"] == "rotation" and plans[0]["position_id"] == weak
    # Executing the rotation close frees the slot and the rotation lock.
    desk.execute(rot[0]["plan_id"])
    desk.settled()
    assert desk.r.get(desk.keys.rotation_lock) is None
    assert desk.decide("OPEN", "S03USDT")["decision"] == "PERMIT"


def test_close_permitted_once_with_fence_then_exit_lock_busy(make_desk: MakeDesk) -> None:
    desk = make_desk()
    desk.open_position("S01USDT")
    c1 = desk.decide("CLOSE", "S01USDT", source="harvest_brain")
    c2 = desk.decide("CLOSE", "S01USDT", source="exit_monitor")
    assert c1["decision"] == "PERMIT" and int(c1["fence"]) > 0
    assert c2["reason"] == "exit_lock_busy_double_close_prevention"
    desk.execute(c1["plan_id"])
    desk.settled()
    c3 = desk.decide("CLOSE", "S01USDT", source="kill_switch")
    assert c3["reason"] == "no_open_position"


def test_fences_increase(make_desk: MakeDesk) -> None:
    desk = make_desk()
    desk.open_position("S01USDT")
    c1 = desk.decide("CLOSE", "S01USDT")
    desk.execute(c1["plan_id"], status="rejected")
    desk.settled()
    c2 = desk.decide("CLOSE", "S01USDT")
    assert c2["decision"] == "PERMIT" and int(c2["fence"]) > int(c1["fence"])


def test_exit_lock_outlives_exit_lock_ttl_for_a_slow_order(make_desk: MakeDesk) -> None:
    desk = make_desk(exit_lock_ttl_ms=200)
    desk.open_position("S01USDT")
    assert desk.decide("CLOSE", "S01USDT")["decision"] == "PERMIT"
    time.sleep(0.5)  # the order is slower than exit_lock_ttl_ms
    assert desk.decide("CLOSE", "S01USDT")["reason"] == "exit_lock_busy_double_close_prevention"


def test_close_of_flat_symbol_or_other_position_is_blocked(make_desk: MakeDesk) -> None:
    desk = make_desk()
    assert desk.decide("CLOSE", "S01USDT")["reason"] == "no_open_position"
    pid = desk.open_position("S01USDT")
    assert desk.decide("CLOSE", "S01USDT", position_id="pos-older")["reason"] == \
        "no_open_position"
    assert desk.decide("CLOSE", "S01USDT", position_id=pid)["decision"] == "PERMIT"


def test_stale_close_is_blocked(make_desk: MakeDesk) -> None:
    desk = make_desk(max_intent_age_ms=1000)
    desk.open_position("S01USDT")
    assert desk.decide("CLOSE", "S01USDT", created=now_ms() - 5000)["reason"] == "intent_stale"


def test_unreadable_config_fails_closed(make_desk: MakeDesk) -> None:
    desk = make_desk()
    desk.set_config(max_total_notional="lots")
    assert desk.decide("OPEN", "S01USDT")["reason"] == "config_invalid"
    desk.set_config(max_total_notional="2000")
    assert desk.decide("OPEN", "S01USDT")["decision"] == "PERMIT"


def test_invalid_plans_are_blocked_acked_and_serving_goes_on(make_desk: MakeDesk) -> None:
    desk = make_desk()
    desk.raw_plan({"plan_id": "bad-1", "symbol": "btc", "action": "OPEN"})
    desk.raw_plan({"plan_id": "bad-2", "symbol": "BTCUSDT", "action": "OPEN", "side": "UP",
                   "notional": "1", "source": "x", "intent_created_at_ms": "1"})
    desk.raw_plan({"symbol": "BTCUSDT", "action": "OPEN"})  # no plan_id: nothing to answer
    desk.raw_plan({"plan_id": b"\xff\xfe", "symbol": b"\x00"})  # not UTF-8
    good = desk.plan("OPEN", "S01USDT")
    assert desk.decision("bad-1")["reason"] == "invalid_plan"
    assert desk.decision("bad-1")["symbol"] == "btc"
    assert desk.decision("bad-2")["reason"] == "invalid_plan"
    assert desk.decision(good)["decision"] == "PERMIT"
    desk.wait_idle()


def test_release_then_reopen_frees_slot_and_capital(make_desk: MakeDesk) -> None:
    desk = make_desk(slots_BASE=1, max_total_notional=200)
    desk.open_position("S01USDT", notional="200")
    assert desk.decide("OPEN", "S02USDT")["decision"] == "BLOCK"
    desk.wait_idle()  # the block emitted a rotation close of S01USDT, now permitted
    (rot,) = [e for e in desk.events() if e["plan_id"].startswith("rot_")]
    assert desk.decide("CLOSE", "S01USDT")["reason"] == "exit_lock_busy_double_close_prevention"
    desk.execute(rot["plan_id"])
    desk.settled()
    assert desk.decide("OPEN", "S02USDT", notional="200")["decision"] == "PERMIT"


def test_rejected_and_expired_results_release_the_slot(make_desk: MakeDesk) -> None:
    desk = make_desk(slots_BASE=1)
    d = desk.decide("OPEN", "S01USDT")
    desk.execute(d["plan_id"], status="rejected")
    desk.settled()
    d2 = desk.decide("OPEN", "S02USDT")
    assert d2["decision"] == "PERMIT"
    desk.r.delete(desk.keys.permit(d2["plan_id"]))
    desk.result(d2["plan_id"], "S02USDT", "OPEN", "expired")
    desk.settled()
    assert desk.decide("OPEN", "S03USDT")["decision"] == "PERMIT"

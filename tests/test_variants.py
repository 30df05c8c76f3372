"""The designs under audit (seed, legacy) beside the reference, one behaviour at a time.

Sequential and fault-free: the test plays producer and apply layer by hand
(tests/govtools.py), one step at a time, on a real Redis. So every decision
asserted here is what a design does in calm conditions. Where a variant's
expected decision differs from the reference's, the difference is the
design's own: docs/variants.md gives the line of the seed it comes from.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable

import pytest
from govtools import Desk, now_ms

from governor_ref.seed import SeedLogic

MakeDesk = Callable[..., Desk]
VARIANTS = ["reference", "seed", "legacy"]
SLOTS = "active_slots_waiting_rotation_close"
EXIT_LOCK_BUSY = "exit_lock_busy_double_close_prevention"




def outcome(d: dict[str, str]) -> str:
    """PERMIT, or the block reason."""
    return d["decision"] if d["decision"] == "PERMIT" else d["reason"]


def rotation_events(desk: Desk) -> list[dict[str, str]]:
    desk.wait_idle()
    return [e for e in desk.events() if e["plan_id"].startswith("rot_")]


def seed_logic(desk: Desk) -> SeedLogic:
    logic = desk.running[-1].gov.logic
    assert isinstance(logic, SeedLogic)
    return logic


# -- the functional scenario, every variant ------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_open_on_a_free_symbol_is_permitted_with_its_permit_key(
        make_desk: MakeDesk, variant: str) -> None:
    desk = make_desk(variant)
    d = desk.decide("OPEN", "S01USDT", notional="150.50")
    assert (d["decision"], d["reason"], d["governor"], d["action"]) == ("PERMIT", "", "g1", "OPEN")
    permit = json.loads(desk.r.get(desk.keys.permit(d["plan_id"])))
    assert {k: permit[k] for k in ("plan_id", "symbol", "action", "side", "notional", "fence")} \
        == {"plan_id": d["plan_id"], "symbol": "S01USDT", "action": "OPEN", "side": "LONG",
            "notional": "150.50", "fence": ""}
    assert 0 < desk.r.pttl(desk.keys.permit(d["plan_id"])) <= 60000


@pytest.mark.parametrize("variant", VARIANTS)
def test_open_of_a_symbol_already_open_is_blocked_as_duplicate(
        make_desk: MakeDesk, variant: str) -> None:
    desk = make_desk(variant)
    desk.open_position("S01USDT")
    assert outcome(desk.decide("OPEN", "S01USDT")) == "duplicate_open"


# Seed and legacy know open symbols only from the mirror, which an unexecuted OPEN is not in yet.
IN_FLIGHT_DUPLICATE = {"reference": "duplicate_open", "seed": "PERMIT", "legacy": "PERMIT"}


@pytest.mark.parametrize("variant", VARIANTS)
def test_open_of_a_symbol_whose_open_is_permitted_but_unexecuted_is_blocked_only_by_reference(
        make_desk: MakeDesk, variant: str) -> None:
    desk = make_desk(variant)
    assert outcome(desk.decide("OPEN", "S01USDT")) == "PERMIT"
    assert outcome(desk.decide("OPEN", "S01USDT")) == IN_FLIGHT_DUPLICATE[variant]


@pytest.mark.parametrize("variant", VARIANTS)
def test_close_is_permitted_for_an_open_position_and_blocked_on_a_flat_symbol(
        make_desk: MakeDesk, variant: str) -> None:
    desk = make_desk(variant)
    assert outcome(desk.decide("CLOSE", "S01USDT")) == "no_open_position"
    desk.open_position("S01USDT", notional="120")
    c = desk.decide("CLOSE", "S01USDT", source="harvest_brain")
    assert outcome(c) == "PERMIT"
    permit = json.loads(desk.r.get(desk.keys.permit(c["plan_id"])))
    assert (permit["action"], permit["side"], permit["notional"]) == ("CLOSE", "LONG", "120")
    desk.execute(c["plan_id"])
    desk.settled()
    assert outcome(desk.decide("CLOSE", "S01USDT", source="kill_switch")) == "no_open_position"


# Seed L105-107: before the exit lock, a second close was a double close.
SECOND_CLOSE = {"reference": EXIT_LOCK_BUSY, "seed": EXIT_LOCK_BUSY, "legacy": "PERMIT"}


@pytest.mark.parametrize("variant", VARIANTS)
def test_second_close_before_the_first_executes_is_blocked_by_the_exit_lock_except_in_legacy(
        make_desk: MakeDesk, variant: str) -> None:
    desk = make_desk(variant)
    desk.open_position("S01USDT")
    assert outcome(desk.decide("CLOSE", "S01USDT", source="harvest_brain")) == "PERMIT"
    second = desk.decide("CLOSE", "S01USDT", source="exit_monitor")
    assert outcome(second) == SECOND_CLOSE[variant]


# Seed L160-162: the seed only logs a stale intent; legacy evaluates at execution time (L142).
STALE = {"reference": "intent_stale", "seed": "PERMIT", "legacy": "PERMIT"}


@pytest.mark.parametrize("variant", VARIANTS)
def test_stale_plan_is_blocked_by_the_reference_and_only_logged_by_the_seed(
        make_desk: MakeDesk, variant: str, caplog: pytest.LogCaptureFixture) -> None:
    desk = make_desk(variant)
    with caplog.at_level(logging.WARNING, logger="governor_ref"):
        d = desk.decide("OPEN", "S01USDT", created=now_ms() - 60_000)
    assert outcome(d) == STALE[variant]
    stale_logged = any("Intent stale (>30s)" in r.getMessage() for r in caplog.records)
    assert stale_logged == (variant == "seed")


@pytest.mark.parametrize("variant", VARIANTS)
def test_regime_change_applies_at_once_except_in_the_seed_where_it_waits_for_a_restart(
        make_desk: MakeDesk, variant: str) -> None:
    desk = make_desk(variant, slots_BASE=3, slots_CHOP=2)
    desk.open_position("S01USDT")
    desk.open_position("S02USDT")
    desk.r.set(desk.keys.regime, "CHOP")  # 2 slots, 2 open
    d = desk.decide("OPEN", "S03USDT")
    if variant != "seed":
        assert outcome(d) == SLOTS
        desk.r.set(desk.keys.regime, "TREND_STRONG")  # 6 slots
        assert outcome(desk.decide("OPEN", "S04USDT")) == "PERMIT"
        return
    # Seed L26-29: the counter was set for BASE (3 - 0) at start-up and is not re-derived.
    assert outcome(d) == "PERMIT"
    desk.stop_all()
    desk.start(variant="seed")  # start-up: CHOP 2 - 2 open in the mirror
    assert desk.r.get(desk.keys.slots_available) == "0"
    assert outcome(desk.decide("OPEN", "S04USDT")) == SLOTS


@pytest.mark.parametrize("variant", VARIANTS)
def test_full_slots_block_the_open_and_rotate_out_the_weakest_position(
        make_desk: MakeDesk, variant: str) -> None:
    desk = make_desk(variant, slots_BASE=2)
    desk.open_position("S01USDT", pnl_pct=1.5)
    weak = desk.open_position("S02USDT", pnl_pct=-3.2)
    blocked = desk.decide("OPEN", "S03USDT")
    assert outcome(blocked) == SLOTS
    (rot,) = rotation_events(desk)
    assert (rot["symbol"], rot["action"], rot["decision"]) == ("S02USDT", "CLOSE", "PERMIT")
    (plan,) = [f for _i, f in desk.r.xrange(desk.keys.plans) if f["plan_id"] == rot["plan_id"]]
    assert (plan["source"], plan["position_id"]) == ("rotation", weak)
    if variant != "reference":  # the seed's lock key, per blocked plan (seed L251)
        lock = desk.keys.rotation_lock_for(blocked["plan_id"])
        assert json.loads(desk.r.get(lock))["rotation_plan_id"] == rot["plan_id"]
        assert 0 < desk.r.pttl(lock) <= 120_000
    desk.execute(rot["plan_id"])
    desk.settled()
    assert outcome(desk.decide("OPEN", "S03USDT")) == "PERMIT"


@pytest.mark.parametrize("variant", VARIANTS)
def test_fund_caps_and_allocation_block_an_open_that_exceeds_them(
        make_desk: MakeDesk, variant: str) -> None:
    desk = make_desk(variant, max_total_notional=300)
    desk.r.set(desk.keys.capital, "400")  # 25% of 400: 100 per symbol
    assert outcome(desk.decide("OPEN", "S01USDT", notional="200.01")) == "notional_cap_exceeded"
    assert outcome(desk.decide("OPEN", "S01USDT", notional="120")) == \
        "capital_allocation_exceeded"
    desk.r.delete(desk.keys.allocation("S05USDT"))
    assert outcome(desk.decide("OPEN", "S05USDT", notional="10")) == \
        "capital_allocation_exceeded"
    for sym in ("S01USDT", "S02USDT", "S03USDT"):
        desk.open_position(sym, notional="100")
    assert outcome(desk.decide("OPEN", "S04USDT", notional="50")) == \
        "total_notional_cap_exceeded"


# Legacy has no intent-time checks (seed L142); seed L164-170 and the reference block drift.
DRIFT = {"reference": ("state_drift_position_count", "state_drift_exposure"),
         "seed": ("state_drift_position_count", "state_drift_exposure"),
         "legacy": ("PERMIT", "PERMIT")}


@pytest.mark.parametrize("variant", VARIANTS)
def test_snapshot_drift_beyond_the_limits_is_blocked_except_in_legacy(
        make_desk: MakeDesk, variant: str) -> None:
    desk = make_desk(variant)
    desk.open_position("S01USDT")
    desk.r.set(desk.keys.exposure_pct, "0.40")
    count = desk.decide("OPEN", "S02USDT", snapshot_position_count=4)  # 1 open: diff 3 > 2
    exposure = desk.decide("OPEN", "S03USDT", snapshot_exposure_pct="0.20")  # diff 0.20 > 0.15
    assert (outcome(count), outcome(exposure)) == DRIFT[variant]
    within = desk.decide("OPEN", "S04USDT", snapshot_position_count=3,
                         snapshot_exposure_pct="0.30")
    assert outcome(within) == "PERMIT"


@pytest.mark.parametrize("variant", VARIANTS)
def test_invalid_plans_are_blocked_and_acknowledged_and_serving_goes_on(
        make_desk: MakeDesk, variant: str) -> None:
    desk = make_desk(variant)
    desk.raw_plan({"plan_id": "bad-1", "symbol": "btc", "action": "OPEN"})
    desk.raw_plan({"symbol": "BTCUSDT", "action": "OPEN"})  # no plan_id: nothing to answer
    good = desk.plan("OPEN", "S01USDT")
    assert (desk.decision("bad-1")["reason"], desk.decision("bad-1")["symbol"]) == \
        ("invalid_plan", "btc")
    assert desk.decision(good)["decision"] == "PERMIT"
    desk.wait_idle()


# Seed L18: legacy counts SCAN P:position:* only, so a permitted, unexecuted OPEN takes no slot.
UNEXECUTED_SECOND = {"reference": SLOTS, "seed": SLOTS, "legacy": "PERMIT"}


@pytest.mark.parametrize("variant", VARIANTS)
def test_an_open_permitted_but_not_yet_executed_holds_its_slot_except_in_legacy(
        make_desk: MakeDesk, variant: str) -> None:
    desk = make_desk(variant, slots_BASE=1)
    assert outcome(desk.decide("OPEN", "S01USDT")) == "PERMIT"
    assert outcome(desk.decide("OPEN", "S02USDT")) == UNEXECUTED_SECOND[variant]


# -- the seed's own mechanisms ----------------------------------------------------------------


def test_seed_startup_sets_the_counter_to_desired_minus_open_and_every_startup_resets_it(
        make_desk: MakeDesk) -> None:
    desk = make_desk("seed", start=False)
    desk.r.hset(desk.keys.position("S09USDT"), mapping={"position_id": "ext", "symbol": "S09USDT",
                                                         "side": "LONG", "notional": "50"})
    desk.start(variant="seed")
    assert (desk.r.get(desk.keys.slots_desired), desk.r.get(desk.keys.slots_available)) == \
        ("4", "3")
    assert outcome(desk.decide("OPEN", "S01USDT")) == "PERMIT"
    assert desk.r.get(desk.keys.slots_available) == "2"
    # A second instance starting (seed L26-29) SETs the counter from the mirror again,
    # over the slot the first instance reserved for its unexecuted permit.
    desk.start(consumer="g2", variant="seed")
    assert desk.r.get(desk.keys.slots_available) == "3"


def test_seed_block_after_the_slot_was_reserved_gives_the_slot_back(
        make_desk: MakeDesk) -> None:
    desk = make_desk("seed")
    assert outcome(desk.decide("OPEN", "S01USDT", notional="500")) == "notional_cap_exceeded"
    assert desk.r.get(desk.keys.slots_available) == "4"
    assert seed_logic(desk).reservations == {}


def test_seed_capital_reservation_is_int_of_notional_with_ttl_and_released_by_the_result(
        make_desk: MakeDesk) -> None:
    desk = make_desk("seed")
    d = desk.decide("OPEN", "S01USDT", notional="150.50")
    reserved = desk.keys.capital_reserved("S01USDT")
    assert desk.r.get(reserved) == "150"  # seed L82: int(notional)
    assert 0 < desk.r.pttl(reserved) <= 600_000
    assert seed_logic(desk).reservations[d["plan_id"]] == {"slot": True, "capital": 150.5}
    desk.execute(d["plan_id"])
    desk.settled()
    assert desk.r.get(reserved) == "0"
    assert seed_logic(desk).reservations == {}


def test_seed_exit_lock_holds_the_plan_id_with_ttl_and_the_executed_close_frees_lock_and_slot(
        make_desk: MakeDesk) -> None:
    desk = make_desk("seed")
    desk.open_position("S01USDT")
    assert desk.r.get(desk.keys.slots_available) == "3"
    c = desk.decide("CLOSE", "S01USDT")
    lock = desk.keys.exit_lock("S01USDT")
    assert desk.r.get(lock) == c["plan_id"]
    assert 0 < desk.r.pttl(lock) <= 120_000
    desk.execute(c["plan_id"])
    desk.settled()
    assert desk.r.get(lock) is None
    assert desk.r.get(desk.keys.slots_available) == "4"


def test_seed_slot_of_a_rejected_open_is_not_given_back(make_desk: MakeDesk) -> None:
    # Seed L46: the monitor releases slots "when closes execute", and only then.
    desk = make_desk("seed", slots_BASE=1)
    d = desk.decide("OPEN", "S01USDT")
    desk.execute(d["plan_id"], status="rejected")
    desk.settled()
    assert desk.r.get(desk.keys.slots_available) == "0"
    assert outcome(desk.decide("OPEN", "S02USDT")) == SLOTS


def test_seed_rotation_lock_is_per_plan_so_every_blocked_open_rotates_and_logs_as_the_seed(
        make_desk: MakeDesk, caplog: pytest.LogCaptureFixture) -> None:
    desk = make_desk("seed", slots_BASE=2)
    desk.open_position("S01USDT", pnl_pct=1.5)
    desk.open_position("S02USDT", pnl_pct=-3.2)
    with caplog.at_level(logging.INFO, logger="governor_ref"):
        a = desk.decide("OPEN", "S03USDT")["plan_id"]
        b = desk.decide("OPEN", "S04USDT")["plan_id"]
        rots = rotation_events(desk)
        assert [(e["plan_id"], e["symbol"], outcome(e)) for e in rots] == [
            (f"rot_{a}", "S02USDT", "PERMIT"), (f"rot_{b}", "S02USDT", EXIT_LOCK_BUSY)]
        desk.execute(f"rot_{a}")
        desk.settled()
        c = desk.decide("OPEN", "S03USDT")["plan_id"]
        drift = desk.decide("OPEN", "S05USDT", snapshot_position_count=5)["plan_id"]
    # The seed's expected log patterns (L378-418), in order.
    expected = [
        "S03USDT: Active Slots enabled - checking position limits (ATOMIC)",
        f"No slots available for plan {a} (rollback)",
        "S03USDT: No atomic slots available - checking rotation",
        "S03USDT: No rotation lock - initiating rotation",
        "S03USDT: Weakest position: S02USDT (weakness=0.0320, pnl=-3.20%)",
        f"S03USDT: ROTATION CLOSE emitted for S02USDT (plan_id=rot_{a})",
        "S03USDT: ROTATION LOCK created (TTL=120s)",
        f"S03USDT: BLOCKED plan {a} - {SLOTS}",
        f"Exit lock acquired for S02USDT (plan rot_{a})",
        f"Exit lock busy for S02USDT (held by rot_{a})",
        f"S02USDT: BLOCKED plan rot_{b} - {EXIT_LOCK_BUSY}",
        f"S02USDT: Position CLOSED (plan rot_{a}) - releasing slot",
        f"Slot released for plan rot_{a} (1 available) - reason: position_closed",
        f"Slot reserved for plan {c} (0 remaining)",
        f"S03USDT: Atomic slot reserved for plan {c}",
        f"Capital reserved: $100.00 for S03USDT (plan {c})",
        "S05USDT: Position count drift detected! Intent snapshot: 5, Current: 1 (diff: 4) - "
        "BLOCKING (fail-closed)",
        f"S05USDT: BLOCKED plan {drift} - state_drift_position_count:5→1",
    ]
    messages = iter(r.getMessage() for r in caplog.records)
    for line in expected:
        assert any(m == line for m in messages), f"log line missing or out of order: {line}"

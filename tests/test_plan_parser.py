"""The plan parser: property-based, since bad input is whatever a producer sends."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from governor_ref.protocol import Action, Plan, PlanError

FIELD_NAMES = ["plan_id", "symbol", "action", "side", "notional", "source",
               "intent_created_at_ms", "snapshot_position_count", "snapshot_exposure_pct",
               "position_id"]

plan_ids = st.from_regex(r"[A-Za-z0-9_.:-]{1,64}", fullmatch=True)
symbols = st.from_regex(r"[A-Z0-9]{2,20}", fullmatch=True)
decimals = st.decimals(min_value="0.01", max_value="1000000", places=2).map(str)


@st.composite
def valid_plans(draw: st.DrawFn) -> Plan:
    action = draw(st.sampled_from(list(Action)))
    return Plan(
        plan_id=draw(plan_ids), symbol=draw(symbols), action=action,
        source=draw(st.sampled_from(["intent_bridge", "harvest_brain", "exit_monitor",
                                     "kill_switch", "rotation"])),
        intent_created_at_ms=draw(st.integers(0, 2**53)),
        side=draw(st.sampled_from(["LONG", "SHORT"])) if action is Action.OPEN else None,
        notional=draw(decimals) if action is Action.OPEN else None,
        snapshot_position_count=draw(st.none() | st.integers(0, 1000)),
        snapshot_exposure_pct=draw(st.none() | decimals),
        position_id=draw(st.none() | plan_ids) if action is Action.CLOSE else None,
    )


@given(valid_plans())
def test_valid_plans_round_trip(plan: Plan) -> None:
    assert Plan.from_fields(plan.to_fields()) == plan


@given(valid_plans())
def test_valid_plans_parse_from_bytes_as_redis_returns_them(plan: Plan) -> None:
    raw = {k.encode(): v.encode() for k, v in plan.to_fields().items()}
    assert Plan.from_fields(raw) == plan


anything = st.one_of(st.text(max_size=80), st.binary(max_size=80))


def as_text(value: str | bytes) -> str:
    """A field value as the parser reads it: Redis hands back bytes, which docs/protocol.md
    says are UTF-8, so a parsed plan carries the decoded text, never the raw bytes."""
    return value.decode("utf-8") if isinstance(value, bytes) else value


@settings(max_examples=500)
@given(st.dictionaries(st.sampled_from(FIELD_NAMES) | st.text(max_size=10), anything,
                       max_size=12))
def test_arbitrary_fields_parse_or_raise_plan_error_only(raw: dict) -> None:
    try:
        plan = Plan.from_fields(raw)
    except PlanError as err:
        if err.plan_id is not None:
            assert 0 < len(err.plan_id) <= 256 and err.plan_id.isprintable()
        return
    assert plan.to_fields()["plan_id"] == as_text(raw["plan_id"])


@given(valid_plans(), st.sampled_from(FIELD_NAMES), anything)
def test_one_corrupted_field_is_rejected_or_still_valid(plan: Plan, name: str, value) -> None:
    fields = plan.to_fields()
    fields[name] = value
    try:
        parsed = Plan.from_fields(fields)
    except PlanError as err:
        if name != "plan_id":
            assert err.plan_id == plan.plan_id  # still answerable with invalid_plan
        return
    assert parsed.plan_id == as_text(fields["plan_id"])


def test_open_without_side_or_notional_is_invalid() -> None:
    base = {"plan_id": "p1", "symbol": "BTCUSDT", "action": "OPEN", "source": "x",
            "intent_created_at_ms": "1"}
    for missing in ({}, {"side": "LONG"}, {"notional": "5"}):
        try:
            Plan.from_fields({**base, **missing})
        except PlanError as err:
            assert err.plan_id == "p1"
        else:
            raise AssertionError(f"accepted OPEN with only {missing}")


def test_negative_zero_and_exponent_notionals_are_invalid() -> None:
    base = {"plan_id": "p1", "symbol": "BTCUSDT", "action": "OPEN", "source": "x",
            "intent_created_at_ms": "1", "side": "LONG"}
    for bad in ("0", "-5", "1e3", "NaN", "inf", " 5", "5.", ".5", ""):
        try:
            Plan.from_fields({**base, "notional": bad})
        except PlanError:
            continue
        raise AssertionError(f"accepted notional {bad!r}")

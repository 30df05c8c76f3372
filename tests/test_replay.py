"""Replay: scenarios written and read back exactly, the replay workload, and a recorded run
sent again -- the same plans, fields and order per producer, the regime and pnl writes too."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from govtools import small_scenario
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chaos.history import F
from chaos.replay import (
    ReplayError,
    run_scenario,
    scenario_from_run,
    sent_by_producer,
    truncate,
)
from chaos.scenario import (
    ANCHOR_EVENTS,
    ANCHOR_FILTERS,
    ScenarioError,
    builtin_names,
    dump,
    from_dict,
    load,
    parse,
)
from chaos.workloads import (
    InitialRegime,
    MarketView,
    SetPnl,
    SetRegime,
    SubmitPlan,
    WorkloadContext,
    WorkloadSpec,
    make_generator,
)


# ====================================================================== dump / parse
@pytest.mark.parametrize("name", builtin_names())
def test_every_builtin_scenario_round_trips(name: str) -> None:
    sc = load(name)
    assert parse(dump(sc), source=sc.source) == sc


_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)
_num = st.floats(0, 1000, allow_nan=False)
_filter_values = {"action": st.sampled_from(["OPEN", "CLOSE"]),
                  "instance": st.sampled_from(["gov-1", "gov-2"]),
                  "symbol": st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789", min_size=1,
                                    max_size=8),
                  "reason": _text.filter(bool), "plan_id": _text.filter(bool),
                  "status": st.sampled_from(["executed", "rejected", "expired"])}


@st.composite
def anchors(draw: Any) -> dict[str, Any]:
    event = draw(st.sampled_from(sorted(ANCHOR_EVENTS)))
    out: dict[str, Any] = {"event": event}
    if draw(st.booleans()):
        out["n"] = draw(st.integers(1, 10_000_000))
    if draw(st.booleans()):
        out["delay"] = draw(_num)
    for k, events in ANCHOR_FILTERS.items():
        if event in events and draw(st.booleans()):
            out[k] = draw(_filter_values[k])
    if event == "exit_lock" and out.get("action") == "OPEN":
        out["action"] = "CLOSE"
    return out


@st.composite
def replay_ops(draw: Any, duration: float) -> list[dict[str, Any]]:
    times = sorted(draw(st.lists(st.floats(0, duration + 9, allow_nan=False), max_size=6)))
    ops = []
    for t in times:
        kind = draw(st.sampled_from(["plan", "regime", "pnl", "initial_regime"]))
        op: dict[str, Any] = {"t": t}
        if kind == "plan":
            fields = draw(st.dictionaries(_text, _text | st.binary(max_size=6).map(
                lambda b: {"hex": b.hex()}), min_size=1, max_size=4))
            fields["plan_id"] = draw(_text.filter(bool))
            op["plan"] = fields
            if draw(st.booleans()):
                op["age_ms"] = draw(st.integers(-10**6, 10**9))
            if draw(st.booleans()):
                op["meta"] = draw(st.dictionaries(
                    _text.filter(lambda k: k not in ("plan", "workload", "producer")),
                    _text | st.booleans() | st.integers(-9, 9) | _num, max_size=3))
            if draw(st.booleans()):
                op["key"] = draw(_text.filter(bool))
        elif kind == "regime":
            op["regime"] = draw(st.sampled_from(["BASE", "TREND_STRONG", "CHOP"]))
            if draw(st.booleans()):
                op["previous"] = draw(_text)
        elif kind == "pnl":
            op.update(pnl=draw(st.floats(-100, 100, allow_nan=False)),
                      symbol=draw(_filter_values["symbol"]))
        else:
            op["initial_regime"] = True
        ops.append(op)
    return ops


@st.composite
def scenarios(draw: Any) -> dict[str, Any]:
    duration = draw(st.floats(0.01, 100, allow_nan=False))
    raw: dict[str, Any] = {
        "name": draw(st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,20}", fullmatch=True)),
        "description": draw(_text), "duration_s": duration, "seed": draw(st.integers(0, 99)),
        "governors": 2,
        "apply": {"open_latency_ms": draw(_num), "duplicate_result_prob": draw(
            st.floats(0, 1, allow_nan=False)), "fenced": draw(st.booleans())},
        "market": {"capital": draw(st.floats(1, 1e9, allow_nan=False))},
        "config": {"permit_ttl_ms": str(draw(st.integers(100, 10_000)))},
        "workload": [
            {"kind": "open_storm", "rate": draw(_num), "notional_min": 1,
             "notional_max": draw(st.floats(1, 100, allow_nan=False))},
            {"kind": "replay", "producer": draw(_text), "ops": draw(replay_ops(duration))},
        ],
        "fault": [],
    }
    for _ in range(draw(st.integers(0, 3))):
        f: dict[str, Any] = {"kind": draw(st.sampled_from(["pause_governor", "kill_governor",
                                                            "slow_exchange"])),
                             "duration": draw(_num)}
        if f["kind"] != "slow_exchange":
            f["target"] = draw(st.sampled_from(["gov-1", "gov-2", "random", "all"]))
        if draw(st.booleans()):
            f["after"] = draw(anchors())
        else:
            f["at"] = draw(st.floats(0, duration * 0.99, allow_nan=False))
        raw["fault"].append(f)
    return raw


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_dump_then_parse_gives_the_same_scenario(raw: dict[str, Any]) -> None:
    sc = from_dict(raw)
    text = dump(sc)
    assert parse(text) == sc
    assert dump(parse(text)) == text


def test_dump_refuses_what_toml_cannot_hold() -> None:
    sc = parse('name = "x"\n[[workload]]\nkind = "replay"\nops = []\n')
    bad = sc.workloads[0].__class__("replay", params={"ops": [{"t": float("nan")}]})
    with pytest.raises(ScenarioError, match="non-finite"):
        dump(sc.__class__(sc.name, workloads=(bad,)))


# ====================================================================== the replay workload
NOW = 1_800_000_000_000


def ctx(tmp: Path, duration: float = 5.0) -> WorkloadContext:
    return WorkloadContext(redis_url="redis://127.0.0.1:1/0", prefix="p", run_dir=str(tmp),
                           seed=1, duration_s=duration, symbols=["S01USDT", "S02USDT"])


def test_replay_sends_its_ops_in_order_with_ages_kept(tmp_path: Path) -> None:
    ops = [{"t": 0.0, "initial_regime": True},
           {"t": 0.01, "plan": {"plan_id": "a-1", "symbol": "S01USDT", "action": "OPEN",
                                "intent_created_at_ms": "5"}, "age_ms": 7000,
            "meta": {"stale": True}},
           {"t": 0.01, "plan": {"symbol": {"hex": "fffe41c3"}, "action": "OPEN"},
            "key": "noid-1", "meta": {"malformed": "no_plan_id"}},
           {"t": 0.5, "regime": "CHOP", "key": "regime-2-1", "previous": "BASE"},
           {"t": 0.6, "pnl": -1.5, "symbol": "S02USDT", "key": "pnl-3-0"},
           {"t": 6.0, "plan": {"plan_id": "late", "symbol": "S02USDT"}}]
    gen = make_generator(WorkloadSpec("replay", params={"producer": "stale-5", "ops": ops}), 4,
                         ctx(tmp_path), random.Random(0))
    streams = {s.name: s for s in gen.streams()}
    assert streams["ops"].times == (0.01, 0.01, 0.5, 0.6, 6.0)
    assert streams["initial"].times == (0.0,)
    assert gen.writes_ledger and gen.plan_ops == 3
    assert gen.next("initial", NOW, MarketView(regime="TREND_STRONG")) == \
        [InitialRegime("TREND_STRONG")]
    sent = [e for _ in range(5) for e in gen.next("ops", NOW, MarketView())]
    a, b, regime, pnl, late = sent
    assert isinstance(a, SubmitPlan) and a.key == "a-1" and a.symbol == "S01USDT"
    assert a.fields["intent_created_at_ms"] == str(NOW - 7000)
    assert a.meta == {"producer": "stale-5", "stale": True}
    assert isinstance(b, SubmitPlan) and b.key == "noid-1" and b.symbol is None
    assert b.fields == {"symbol": b"\xff\xfeA\xc3", "action": "OPEN"}
    assert regime == SetRegime("regime-2-1", "CHOP", "BASE")
    assert pnl == SetPnl("pnl-3-0", "S02USDT", -1.5)
    assert isinstance(late, SubmitPlan) and "intent_created_at_ms" not in late.fields


@pytest.mark.parametrize(("ops", "message"), [
    ("[{ t = 0.0 }]", "ops[0]: needs exactly one of plan, regime, pnl, initial_regime, got none"),
    ('[{ t = 0.0, regime = "CHOP", pnl = 1.0 }]', "ops[0]: needs exactly one of"),
    ('[{ t = 16.0, regime = "CHOP" }]', "ops[0].t: must be a number in [0, duration_s + 10"),
    ('[{ t = -1.0, regime = "CHOP" }]', "ops[0].t: must be a number in [0,"),
    ('[{ t = 1.0, regime = "BASE" }, { t = 0.5, regime = "CHOP" }]',
     "ops[1].t: ops must be in time order"),
    ('[{ t = 0.0, regime = "SIDEWAYS" }]', "ops[0].regime: must be one of BASE"),
    ("[{ t = 0.0, plan = { symbol = 5 } }]", "ops[0].plan.symbol: must be a string or"),
    ('[{ t = 0.0, plan = { symbol = { hex = "zz" } } }]', "ops[0].plan.symbol.hex: not hexa"),
    ('[{ t = 0.0, plan = { symbol = "AUSDT" } }]', "ops[0]: a plan without a text plan_id"),
    ('[{ t = 0.0, plan = { plan_id = "a" }, age_ms = 1.5 }]', "ops[0].age_ms: must be an int"),
    ('[{ t = 0.0, regime = "CHOP", age_ms = 1 }]', "ops[0].age_ms: only a plan op has it"),
    ("[{ t = 0.0, pnl = 1.0 }]", "ops[0].symbol: a pnl op needs the symbol"),
    ("[{ t = 0.0, initial_regime = false }]", "ops[0].initial_regime: must be true"),
    ('[{ t = 0.0, regime = "CHOP", when = 1 }]', "ops[0].when: unknown field"),
    ('[{ t = 0.0, plan = { plan_id = "a" }, meta = { plan = "x" } }]',
     "ops[0].meta.plan: the history sets it itself"),
    ('"x"', "ops must be an array of tables"),
])
def test_bad_replay_ops_are_one_line_errors(ops: str, message: str) -> None:
    with pytest.raises(ScenarioError) as err:
        parse(f'name = "x"\nduration_s = 5.0\n[[workload]]\nkind = "replay"\nops = {ops}\n')
    assert str(err.value).startswith(f"workload[0]: {message}"), str(err.value)


def test_a_replay_is_one_process() -> None:
    with pytest.raises(ScenarioError, match=r"workload\[0\]: processes must be 1"):
        parse('name = "x"\n[[workload]]\nkind = "replay"\nprocesses = 2\nops = []\n')


# ====================================================================== refusals
def test_what_cannot_be_replayed_is_refused_in_one_line(tmp_path: Path) -> None:
    with pytest.raises(ReplayError, match="no run.json: not a run directory"):
        scenario_from_run(tmp_path)
    (tmp_path / "run.json").write_text(json.dumps({"kind": "import"}))
    with pytest.raises(ReplayError, match=r"holds no scenario \(import\): only a `chaos run`"):
        scenario_from_run(tmp_path)
    (tmp_path / "run.json").write_text("{")
    with pytest.raises(ReplayError, match="run.json: unreadable"):
        run_scenario(tmp_path)
    p = subprocess.run([sys.executable, "-m", "chaos", "run", "--replay", str(tmp_path / "no")],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 254
    assert p.stderr.strip() == f"chaos run: {tmp_path / 'no'}: no run.json: not a run directory"


# ====================================================================== a recorded run, again
MIXED = """
[[workload]]
kind = "malformed"
rate = 40
bad_fraction = 0.6

[[workload]]
kind = "regime_flip"
period_s = 0.5

[[workload]]
kind = "rotation_pressure"
rate = 20
pnl_period_ms = 200

[[workload]]
kind = "duplicate_close"
period_ms = 150

[[workload]]
kind = "stale"
rate = 20

[[workload]]
kind = "drift"
rate = 20

[[fault]]
kind = "pause_governor"
duration = 0.5
target = "gov-1"
after = { event = "permit", instance = "gov-1", n = 3 }
"""


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "chaos", "run", *args, "--quiet",
                           "--no-report"], capture_output=True, text=True, timeout=240)


def test_a_replayed_run_submits_the_same_plans(tmp_path: Path) -> None:
    src = tmp_path / "mixed.toml"
    src.write_text(small_scenario("mixed", 3).replace("processes = 2\nrate = 200", "rate = 40")
                   + MIXED)
    first, again = tmp_path / "first", tmp_path / "again"
    p = _run("--scenario", str(src), "--out", str(first))
    assert p.returncode in (0, 1, 2), p.stdout + p.stderr
    sc = scenario_from_run(first)
    assert sc.name == "small-mixed-replay" and len(sc.workloads) == 7
    assert [w.params["producer"] for w in sc.workloads] == [
        "open_storm-0", "malformed-1", "regime_flip-2", "rotation_pressure-3",
        "duplicate_close-4", "stale-5", "drift-6"]
    original = run_scenario(first)
    assert (sc.faults, sc.config, sc.market, sc.apply, sc.seed, sc.duration_s) == (
        original.faults, original.config, original.market, original.apply, original.seed,
        original.duration_s)
    p = _run("--replay", str(first), "--out", str(again))
    assert p.returncode in (0, 1, 2), p.stdout + p.stderr
    assert parse((again / "scenario.toml").read_text()) == sc
    a, b = sent_by_producer(first), sent_by_producer(again)
    assert sorted(a) == sorted(b) == list(range(7))
    for i in a:
        assert [x.what for x in b[i]] == [x.what for x in a[i]], \
            f"producer {i}: {sc.workloads[i].params['producer']}"
    whats = [x.what for xs in a.values() for x in xs]
    assert {w[0] for w in whats} == {F.SUBMIT, F.OPERATOR}
    assert any(w[2] is None and w[0] == F.SUBMIT for w in whats), \
        "the non-UTF-8 plans were replayed (as bytes: the history shows the same escapes)"
    assert any(w[5] is not None for w in whats), "pnl writes were replayed"
    assert any(w[4] is not None for w in whats), "regime writes were replayed"
    ages = [(x.age_ms, y.age_ms) for i in a for x, y in zip(a[i], b[i], strict=True)
            if x.age_ms is not None]
    # An age is the submit's recorded time minus the intent time: both runs add the delay
    # between building a plan and recording its submit, which a loaded host stretches. The
    # replay keeps the age up to that delay (to the ms on a quiet host), far inside any
    # max_intent_age_ms.
    assert all(y is not None for _x, y in ages)
    diffs = sorted(abs(y - x) for x, y in ages)
    assert diffs[len(diffs) // 2] <= 2, f"each plan is as old as it was: {diffs[-10:]}"
    assert diffs[-1] <= 100, f"each plan is as old as it was: {diffs[-10:]}"
    assert any(x > 1000 for x, _ in ages), "stale plans were sent, and stayed stale"
    anchors = json.loads((again / "run.json").read_text())["stats"]["anchors"]
    assert anchors[0]["after"]["instance"] == "gov-1", "the fault anchors are kept"


def test_truncate_keeps_the_first_seconds_of_a_replay() -> None:
    sc = parse('name = "x"\nduration_s = 5.0\n[[workload]]\nkind = "replay"\nops = ['
               '{ t = 0.5, regime = "CHOP" }, { t = 1.5, regime = "BASE" }, '
               '{ t = 6.0, regime = "CHOP" }]\n[[workload]]\nkind = "open_storm"\n')
    short = truncate(sc, 1.0)
    assert short.duration_s == 1.0
    assert short.workloads[0].params["ops"] == [{"t": 0.5, "regime": "CHOP"}]
    assert short.workloads[1] == sc.workloads[1]
    with pytest.raises(ScenarioError, match="--duration"):
        truncate(sc, 0.0)


def test_a_fault_scheduled_after_the_run_ended_is_left_out_of_its_replay(
        tmp_path: Path) -> None:
    """``chaos suite --quick`` runs ``network`` for 6 s, so its fault at 8 s never starts:
    the run's own scenario is read back without it (the scenario checks would refuse a
    fault after the end), and the faults that did start stay."""
    from dataclasses import asdict

    sc = load("network").with_overrides(duration_s=6.0)
    assert any(f.at >= 6.0 for f in sc.faults)
    (tmp_path / "run.json").write_text(json.dumps({"scenario_spec": asdict(sc)}))
    back = run_scenario(tmp_path)
    assert back.duration_s == 6.0
    assert [(f.kind, f.at) for f in back.faults] == [(f.kind, f.at) for f in sc.faults
                                                     if f.at < 6.0]

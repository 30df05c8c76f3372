"""Faults anchored to events: the scenario syntax, the watcher on real streams, and a real
run where a pause lands between the anchoring PERMIT and the governor's next decision."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from govtools import small_scenario

from chaos.anchors import AnchorEvent, AnchorWatcher
from chaos.history import F, OpType, read_history
from chaos.replay import anchor_before
from chaos.scenario import AnchorSpec, ScenarioError, parse
from governor_ref.keys import Keys


def fault_scenario(after: str, extra: str = "") -> str:
    return f"""name = "a"
governors = 2
[[fault]]
kind = "pause_governor"
duration = 1.0
{extra}
after = {after}
"""


# ====================================================================== the scenario format
def test_anchor_is_parsed_with_its_defaults_and_filters() -> None:
    sc = parse(fault_scenario('{ event = "permit", action = "OPEN", instance = "gov-1", n = 3 }',
                              'target = "gov-1"'))
    a = sc.faults[0].after
    assert a == AnchorSpec("permit", n=3, delay=0.0, action="OPEN", instance="gov-1")
    assert a.filters() == {"action": "OPEN", "instance": "gov-1"}
    assert a.describe() == "permit #3 (action=OPEN, instance=gov-1)"
    assert sc.faults[0].at == 0.0 and sc.faults[0].every == 0.0


@pytest.mark.parametrize(("after", "extra", "message"), [
    ('{ event = "permitt" }', "", "fault[0].after.event: unknown event 'permitt'; known: "),
    ("{ n = 2 }", "", "fault[0].after.event: required"),
    ('"permit"', "", "fault[0].after: must be a table"),
    ('{ event = "permit", n = 0 }', "", "fault[0].after.n: must be within 1..10000000"),
    ('{ event = "permit", n = 1.5 }', "", "fault[0].after.n: must be an integer"),
    ('{ event = "permit", delay = -1 }', "", "fault[0].after.delay: must be within 0.."),
    ('{ event = "permit", foo = 1 }', "", "fault[0].after.foo: unknown field; known: action"),
    ('{ event = "permit", status = "executed" }', "",
     "fault[0].after.status: does not apply to event 'permit'; it filters result"),
    ('{ event = "take", instance = "gov-1" }', "",
     "fault[0].after.instance: does not apply to event 'take'"),
    ('{ event = "permit", instance = "gov-3" }', "",
     "fault[0].after.instance: must be gov-1..gov-2, got 'gov-3'"),
    ('{ event = "permit", action = "HOLD" }', "", "fault[0].after.action: must be OPEN or CLOSE"),
    ('{ event = "exit_lock", action = "OPEN" }', "", "fault[0].after.action: an exit lock"),
    ('{ event = "result", status = "done" }', "", "fault[0].after.status: must be executed"),
    ('{ event = "permit", symbol = "" }', "", "fault[0].after.symbol: must not be empty"),
    ('{ event = "permit" }', "at = 1.0", "fault[0].at: a fault with `after` starts on its event"),
    ('{ event = "permit" }', "every = 2.0", "fault[0].every: a fault with `after` starts once"),
    ('{ event = "take" }', 'target = "anchor"',
     "fault[0].target: 'anchor' (the governor that decided the anchoring event) needs"),
])
def test_bad_anchors_are_one_line_errors_naming_the_field(after: str, extra: str,
                                                          message: str) -> None:
    with pytest.raises(ScenarioError) as err:
        parse(fault_scenario(after, extra))
    assert str(err.value).startswith(message), str(err.value)
    assert "\n" not in str(err.value)


def test_governors_override_rechecks_the_anchor_instance() -> None:
    sc = parse(fault_scenario('{ event = "permit", instance = "gov-2" }'))
    with pytest.raises(ScenarioError, match=r"fault\[0\]\.after\.instance: .*with --governors"):
        sc.with_overrides(governors=1)


def test_chaos_run_refuses_a_bad_anchor_with_exit_254(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(fault_scenario('{ event = "permit", n = 0 }'))
    p = subprocess.run([sys.executable, "-m", "chaos", "run", "--scenario", str(bad)],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 254
    assert p.stderr.strip() == "chaos run: fault[0].after.n: must be within 1..10000000, got 0"


# ====================================================================== the watcher
def test_watcher_counts_matching_events_from_its_start_and_fires_once(
        shared_redis: Any, prefix: str) -> None:
    k = Keys(prefix)
    r = shared_redis.client(decode_responses=False)
    # Before the watcher starts: does not count.
    r.xadd(k.events, {"plan_id": "old", "decision": "PERMIT", "action": "OPEN",
                      "governor": "gov-1"})
    fired: list[tuple[int, AnchorEvent]] = []
    done = threading.Event()

    def fire(slot: int, ev: AnchorEvent) -> None:
        fired.append((slot, ev))
        if len(fired) == 3:
            done.set()

    anchors = [(0, AnchorSpec("permit", n=2, action="OPEN", instance="gov-1")),
               (1, AnchorSpec("exit_lock", n=1)),
               (2, AnchorSpec("submit", n=2)),
               (3, AnchorSpec("block", n=5))]
    w = AnchorWatcher(lambda: shared_redis.client(decode_responses=False), k, anchors,
                      fire).start()
    try:
        entries = [
            (k.plans, {"plan_id": "p1", "symbol": "AUSDT", "action": "OPEN"}),
            (k.plans, {"plan_id": "rot_1", "symbol": "AUSDT", "action": "CLOSE",
                       "source": "rotation"}),  # a governor's plan: not a submit
            (k.events, {"plan_id": "p1", "decision": "PERMIT", "action": "OPEN",
                        "governor": "gov-2"}),  # another governor
            (k.events, {"plan_id": "p2", "decision": "PERMIT", "action": "OPEN",
                        "governor": "gov-1"}),
            (k.events, {"plan_id": "c1", "decision": "PERMIT", "action": "CLOSE",
                        "governor": "gov-1"}),
            (k.events, {"plan_id": "hb", "decision": "HEARTBEAT"}),  # informational
            (k.events, {"plan_id": "p3", "decision": "BLOCK", "action": "OPEN",
                        "governor": "gov-1", "reason": "intent_stale"}),
            (k.events, {"plan_id": "p4", "decision": "PERMIT", "action": "OPEN",
                        "governor": "gov-1"}),
            (k.plans, {"plan_id": "p5", "symbol": b"\xff\xfe", "action": "OPEN"}),
        ]
        ids = {fields["plan_id"]: r.xadd(stream, fields).decode() for stream, fields in entries}
        assert done.wait(10), f"fired only {fired}"
    finally:
        w.stop()
    by_slot = {slot: ev for slot, ev in fired}
    assert sorted(by_slot) == [0, 1, 2] and len(fired) == 3
    assert by_slot[0].plan_id == "p4" and by_slot[0].entry_id == ids["p4"]
    assert by_slot[0].instance == "gov-1" and by_slot[0].event == "permit"
    assert by_slot[1].plan_id == "c1" and by_slot[1].action == "CLOSE"
    assert by_slot[2].plan_id == "p5", "a non-UTF-8 plan is a submit like any other"
    assert by_slot[0].wall_ms == float(ids["p4"].split("-")[0])
    assert w.pending() == {3: 1}


def test_take_anchor_fires_from_the_apply_layer_hook() -> None:
    fired: list[AnchorEvent] = []
    w = AnchorWatcher(lambda: None, Keys("x"), [(0, AnchorSpec("take", n=2, action="CLOSE"))],
                      lambda slot, ev: fired.append(ev))  # type: ignore[arg-type,return-value]
    w.start()  # no stream-borne anchor: no connection, no thread
    assert w._thread is None
    for i, action in enumerate(["CLOSE", "OPEN", "CLOSE", "CLOSE"]):
        w.on_apply_record({"type": "permit_taken", "plan_id": f"p{i}", "entry_id": f"{i}-0",
                           "wall_ms": 1, "mono_ns": 5,
                           "permit": {"symbol": "AUSDT", "action": action}})
    w.on_apply_record({"type": "order_executed", "plan_id": "x"})
    assert [ev.plan_id for ev in fired] == ["p2"]
    assert fired[0].lag_ms(0, 1_000_005) == 1.0, "hook events are timed on the monotonic clock"


# ====================================================================== a real run
ANCHORED = """
[[fault]]
kind = "pause_governor"
duration = 1.0
target = "anchor"
after = { event = "permit", action = "OPEN", instance = "gov-1", n = 3 }

[[fault]]
kind = "slow_exchange"
duration = 0.3
after = { event = "take", n = 4 }

[[fault]]
kind = "kill_governor"
target = "gov-2"
after = { event = "block", reason = "no_such_reason", n = 1 }
"""


def test_event_anchored_faults_fire_at_their_event_in_a_real_run(tmp_path: Path) -> None:
    """pause_governor after gov-1's 3rd OPEN PERMIT: the history shows the fault start after
    that permit and before gov-1's next decision; the take anchor starts on the 4th take;
    an anchor whose event never comes is recorded as not fired and the run says so."""
    text = small_scenario("anch", 3).replace("processes = 2\nrate = 200", "rate = 20")
    text = text.replace("governors = 2", "governors = 2\nseed = 3") + ANCHORED
    scn = tmp_path / "anch.toml"
    scn.write_text(text)
    out = tmp_path / "run"
    p = subprocess.run([sys.executable, "-m", "chaos", "run", "--scenario", str(scn), "--out",
                        str(out), "--quiet", "--no-report"], capture_output=True, text=True,
                       timeout=240)
    assert p.returncode == 2, p.stdout + p.stderr  # valid but for the fault never fired
    assert "not exercised: fault[2] kill_governor never fired: its event came 0 time(s) of 1" \
        in p.stdout
    ops = read_history(out)
    faults = [op for op in ops if op.f == F.FAULT]
    start = next(op for op in faults if op.value.get("kind") == "pause_governor"
                 and op.value.get("phase") == "start" and op.type == OpType.INVOKE)
    ev = start.value["anchor_event"]
    assert start.value["after"] == {"event": "permit", "n": 3, "delay": 0.0, "action": "OPEN",
                                    "instance": "gov-1"}
    assert start.value["anchor_lag_ms"] >= 0
    # The recorder's view of the same stream: gov-1's OPEN PERMITs and its decisions.
    decisions = [op for op in ops if op.f == F.DECISION]
    gov1 = sorted((op for op in decisions if op.value.get("governor") == "gov-1"),
                  key=lambda op: _id(op.value["entry_id"]))
    permits = [op for op in gov1 if op.value.get("decision") == "PERMIT"
               and op.value.get("action") == "OPEN"]
    third = permits[2]
    assert ev["entry_id"] == third.value["entry_id"] and ev["plan_id"] == third.key
    after = [op for op in gov1 if _id(op.value["entry_id"]) > _id(third.value["entry_id"])]
    assert after, "gov-1 decided again after its pause"
    assert int(after[0].value["entry_ms"]) > start.wall_ms, \
        "gov-1's next decision came after the fault started"
    ok = next(op for op in faults if op.key == start.key and op.type == OpType.OK
              and op.value.get("phase") == "start")
    assert ok.value["paused"] == ["gov-1"], "target 'anchor': the governor that decided"
    # take #4, from the apply layer's own records
    takes = [op for op in ops if op.f == F.TAKE and op.type == OpType.OK]
    slow = next(op for op in faults if op.value.get("kind") == "slow_exchange"
                and op.value.get("phase") == "start" and op.type == OpType.INVOKE)
    assert slow.value["anchor_event"]["plan_id"] == takes[3].key
    # read back from the history: the same anchors (for turning timed faults into anchored)
    again = anchor_before(out, start.key, "permit", action="OPEN", instance="gov-1")
    assert again is not None and (again.n, again.instance) == (3, "gov-1")
    took = anchor_before(out, slow.key, "take")
    assert took is not None and took.n == 4
    sub = anchor_before(out, start.key)
    assert sub is not None and sub.event == "submit" and sub.n == 1 and sub.plan_id
    # never fired: in the history, in run.json and in results.json
    nf = [op for op in faults if op.value.get("phase") == "not_fired"]
    assert [(op.type, op.value["slot"], op.value["matched"]) for op in nf] == \
        [(OpType.INFO, 2, 0)]
    anchors = json.loads((out / "run.json").read_text())["stats"]["anchors"]
    assert [(a["fault"], a["fired"]) for a in anchors] == [(0, True), (1, True), (2, False)]
    cov = json.loads((out / "results.json").read_text())["coverage"]
    assert cov["faults_not_fired"] == 1


def _id(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq)


def test_every_fault_kind_can_be_anchored(tmp_path: Path) -> None:
    """The anchor path is the same for every kind: each starts on its event with the
    anchor in its start op (here with no tools to act on, so each start is then a recorded
    ``fail``, as any fault that cannot happen); an unfired one is recorded at stop."""
    from chaos.history import HistoryWriter
    from chaos.nemesis import Nemesis, NemesisContext
    from chaos.scenario import FAULT_KINDS, FaultSpec

    kinds = sorted(FAULT_KINDS)
    faults = [FaultSpec(k, duration=0.05, after=AnchorSpec("take", n=i + 1))
              for i, k in enumerate(kinds)]
    faults.append(FaultSpec("pause_governor", after=AnchorSpec("take", n=999)))
    h = HistoryWriter(tmp_path, "nemesis")
    nem = Nemesis(NemesisContext(history=h), faults).start()
    for i in range(len(kinds)):
        nem.on_apply_record({"type": "permit_taken", "plan_id": f"p{i}", "entry_id": f"{i}-0",
                             "wall_ms": 1, "mono_ns": 1, "permit": {"action": "OPEN"}})
    nem.heal_all()
    h.close()
    ops = [op for op in read_history(tmp_path) if op.f == F.FAULT]
    starts = {op.value["kind"]: op for op in ops if op.type == OpType.INVOKE
              and op.value.get("phase") == "start"}
    assert sorted(starts) == kinds
    for i, k in enumerate(kinds):
        assert starts[k].value["anchor_event"]["plan_id"] == f"p{i}"
        assert starts[k].value["after"]["n"] == i + 1
        assert any(op.key == starts[k].key and op.type != OpType.INVOKE for op in ops)
    [nf] = [op for op in ops if op.value.get("phase") == "not_fired"]
    assert nf.value["slot"] == len(kinds) and nf.value["matched"] == len(kinds)
    assert [r["fired"] for r in nem.anchor_report()] == [True] * len(kinds) + [False]

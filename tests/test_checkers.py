"""Each checker on small hand-written histories: one that holds, one per way it breaks."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from chaos.checkers import check_run
from chaos.exchange import Exchange, Order
from chaos.history import F, Op, OpType, write_history
from governor_ref.protocol import GovernorConfig

T0 = 1_800_000_000_000  # ms


class Story:
    """A run directory written by hand: operations, then orders on a real ledger."""

    def __init__(self, tmp: Path, **config: Any) -> None:
        self.dir = tmp / "run"
        self.dir.mkdir()
        self.cfg = GovernorConfig().to_hash() | {k: str(v) for k, v in config.items()}
        self.ops: list[Op] = []
        self.ex = Exchange.create(self.dir / "ledger.sqlite", capital=10_000)
        (self.dir / "run.json").write_text(json.dumps(
            {"status": "complete", "governor_config": self.cfg}))
        self.op(0, OpType.OK, F.OPERATOR, "config", config=self.cfg)
        self.op(0, OpType.OK, F.OPERATOR, "capital", capital=10_000, allocation_pct=0.25)
        self.op(0, OpType.OK, F.OPERATOR, "regime-initial", regime="BASE", initial=True)

    def op(self, t: int, typ: OpType, f: str, key: str | None = None, symbol: str | None = None,
           process: str = "p", fields: dict[str, Any] | None = None, **value: Any) -> None:
        self.ops.append(Op(typ, str(f), process, (T0 + t) * 1_000_000, T0 + t, key, symbol,
                           {**(fields or {}), **value}))

    def submit(self, t: int, pid: str, sym: str, action: str = "OPEN", status: OpType = OpType.OK,
               created: int | None = None, notional: str = "100", **extra: Any) -> None:
        plan = {"plan_id": pid, "symbol": sym, "action": action, "source": "t",
                "intent_created_at_ms": str(T0 + (created if created is not None else t))}
        if action == "OPEN":
            plan |= {"side": "LONG", "notional": notional}
        self.op(t, OpType.INVOKE, F.SUBMIT, pid, sym, plan=plan, **extra)
        self.op(t + 1, status, F.SUBMIT, pid, sym)

    def decide(self, t: int, pid: str, sym: str, action: str = "OPEN", decision: str = "PERMIT",
               reason: str = "", fence: str = "") -> None:
        self.op(t, OpType.OK, F.DECISION, pid, sym, process="recorder", fields={
            "plan_id": pid, "symbol": sym, "action": action, "decision": decision,
            "reason": reason, "governor": "g1", "entry_ms": T0 + t, "entry_id": f"{T0 + t}-0",
            "fence": fence})

    def execute(self, t: int, pid: str, sym: str, action: str = "OPEN",
                notional: str = "100", issued: int | None = None) -> None:
        fill = self.ex.execute(Order(pid, sym, action, "LONG" if action == "OPEN" else "",
                                     notional, issued_at_ms=T0 + (issued if issued is not None
                                                                  else t - 5)))
        # The story has its own clock: stamp the real execution with the story's time.
        with sqlite3.connect(self.dir / "ledger.sqlite") as con:
            con.execute("UPDATE orders SET wall_ms = ? WHERE seq = ?", (T0 + t, fill.seq))
        self.op(t, OpType.OK, F.ORDER, pid, sym, process="apply", fill={"effect": fill.effect})

    def probe(self, pid: str, sym: str, kind: str, decision: str | None, reason: str = "",
              t: int = 90_000) -> None:
        self.op(t, OpType.INVOKE, F.PROBE, pid, sym, process="probe", probe=kind)
        typ = OpType.OK if decision else OpType.FAIL
        self.op(t + 5, typ, F.PROBE, pid, sym, process="probe", probe=kind, decision=decision,
                reason=reason)

    def check(self) -> dict[str, Any]:
        self.ex.close()
        write_history(self.dir, self.ops)
        v = check_run(self.dir)
        return {n: r.valid for n, r in v.results.items()} | {"_v": v}


@pytest.fixture
def story(tmp_path: Path) -> Story:
    return Story(tmp_path, slots_BASE=2, slots_CHOP=1)


def _open(s: Story, t: int, pid: str, sym: str) -> None:
    s.submit(t, pid, sym)
    s.decide(t + 5, pid, sym)
    s.execute(t + 20, pid, sym, issued=t + 5)


def test_a_calm_history_is_valid_on_every_invariant(story: Story) -> None:
    _open(story, 100, "o1", "AAUSDT")
    _open(story, 200, "o2", "BBUSDT")
    story.submit(300, "o3", "CCUSDT")
    story.decide(305, "o3", "CCUSDT", decision="BLOCK",
                 reason="active_slots_waiting_rotation_close")
    story.submit(400, "c1", "AAUSDT", action="CLOSE")
    story.decide(405, "c1", "AAUSDT", action="CLOSE", fence="1")
    story.execute(420, "c1", "AAUSDT", action="CLOSE")
    story.probe("pc", "BBUSDT", "close", "PERMIT")
    res = story.check()
    assert all(res[n] is True for n in res if n != "_v"), res
    assert res["_v"].exit_code == 0


def test_slots_violated_when_an_open_executes_at_the_limit(story: Story) -> None:
    _open(story, 100, "o1", "AAUSDT")
    _open(story, 200, "o2", "BBUSDT")
    _open(story, 300, "o3", "CCUSDT")  # third position, 2 slots
    res = story.check()
    assert res["slots"] is False
    (v,) = res["_v"].results["slots"].violations
    assert v.plan_ids == ("o3",) and v.observed == "2 open"


def test_slots_judged_by_the_regime_in_force_when_the_permit_was_issued(story: Story) -> None:
    _open(story, 100, "o1", "AAUSDT")
    story.op(150, OpType.INVOKE, F.OPERATOR, "regime-1", regime="CHOP")
    story.op(151, OpType.OK, F.OPERATOR, "regime-1", regime="CHOP")
    _open(story, 200, "o2", "BBUSDT")  # issued under CHOP (1 slot) with 1 open
    res = story.check()
    assert res["slots"] is False


def test_a_flip_completing_in_the_permits_millisecond_may_not_have_landed(story: Story) -> None:
    """The flip's completion (harness clock) and the permit (Redis clock) in one ms: the SET
    may have landed just after the decision in that ms, so either regime may hold (seen on
    a reference run: a permit under BASE judged by CHOP's slots)."""
    _open(story, 100, "o1", "AAUSDT")
    story.op(150, OpType.INVOKE, F.OPERATOR, "regime-1", regime="CHOP")
    story.op(205, OpType.OK, F.OPERATOR, "regime-1", regime="CHOP")
    _open(story, 200, "o2", "BBUSDT")  # permit issued at 205, the flip's completion
    assert story.check()["slots"] is True
    story.op(206, OpType.INVOKE, F.OPERATOR, "regime-2", regime="CHOP")
    story.op(206, OpType.OK, F.OPERATOR, "regime-2", regime="CHOP")
    _open(story, 202, "o3", "CCUSDT")  # issued at 207: after the flip, surely CHOP
    assert story.check()["slots"] is False


def test_slots_give_the_benefit_of_the_doubt_to_a_flip_in_flight(story: Story) -> None:
    _open(story, 100, "o1", "AAUSDT")
    story.op(150, OpType.INVOKE, F.OPERATOR, "regime-1", regime="CHOP")
    _open(story, 200, "o2", "BBUSDT")  # the flip never completed: BASE may still hold
    story.op(400, OpType.INFO, F.OPERATOR, "regime-1", regime="CHOP")
    res = story.check()
    assert res["slots"] is True


def test_max_positions_is_a_hard_cap(tmp_path: Path) -> None:
    s = Story(tmp_path, slots_BASE=10, max_positions=1)
    _open(s, 100, "o1", "AAUSDT")
    _open(s, 200, "o2", "BBUSDT")
    assert s.check()["slots"] is False


def test_double_open_is_a_violation(story: Story) -> None:
    _open(story, 100, "o1", "AAUSDT")
    _open(story, 200, "o2", "AAUSDT")
    res = story.check()
    assert res["one_position_per_symbol"] is False
    assert res["slots"] is True  # an add opens no new position


def test_double_close_flips_and_is_a_violation(story: Story) -> None:
    _open(story, 100, "o1", "AAUSDT")
    for pid, t in (("c1", 200), ("c2", 300)):
        story.submit(t, pid, "AAUSDT", action="CLOSE")
        story.decide(t + 5, pid, "AAUSDT", action="CLOSE")
        story.execute(t + 20, pid, "AAUSDT", action="CLOSE")
    res = story.check()
    assert res["single_close"] is False
    assert any("flip" in v.message for v in res["_v"].results["single_close"].violations)


def test_two_close_permits_outstanding_at_once_is_a_violation(story: Story) -> None:
    _open(story, 100, "o1", "AAUSDT")
    story.decide(200, "c1", "AAUSDT", action="CLOSE")
    story.decide(210, "c2", "AAUSDT", action="CLOSE")  # c1 not yet executed
    story.execute(300, "c1", "AAUSDT", action="CLOSE")
    story.op(305, OpType.FAIL, F.TAKE, "c2", process="apply")  # c2's permit was then missing
    res = story.check()
    assert res["single_close"] is False
    v = res["_v"].results["single_close"].violations[0]
    assert set(v.plan_ids) == {"c1", "c2"}


def test_sequential_close_permits_are_fine(story: Story) -> None:
    _open(story, 100, "o1", "AAUSDT")
    story.decide(200, "c1", "AAUSDT", action="CLOSE")
    story.op(250, OpType.FAIL, F.TAKE, "c1", process="apply")  # expired, never ran
    story.decide(300, "c2", "AAUSDT", action="CLOSE")
    story.execute(320, "c2", "AAUSDT", action="CLOSE")
    assert story.check()["single_close"] is True


def test_capital_per_trade_total_and_allocation(tmp_path: Path) -> None:
    s = Story(tmp_path, slots_BASE=10, max_notional_per_trade=200, max_total_notional=300)
    s.submit(100, "o1", "AAUSDT", notional="250")  # > per trade
    s.decide(105, "o1", "AAUSDT")
    s.submit(200, "o2", "BBUSDT", notional="150")
    s.decide(205, "o2", "BBUSDT")
    s.submit(210, "o3", "CCUSDT", notional="150")  # 250 + 150 + 150 > 300 while pending
    s.decide(215, "o3", "CCUSDT")
    res = s.check()
    assert res["capital"] is False
    msgs = " ".join(v.message for v in res["_v"].results["capital"].violations)
    assert "max_notional_per_trade" in msgs and "in total" in msgs


def test_allocation_counts_open_and_permitted_on_the_symbol(tmp_path: Path) -> None:
    s = Story(tmp_path, slots_BASE=10)  # capital 10000 x 0.25 = 2500 per symbol
    s.op(1, OpType.OK, F.OPERATOR, "capital", capital=400, allocation_pct=0.25)  # 100
    s.submit(100, "o1", "AAUSDT", notional="80")
    s.decide(105, "o1", "AAUSDT")
    s.execute(120, "o1", "AAUSDT", notional="80")
    s.submit(200, "o2", "AAUSDT", notional="50")
    s.decide(205, "o2", "AAUSDT")
    res = s.check()
    assert res["capital"] is False


def test_stale_permit_violates_fresh_intent_stale_block_does_not(story: Story) -> None:
    story.submit(40_000, "o1", "AAUSDT", created=1_000)
    story.decide(40_005, "o1", "AAUSDT")
    story.submit(40_100, "o2", "BBUSDT", created=1_000)
    story.decide(40_105, "o2", "BBUSDT", decision="BLOCK", reason="intent_stale")
    res = story.check()
    assert res["fresh_intent"] is False
    assert res["_v"].results["fresh_intent"].violations[0].plan_ids == ("o1",)


def test_second_decision_and_missing_decision(story: Story) -> None:
    story.submit(100, "o1", "AAUSDT")
    story.decide(105, "o1", "AAUSDT")
    story.decide(900, "o1", "AAUSDT", decision="BLOCK", reason="duplicate_open")
    story.submit(200, "o2", "BBUSDT")  # never decided
    story.op(1_000, OpType.OK, F.PHASE, "heal", process="runner")
    res = story.check()
    assert res["one_decision"] is False
    msgs = [v.message for v in res["_v"].results["one_decision"].violations]
    assert any("2 decisions that differ" in m for m in msgs)
    assert any("never decided" in m for m in msgs)


def test_unknown_submit_needs_no_decision(story: Story) -> None:
    story.submit(100, "o1", "AAUSDT", status=OpType.INFO)  # maybe never reached Redis
    story.op(1_000, OpType.OK, F.PHASE, "heal", process="runner")
    assert story.check()["one_decision"] is True


def test_liveness_failures_and_missing_probe(story: Story) -> None:
    story.probe("p1", "AAUSDT", "close", "BLOCK", "exit_lock_busy_double_close_prevention")
    story.probe("p2", "PRBUSDT", "open", None)
    res = story.check()
    assert res["liveness"] is False
    assert len(res["_v"].results["liveness"].violations) == 2


def test_no_probe_is_unknown_and_so_is_the_verdict(story: Story) -> None:
    _open(story, 100, "o1", "AAUSDT")
    res = story.check()
    assert res["liveness"] is None
    assert res["_v"].valid is None and res["_v"].exit_code == 2


def test_results_json_is_written(story: Story) -> None:
    _open(story, 100, "o1", "AAUSDT")
    _open(story, 200, "o2", "BBUSDT")
    _open(story, 300, "o3", "CCUSDT")
    story.check()
    data = json.loads((story.dir / "results.json").read_text())
    assert data["valid"] is False
    assert data["invariants"]["slots"]["violations"] == 1
    assert data["violations"][0]["invariant"] == "slots"


# -- violations explained with their causes ---------------------------------------------------
def test_double_close_names_the_close_that_made_it_flat_and_both_permits(story: Story) -> None:
    _open(story, 100, "o1", "AAUSDT")
    for pid, t, fence in (("c1", 200, "7"), ("c2", 300, "8")):
        story.submit(t, pid, "AAUSDT", action="CLOSE")
        story.decide(t + 5, pid, "AAUSDT", action="CLOSE", fence=fence)
        story.execute(t + 20, pid, "AAUSDT", action="CLOSE")
    res = story.check()
    (v,) = [v for v in res["_v"].results["single_close"].violations
            if v.observed == "CLOSE on a flat symbol"]
    assert v.plan_ids == ("c1", "c2")
    assert "c1 had closed" in v.message
    permits = [(e["plan_id"], e["governor"], e["entry_ms"], e["fence"]) for e in v.events
               if e["what"] == "decision"]
    assert permits == [("c1", "g1", T0 + 205, "7"), ("c2", "g1", T0 + 305, "8")]
    orders = [(e["plan_id"], e["effect"]) for e in v.events if e["what"] == "order"]
    assert orders == [("c1", "close"), ("c2", "flip")]


def test_slot_violation_lists_the_positions_open_and_the_permits_regime(story: Story) -> None:
    _open(story, 100, "o1", "AAUSDT")
    _open(story, 200, "o2", "BBUSDT")
    _open(story, 300, "o3", "CCUSDT")  # third position, 2 slots
    (v,) = story.check()["_v"].results["slots"].violations
    held = [(e["symbol"], e["plan_id"], e["wall_ms"]) for e in v.events
            if e["what"] == "open position"]
    assert held == [("AAUSDT", "o1", T0 + 120), ("BBUSDT", "o2", T0 + 220)]
    (regime,) = [e for e in v.events if e["what"] == "regime at permit"]
    assert regime["regime"] == "BASE" and regime["slots"] == 2
    assert regime["wall_ms"] == T0 + 305
    assert "AAUSDT (o1), BBUSDT (o2)" in v.message
    assert v.events[-1]["what"] == "order" and v.events[-1]["plan_id"] == "o3"


def test_liveness_failure_says_what_the_exchange_held_and_the_last_releases(
        story: Story) -> None:
    _open(story, 100, "o1", "AAUSDT")
    _open(story, 200, "o2", "BBUSDT")
    for pid, sym, t in (("c1", "AAUSDT", 300), ("c2", "BBUSDT", 400)):
        story.submit(t, pid, sym, action="CLOSE")
        story.decide(t + 5, pid, sym, action="CLOSE", fence="3")
        story.execute(t + 20, pid, sym, action="CLOSE")
        story.op(t + 25, OpType.OK, F.RESULT, pid, sym, process="recorder", fields={
            "plan_id": pid, "symbol": sym, "action": "CLOSE", "status": "executed",
            "fence": "3", "entry_ms": T0 + t + 25})
    story.probe("probe-open-1800000090000-0", "PRBUSDT", "open", "BLOCK",
                "active_slots_waiting_rotation_close")
    (v,) = story.check()["_v"].results["liveness"].violations
    assert ("0 open positions and 0 outstanding OPEN permits on the exchange against 2 slots "
            "(BASE), yet the governor answered active_slots_waiting_rotation_close: 2 slots "
            "leaked") in v.message
    (held,) = [e for e in v.events if e["what"] == "exchange at probe"]
    assert held["open_positions"] == 0 and held["outstanding_permits"] == 0
    sent = [(e["plan_id"], e["symbol"], e["effect"], e["entry_ms"]) for e in v.events
            if e["what"] == "result sent"]
    assert sent == [("c1", "AAUSDT", "executed", T0 + 325), ("c2", "BBUSDT", "executed",
                                                            T0 + 425)]

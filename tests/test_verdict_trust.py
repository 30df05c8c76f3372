"""Verdicts that can be trusted (issue 10): no reader stalled by one entry, malformed decisions
reported as the governor's, runs that did not exercise the governor UNKNOWN, coverage recorded.

Against real Redis servers and real processes; no mocks.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import redis
from govtools import wait_for
from test_apply_layer import FAST, grant, results, running, wait_results
from test_checkers import Story, _open

from chaos.apply_layer import ApplyEvent, ApplyLayer
from chaos.exchange import Exchange
from governor_ref.keys import Keys
from governor_ref.protocol import ResultStatus

ROOT = Path(__file__).resolve().parents[1]
BTC, ETH = "BTCUSDT", "ETHUSDT"


@pytest.fixture
def keys(prefix: str) -> Keys:
    return Keys(prefix)


def _all_acked(r: redis.Redis, keys: Keys) -> bool:
    g = r.xinfo_groups(keys.events)[0]
    return g["pending"] == 0 and g["last-delivered-id"] == r.xinfo_stream(keys.events)[
        "last-generated-id"]


# -- the apply layer ------------------------------------------------------------------------
def test_an_informational_entry_with_a_bad_time_does_not_stop_the_apply_layer(
        shared_redis: Any, r: redis.Redis, keys: Keys, ex: Exchange) -> None:
    """The protocol says to ignore decisions that are neither PERMIT nor BLOCK: whatever
    else they hold (here a ``decided_at_ms`` that is not a number) must not matter."""
    r.xadd(keys.events, {"decision": "HEARTBEAT", "governor": "g", "decided_at_ms": "n/a"})
    r.xadd(keys.events, {"plan_id": "i1", "decision": "INFO", "decided_at_ms": "soon"})
    grant(r, keys, "o1")
    with running(ApplyLayer(shared_redis.url, keys, ex, FAST)):
        [(_, res)] = wait_results(r, keys, 1)
        wait_for(lambda: _all_acked(r, keys), what="every entry acked")
    assert (res.plan_id, res.status) == ("o1", ResultStatus.EXECUTED)
    assert [o.plan_id for o in ex.orders()] == ["o1"]


def test_a_malformed_permit_is_recorded_and_acked_and_does_not_block_the_next(
        shared_redis: Any, r: redis.Redis, keys: Keys, ex: Exchange) -> None:
    """A PERMIT without a plan id is passed over (recorded, acked); one with a bad
    ``decided_at_ms`` is still executed (the apply layer does not need that field, the
    checkers report the breach); one with bytes that are not UTF-8 is read all the same."""
    records: list[dict[str, Any]] = []
    r.xadd(keys.events, {"symbol": BTC, "action": "OPEN", "decision": "PERMIT",
                         "decided_at_ms": "1"})  # no plan_id
    grant(r, keys, "o-bad-time")
    r.xadd(keys.events, {"plan_id": "o-bad-time", "decision": "PERMIT", "symbol": BTC,
                         "action": "OPEN", "decided_at_ms": "n/a"})  # a second copy, bad time
    raw = shared_redis.client(decode_responses=False)
    try:
        raw.xadd(keys.events, {b"plan_id": b"x\xff\xfe", b"decision": b"PERMIT",
                               b"governor": b"\xc3\x28", b"decided_at_ms": b"1"})
    finally:
        raw.close()
    grant(r, keys, "o2", symbol=ETH)
    layer = ApplyLayer(shared_redis.url, keys, ex, FAST, on_record=records.append)
    with running(layer):
        wait_for(lambda: {res.plan_id for _, res in results(r, keys)} >= {"o-bad-time", "o2"},
                 what="both permits executed")
        wait_for(lambda: _all_acked(r, keys), what="every entry acked")
    assert sorted(o.plan_id for o in ex.orders()) == ["o-bad-time", "o2"]
    passed_over = [x for x in records if x["type"] == ApplyEvent.UNREADABLE_DECISION]
    assert [x["plan_id"] for x in passed_over] == [None]
    assert "plan_id" in passed_over[0]["problem"]


# -- the checkers ---------------------------------------------------------------------------
def test_a_decision_action_hold_is_a_protocol_violation_and_the_rest_is_judged(
        story: Story) -> None:
    _open(story, 100, "o1", "AAUSDT")
    _open(story, 200, "o2", "AAUSDT")  # a double open: the rest is still judged
    story.submit(300, "h1", "BBUSDT")
    story.decide(305, "h1", "BBUSDT", action="HOLD")
    story.submit(400, "h2", "CCUSDT")
    story.decide(405, "h2", "CCUSDT", action="HOLD", decision="BLOCK", reason="whatever")
    story.probe("pc", "AAUSDT", "close", "PERMIT")
    res = story.check()
    v = res["_v"]
    assert res["protocol"] is False
    bad = [x for x in v.violations if x.invariant == "protocol"]
    assert sorted(x.plan_ids for x in bad) == [("h1",), ("h2",)]
    assert all("HOLD" in x.observed for x in bad)
    assert res["one_position_per_symbol"] is False  # judged beside it
    assert res["one_decision"] is True  # a malformed decision is still a decision
    assert v.exit_code == 1
    saved = json.loads((story.dir / "results.json").read_text())
    assert saved["invariants"]["protocol"]["violations"] == 2


def test_other_malformed_decision_fields_are_protocol_violations(story: Story) -> None:
    """No plan_id, a decided_at_ms that is not a number, a PERMIT without a symbol."""
    _open(story, 100, "o1", "AAUSDT")
    story.op(150, "ok", "decision", None, "BBUSDT", process="recorder", fields={
        "symbol": "BBUSDT", "action": "OPEN", "decision": "PERMIT", "reason": "",
        "governor": "g1", "entry_ms": 1_800_000_000_150, "entry_id": "1800000000150-0"})
    story.submit(200, "t1", "CCUSDT")
    story.op(205, "ok", "decision", "t1", "CCUSDT", process="recorder", fields={
        "plan_id": "t1", "symbol": "CCUSDT", "action": "OPEN", "decision": "BLOCK",
        "reason": "intent_stale", "governor": "g1", "decided_at_ms": "n/a",
        "entry_ms": 1_800_000_000_205, "entry_id": "1800000000205-0"})
    story.submit(300, "s1", "DDUSDT")
    story.decide(305, "s1", "")
    # Informational entries are skipped whatever they hold.
    story.op(310, "ok", "decision", None, None, process="recorder", fields={
        "decision": "HEARTBEAT", "decided_at_ms": "n/a", "entry_ms": 1_800_000_000_310,
        "entry_id": "1800000000310-0"})
    story.probe("pc", "AAUSDT", "close", "PERMIT")
    res = story.check()
    bad = {x.plan_ids: x.observed for x in res["_v"].violations if x.invariant == "protocol"}
    assert set(bad) == {(), ("t1",), ("s1",)}, bad
    assert "plan_id" in bad[()] and "decided_at_ms" in bad[("t1",)] and "symbol" in bad[("s1",)]
    assert res["one_decision"] is True and res["_v"].exit_code == 1


def test_a_hold_decision_in_a_history_scanned_in_parallel_is_judged(story: Story) -> None:
    """Long histories are scanned by workers whose facts travel as msgpack: a decision
    with an action outside the protocol must survive that trip too."""
    from chaos.checkers import gather, run_checkers

    for i in range(40):
        _open(story, 100 + i * 100, f"x{i}", f"X{i:02d}USDT")
    story.submit(9000, "h1", "BBUSDT")
    story.decide(9005, "h1", "BBUSDT", action="HOLD")  # in the second worker's share
    story.check()
    facts = gather(story.dir, workers=2)
    res = run_checkers(facts)
    assert res["protocol"].valid is False
    assert [v.plan_ids for v in res["protocol"].violations] == [("h1",)]


@pytest.fixture
def story(tmp_path: Path) -> Story:
    return Story(tmp_path, slots_BASE=2, slots_CHOP=1)


# -- coverage: a run that did not exercise the governor is not VALID -------------------------
def _as_run(story: Story, spec: dict[str, Any], producers: dict[str, int]) -> None:
    """Make the story a ``chaos run`` directory: its scenario and producers' summaries."""
    meta = json.loads((story.dir / "run.json").read_text())
    (story.dir / "run.json").write_text(json.dumps(meta | {"scenario_spec": spec}))
    (story.dir / "workloads").mkdir()
    for name, plans in producers.items():
        (story.dir / "workloads" / f"{name}.json").write_text(json.dumps(
            {"name": name, "kind": name.rsplit("-", 1)[0], "plans": plans,
             "stopped_by": "duration"}))


SPEC = {"name": "t", "duration_s": 2.0, "workloads": [
    {"kind": "open_storm", "processes": 1, "rate": 2.0, "params": {}}], "faults": []}


def _calm(story: Story) -> None:
    _open(story, 100, "o1", "AAUSDT")
    story.submit(200, "o2", "BBUSDT")
    story.decide(205, "o2", "BBUSDT", decision="BLOCK", reason="intent_stale")
    story.submit(300, "o3", "CCUSDT")
    story.decide(305, "o3", "CCUSDT", decision="BLOCK", reason="intent_stale")
    story.probe("pc", "AAUSDT", "close", "PERMIT")


def test_a_calm_run_that_did_what_its_scenario_asks_is_valid_with_its_coverage(
        story: Story) -> None:
    _calm(story)
    _as_run(story, SPEC, {"open_storm-0": 4})
    v = story.check()["_v"]
    assert v.exit_code == 0, v.summary()
    cov = json.loads((story.dir / "results.json").read_text())["coverage"]
    assert cov["exercised"] is True and cov["not_exercised"] == []
    assert (cov["plans_expected"], cov["plans_sent"], cov["plans_decided"], cov["permits"],
            cov["permits_executed"], cov["permits_unhandled"], cov["probe_permits_executed"],
            cov["faults_scheduled"], cov["faults_applied"]) == (4, 3, 3, 1, 1, 0, 0, 0, 0)


def test_permits_that_never_reached_the_exchange_make_the_run_unknown(story: Story) -> None:
    story.submit(100, "o1", "AAUSDT")
    story.decide(105, "o1", "AAUSDT")  # permitted, never executed: the apply layer stalled
    story.submit(200, "o2", "BBUSDT")
    story.decide(205, "o2", "BBUSDT")
    story.probe("po", "PRB00USDT", "open", "PERMIT")
    _as_run(story, SPEC, {"open_storm-0": 4})
    v = story.check()["_v"]
    assert v.exit_code == 2
    assert any("reached the exchange" in w for w in v.coverage["not_exercised"]), v.coverage
    assert "not exercised: none of the 2 permits reached the exchange" in v.summary()
    assert (v.coverage["permits"], v.coverage["permits_executed"],
            v.coverage["permits_unhandled"]) == (2, 0, 2)


def test_a_stuck_producer_and_faults_never_applied_make_the_run_unknown(story: Story) -> None:
    _calm(story)
    spec = SPEC | {"workloads": [{"kind": "open_storm", "processes": 2, "rate": 100.0}],
                   "faults": [{"kind": "pause_governor", "at": 0.5, "duration": 0.2,
                               "every": 1.0}]}
    _as_run(story, spec, {"open_storm-0": 3})  # the second producer never finished
    v = story.check()["_v"]
    why = v.coverage["not_exercised"]
    assert v.exit_code == 2
    assert v.coverage["faults_scheduled"] == 2 and v.coverage["faults_applied"] == 0
    assert any("2 faults scheduled, none applied" in w for w in why), why
    assert any("open_storm-0 sent 3 plans of the ~200" in w for w in why), why
    assert any("1 of 2 workload processes wrote no summary" in w for w in why), why


def test_an_import_has_coverage_and_no_exercised_rule(story: Story) -> None:
    story.submit(100, "o1", "AAUSDT")
    story.decide(105, "o1", "AAUSDT", decision="BLOCK", reason="intent_stale")
    story.probe("pc", "AAUSDT", "close", "PERMIT")
    meta = json.loads((story.dir / "run.json").read_text())
    (story.dir / "run.json").write_text(json.dumps(meta | {"kind": "import"}))
    v = story.check()["_v"]
    assert v.exit_code == 0
    assert v.coverage["exercised"] is None and v.coverage["permits"] == 0


# -- whole runs, real processes ---------------------------------------------------------------
def _chaos_run(tmp_path: Path, governor: str, duration: float = 3,
               extra: tuple[str, ...] = ()) -> tuple[int, str, dict]:
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "chaos", "run", "--scenario", "open-storm", "--duration",
           str(duration), "--no-report", "--out", str(out), "--probe-max-wait", "5",
           "--governor-cmd", f"{sys.executable} {ROOT / 'tests' / 'governors' / governor}",
           *extra]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        text, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:  # every process of the run is in its session
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode, text, json.loads((out / "results.json").read_text())


def test_a_governor_that_permits_nothing_of_the_workload_is_unknown_with_the_reason(
        tmp_path: Path) -> None:
    """Every invariant holds against a governor that BLOCKs every workload plan (it lets
    the liveness probe through): nothing was exercised, so the run is UNKNOWN, exit 2."""
    rc, text, res = _chaos_run(tmp_path, "block_all_governor.py")
    assert rc == 2, text
    cov = res["coverage"]
    assert "not exercised: no plan was permitted" in text
    assert cov["exercised"] is False and cov["permits"] == 0 and cov["plans_decided"] > 100
    assert cov["probe_permits_executed"] > 0
    assert all(r["valid"] is True for r in res["invariants"].values())


def test_a_governor_still_deciding_when_the_run_ends_is_not_judged_never_decided(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A governor that takes 150 ms per plan is far behind a 1,000 plans/s storm when the
    load stops, and still deciding when the 30 s settle ends. The protocol gives each plan
    60 s: what was sent within that before the end is not "never decided" (a ``cutoff``
    phase, reason ``behind``), so the verdict does not hang on when the harness stopped."""
    monkeypatch.setenv("MINIMAL_GOVERNOR_DELAY_MS", "150")
    rc, text, res = _chaos_run(tmp_path, "minimal_governor.py", duration=2,
                               extra=("--no-probe",))
    one = res["invariants"]["one_decision"]
    assert one["valid"] is True, text
    assert "still deciding when the run ended" in text, text
    cutoffs = [json.loads(line) for f in (tmp_path / "run" / "history").glob("runner-cutoff*")
               for line in f.read_text().splitlines()]
    assert cutoffs and all(c["value"]["reason"] == "behind" for c in cutoffs), cutoffs
    assert 0 < res["coverage"]["plans_decided"] < res["coverage"]["plans_added"], \
        res["coverage"]
    assert rc == 2  # it BLOCKs everything: valid invariants, nothing exercised


def test_a_governor_that_writes_informational_entries_is_valid_with_its_coverage(
        tmp_path: Path) -> None:
    """The reference plus HEARTBEAT / INFO entries with ``decided_at_ms`` = "n/a"."""
    rc, text, res = _chaos_run(tmp_path, "chatty_governor.py")
    assert rc == 0, text
    assert res["stats"]["orders"] > 10, res["stats"]  # the apply layer kept executing
    cov = res["coverage"]
    assert cov["exercised"] is True and cov["permits_executed"] > 10, cov
    assert cov["plans_decided"] >= cov["plans_added"] > 100  # and rotation plans
    infos = 0
    for f in (tmp_path / "run" / "history").glob("recorder-*.jsonl"):
        infos += sum(1 for line in f.read_text().splitlines()
                     if '"decision":"INFO"' in line.replace(" ", ""))
    assert infos > 10


def test_a_suite_says_why_a_run_is_unknown_and_junit_does_not_show_it_green(
        tmp_path: Path) -> None:
    """The suite's table, summary.md, summary.json and junit.xml carry the reason a run is
    unknown and its coverage figures: an unknown verdict in a CI's JUnit view is no pass."""
    import xml.etree.ElementTree as ET

    out = tmp_path / "suite"
    gov = f"python {ROOT / 'tests' / 'governors' / 'block_all_governor.py'}"
    p = subprocess.run([sys.executable, "-m", "chaos", "suite", "--quick", "--scenario",
                        "open-storm", "--governor-cmd", gov, "--out", str(out)],
                       capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert p.returncode == 2, p.stdout + p.stderr
    assert "not exercised: no plan was permitted" in p.stdout, p.stdout
    row = json.loads((out / "summary.json").read_text())["scenarios"][0]
    assert row["valid"] == "unknown"
    assert any("no plan was permitted" in w for w in row["unknown_because"]), row
    assert row["coverage"]["plans_sent"] > 100 and row["coverage"]["permits_executed"] == 0
    assert "no plan was permitted" in (out / "summary.md").read_text()
    skipped = ET.parse(out / "junit.xml").getroot().findall(".//testcase/skipped")
    assert skipped and "no plan was permitted" in skipped[0].get("message", "")

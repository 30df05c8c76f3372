"""``chaos shrink``: a small deterministic failure shrinks to its known minimum; bad input is
one line and exit 254; a Ctrl-C halfway exits 2, leaves no process, keeps shrink.json.

The failure comes from ``tests/governors/double_open_governor.py``, which PERMITs the first
two OPENs of every symbol: the smallest scenario that still shows its
``one_position_per_symbol`` violation is one producer sending two OPENs on one symbol, with
no fault. Real runs, real governors, real redis-server.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from test_signals import Harness, gone_within, harness, wait_until  # noqa: F401 - fixture

from chaos import scenario as scn
from chaos.checkers import check_run
from chaos.runner import RunOptions, run
from chaos.shrink import ddmin

DOUBLE_OPEN = f"{sys.executable} {Path(__file__).parent / 'governors' / 'double_open_governor.py'}"
INVARIANT = "one_position_per_symbol"

SCENARIO = """
name = "double-open"
duration_s = 2
governors = 1

[config]
permit_ttl_ms = 500
exit_lock_ttl_ms = 400
rotation_lock_ttl_ms = 500
capital_reservation_ttl_ms = 2000
max_total_notional = 100000

[apply]
open_latency_ms = 5
open_jitter_ms = 10
close_latency_ms = 5
close_jitter_ms = 10

[market]
symbols = 8

[[workload]]
kind = "open_storm"
processes = 2
rate = 8
symbols = 8

[[fault]]
kind = "pause_governor"
at = 0.2
duration = 0.3
"""


def _run(tmp: Path, name: str, text: str, governor_cmd: str | None, probe: bool) -> Path:
    path = tmp / f"{name}.toml"
    path.write_text(text)
    out = tmp / name
    run(RunOptions(scenario=scn.load(path), governor_cmd=governor_cmd, out=out,
                   progress=False, probe=probe, probe_max_wait_s=10))
    check_run(out, models=False)
    return out


@pytest.fixture(scope="module")
def invalid_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = _run(tmp_path_factory.mktemp("shrink"), "invalid", SCENARIO, DOUBLE_OPEN, False)
    results = json.loads((out / "results.json").read_text())
    assert results["invariants"][INVARIANT]["valid"] is False, results["violations"][:2]
    return out


def shrink_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "chaos", "shrink", *args], text=True,
                          capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL)


def test_ddmin_finds_the_one_minimal_subset() -> None:
    """The delta debugging the search uses, on a predicate with a known answer: two
    culprits far apart among 40, found in fewer distinct subsets than there are items (the
    search judges each distinct subset once)."""
    asked: set[frozenset[str]] = set()

    def fails(sub: list[str]) -> bool:
        asked.add(frozenset(sub))
        return {"7", "23"} <= set(sub)

    assert sorted(ddmin([str(i) for i in range(40)], fails), key=int) == ["7", "23"]
    assert len(asked) < 40, len(asked)


def test_a_deterministic_double_open_shrinks_to_two_plans_one_producer_no_fault(
        invalid_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "shrink"
    p = shrink_cli(str(invalid_run), "--out", str(out), "--tries", "3", "--k", "3",
                   "--search-tries", "2", "--budget-s", "240", "--governor-cmd", DOUBLE_OPEN)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "reproduces one_position_per_symbol in 3/3" in p.stdout
    assert "seed: witness plans" in p.stderr  # progress: one line per step
    data = json.loads((out / "shrink.json").read_text())
    assert data["status"] == "reproduced" and data["invariant"] == INVARIANT
    assert data["before"]["plans"] > 10 and data["before"]["faults"] == 1
    assert {k: data["after"][k] for k in ("faults", "producers", "plans", "symbols")} == \
        {"faults": 0, "producers": 1, "plans": 2, "symbols": 1}
    assert data["rate"] == {"failures": 3, "tries": 3, "measured": 1.0}
    assert all(t["met"] for t in data["targets"].values()), data["targets"]
    verify = data["steps"][-1]
    assert verify["name"] == "verify" and len(verify["tries"]) == 3
    assert all(Path(t["run_dir"]).is_dir() and t["verdict"] == "INVALID"
               for t in verify["tries"])
    # repro.toml is a normal scenario: two OPENs on one symbol, and it fails again.
    repro = scn.load(out / "repro.toml")
    (w,) = repro.workloads
    plans = [op["plan"] for op in w.params["ops"]]
    assert [pl["action"] for pl in plans] == ["OPEN", "OPEN"]
    assert len({pl["symbol"] for pl in plans}) == 1 and not repro.faults
    again = tmp_path / "again"
    r = subprocess.run([sys.executable, "-m", "chaos", "run", "--scenario",
                        str(out / "repro.toml"), "--governor-cmd", DOUBLE_OPEN, "--out",
                        str(again), "--no-probe", "--no-report", "--quiet"],
                       capture_output=True, text=True, timeout=120)
    assert f"{INVARIANT}  VIOLATED (1 violations)" in r.stdout, r.stdout + r.stderr
    assert "**reproduced**" in (out / "shrink.md").read_text()


def test_bad_input_is_one_line_and_254(invalid_run: Path, tmp_path: Path) -> None:
    cases = [
        ([str(tmp_path)], "is not a run directory"),
        ([str(invalid_run), "--tries", "3", "--k", "4"], "--k: must be within 1..--tries"),
        ([str(invalid_run), "--invariant", "nope"], "unknown invariant 'nope'"),
        ([str(invalid_run), "--invariant", "single_close"], "single_close is not violated"),
    ]
    for args, want in cases:
        p = shrink_cli(*args, "--out", str(tmp_path / "o"), timeout=60)
        assert p.returncode == 254, (args, p.stderr)
        assert want in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_a_valid_run_has_nothing_to_shrink(tmp_path: Path) -> None:
    valid = _run(tmp_path, "valid", SCENARIO.replace("double-open", "valid"), None, True)
    assert json.loads((valid / "results.json").read_text())["valid"] is True
    p = shrink_cli(str(valid), timeout=60)
    assert p.returncode == 254, p.stdout + p.stderr
    assert p.stderr.strip() == f"chaos shrink: {valid}: nothing to shrink: the run is VALID " \
                               f"with no violation"
    assert not (valid / "shrink").exists()


def test_ctrl_c_halfway_exits_2_leaves_nothing_and_keeps_shrink_json(
        invalid_run: Path, tmp_path: Path, harness: Callable[..., Harness]) -> None:  # noqa: F811
    out = tmp_path / "shrink"
    h = harness("shrink", str(invalid_run), "--out", str(out), "--tries", "10", "--k", "10",
                "--search-tries", "4", "--governor-cmd", DOUBLE_OPEN)

    def steps() -> int:
        try:
            return len(json.loads((out / "shrink.json").read_text())["steps"])
        except (OSError, ValueError, KeyError):
            return 0

    wait_until(lambda: steps() >= 1 or h.proc.poll() is not None, 120, "a first step")
    assert h.proc.poll() is None, h.output()
    wait_until(lambda: len(list((out / "tries").glob("*"))) > sum(
        len(s["tries"]) for s in json.loads((out / "shrink.json").read_text())["steps"]),
        60, "a try under way")
    before = h.snapshot()
    os.killpg(h.proc.pid, signal.SIGINT)
    assert h.wait(90) == 2, h.output()
    assert gone_within(h.mark, 10, before) == []
    data = json.loads((out / "shrink.json").read_text())
    assert data["status"] == "interrupted" and data["steps"], data
    assert (out / "repro.toml").is_file()  # the smallest candidate kept so far
    assert "interrupted" in (out / "shrink.md").read_text()


def test_a_fault_that_never_fired_is_said_once_on_the_progress_line_not_logged_per_try(
        invalid_run: Path, tmp_path: Path) -> None:
    """A candidate whose anchor's event never comes: the nemesis's warning stays in the
    try's harness.log and off the terminal, and the try counts it for the progress line."""
    import io
    import logging

    from chaos.shrink import Original, Shrinker, ShrinkOptions

    text = SCENARIO.replace("at = 0.2", 'after = { event = "submit", plan_id = "no-such-plan" }')
    sc = scn.parse(text)
    terminal = io.StringIO()
    handler = logging.StreamHandler(terminal)
    logging.getLogger().addHandler(handler)
    try:
        sh = Shrinker(ShrinkOptions(invalid_run, out=tmp_path / "sh", governor_cmd=DOUBLE_OPEN),
                      Original(invalid_run, INVARIANT, {}, 1, 0, "reference"))
        t = sh.run_try(sc)
    finally:
        logging.getLogger().removeHandler(handler)
    assert t.unfired == 1, t
    assert "never fired" not in terminal.getvalue()
    assert "never fired" in (Path(t.run_dir) / "logs" / "harness.log").read_text()
    # Outside a try the warning reaches the terminal as before.
    logging.getLogger().addHandler(handler)
    try:
        logging.getLogger("chaos.nemesis").warning("nemesis: fault[0] x never fired: y")
    finally:
        logging.getLogger().removeHandler(handler)
    assert "never fired" in terminal.getvalue()


def test_by_default_the_invariant_violated_most_often_is_kept(invalid_run: Path,
                                                             tmp_path: Path) -> None:
    """A run whose first violation is a lone one of another invariant: the default is the
    invariant with the most violations (a design's systematic failure), its first
    violation the witness; ``--invariant`` still picks any; ties go to the first."""
    import shutil

    from chaos.shrink import load_original

    run = tmp_path / "run"
    shutil.copytree(invalid_run, run)
    res = json.loads((run / "results.json").read_text())
    ours = [v for v in res["violations"] if v["invariant"] == INVARIANT]
    first_ms = min(int(v["wall_ms"]) for v in ours)
    lone = {**ours[0], "invariant": "one_decision", "wall_ms": first_ms - 100}
    res["violations"].insert(0, lone)
    res["invariants"]["one_decision"] = {"invariant": "one_decision", "valid": False,
                                         "violations": 1, "note": ""}
    (run / "results.json").write_text(json.dumps(res))
    o = load_original(run, None)
    assert (o.invariant, int(o.violation["wall_ms"])) == (INVARIANT, first_ms)
    assert load_original(run, "one_decision").invariant == "one_decision"
    # A tie (as many of each): the one violated first.
    res["invariants"]["one_decision"]["violations"] = res["invariants"][INVARIANT]["violations"]
    res["violations"] += [lone] * (len(ours) - 1)
    (run / "results.json").write_text(json.dumps(res))
    assert load_original(run, None).invariant == "one_decision"


def test_when_the_default_invariant_does_not_come_back_another_that_replays_is_shrunk(
        invalid_run: Path, tmp_path: Path) -> None:
    """The run's verdict is given one more invariant, violated most often (so the default)
    but never by this governor: no candidate reproduces it, the whole replay is then
    measured per invariant, and the one that comes back in k of N is shrunk to its known
    minimum. With ``--invariant`` given, there is no such fallback."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(invalid_run, run)
    res = json.loads((run / "results.json").read_text())
    ours = [v for v in res["violations"] if v["invariant"] == INVARIANT]
    ghost = [{**v, "invariant": "one_decision"} for v in ours] * 2
    res["violations"] += ghost
    res["invariants"]["one_decision"] = {"invariant": "one_decision", "valid": False,
                                         "violations": len(ghost), "note": ""}
    (run / "results.json").write_text(json.dumps(res))
    out = tmp_path / "shrink"
    p = shrink_cli(str(run), "--out", str(out), "--tries", "3", "--k", "3",
                   "--search-tries", "2", "--budget-s", "300", "--governor-cmd", DOUBLE_OPEN)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "seed: the whole replay, any of" in p.stderr, p.stderr
    assert f"shrinking {INVARIANT} instead" in p.stderr, p.stderr
    assert f"reproduces {INVARIANT} in 3/3" in p.stdout, p.stdout
    data = json.loads((out / "shrink.json").read_text())
    assert data["invariant"] == INVARIANT and data["status"] == "reproduced"
    pick = next(s for s in data["steps"] if s["name"].startswith("seed: the whole replay, any"))
    assert pick["accepted"] and f"{INVARIANT} 3/3" in pick["note"] and "one_decision 0/3" \
        in pick["note"], pick["note"]
    assert {k: data["after"][k] for k in ("faults", "producers", "plans")} == \
        {"faults": 0, "producers": 1, "plans": 2}
    forced = shrink_cli(str(run), "--out", str(tmp_path / "forced"), "--invariant",
                        "one_decision", "--tries", "3", "--k", "3", "--search-tries", "2",
                        "--budget-s", "120", "--governor-cmd", DOUBLE_OPEN)
    assert forced.returncode == 1, forced.stdout + forced.stderr
    assert "any of" not in forced.stderr
    assert "one_decision 0/3" in (out / "shrink.md").read_text()


def test_a_candidate_never_drops_the_plan_its_fault_is_anchored_on(invalid_run: Path) -> None:
    """Cutting plans or producers keeps the plan an event-anchored fault waits for: a
    candidate without it would never fire its fault (and be judged on a scenario that
    is not the one it describes)."""
    from dataclasses import replace

    from chaos.replay import scenario_from_run
    from chaos.shrink import _keep, _plan_id, _plans, _producers

    sc = scenario_from_run(invalid_run)
    plans = _plans(sc)
    anchor = _plan_id(plans[len(plans) // 2])
    fault = replace(sc.faults[0], at=0.0, every=0.0,
                    after=scn.AnchorSpec(event="submit", plan_id=anchor, delay=0.01))
    sc = replace(sc, faults=(fault,))
    assert [_plan_id(op) for op in _plans(_keep(sc, lambda p, op: False))] == [anchor]
    owner = next(str(w.params["producer"]) for w in _producers(sc)
                 if any(_plan_id(op) == anchor for op in w.params["ops"]))
    others = {str(w.params["producer"]) for w in _producers(sc)} - {owner}
    cut = _keep(sc, lambda p, op: True, producers=others)
    assert anchor in {_plan_id(op) for op in _plans(cut)}
    assert len(_plans(cut)) < len(plans)
    # Without the fault, nothing is kept for its sake.
    assert _plans(_keep(replace(sc, faults=()), lambda p, op: False)) == []

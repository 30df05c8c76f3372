"""``chaos run`` end to end: real Redis, governor processes, workloads, faults, verdict."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from govtools import small_scenario

from chaos.history import F, OpType, read_history


def scenario(tmp: Path, name: str = "t", duration: float = 3, extra: str = "") -> Path:
    p = tmp / f"{name}.toml"
    p.write_text(small_scenario(name, duration, extra))
    return p


def chaos(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "chaos", *args], capture_output=True,
                          text=True, timeout=timeout)


def test_reference_run_is_valid_and_leaves_a_complete_run_directory(tmp_path: Path) -> None:
    out = tmp_path / "run"
    p = chaos("run", "--scenario", str(scenario(tmp_path)), "--out", str(out), "--quiet")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "verdict: VALID" in p.stdout
    meta = json.loads((out / "run.json").read_text())
    assert meta["status"] == "complete" and meta["governor"] == "reference"
    assert (out / "ledger.sqlite").exists() and (out / "results.json").exists()
    assert (out / "logs" / "gov-1.log").exists() and (out / "logs" / "harness.log").exists()
    ops = read_history(out)
    kinds = {op.f for op in ops}
    assert {F.SUBMIT, F.PLAN, F.DECISION, F.TAKE, F.ORDER, F.RESULT, F.PROBE, F.PHASE,
            F.OPERATOR, F.GOVERNOR} <= kinds
    submits = [op for op in ops if op.f == F.SUBMIT]
    assert sum(op.type == OpType.INVOKE for op in submits) == \
        sum(op.type != OpType.INVOKE for op in submits), "every invoke is completed"
    results = json.loads((out / "results.json").read_text())
    assert results["valid"] is True


def test_legacy_open_storm_is_invalid_with_slot_violations(tmp_path: Path) -> None:
    out = tmp_path / "run"
    p = chaos("run", "--scenario", str(scenario(tmp_path)), "--governor", "legacy",
              "--out", str(out), "--quiet")
    assert p.returncode == 1, p.stdout + p.stderr
    results = json.loads((out / "results.json").read_text())
    assert results["invariants"]["slots"]["valid"] is False
    assert results["violations"][0]["events"], "a violation names the events that show it"


def test_governor_given_only_as_a_command(tmp_path: Path) -> None:
    out = tmp_path / "run"
    p = chaos("run", "--scenario", str(scenario(tmp_path)), "--governor-cmd",
              "python -m governor_ref run", "--out", str(out), "--quiet")
    assert p.returncode == 0, p.stdout + p.stderr
    assert json.loads((out / "run.json").read_text())["governor"].startswith("cmd:")


def test_faults_are_recorded_as_windows(tmp_path: Path) -> None:
    out = tmp_path / "run"
    extra = """
[[fault]]
kind = "kill_governor"
at = 0.5
every = 1.0
"""
    p = chaos("run", "--scenario", str(scenario(tmp_path, "k", 3, extra)), "--out", str(out),
              "--quiet")
    assert p.returncode == 0, p.stdout + p.stderr
    faults = [op for op in read_history(out) if op.f == F.FAULT]
    starts = [op for op in faults if op.value.get("phase") == "start" and op.type == OpType.OK]
    assert len(starts) >= 2
    restarts = [op for op in read_history(out) if op.f == F.GOVERNOR
                and op.value.get("type") == "start"]
    assert len(restarts) >= 2 + len(starts), "killed governors were started again"


def test_bad_scenario_file_names_the_field_and_exits_254(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "b"\n[[fault]]\nkind = "kil_governor"\n')
    p = chaos("run", "--scenario", str(bad))
    assert p.returncode == 254
    assert "fault[0].kind" in p.stderr and "kill_governor" in p.stderr
    p = chaos("run", "--scenario", "no-such-scenario")
    assert p.returncode == 254 and "open-storm" in p.stderr


def test_governor_that_cannot_start_is_a_harness_failure_not_a_violation(
        tmp_path: Path) -> None:
    p = chaos("run", "--scenario", str(scenario(tmp_path)), "--out", str(tmp_path / "r"),
              "--governor-cmd", "python -c \"import sys; sys.exit('no config for me')\"",
              "--quiet")
    assert p.returncode == 255, p.stdout + p.stderr
    assert "no config for me" in p.stderr
    assert "VIOLATED" not in p.stdout


def test_ctrl_c_stops_cleanly_and_keeps_the_history(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "chaos", "run", "--scenario",
                             str(scenario(tmp_path, "long", 60)), "--out", str(out), "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        hist = list((out / "history").glob("open_storm*.jsonl")) if out.exists() else []
        if hist and sum(h.stat().st_size for h in hist) > 10_000:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=90)
    assert proc.returncode == 2, stdout + stderr
    meta = json.loads((out / "run.json").read_text())
    assert meta["status"] == "interrupted"
    assert any(op.f == F.SUBMIT for op in read_history(out))
    p = chaos("check", str(out))
    assert p.returncode in (0, 1, 2) and "verdict" in p.stdout


def test_chaos_check_recomputes_the_stored_verdict(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert chaos("run", "--scenario", str(scenario(tmp_path)), "--governor", "legacy",
                 "--out", str(out), "--quiet").returncode == 1
    first = json.loads((out / "results.json").read_text())
    os.remove(out / "results.json")
    p = chaos("check", str(out))
    assert p.returncode == 1
    again = json.loads((out / "results.json").read_text())
    assert again["invariants"] == first["invariants"]


@pytest.mark.parametrize("bad", [["check", "/nonexistent"], ["suite", "--seeds", "0"]])
def test_check_and_suite_reject_bad_arguments(bad: list[str]) -> None:
    assert chaos(*bad).returncode == 254


def test_model_checker_agrees_with_the_invariant_checkers(tmp_path: Path) -> None:
    for governor, expect in (("reference", True), ("legacy", False)):
        out = tmp_path / governor
        chaos("run", "--scenario", str(scenario(tmp_path, governor)), "--governor", governor,
              "--out", str(out), "--quiet")
        results = json.loads((out / "results.json").read_text())
        assert results["models"]["slots_model"]["valid"] is expect
        assert results["models_agree"] is True


def test_suite_writes_reports_in_the_background_and_stops_its_processes(tmp_path: Path) -> None:
    # Two small scenarios against the legacy governor: both invalid, so both get a report,
    # written by the suite's report process while the second scenario runs.
    out = tmp_path / "suite"
    a, b = scenario(tmp_path, "sa", 2), scenario(tmp_path, "sb", 2)
    # Every process the suite starts inherits this mark (other tests run beside this one).
    mark = f"CHAOS_TEST_SUITE_MARK={uuid.uuid4().hex}"
    p = subprocess.run([sys.executable, "-m", "chaos", "suite", "--governor", "legacy",
                        "--quick", "--out", str(out), "--scenario", str(a), "--scenario",
                        str(b)], capture_output=True, text=True, timeout=240,
                       env={**os.environ, mark.split("=")[0]: mark.split("=")[1]})
    assert p.returncode == 1, p.stdout + p.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["valid"] is False
    names = [s["name"] for s in summary["scenarios"]]
    assert names == ["small-sa", "small-sb"]
    for name in names:
        assert (out / name / "report.html").stat().st_size > 10_000
        assert (out / name / "plots" / "open_positions.png").exists()
    assert "report for" not in p.stderr  # no report failed
    # The report process (and everything else the suite started) stopped with it.
    assert _marked_processes(mark) == [], "a process of the suite outlived it"


def _marked_processes(mark: str) -> list[int]:
    """The processes whose environment holds ``mark``."""
    found = []
    for env in Path("/proc").glob("[0-9]*/environ"):
        try:
            if mark.encode() in env.read_bytes().split(b"\0"):
                found.append(int(env.parent.name))
        except OSError:
            continue  # gone meanwhile, or not ours to read
    return found

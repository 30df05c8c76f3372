"""``chaos conformance``: the protocol cases against real governor processes.

The reference must pass every case; the seed and legacy designs must fail exactly the
cases where their documented departures (docs/variants.md) show without concurrency,
each failure naming what the protocol expected; the misbehaving test governors must fail
the cases they break. Everything runs real processes on a real embedded Redis.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import psutil
import pytest

from chaos import conformance as cf
from chaos.runner import governor_spec

ROOT = Path(__file__).resolve().parent.parent
GOVERNORS = ROOT / "tests" / "governors"

SEED_FAILS = {"close_permit", "intent_stale", "total_cap_permitted",
              "duplicate_open_permitted", "exit_lock_outlives_ttl", "regime_change",
              "redelivered_plan", "readded_plan_id", "redelivered_results", "unknown_result"}
LEGACY_FAILS = {"close_permit", "intent_stale", "drift_position_count", "drift_exposure",
                "total_cap_permitted", "duplicate_open_permitted", "exit_lock_busy",
                "exit_lock_outlives_ttl", "slots_count_permitted", "redelivered_plan",
                "readded_plan_id", "unknown_result"}


def _governor_children() -> list[psutil.Process]:
    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            cmd = " ".join(p.cmdline())
        except psutil.Error:
            continue
        if "governor_ref" in cmd or "tests/governors" in cmd:
            out.append(p)
    return out


def _run(logs: Path, governor: str | None = None, cmd: str | None = None,
         cases: list[str] | None = None) -> cf.Report:
    spec = governor_spec(governor or "reference", cmd)
    report = cf.run_conformance(spec, cases=cf.select(cases), logs=logs)
    assert not _governor_children(), "governor processes left running"
    return report


def _by_name(report: cf.Report) -> dict[str, cf.CaseResult]:
    return {r.name: r for r in report.results}


def _check_failures(results: dict[str, cf.CaseResult], expected: set[str]) -> None:
    """The failed cases are exactly ``expected``, each naming what the protocol expected
    and what was observed instead."""
    failed = {n for n, r in results.items() if r.status == cf.FAIL}
    assert failed == expected, "\n".join(r.line() for r in results.values())
    assert results["intent_stale"].expected.startswith("BLOCK intent_stale")
    assert results["intent_stale"].observed.startswith("PERMIT")
    assert results["close_permit"].observed == "no fence field on a CLOSE permit"
    assert "exactly one decision" in results["readded_plan_id"].expected
    assert re.match(r"2 decisions: PERMIT, PERMIT", results["readded_plan_id"].observed)
    assert results["duplicate_open_permitted"].expected.startswith("BLOCK duplicate_open")
    for r in results.values():
        if r.status == cf.FAIL:
            assert r.expected and r.observed and Path(r.log).is_file(), r.line()
    # Checking position_id is optional: the designs skip it, and do not fail for it.
    assert results["close_stale_position_id"].status == cf.NOT_PRESENT


def test_seed_fails_its_documented_departures(tmp_path: Path) -> None:
    report = _run(tmp_path, "seed")
    assert not report.passed
    _check_failures(_by_name(report), SEED_FAILS)


def test_a_governor_that_blocks_everything(tmp_path: Path) -> None:
    report = _run(tmp_path, cmd=f"python {GOVERNORS / 'block_all_governor.py'}",
                  cases=["open_permit", "intent_stale", "invalid_missing_fields"])
    r = _by_name(report)
    assert r["open_permit"].status == cf.FAIL
    assert r["open_permit"].observed == "BLOCK closed_for_business"
    # A required BLOCK with the governor's own reason: not a failure, the reason is absent.
    assert r["intent_stale"].status == cf.NOT_PRESENT
    assert "closed_for_business" in r["intent_stale"].observed
    # invalid_plan is named by the protocol: its own reason fails there.
    assert r["invalid_missing_fields"].status == cf.FAIL
    assert r["invalid_missing_fields"].expected.startswith("BLOCK invalid_plan")


@pytest.mark.parametrize("governor", ["utf8_only_governor.py", "poison_governor.py"])
def test_governors_dying_on_non_utf8_fail_that_case(governor: str, tmp_path: Path) -> None:
    report = _run(tmp_path, cmd=f"python {GOVERNORS / governor}",
                  cases=["invalid_bad_values", "invalid_non_utf8", "no_open_position"])
    r = _by_name(report)
    assert r["invalid_non_utf8"].status == cf.FAIL
    assert r["invalid_non_utf8"].observed == "the governor exited (return code 1)"
    log = Path(r["invalid_non_utf8"].log).read_text()  # kept: the case failed
    assert "UnicodeDecodeError" in log or "cannot decode" in log
    if governor == "utf8_only_governor.py":  # the reference otherwise: the rest passes
        assert r["invalid_bad_values"].status == cf.PASS
        assert r["no_open_position"].status == cf.PASS


def _chaos(*args: str, cwd: Path | None = None,
           timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "chaos", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=timeout)


def test_cli_exit_codes_json_and_junit(tmp_path: Path) -> None:
    p = _chaos("conformance", "--governor", "legacy", "--case", "intent_stale",
               "--case", "no_open_position", "--json", str(tmp_path / "c.json"),
               "--junit", str(tmp_path / "c.xml"), "--logs", str(tmp_path / "logs"))
    assert p.returncode == 1, p.stdout + p.stderr
    assert "FAIL        intent_stale" in p.stdout
    assert "expected: BLOCK intent_stale" in p.stdout
    data = json.loads((tmp_path / "c.json").read_text())
    assert data["passed"] is False and data["governor"] == "legacy"
    assert {c["name"]: c["status"] for c in data["cases"]} == {
        "intent_stale": "FAIL", "no_open_position": "PASS"}
    suite = ET.parse(tmp_path / "c.xml").getroot().find("testsuite")
    assert suite is not None
    cases = {tc.get("name"): [c.tag for c in tc] for tc in suite.iter("testcase")}
    assert cases == {"intent_stale": ["failure"], "no_open_position": []}
    assert (tmp_path / "logs" / "01-intent_stale" / "gov-1.log").is_file()

    p = _chaos("conformance", "--case", "no_such_case")
    assert p.returncode == 254 and "unknown conformance case(s): no_such_case" in p.stderr
    p = _chaos("conformance", "--list")
    assert p.returncode == 0
    assert [line.split()[0] for line in p.stdout.splitlines()] == cf.case_names()


@pytest.mark.parametrize("cmd", ["/nonexistent/governor", "python -c 'raise SystemExit(3)'"])
def test_a_governor_that_never_starts_is_255_not_a_failure(cmd: str, tmp_path: Path) -> None:
    p = _chaos("conformance", "--governor-cmd", cmd, "--logs", str(tmp_path), timeout=60)
    assert p.returncode == 255, p.stdout + p.stderr
    assert "governor command does not start" in p.stderr
    assert "FAIL" not in p.stdout


def test_suite_stops_when_legacy_fails_its_documented_departures(tmp_path: Path) -> None:
    """``chaos suite --conformance`` on the legacy design: the cases run first, fail where
    legacy departs from the protocol, and no chaos scenario starts."""
    out = tmp_path / "suite"
    p = _chaos("suite", "--conformance", "--governor", "legacy", "--quick", "--scenario",
               "open-storm", "--out", str(out))
    assert p.returncode == 1, p.stdout + p.stderr
    assert "the chaos scenarios were not run" in p.stderr
    assert "FAIL        slots_count_permitted" in p.stdout
    data = json.loads((out / "conformance.json").read_text())
    assert data["passed"] is False and data["governor"] == "legacy"
    _check_failures({c["name"]: cf.CaseResult(**c) for c in data["cases"]}, LEGACY_FAILS)
    assert (out / "conformance-junit.xml").is_file()
    assert (out / "conformance-logs" / "01-start_stream_absent" / "gov-1.log").is_file()
    assert not (out / "open-storm").exists() and not (out / "summary.json").exists()


def _recipe_steps() -> list[str]:
    """The ``run:`` commands of the workflow in docs/your-governor.md."""
    text = (ROOT / "docs" / "your-governor.md").read_text()
    block = re.search(r"```yaml\n(.*?)```", text, re.S)
    assert block, "no yaml block in docs/your-governor.md"
    return re.findall(r"^\s+run: (.+)$", block.group(1), re.M)


def test_the_ci_recipe_of_the_docs_runs(tmp_path: Path) -> None:
    steps = _recipe_steps()
    install = [s for s in steps if "pip install" in s]
    assert install and "governor-audit[chaos]" in install[0]  # already installed here
    chaos_steps = [s for s in steps if s.startswith("chaos ")]
    assert [s.split()[1] for s in chaos_steps] == ["conformance", "suite"]
    env = dict(os.environ, GOVERNOR_CMD="python -m governor_ref run",
               CHAOS_SUITE_ARGS="--scenario open-storm",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    for step in chaos_steps:
        p = subprocess.run(["bash", "-c", step], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=300)
        assert p.returncode == 0, f"{step}\n{p.stdout}\n{p.stderr}"
    reports = tmp_path / "reports"
    # The reference passes every case (the figure in the docs is its "seconds").
    data = json.loads((reports / "conformance.json").read_text())
    assert [c["name"] for c in data["cases"]] == cf.case_names()
    assert [c["name"] for c in data["cases"] if c["status"] != cf.PASS] == []
    assert data["passed"] is True
    print(f"reference conformance: {data['seconds']} s")
    assert (reports / "conformance.xml").is_file()
    assert json.loads((reports / "suite" / "summary.json").read_text())["valid"] is True
    assert (reports / "suite" / "junit.xml").is_file()

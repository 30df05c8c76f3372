"""The pytest plugin (``chaos.pytest_plugin``), run as a user runs it: pytest in a
subprocess, in a directory of its own, against real governors."""

from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

from govtools import small_scenario

ROOT = Path(__file__).resolve().parent.parent


def _pytest(tmp: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """pytest in ``tmp`` (an empty ini: not this project's config), Locust's plugin off."""
    (tmp / "pytest.ini").write_text("[pytest]\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:locust",
                           "-p", "no:cacheprovider", *args], cwd=tmp, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _junit(path: Path) -> dict[str, list[str]]:
    """``classname::name`` -> tags of its children (failure, skipped...)."""
    return {f"{tc.get('classname')}::{tc.get('name')}": [c.tag for c in tc
                                                         if c.tag not in ("system-out",
                                                                          "system-err")]
            for tc in ET.parse(path).getroot().iter("testcase")}


def test_reference_items_pass_with_junit(tmp_path: Path) -> None:
    p = _pytest(tmp_path, "--chaos-governor", "reference", "--chaos-quick",
                "-k", "conformance and (open_permit or intent_stale or rotation) or open-storm",
                "--junitxml", "j.xml")
    assert p.returncode == 0, p.stdout + p.stderr
    assert _junit(tmp_path / "j.xml") == {
        "chaos.conformance::open_permit": [], "chaos.conformance::duplicate_open_permitted": [],
        "chaos.conformance::intent_stale": [], "chaos.conformance::rotation": [],
        "chaos.scenario::open-storm[seed1]": []}
    assert (tmp_path / "reports" / "chaos-pytest").is_dir()


def test_legacy_items_fail_with_violations_and_run_directory(tmp_path: Path) -> None:
    p = _pytest(tmp_path, "--chaos-governor", "legacy", "--chaos-quick",
                "-k", "intent_stale or no_open_position or duplicate-close",
                "--junitxml", "j.xml")
    assert p.returncode == 1, p.stdout + p.stderr
    assert _junit(tmp_path / "j.xml") == {
        "chaos.conformance::intent_stale": ["failure"],
        "chaos.conformance::no_open_position": [],
        "chaos.scenario::duplicate-close[seed1]": ["failure"]}
    out = p.stdout
    # A few lines per failure: what was expected and seen, the violations, where to look.
    assert "expected: BLOCK intent_stale" in out and "observed: PERMIT" in out
    assert "duplicate-close seed 1: INVALID (" in out and "single_close" in out
    run_dir = next(line.split(": ", 1)[1] for line in out.splitlines()
                   if line.strip().startswith("run directory:"))
    report = next(line.split(": ", 1)[1] for line in out.splitlines()
                  if line.strip().startswith("report:"))
    assert (Path(run_dir) / "results.json").is_file() and Path(report).is_file()
    assert "Traceback" not in out


def test_xdist_workers_each_run_their_own_cases(tmp_path: Path) -> None:
    p = _pytest(tmp_path, "--chaos-governor", "reference", "-n", "2", "-k",
                "conformance and (notional_cap or slots_full or regime or readded)")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "2 workers [4 items]" in p.stdout and "4 passed" in p.stdout
    sessions = sorted(d.name.split("-")[0] for d in
                      (tmp_path / "reports" / "chaos-pytest" / "conformance").iterdir())
    assert sessions == ["gw0", "gw1"]  # one conformance session (own Redis) per worker


def test_off_unless_asked_and_user_scenarios(tmp_path: Path) -> None:
    (tmp_path / "test_mine.py").write_text("def test_one():\n    pass\n")
    p = _pytest(tmp_path, "--collect-only", "-q")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "test_mine.py::test_one" in p.stdout and "chaos::" not in p.stdout
    assert "--chaos-governor-cmd" in _pytest(tmp_path, "--help").stdout

    mine = tmp_path / "my-scenarios"
    mine.mkdir()
    (mine / "small.toml").write_text(small_scenario("mine"))
    cmd = f"python {ROOT / 'tests' / 'governors' / 'minimal_governor.py'}"
    p = _pytest(tmp_path, "--chaos-governor-cmd", cmd, "--chaos-scenarios", str(mine),
                "--chaos-seeds", "2", "--collect-only", "-q")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "chaos::my-scenarios::small-mine[seed1]" in p.stdout
    assert "chaos::my-scenarios::small-mine[seed2]" in p.stdout
    assert "chaos::conformance::open_permit" in p.stdout
    assert "chaos::scenario::open-storm[seed2]" in p.stdout

    (mine / "broken.toml").write_text("name = \n")
    p = _pytest(tmp_path, "--chaos-governor-cmd", cmd, "--chaos-scenarios", str(mine),
                "--collect-only", "-q")
    assert p.returncode == 4 and "--chaos-scenarios" in p.stderr and "broken.toml" in p.stderr

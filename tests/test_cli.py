"""The command lines: the main job end to end, and clear errors for bad input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from chaos.demo import run_demo


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120)


def test_demo_with_the_reference_holds_every_bound(tmp_path: Path) -> None:
    res = run_demo(seconds=3, governors=2, run_dir=tmp_path / "run", progress=False)
    assert res.ok, res
    assert res.opens_executed > 0 and res.closes_executed > 0, "the load did trade"
    assert res.decisions["PERMIT"] > 0
    assert (tmp_path / "run" / "ledger.sqlite").exists()
    assert (tmp_path / "run" / "logs" / "gov-1.log").exists()


def test_demo_with_the_legacy_design_is_caught(tmp_path: Path) -> None:
    res = run_demo(seconds=3, governors=2, variant="legacy", run_dir=tmp_path / "run",
                   progress=False)
    assert not res.ok
    assert res.double_closes > 0 or res.double_opens > 0 or res.peak_open > res.slots


def test_chaos_demo_command_exits_zero_and_prints_the_verdict(tmp_path: Path) -> None:
    p = _run("-m", "chaos", "demo", "--seconds", "2", "--governors", "1",
             "--out", str(tmp_path / "d"))
    assert p.returncode == 0, p.stderr
    assert "verdict: OK" in p.stdout


def test_chaos_bad_arguments_exit_254() -> None:
    p = _run("-m", "chaos", "demo", "--seconds", "abc")
    assert p.returncode == 254
    assert "--seconds" in p.stderr
    p = _run("-m", "chaos", "nosuchcommand")
    assert p.returncode == 254
    for bad in (("--seconds", "nan"), ("--seconds", "inf"), ("--seconds", "0"),
                ("--governors", "0"), ("--governors", "1000")):
        p = _run("-m", "chaos", "demo", *bad)
        assert p.returncode == 254 and bad[0] in p.stderr, (bad, p.stderr)


def test_governor_ref_rejects_unknown_variant_and_bad_url() -> None:
    p = _run("-m", "governor_ref", "run", "--variant", "nope")
    assert p.returncode == 2 and "nope" in p.stderr
    p = _run("-m", "governor_ref", "run", "--redis-url", "http://x")
    assert p.returncode == 2 and "unsupported Redis URL scheme" in p.stderr

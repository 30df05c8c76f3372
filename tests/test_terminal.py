"""What ``chaos run`` prints to the terminal: the verdict, progress and real problems.

The expected effects of injected faults (the apply layer retrying through an OOM, the fault
proxy's own lines) belong in the run's ``logs/harness.log``, not between a suite's rows.
"""

from __future__ import annotations

import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest

# A line on stderr from the apply layer or the proxy (in-process or the proxy's own process).
FAULT_EFFECT_LINE = re.compile(r"(WARNING|INFO) chaos\.(apply_layer|proxy)\b|proxy\[\d+\] ")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, int, str]]:
    """memory-pressure (the OOM retries) and network (the proxy), run side by side."""
    root = tmp_path_factory.mktemp("terminal")
    procs = {}
    for scenario in ("memory-pressure", "network"):
        procs[scenario] = subprocess.Popen(
            [sys.executable, "-m", "chaos", "run", "--scenario", scenario, "--duration", "5",
             "--no-report", "--out", str(root / scenario)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    out = {}
    try:
        for scenario, p in procs.items():
            err = p.communicate(timeout=240)[1]
            out[scenario] = (root / scenario, p.returncode, err)
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
    return out


@pytest.mark.parametrize("scenario", ["memory-pressure", "network"])
def test_fault_effects_go_to_the_run_log_not_the_terminal(
        runs: dict[str, tuple[Path, int, str]], scenario: str) -> None:
    run_dir, rc, err = runs[scenario]
    assert rc == 0, err
    lines = err.replace("\r", "\n").splitlines()
    leaked = [line for line in lines if FAULT_EFFECT_LINE.search(line)]
    assert not leaked, f"{len(leaked)} fault-effect lines on the terminal:\n" + "\n".join(
        leaked[:5])
    log = (run_dir / "logs" / "harness.log").read_text()
    if scenario == "memory-pressure":
        assert re.search(r"WARNING chaos\.apply_layer .*OutOfMemoryError", log), \
            "the OOM retries are in harness.log"
    else:
        assert re.search(r"proxy\[\d+\] INFO proxy listening", log), \
            "the proxy process's lines are in harness.log"
        assert re.search(r"INFO chaos\.proxy \[[^]]*\] fault latency", log)


def _record(name: str, level: int) -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, "msg", None, None)


def test_a_warning_outside_any_fault_reaches_the_terminal() -> None:
    """Quiet only while a fault is recent: a retry that outlasts its fault is a problem."""
    from chaos.runner import FaultEffectsToRunLog

    recent = {"on": True}
    f = FaultEffectsToRunLog(lambda: recent["on"])
    assert not f.filter(_record("chaos.apply_layer", logging.WARNING))
    assert f.filter(_record("chaos.apply_layer", logging.ERROR))  # errors always show
    assert f.filter(_record("chaos.supervisor", logging.WARNING))  # not a fault effect
    recent["on"] = False
    assert f.filter(_record("chaos.apply_layer", logging.WARNING))

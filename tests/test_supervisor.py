"""chaos.supervisor against real processes: reference governors on a real Redis, real signals.

Every test stops what it started; an autouse check fails the test if any process carrying
its prefix in ``GOVERNOR_PREFIX`` is still alive afterwards (and kills it).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest
from govtools import Desk

from chaos.redis_servers import EmbeddedRedis
from chaos.supervisor import (
    GovernorNotReady,
    GovernorSpec,
    GovernorStartError,
    Supervisor,
)

GOV = "python -m governor_ref run"
# The reference governor with a child in its process group (a wrapper's typical shape):
# kill and pause must reach the child too.
GOV_WITH_CHILD = "sh -c 'sleep 600 & exec {python} -m governor_ref run'"
SLEEPER = "python -c 'import time; time.sleep(600)'"

pytestmark = pytest.mark.usefixtures("no_leftover_governors")


def wait_for(pred: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(0.01)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def reaped(pid: int) -> bool:
    """Our direct child is gone for good: not even a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def dead(pid: int) -> bool:
    """A grandchild is dead (reparented ones may stay zombies until init reaps them)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def child_pids(pid: int) -> list[int]:
    return [c.pid for c in psutil.Process(pid).children(recursive=True)]


def consumer_of(pid: int) -> str:
    """GOVERNOR_CONSUMER of a process (its environ reads empty for an instant after exec)."""
    return wait_for(lambda: psutil.Process(pid).environ().get("GOVERNOR_CONSUMER"), 5,
                    f"the environment of pid {pid}")


def events_of(sup: Supervisor, kind: str, consumer: str | None = None) -> list[dict[str, Any]]:
    return [e for e in sup.events
            if e["type"] == kind and (consumer is None or e["consumer"] == consumer)]


@pytest.fixture
def desk(make_desk: Callable[..., Desk]) -> Desk:
    """Config and plan group written, no in-process governor: the supervisor runs them."""
    return make_desk(start=False)


def supervisor(desk_or_url: Desk | str, prefix: str, tmp_path: Path, command: str,
               count: int = 1, **kw: Any) -> Supervisor:
    url = desk_or_url.url if isinstance(desk_or_url, Desk) else desk_or_url
    return Supervisor(GovernorSpec(command, env={"GOVERNOR_LOG_LEVEL": "INFO"}), url, prefix,
                      count, tmp_path / "logs", **kw)


# --------------------------------------------------------------------------- spec


def test_spec_maps_python_to_this_interpreter(tmp_path: Path) -> None:
    exe = sys.executable
    assert GovernorSpec("python -m governor_ref run").argv() == [exe, "-m", "governor_ref", "run"]
    assert GovernorSpec("python3 -V").argv() == [exe, "-V"]
    assert GovernorSpec("sh -c '{python} -V'").argv() == ["sh", "-c", f"{exe} -V"]
    assert GovernorSpec(["./my-governor", "--flag", "a b"]).argv() == [
        "./my-governor", "--flag", "a b"]
    assert GovernorSpec("/usr/bin/python -V").argv()[0] == "/usr/bin/python"
    with pytest.raises(ValueError, match="empty"):
        GovernorSpec("  ")


# --------------------------------------------------------------------------- happy path


def test_two_reference_governors_join_the_group_and_decide(desk: Desk, tmp_path: Path) -> None:
    events: list[dict[str, Any]] = []
    with supervisor(desk, desk.prefix, tmp_path, GOV, count=2, on_event=events.append) as sup:
        ready = sup.wait_ready(timeout=30)
        assert set(ready) == {"gov-1", "gov-2"} and ready == sup.pids()
        consumers = {c["name"] for c in desk.r.xinfo_consumers(desk.keys.plans, "governor")}
        assert {"gov-1", "gov-2"} <= consumers
        for pid in ready.values():
            env = psutil.Process(pid).environ()
            assert env["REDIS_URL"] == desk.url and env["GOVERNOR_PREFIX"] == desk.prefix
        plan_ids = [desk.plan("OPEN", f"S0{i}USDT") for i in range(3)]
        for plan_id in plan_ids:
            d = desk.decision(plan_id, timeout=15)
            assert d["decision"] == "PERMIT", d
            assert d["governor"] in ready
        pids = list(ready.values())
    assert all(reaped(pid) for pid in pids)
    assert [e["type"] for e in events].count("start") == 2
    log = (tmp_path / "logs" / "gov-1.log").read_text()
    assert "supervisor: start #1 of gov-1" in log and "governor gov-1" in log


# --------------------------------------------------------------------------- faults


def test_kill_reaches_the_group_and_the_monitor_restarts_same_consumer(
    desk: Desk, tmp_path: Path
) -> None:
    with supervisor(desk, desk.prefix, tmp_path, GOV_WITH_CHILD, restart_backoff_s=0.1) as sup:
        old = sup.wait_ready(timeout=30)["gov-1"]
        [old_child] = child_pids(old)
        assert sup.kill("gov-1") == old
        assert reaped(old), "kill() returned but the old pid still exists"
        wait_for(lambda: dead(old_child), 5, "the governor's child to die with it")

        new = wait_for(lambda: sup.pids().get("gov-1"), 10, "the restart")
        assert new != old
        assert sup.wait_ready(timeout=30) == {"gov-1": new}  # joined again since its restart
        assert consumer_of(new) == "gov-1"
        assert desk.decide("OPEN", "S01USDT")["governor"] == "gov-1"

        [kill] = events_of(sup, "kill")
        assert kill["pid"] == old and kill["consumer"] == "gov-1"
        [exit_] = events_of(sup, "exit")
        assert exit_["cause"] == "kill" and exit_["returncode"] == -signal.SIGKILL
        assert not events_of(sup, "crash"), "a nemesis kill is not a governor crash"
        starts = events_of(sup, "start")
        assert [s["pid"] for s in starts] == [old, new] and starts[1]["cause"] == "restart"
    assert reaped(new)


def test_pause_stops_the_group_and_resume_continues(desk: Desk, tmp_path: Path) -> None:
    with supervisor(desk, desk.prefix, tmp_path, GOV_WITH_CHILD) as sup:
        pid = sup.wait_ready(timeout=30)["gov-1"]
        group = [psutil.Process(pid)] + [psutil.Process(c) for c in child_pids(pid)]
        assert len(group) == 2
        assert sup.pause("gov-1")
        for proc in group:
            wait_for(lambda p=proc: p.status() == psutil.STATUS_STOPPED, 5, "SIGSTOP")
        plan_id = desk.plan("OPEN", "S02USDT")
        time.sleep(0.5)
        assert desk.decisions(plan_id) == [], "a paused governor decided"
        assert sup.status()["gov-1"].state == "paused"

        assert sup.resume("gov-1")
        for proc in group:
            wait_for(lambda p=proc: p.status() != psutil.STATUS_STOPPED, 5, "SIGCONT")
        assert desk.decision(plan_id, timeout=15)["decision"] == "PERMIT"
        assert sup.pids() == {"gov-1": pid}, "pause/resume must not restart"
        assert [e["type"] for e in sup.events if e["type"] in ("pause", "resume")] == [
            "pause", "resume"]


def test_external_crash_is_detected_recorded_and_restarted(desk: Desk, tmp_path: Path) -> None:
    with supervisor(desk, desk.prefix, tmp_path, GOV_WITH_CHILD, restart_backoff_s=0.1) as sup:
        old = sup.wait_ready(timeout=30)["gov-1"]
        [orphan] = child_pids(old)
        os.kill(old, signal.SIGKILL)  # not through the supervisor: a crash

        [crash] = wait_for(lambda: events_of(sup, "crash"), 10, "the crash event")
        assert crash["consumer"] == "gov-1" and crash["pid"] == old
        assert crash["returncode"] == -signal.SIGKILL
        assert crash["t_mono_ns"] > 0 and crash["t_wall_ms"] > 1_600_000_000_000
        assert reaped(old)
        wait_for(lambda: dead(orphan), 5, "the crashed governor's child to be killed")

        new = wait_for(lambda: sup.pids().get("gov-1"), 10, "the restart")
        assert new != old
        assert sup.wait_ready(timeout=30) == {"gov-1": new}
        assert consumer_of(new) == "gov-1"
        assert sup.status()["gov-1"].crashes == 1


def test_stop_instance_stays_stopped_until_started(shared_redis: EmbeddedRedis, prefix: str,
                                                  tmp_path: Path) -> None:
    with supervisor(shared_redis.url, prefix, tmp_path, SLEEPER, count=2,
                    restart_backoff_s=0.05) as sup:
        first = sup.pids()
        assert sup.stop_instance("gov-1") == -signal.SIGTERM
        assert reaped(first["gov-1"])
        time.sleep(0.3)  # several backoffs: a stopped-on-purpose instance is not restarted
        assert sup.pids() == {"gov-2": first["gov-2"]}
        assert sup.status()["gov-1"].state == "stopped"

        pid = sup.start_instance("gov-1")
        assert pid not in first.values() and sup.pids()["gov-1"] == pid
        assert consumer_of(pid) == "gov-1"
        again = sup.restart("gov-1")
        assert again != pid and reaped(pid)
        assert sup.pids() == {"gov-1": again, "gov-2": first["gov-2"]}
        assert not events_of(sup, "crash")


def test_stop_leaves_no_process_alive(desk: Desk, tmp_path: Path) -> None:
    sup = supervisor(desk, desk.prefix, tmp_path, GOV_WITH_CHILD, count=2).start()
    try:
        leaders = list(sup.wait_ready(timeout=30).values())
        children = [c for pid in leaders for c in child_pids(pid)]
        assert len(children) == 2
        assert sup.pause("gov-2")  # a paused governor must be stopped too
    finally:
        sup.stop()
    assert all(reaped(pid) for pid in leaders)
    wait_for(lambda: all(dead(c) for c in children), 5, "the governors' children to die")
    assert sup.pids() == {}
    sup.stop()  # idempotent
    assert {e["cause"] for e in events_of(sup, "exit")} == {"stop"}


def test_stop_escalates_to_sigkill(shared_redis: EmbeddedRedis, prefix: str,
                                   tmp_path: Path) -> None:
    stubborn = "sh -c \"trap '' TERM; sleep 600\""
    sup = supervisor(shared_redis.url, prefix, tmp_path, stubborn, stop_timeout_s=0.3).start()
    pid = sup.pids()["gov-1"]
    [child] = wait_for(lambda: child_pids(pid), 5, "the sleep child")
    t0 = time.monotonic()
    sup.stop()
    assert time.monotonic() - t0 < 3
    assert reaped(pid)
    wait_for(lambda: dead(child), 5, "the child to die")
    [exit_] = events_of(sup, "exit")
    assert exit_["returncode"] == -signal.SIGKILL


# --------------------------------------------------------------------------- start-up failures


def test_command_not_found(shared_redis: EmbeddedRedis, prefix: str, tmp_path: Path) -> None:
    sup = supervisor(shared_redis.url, prefix, tmp_path, "no-such-governor-cmd --flag")
    with (pytest.raises(GovernorStartError, match="command not found: 'no-such-governor-cmd'"),
          sup):
        pytest.fail("started a command that does not exist")
    assert sup.pids() == {}


def test_command_not_executable(shared_redis: EmbeddedRedis, prefix: str,
                                tmp_path: Path) -> None:
    script = tmp_path / "my-governor"
    script.write_text("#!/bin/sh\nexit 0\n")
    script.chmod(0o644)
    sup = supervisor(shared_redis.url, prefix, tmp_path, f"{script} --flag")
    with pytest.raises(GovernorStartError, match="not executable"):
        sup.wait_ready(timeout=5)  # starts it
    assert sup.pids() == {}


def test_command_that_exits_at_once_is_a_start_error(shared_redis: EmbeddedRedis, prefix: str,
                                                     tmp_path: Path) -> None:
    sup = supervisor(shared_redis.url, prefix, tmp_path,
                     "python -c \"import sys; sys.exit('boom')\"", restart_backoff_s=0.05)
    t0 = time.monotonic()
    with pytest.raises(GovernorStartError) as info, sup:
        sup.wait_ready(timeout=30)
    assert time.monotonic() - t0 < 10, "detected by the exits, not by the timeout"
    err = info.value
    assert not isinstance(err, GovernorNotReady)
    assert err.returncode == 1 and err.consumer == "gov-1"
    assert "boom" in err.log_tail
    assert "boom" in str(err) and "return code: 1" in str(err)
    assert "exited 3 times" in str(err)
    assert sup.pids() == {}
    assert len(events_of(sup, "crash")) >= 3 and events_of(sup, "crash_loop")


def test_single_exit_is_a_start_error_without_restarts(shared_redis: EmbeddedRedis,
                                                        prefix: str, tmp_path: Path) -> None:
    sup = supervisor(shared_redis.url, prefix, tmp_path, "python -c 'raise SystemExit(3)'",
                     restart=False)
    with pytest.raises(GovernorStartError, match="restart disabled") as info:
        sup.wait_ready(timeout=30)
    assert info.value.returncode == 3
    assert len(events_of(sup, "start")) == 1


def test_command_that_never_joins_the_group(shared_redis: EmbeddedRedis, prefix: str,
                                            tmp_path: Path) -> None:
    sup = supervisor(shared_redis.url, prefix, tmp_path, SLEEPER)
    with pytest.raises(GovernorNotReady, match="did not join consumer group 'governor'"):
        sup.wait_ready(timeout=1.0)
    assert sup.pids() == {}, "stop_on_error stops the instances"


# --------------------------------------------------------------------------- crash loops


def test_crash_loop_is_recorded_and_rate_limited(shared_redis: EmbeddedRedis, prefix: str,
                                                 tmp_path: Path) -> None:
    with supervisor(shared_redis.url, prefix, tmp_path, "python -c 'raise SystemExit(7)'",
                    restart_backoff_s=0.05, restart_backoff_max_s=0.2) as sup:
        time.sleep(1.5)
    crashes = events_of(sup, "crash")
    backoffs = [c["backoff_s"] for c in crashes if c["backoff_s"] is not None]
    assert backoffs[:3] == [0.05, 0.1, 0.2] and max(backoffs) == 0.2
    assert backoffs == sorted(backoffs)
    assert all(c["returncode"] == 7 for c in crashes)
    # 0.05 + 0.1 + 0.2 * k <= 1.5 s of backoffs: at most 9 starts, however fast the machine.
    assert 3 <= len(events_of(sup, "start")) <= 9
    assert len(events_of(sup, "crash_loop")) == 1


def test_max_restarts_gives_up(shared_redis: EmbeddedRedis, prefix: str,
                               tmp_path: Path) -> None:
    with supervisor(shared_redis.url, prefix, tmp_path, "python -c 'raise SystemExit(5)'",
                    restart_backoff_s=0.02, max_restarts_per_instance=2) as sup:
        wait_for(lambda: events_of(sup, "gave_up"), 10, "the supervisor to give up")
        time.sleep(0.2)
        assert len(events_of(sup, "start")) == 3
        assert sup.status()["gov-1"].state == "gave_up"
        with pytest.raises(GovernorStartError, match="gave up after 2 restart"):
            sup.wait_ready(timeout=5, stop_on_error=False)

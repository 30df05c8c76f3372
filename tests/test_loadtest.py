"""The Locust load test end to end: the locustfile run headless as a real subprocess.

Each run starts its own embedded Redis, governors, apply layer and exchange (the world
child), sends plans for a few seconds, and judges the run directory. Checked: Locust's
CSV rows (request types OPEN/CLOSE, names PERMIT / BLOCK <reason>), the run directory's
results.json verdict, latency.json, the exit code, and that no process of the run is left.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

# Locust runs as a subprocess, as a user runs it: importing it here would monkey-patch this
# process with gevent and break pytest-xdist's workers. locust and hdrhistogram are in the
# test extra, so a missing one is an error of the install, not a reason to skip.
pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parent.parent
LOCUSTFILE = ROOT / "loadtests" / "locustfile.py"


def _locust(tmp: Path, *extra: str, seconds: int = 4) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("locust", path=os.path.dirname(sys.executable)) or "locust"
    cmd = [exe, "-f", str(LOCUSTFILE), "--headless", "-u", "4", "-r", "4", "-t",
           f"{seconds}s", "--csv", str(tmp / "lt"), "--run-dir", str(tmp / "run"),
           "--only-summary", *extra]
    return subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, timeout=110)


def _left_over(run_dir: Path) -> list[str]:
    """Processes of this run: the world (its command line names the run directory), Redis
    (``redis-server 127.0.0.1:PORT``) and the governors (``REDIS_URL`` with that port)."""
    from urllib.parse import urlsplit

    url = json.loads((run_dir / "run.json").read_text())["redis"]["url"]
    addr = f"127.0.0.1:{urlsplit(url).port}".encode()
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            environ = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue
        if str(run_dir) in cmd or addr in cmd.encode() or addr in environ:
            out.append(f"{pid}: {cmd}")
    return out


def _wait_gone(run_dir: Path, timeout: float = 5.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while (left := _left_over(run_dir)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def test_reference_headless_run_is_valid_with_latency_and_csv(tmp_path: Path) -> None:
    p = _locust(tmp_path, "--rate", "200")
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-4000:]
    rows = list(csv.DictReader((tmp_path / "lt_stats.csv").open()))
    named = [r for r in rows if r["Name"] != "Aggregated"]
    assert {r["Type"] for r in named} <= {"OPEN", "CLOSE"}
    assert {r["Type"] for r in named} == {"OPEN", "CLOSE"}
    names = {r["Name"] for r in named}
    assert "PERMIT" in names
    assert any(n.startswith("BLOCK ") for n in names), names
    assert "BLOCK intent_stale" in names and "BLOCK invalid_plan" in names, names
    total = next(r for r in rows if r["Name"] == "Aggregated")
    assert int(total["Request Count"]) > 300, total  # 200 plans/s for ~4 s
    assert int(total["Failure Count"]) == 0, total

    run = tmp_path / "run"
    meta = json.loads((run / "run.json").read_text())
    assert meta["kind"] == "loadtest" and meta["status"] == "complete"
    assert meta["loadtest"]["rate"] == 200.0 and "scenario_spec" not in meta
    results = json.loads((run / "results.json").read_text())
    assert results["valid"] is True, results.get("violations")
    cov = results["coverage"]
    assert cov["exercised"] is True and cov["plans_sent"] > 300 and cov["permits_executed"] > 0
    lat = json.loads((run / "latency.json").read_text())
    assert lat["count"] > 300
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["p99.9"] <= lat["max"]
    assert lat["event_loop"] == (os.environ.get("GEVENT_BACKEND") or "select")
    # the harness's executor and recorder ran under SCHED_IDLE (--harness-threads idle)
    assert "recorder" in meta["background_threads"], meta.get("background_threads")
    assert any(n.startswith("apply-") for n in meta["background_threads"])
    assert "verdict: VALID" in out and "decision latency" in out
    assert list((run / "history").glob("locust-*.jsonl"))
    # The quiet end: a 4 s timed run sends nothing in its last 0.25 s (END_QUIET_S in
    # chaos.loadtest.user, not imported here: it imports Locust), so its plans span at most
    # 3.75 s from the test start; without it, nearly 4 s.
    sent = [json.loads(line)["wall_ms"] for f in (run / "history").glob("locust-*.jsonl")
            for line in f.read_text().splitlines() if '"type":"invoke"' in line]
    assert (max(sent) - min(sent)) / 1000 <= 4 - 0.25, (min(sent), max(sent))
    assert _wait_gone(run) == []


def test_to_background_moves_only_the_named_threads_to_sched_idle() -> None:
    """The world's apply layer and recorder threads go to SCHED_IDLE, a thread they start
    afterwards inherits it, and any other thread (the supervisor's, which starts
    governors) keeps its policy."""
    import threading

    from chaos.loadtest.world import to_background

    if not hasattr(os, "SCHED_IDLE"):
        pytest.skip("no SCHED_IDLE on this OS")
    go = threading.Event()
    seen: dict[str, int] = {}

    def body(name: str) -> None:
        go.wait(10)
        if name == "apply-x":  # a thread started after the move inherits the policy
            child = threading.Thread(target=lambda: seen.update(
                child=os.sched_getscheduler(0)), name="order")
            child.start()
            child.join()
        seen[name] = os.sched_getscheduler(0)

    threads = [threading.Thread(target=body, args=(n,), name=n)
               for n in ("apply-x", "recorder", "supervisor-x")]
    for t in threads:
        t.start()
    try:
        moved = to_background(threads)
    finally:
        go.set()
        for t in threads:
            t.join(10)
    assert sorted(moved) == ["apply-x", "recorder"]
    assert seen == {"apply-x": os.SCHED_IDLE, "recorder": os.SCHED_IDLE,
                    "child": os.SCHED_IDLE, "supervisor-x": os.SCHED_OTHER}
    assert os.sched_getscheduler(0) == os.SCHED_OTHER  # the caller's own policy untouched


@pytest.mark.parametrize(("env", "backend"), [(None, "select"), ("poll", "poll")])
def test_precise_timers_moves_locusts_loop_off_epoll(env: str | None, backend: str) -> None:
    """After ``import locust`` gevent's hub already runs on epoll (millisecond timeouts);
    :func:`chaos.loadtest.loop.precise_timers` replaces it by one on select, unless
    ``GEVENT_BACKEND`` names a backend. The new loop serves greenlets, timers and child
    processes as the old one did."""
    code = """if True:
        import locust, gevent, gevent.subprocess, time
        assert gevent.get_hub().loop.backend in ("epoll", "poll"), gevent.get_hub().loop.backend
        from chaos.loadtest.loop import precise_timers
        backend = precise_timers()
        assert backend == gevent.get_hub().loop.backend
        g = gevent.spawn(lambda: (gevent.sleep(0.0013), 7))
        t = time.perf_counter()
        assert g.get(timeout=5)[1] == 7 and time.perf_counter() - t >= 0.0013
        assert gevent.subprocess.run(["true"]).returncode == 0
        print(backend)
    """
    environ = {k: v for k, v in os.environ.items() if k != "GEVENT_BACKEND"}
    if env:
        environ["GEVENT_BACKEND"] = env
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=60, env=environ, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.split() == [backend]


def test_legacy_open_storm_breaks_the_invariants_and_exits_1(tmp_path: Path) -> None:
    p = _locust(tmp_path, "--rate", "400", "--governor", "legacy", "--governors", "3",
                "--mix", "open=100", "--symbols", "40", "--harness-threads", "normal")
    out = p.stdout + p.stderr
    assert p.returncode == 1, out[-4000:]
    meta = json.loads((tmp_path / "run" / "run.json").read_text())
    assert "background_threads" not in meta and meta["loadtest"]["harness_threads"] == "normal"
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["valid"] is False
    assert results["violations"], results
    assert "verdict: INVALID" in out
    assert _wait_gone(tmp_path / "run") == []


def test_a_governor_command_that_never_reads_its_plans_is_a_harness_error(
        tmp_path: Path) -> None:
    """A command that starts and stays up but never reads the plan stream (it only
    sleeps) did not start: exit 255 and the reason, as `chaos run` says it, never INVALID
    for plans it never saw."""
    p = _locust(tmp_path, "--rate", "100", "--governor-cmd", "sleep 600", seconds=3)
    out = p.stdout + p.stderr
    assert p.returncode == 255, out[-4000:]
    assert "the governor under test did not start: no instance read" in out
    assert "verdict: INVALID" not in out
    assert _wait_gone(tmp_path / "run") == []


def test_a_run_directory_that_holds_a_run_or_is_a_file_is_refused(tmp_path: Path) -> None:
    """A second load test into a used ``--run-dir`` would add its history to the first's
    and reuse its ledger: refused before anything starts, the old run untouched."""
    used = tmp_path / "used"
    (used / "history").mkdir(parents=True)
    (used / "history" / "locust-1-1.jsonl").write_text("{}\n")
    p = _locust(tmp_path, "--run-dir", str(used), seconds=2)
    out = p.stdout + p.stderr
    assert p.returncode == 254, out[-2000:]
    assert f"--run-dir {used} already holds a run" in out
    assert sorted(x.name for x in used.rglob("*")) == ["history", "locust-1-1.jsonl"]
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    p = _locust(tmp_path, "--run-dir", str(a_file), seconds=2)
    assert p.returncode == 254, (p.stdout + p.stderr)[-2000:]
    assert "is not a directory" in p.stdout + p.stderr


@pytest.mark.parametrize(("args", "said"), [
    (("--mix", "open=70,hold=30"), "--mix"),
    (("--rate", "0"), "--rate"),
    (("--rate", "900", "--max-rate", "500"), "--max-rate"),
    # without chaos.loadtest.staging: "not available yet" (never a shared Redis without
    # the safety rules); with it: its preflight refuses a server that does not answer
    (("--redis-url", "redis://127.0.0.1:1/0"), "redis"),
])
def test_bad_options_are_refused_before_anything_starts(tmp_path: Path, args: tuple[str, ...],
                                                       said: str) -> None:
    p = _locust(tmp_path, *args, seconds=2)
    out = p.stdout + p.stderr
    assert p.returncode == 254, out[-2000:]
    assert said in out.split("load test: ", 1)[-1]
    assert not (tmp_path / "run" / "run.json").exists()


def test_two_processes_merge_histograms_and_p99_ceiling_fails_the_run(tmp_path: Path) -> None:
    """``--processes 2``: one world (started by the master only), two senders whose HDR
    histograms the master merges; a p99 ceiling below what any run reaches exits 1 even
    though the verdict is VALID."""
    p = _locust(tmp_path, "--processes", "2", *_own_master_port(), "--rate", "100",
                "--max-p99-ms", "0.001")
    out = p.stdout + p.stderr
    assert p.returncode == 1, out[-4000:]
    assert "verdict: VALID" in out and "is above --max-p99-ms" in out
    run = tmp_path / "run"
    senders = list((run / "history").glob("locust-*.jsonl"))
    assert len(senders) == 2, senders
    assert len(list((run / "history").glob("runner-*.jsonl"))) == 1  # one world
    lat = json.loads((run / "latency.json").read_text())
    rows = list(csv.DictReader((tmp_path / "lt_stats.csv").open()))
    total = next(r for r in rows if r["Name"] == "Aggregated")
    # both workers' plans: the master's merged histogram counts every request of both
    # (how many depends on how soon a loaded host spawns the workers: not asserted)
    assert lat["count"] == int(total["Request Count"]) > 0
    for f in senders:
        assert '"f":"submit"' in f.read_text().replace(" ", ""), f"{f.name} sent nothing"
    assert _wait_gone(run) == []


def _private_mount_works() -> bool:
    """``unshare -m`` with a tmpfs mount: root (or user namespaces) and util-linux."""
    if not shutil.which("unshare"):
        return False
    p = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs none /mnt"],
                       capture_output=True, timeout=10)
    return p.returncode == 0


def test_master_and_workers_as_separate_commands_and_a_worker_that_cannot_see_the_run(
        tmp_path: Path) -> None:
    """``--master`` and ``--worker`` started apart, as on several machines: a worker on the
    master's file system sends and is judged with the rest; a worker that cannot see the
    run directory (here: a private mount namespace hides it, as another machine would)
    refuses with exit 255 instead of writing a history nobody checks, and the master's run
    is UNKNOWN (nothing sent), never VALID."""
    exe = shutil.which("locust", path=os.path.dirname(sys.executable)) or "locust"
    runs = tmp_path / "runs"
    runs.mkdir()

    def master(name: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [exe, "-f", str(LOCUSTFILE), "--headless", "--master", "--expect-workers", "1",
             "-u", "2", "-r", "2", "-t", "3s", "--rate", "50", "--run-dir", str(runs / name),
             "--only-summary", "--master-bind-port", str(_free_port())],
            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def worker(m: subprocess.Popen[str], *wrap: str) -> subprocess.CompletedProcess[str]:
        port = m.args[m.args.index("--master-bind-port") + 1]
        return subprocess.run([*wrap, exe, "-f", str(LOCUSTFILE), "--worker",
                               "--master-port", port], cwd=tmp_path, capture_output=True,
                              text=True, timeout=90)

    m = master("shared")
    try:
        w = worker(m)
        out, _ = m.communicate(timeout=90)
    finally:
        m.kill()
    assert m.returncode == 0 and "verdict: VALID" in out, out[-3000:] + w.stderr[-2000:]
    assert len(list((runs / "shared" / "history").glob("locust-*.jsonl"))) == 1
    if not _private_mount_works():
        pytest.skip("no private mount namespace here (unshare -m needs root)")
    m = master("hidden")
    try:
        w = worker(m, "unshare", "-m", "sh", "-c", f'mount -t tmpfs none {runs} && exec "$@"',
                   "sh")
        out, _ = m.communicate(timeout=90)
    finally:
        m.kill()
    said = w.stdout + w.stderr
    assert w.returncode == 255 and "cannot see the run directory" in said, said[-2000:]
    assert m.returncode == 2 and "the load test sent no plan" in out, out[-3000:]
    assert _wait_gone(runs / "hidden") == []


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_or_sigterm_stops_everything_and_still_judges(tmp_path: Path, sig: int) -> None:
    """A Ctrl-C (SIGINT) or SIGTERM in the middle of the load: the users stop, the world
    settles, stops and judges what was sent; nothing of the run is left."""
    exe = shutil.which("locust", path=os.path.dirname(sys.executable)) or "locust"
    proc = subprocess.Popen(
        [exe, "-f", str(LOCUSTFILE), "--headless", "-u", "2", "-r", "2", "-t", "60s",
         "--rate", "100", "--run-dir", str(tmp_path / "run"), "--only-summary"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        hist = tmp_path / "run" / "history"
        while not list(hist.glob("locust-*.jsonl")) and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(2)
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "verdict: VALID" in out, out[-3000:]
    assert proc.returncode == 0, out[-3000:]
    assert json.loads((tmp_path / "run" / "run.json").read_text())["status"] == "complete"
    assert _wait_gone(tmp_path / "run") == []


def _session_members(sid: int) -> list[str]:
    out = []
    for pid in os.listdir("/proc"):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if pid.isdigit() and int(fields[3]) == sid and fields[0] != "Z":
            out.append(f"{pid} {stat[:stat.rindex(')') + 1]}")
    return out


def test_terminal_ctrl_c_with_two_processes_keeps_every_latency(tmp_path: Path) -> None:
    """The terminal's Ctrl-C reaches every process of ``--processes 2`` at once. Each
    worker drains and reports before it quits (Locust's own worker sends "quit" with up to
    3 s of its latencies unreported: the figures held none of the plans), the master keeps
    the world up until the workers' final reports, no greenlet prints a KeyboardInterrupt
    traceback, and no worker outlives the master (Locust's exit wait does not wait)."""
    exe = shutil.which("locust", path=os.path.dirname(sys.executable)) or "locust"
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [exe, "-f", str(LOCUSTFILE), "--headless", "--processes", "2", *_own_master_port(),
         "-u", "4", "-r", "4", "-t", "60s", "--rate", "200", "--max-p99-ms", "60000",
         "--run-dir", str(run), "--only-summary"], cwd=tmp_path, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while len(list((run / "history").glob("locust-*.jsonl"))) < 2 and \
                time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1.5)
        os.killpg(proc.pid, signal.SIGINT)  # what the terminal does on Ctrl-C
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0 and "verdict: VALID" in out, out[-4000:]
    assert "Traceback" not in out and "failed with KeyboardInterrupt" not in out, out[-4000:]
    sent = json.loads((run / "results.json").read_text())["coverage"]["plans_sent"]
    lat = json.loads((run / "latency.json").read_text())
    assert lat["count"] == sent > 0, (lat, sent)
    assert "not judged" not in out
    time.sleep(0.3)
    assert _session_members(proc.pid) == []
    assert _wait_gone(run) == []


def test_the_p99_gate_judges_only_a_run_whose_latencies_all_arrived() -> None:
    """``--max-p99-ms``: above it 1; below it 0 when the master holds the latency of the
    plans the history says were sent, 2 (UNKNOWN) when it holds none or only part;
    a worse code stands."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    code = """
from chaos.loadtest.hooks import _latency_gate as g
fin = {"coverage": {"plans_sent": 1000}}
print([g({"p99": 3.0, "count": 1000}, fin, 5, 0), g({"p99": 9.0, "count": 1000}, fin, 5, 0),
       g({"p99": 3.0, "count": 400}, fin, 5, 0), g({"p99": None, "count": 0}, fin, 5, 0),
       g({"p99": 9.0, "count": 400}, fin, 5, 0), g({"p99": None, "count": 0}, fin, 5, 255),
       g({"p99": 3.0, "count": 995}, fin, 5, 0), g({"p99": 3.0, "count": 3}, None, 5, 0)])
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env=env, cwd=ROOT, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip().splitlines()[-1] == "[0, 1, 2, 2, 1, 255, 0, 0]"


def test_staging_as_acl_user_touches_nothing_else_and_cleans_up(tmp_path: Path) -> None:
    """``--redis-url`` on a separately started Redis holding another system's keys, as
    the least-privilege ACL user of :mod:`chaos.loadtest.staging` (its commands, keys
    ``lt-acl:*`` only): the whole Locust run (world, governors, apply layer, senders,
    readers, cleanup) is refused nothing, leaves the other keys as they were (DUMP before
    and after) and removes its own; a prefix with live traffic is refused (254)."""
    from urllib.parse import urlsplit

    from chaos.loadtest import staging
    from chaos.redis_servers import provide

    with provide("embedded") as other:
        c = other.client(decode_responses=False)
        c.set(b"other:config", b"keep me")
        c.hset(b"quantum:position:BTCUSDT", mapping={b"side": b"LONG"})
        c.xadd(b"quantum:stream:apply.plan", {b"plan_id": b"live-1"})
        before = {k: c.dump(k) for k in c.scan_iter(count=1000)}
        c.execute_command("ACL", "SETUSER", *staging.acl_setuser_args(
            "loadtest", "pw-lt", "lt-acl", include_governor=True))
        c.execute_command("ACL", "LOG", "RESET")
        u = urlsplit(other.url)
        url = f"redis://loadtest:pw-lt@{u.hostname}:{u.port}/0"
        p = _locust(tmp_path, "--redis-url", url, "--prefix", "lt-acl", "--rate", "100",
                    seconds=3)
        out = p.stdout + p.stderr
        assert p.returncode == 0, out[-4000:]
        assert "verdict: VALID" in out and "removed the run's" in out
        assert "pw-lt" not in out  # the password is never shown
        log = c.execute_command("ACL", "LOG")  # redis-py parses each entry into a dict
        refused = {str(e.get("object", e.get(b"object", ""))) for e in log}
        # only redis-py's optional CLIENT SETINFO on connect (ignored by redis-py)
        assert {o for o in refused if "client" not in o} == set(), log
        c.execute_command("ACL", "DELUSER", "loadtest")
        after = {k: c.dump(k) for k in c.scan_iter(count=1000)}
        assert after == before  # nothing else touched, nothing of the run left
        meta = json.loads((tmp_path / "run" / "run.json").read_text())
        assert meta["redis"]["kind"] == "url" and meta["redis"]["prefix"] == "lt-acl"
        assert "pw-lt" not in (tmp_path / "run" / "run.json").read_text()
        # a prefix with live traffic is refused before anything is written
        again = tmp_path / "again"
        again.mkdir()
        p = _locust(again, "--redis-url", other.url, "--prefix", "quantum", seconds=2)
        assert p.returncode == 254, (p.stdout + p.stderr)[-2000:]
        assert "staging refused" in p.stdout + p.stderr
        assert {k: c.dump(k) for k in c.scan_iter(count=1000)} == before


def test_external_governor_on_staging_keeps_its_keys(tmp_path: Path) -> None:
    """``--external-governor --prefix ext``: a reference governor already serves there
    (started here, as another team would); the load test starts no governor, writes only
    the inputs that are missing, is judged VALID, and its cleanup leaves the governor's
    keys (its streams' groups, its config) in place."""
    import redis

    from chaos.redis_servers import provide

    with provide("embedded") as other:
        c = other.client(decode_responses=True)
        env = dict(os.environ, REDIS_URL=other.url, GOVERNOR_PREFIX="ext",
                   GOVERNOR_CONSUMER="ext-gov-1")
        with (tmp_path / "gov.log").open("wb") as log:
            gov = subprocess.Popen([sys.executable, "-m", "governor_ref", "run"], env=env,
                                   stdin=subprocess.DEVNULL, stdout=log,
                                   stderr=subprocess.STDOUT)
        try:
            # Idle, it has created both its groups (the plan loop's, then the results
            # thread's) and written last_seen: what it leaves is then complete.
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                try:
                    if (c.xinfo_groups("ext:stream:apply.plan")
                            and c.xinfo_groups("ext:stream:apply.result")
                            and c.exists("ext:gov:last_seen")):
                        break
                except redis.ResponseError:
                    pass
                time.sleep(0.1)
            kept = set(c.scan_iter(match="ext:*"))
            p = _locust(tmp_path, "--redis-url", other.url, "--prefix", "ext",
                        "--external-governor", "--rate", "100", seconds=3)
            out = p.stdout + p.stderr
            assert p.returncode == 0, out[-4000:]
            assert "an external governor" in out and "verdict: VALID" in out
            assert not list((tmp_path / "run" / "logs").glob("gov-*.log"))  # none started
            assert gov.poll() is None  # still serving
            assert set(c.scan_iter(match="ext:*")) == kept  # the run's keys gone, its kept
            assert c.xlen("ext:stream:apply.plan") == 0  # the run's plans taken out
        finally:
            gov.terminate()
            gov.wait(timeout=10)


def test_an_external_governor_that_stopped_before_the_load_is_a_harness_error(
        tmp_path: Path) -> None:
    """The governor served on the prefix (its group is there: preflight accepts it), then
    stopped before the load: nothing read the plans. Exit 255 saying so, not INVALID for
    plans it never saw, and the run's keys are still removed."""
    from chaos.redis_servers import provide

    with provide("embedded") as other:
        c = other.client(decode_responses=True)
        env = dict(os.environ, REDIS_URL=other.url, GOVERNOR_PREFIX="gone",
                   GOVERNOR_CONSUMER="gone-1")
        gov = subprocess.Popen([sys.executable, "-m", "governor_ref", "run"], env=env,
                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 30
            while (c.exists("gone:stream:apply.plan", "gone:stream:apply.result",
                            "gone:gov:last_seen") != 3 and time.monotonic() < deadline):
                time.sleep(0.1)
        finally:
            gov.terminate()
            gov.wait(timeout=10)
        kept = set(c.scan_iter(match="gone:*"))
        p = _locust(tmp_path, "--redis-url", other.url, "--prefix", "gone",
                    "--external-governor", "--rate", "50", seconds=2)
        out = p.stdout + p.stderr
        assert p.returncode == 255, out[-4000:]
        assert "the external governor did not read the plans" in out
        assert "verdict: INVALID" not in out
        assert set(c.scan_iter(match="gone:*")) == kept


def _own_master_port() -> tuple[str, ...]:
    """``--processes``: the master binds, and its forked workers connect to, Locust's port
    5557 by default; two such tests at once (pytest-xdist) would collide on it."""
    port = str(_free_port())
    return ("--master-bind-port", port, "--master-port", port)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _http(url: str, data: dict[str, str] | None = None, timeout: float = 10) -> dict:
    """GET, or POST a form; the JSON reply."""
    from urllib.parse import urlencode
    from urllib.request import urlopen

    body = urlencode(data).encode() if data is not None else None
    with urlopen(url, data=body, timeout=timeout) as resp:  # noqa: S310 - loopback only
        return json.loads(resp.read() or b"{}")


def test_web_ui_swarm_stop_swarm_again_then_sigterm(tmp_path: Path) -> None:
    """Locust without ``--headless`` on 127.0.0.1: the world starts once, before the web
    UI; ``POST /swarm`` starts the load (a form field naming a load-test option is
    ignored: options are fixed at start), ``POST /stop`` stops it and settles the plans in
    flight, a second swarm continues the same run, and SIGTERM (Locust has no /quit) stops
    the world, which judges the run directory; nothing of the run is left."""
    exe = shutil.which("locust", path=os.path.dirname(sys.executable)) or "locust"
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [exe, "-f", str(LOCUSTFILE), "--web-host", "127.0.0.1", "--web-port", str(port),
         "--rate", "100", "--run-dir", str(run)],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                _http(f"{base}/stats/requests")
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "no web UI"
                time.sleep(0.2)
        hist = run / "history"

        def sent() -> int:
            return sum(1 for f in hist.glob("locust-*.jsonl")
                       for line in f.open() if '"type":"ok"' in line)

        reply = _http(f"{base}/swarm", {"user_count": "2", "spawn_rate": "2", "rate": "5000"})
        assert reply["success"] is True, reply
        time.sleep(3)
        assert _http(f"{base}/stop", {})["success"] is True
        time.sleep(1)
        first = sent()
        assert 150 < first < 600, first  # 100 plans/s for ~3 s: the form's rate was ignored
        assert _http(f"{base}/swarm", {"user_count": "2", "spawn_rate": "2"})["success"]
        time.sleep(2)
        assert _http(f"{base}/stop", {})["success"] is True
        time.sleep(1)
        assert sent() > first + 100
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "options are fixed when Locust starts; ignored the new value of --rate" in out, \
        out[-3000:]
    assert "verdict: VALID" in out, out[-3000:]
    assert proc.returncode == 0, out[-3000:]
    meta = json.loads((run / "run.json").read_text())
    assert meta["status"] == "complete"
    results = json.loads((run / "results.json").read_text())
    assert results["valid"] is True and results["coverage"]["plans_sent"] == sent()
    assert len(list((run / "history").glob("runner-*.jsonl"))) == 1  # one world
    assert _wait_gone(run) == []

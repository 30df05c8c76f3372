"""Locust event listeners of the load test: the world's life cycle, the plane, the verdict.

The package's parts: :mod:`~chaos.loadtest.options` (options, the task mix),
:mod:`~chaos.loadtest.world` (the harness in a child process without gevent),
:mod:`~chaos.loadtest.latency` (HDR histogram, finer Locust buckets),
:mod:`~chaos.loadtest.user` (the paced sender and the one events reader per process),
and this module, which ``loadtests/locustfile.py`` imports. See docs/loadtests.md.

Who does what:

* ``init`` (every process): finer response-time buckets. On the master or the local
  runner only, the world (:mod:`chaos.loadtest.world`) starts, once; its Redis URL,
  prefix and run directory go into hidden options, which Locust sends to the workers
  with the test start.
* ``test_start`` (local runner and workers): the process's :class:`~chaos.loadtest.user.
  Plane` (reader, expirer, history).
* ``test_stop`` (same): the plane waits for the last decisions, fails the rest, closes.
* ``report_to_master`` / ``worker_report``: HDR histogram deltas, workers to master.
* ``quitting`` (master or local runner): stop the users, stop the world (which settles,
  drains its recorder, tears down and judges the run directory), write latency.json,
  print the verdict, set ``environment.process_exit_code``.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

import gevent
import gevent.event
from locust import events
from locust.env import Environment
from locust.runners import (
    STATE_RUNNING,
    STATE_SPAWNING,
    LocalRunner,
    MasterRunner,
    WorkerRunner,
)

from chaos import reaper
from chaos.loadtest import latency, options, user
from chaos.loadtest.world import ROOT, WorldError, WorldProcess
from chaos.runner import default_run_dir

log = logging.getLogger(__name__)

EXIT_INVALID, EXIT_UNKNOWN, EXIT_HARNESS = 1, 2, 255
# The p99 gate judges a run when the master holds the latency of at least this share of
# the plans its history says were sent.
LATENCY_COVERAGE = 0.99
DRAIN_MAX_S = 10.0  # at the end, the longest wait for the decisions of what was sent
FINAL_REPORT_WAIT_S = DRAIN_MAX_S + 5.0  # ... and for a drain, then its report, to end


class _State:
    world: WorldProcess | None = None
    run_dir: Path | None = None
    latency = latency.LatencyRecorder()
    mix: dict[str, float] = {}
    finished = False
    error: str | None = None
    target: Any = None  # a staging.StagingTarget with --redis-url
    fixed: dict[str, Any] = {}  # the options as the world was started with them
    drained = gevent.event.Event()  # clear while this process's plane drains
    plane_state = ""  # a worker's: "running" once it has a plane, "final" once drained
    workers: dict[str, bool] = {}  # the master's: worker -> its final report arrived


S = _State()
S.drained.set()


def _controller(env: Environment) -> bool:
    """The master, or the runner of a single-process test: the world's owner."""
    return isinstance(env.runner, MasterRunner | LocalRunner)


def _run_dir(opts: Any) -> tuple[Path, bool]:
    """``--run-dir``, or a new ``reports/loadtests/<time>/`` (then ``latest`` links it)."""
    if opts.run_dir:
        return Path(opts.run_dir).resolve(), False
    return default_run_dir("", ROOT.resolve()), True


@events.init_command_line_parser.add_listener
def _add_options(parser: Any) -> None:
    options.add_arguments(parser)


def _ctrl_c_to_main() -> None:
    """SIGINT as a KeyboardInterrupt in the main greenlet only, where Locust shuts down
    (the users stop, test_stop drains the plane, quitting). Python's own handler raises it
    in whichever greenlet runs at that instant: in a sender between its XADDs (a batch
    neither sent nor failed), in the reader, in a user's task, and gevent prints that
    greenlet's traceback. With ``--processes`` every process gets the terminal's SIGINT."""
    hub = gevent.get_hub()
    hub.parent.throw(KeyboardInterrupt)  # from the hub, as gevent sends a system error


@events.init.add_listener
def _on_init(environment: Environment, **_: Any) -> None:
    latency.install_fine_buckets()
    gevent.signal_handler(signal.SIGINT, _ctrl_c_to_main)
    opts = environment.parsed_options
    if isinstance(environment.runner, WorkerRunner):
        # Registered after the runner's own listener, so called before it (quitting fires
        # in reverse): the worker stops and reports before Locust tells the master "quit".
        environment.events.quitting.add_listener(_on_worker_quitting)
        return
    if opts is None:
        return
    if not _controller(environment):
        return
    if isinstance(environment.runner, MasterRunner) and getattr(opts, "processes", None):
        # Runs before Locust's own exit handler (registered at the fork: atexit is LIFO),
        # once the workers were told to quit.
        atexit.register(_await_forked_workers)
    try:
        S.mix = options.validate(opts)
        S.target = _staging_preflight(opts) if opts.redis_url else None
    except options.OptionError as exc:
        _fail(environment, str(exc), 254)
        return
    run_dir, link = _run_dir(opts)
    args = ["--run-dir", str(run_dir), "--governor", opts.governor,
            "--governors", str(opts.governors), "--symbols", str(opts.symbols),
            "--settings", json.dumps(options.settings(opts, S.mix))]
    if opts.governor_cmd:
        args += ["--governor-cmd", opts.governor_cmd]
    if link:
        args.append("--link-latest")
    if opts.own_executor:
        args.append("--own-executor")
    args += ["--harness-threads", opts.harness_threads]
    if S.target is not None:
        args += ["--prefix", S.target.prefix]
        if opts.external_governor:
            args.append("--external-governor")
    elif opts.external_governor:
        _fail(environment, "--external-governor needs --redis-url and --prefix", 254)
        return
    S.world = WorldProcess(args, redis_url=S.target.url if S.target is not None else None)
    try:
        info = S.world.start()
    except WorldError as exc:
        S.world = None
        _fail(environment, f"the load-test world did not start: {exc}", EXIT_HARNESS)
        return
    S.run_dir = Path(info.run_dir)
    opts.lt_world_url, opts.lt_world_prefix = info.redis_url, info.prefix
    opts.lt_world_run_dir = info.run_dir
    S.fixed = options.fixed(opts)
    where = f"Redis {S.target.shown_url}" if S.target is not None else \
        f"embedded Redis {info.redis_url}"
    gov = "an external governor" if opts.external_governor else \
        f"{opts.governors} x {opts.governor_cmd or opts.governor} governor"
    if opts.own_executor:
        gov += " with its own executor (no apply layer, no exchange: ledger checks skipped)"
    print(f"load test: {where}, prefix {info.prefix}, {gov}, run directory {info.run_dir}",
          flush=True)


def _staging_preflight(opts: Any) -> Any:
    """``--redis-url``: the staging rules of :mod:`chaos.loadtest.staging` (preflight of
    the server and the prefix, the rate ceiling) before anything is written; returns its
    ``StagingTarget``. Without that module (another branch until merged) a shared Redis
    is refused: never without its safety rules."""
    try:
        from chaos.loadtest import staging  # type: ignore[attr-defined]
    except ImportError:
        raise options.OptionError(
            "--redis-url (staging) is not available yet: the staging safety module "
            "(chaos.loadtest.staging) is not installed; run without it for an embedded "
            "Redis") from None
    try:
        target = staging.preflight(opts.redis_url, opts.prefix or None,
                                   allow_remote=opts.allow_remote_redis,
                                   external_governor=opts.external_governor,
                                   owned_prefix=opts.owned_prefix,
                                   own_executor=opts.own_executor)
        ceiling = (staging.RateCeiling(opts.max_rate) if opts.max_rate
                   else staging.RateCeiling.for_target(target))
        ceiling.check(opts.rate * _sender_processes(opts))  # the whole run's rate
    except staging.StagingError as exc:
        raise options.OptionError(f"staging refused: {exc}") from None
    return target


def _sender_processes(opts: Any) -> int:
    """Locust processes that send (each at ``--rate``): ``--processes`` or the workers
    the master expects, else this one."""
    procs = getattr(opts, "processes", None) or 0
    if procs > 0:
        return procs
    if getattr(opts, "master", False):
        return max(1, getattr(opts, "expect_workers", 1) or 1)
    return 1


def _fail(env: Environment, message: str, code: int) -> None:
    """Stop before any load: print why, exit with ``code``."""
    S.error = message
    print(f"load test: {message}", flush=True)
    env.process_exit_code = code
    if env.runner is not None:
        gevent.spawn_later(0.1, env.runner.quit)


@events.test_start.add_listener
def _on_test_start(environment: Environment, **_: Any) -> None:
    opts = environment.parsed_options
    if S.fixed and opts is not None:  # the controller: before the workers get the options
        changed = options.restore(opts, S.fixed)
        if changed:
            print(f"load test: options are fixed when Locust starts; ignored the new value "
                  f"of {', '.join('--' + c.replace('_', '-') for c in changed)}", flush=True)
    if isinstance(environment.runner, MasterRunner) or S.error:
        return
    if user.PLANE is not None or not opts or not opts.lt_world_url:
        return
    if not (Path(opts.lt_world_run_dir) / "run.json").is_file():
        # A worker on another machine: the run directory (history, ledger) is the
        # master's, and this worker's history would be written where no checker reads it.
        # Refused, not run half-judged: senders share the master's file system.
        _fail(environment, f"this worker cannot see the run directory "
              f"{opts.lt_world_run_dir} of the master: workers must share the master's file "
              f"system (same machine, or the run directory on a shared mount at the same "
              f"path); see docs/loadtests.md", EXIT_HARNESS)
        return
    mix = S.mix or options.parse_mix(opts.mix)
    S.plane_state = "running"
    user.PLANE = user.Plane(environment, redis_url=opts.lt_world_url,
                            prefix=opts.lt_world_prefix, run_dir=opts.lt_world_run_dir,
                            mix=mix, rate=opts.rate, n_symbols=opts.symbols,
                            deadline_s=opts.decision_deadline_s, latency=S.latency,
                            run_time_s=getattr(opts, "run_time", None) or None)


@events.test_stop.add_listener
def _on_test_stop(environment: Environment, **_: Any) -> None:
    plane = user.PLANE
    if plane is None:
        # Another greenlet may be draining (a worker's Ctrl-C: Locust's "quit" handler and
        # the shutdown both stop the runner): its end, before the shutdown goes on to tell
        # the master "quit" and kill the runner's greenlets, the drain's among them.
        S.drained.wait(timeout=FINAL_REPORT_WAIT_S)
        return
    user.PLANE = None
    S.drained.clear()
    try:
        plane.drain(timeout=min(environment.parsed_options.decision_deadline_s, DRAIN_MAX_S))
        log.info("load test: %s", plane.counts())
        runner = environment.runner
        if isinstance(runner, WorkerRunner):
            # Every plan is complete or failed now: the last latencies and stats go to
            # the master at once, not at the next periodic report, which a master that
            # is quitting no longer reads (reports are deltas: one more is harmless).
            S.plane_state = "final"
            try:
                runner._send_stats()  # noqa: SLF001 - the report Locust sends on "quit"
            except Exception as exc:  # noqa: BLE001 - the master may be gone already
                log.warning("load test: the final report to the master failed: %s", exc)
        plane.close()
    finally:
        S.drained.set()


def _on_worker_quitting(environment: Environment, **_: Any) -> None:
    """A worker that quits on its own (the terminal's Ctrl-C reaches every process of
    ``--processes``) would tell the master "quit" with up to 3 s of its latencies and
    stats not yet reported, and the master stops listening on that "quit": they were lost
    (a run's figures could cover none of its plans). Stop first: the plane drains and the
    final report leaves before Locust's "quit"."""
    runner = environment.runner
    if runner is not None and runner.state in (STATE_SPAWNING, STATE_RUNNING):
        runner.stop()


@events.report_to_master.add_listener
def _on_report(client_id: str, data: dict[str, Any], **_: Any) -> None:
    S.latency.report(data)
    if S.plane_state:
        data["lt_plane"] = S.plane_state


@events.worker_report.add_listener
def _on_worker_report(client_id: str, data: dict[str, Any], **_: Any) -> None:
    S.latency.merge(data)
    if "lt_plane" in data:
        S.workers[client_id] = data["lt_plane"] == "final"


def _await_final_reports(runner: Any) -> None:
    """The master, at the end: wait (bounded) for the final report of every worker still
    connected that sent plans, so that the world (Redis, the governors) stays up while
    they drain and the figures hold every plan."""
    deadline = time.monotonic() + FINAL_REPORT_WAIT_S
    while time.monotonic() < deadline:
        late = [c for c, final in S.workers.items() if not final and c in runner.clients]
        if not late:
            return
        gevent.sleep(0.05)
    log.warning("load test: no final report from worker(s) %s: their last latencies are "
                "missing from the figures", ", ".join(late))


def _await_forked_workers() -> None:
    """At exit with ``--processes``: the workers are this process's children, and Locust's
    own wait for them at exit does not wait (a ``WNOHANG`` poll counted as an exit): a
    worker still finishing would outlive the run. Wait (bounded) until each has exited (a
    zombie, left for Locust to reap), then kill what remains."""
    workers = _children(os.getpid())
    deadline = time.monotonic() + 10.0
    while (alive := [p for p in workers if not reaper.exited(p)]) and \
            time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in alive:
        print(f"load test: Locust worker {pid} did not exit: killing it", flush=True)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _children(ppid: int) -> list[int]:
    """The processes whose parent is ``ppid`` (Linux /proc; elsewhere none are found and
    Locust's own handling stands)."""
    out = []
    for d in Path("/proc").glob("[0-9]*"):
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        fields = stat.rpartition(")")[2].split()  # after "pid (comm)": state, ppid, ...
        if len(fields) > 1 and fields[1] == str(ppid):
            out.append(int(d.name))
    return out


def _staging_cleanup() -> None:
    """Remove this run's keys from the staging Redis, once the world (the apply layer,
    the governors) has stopped writing."""
    from chaos.loadtest import staging  # type: ignore[attr-defined]

    try:
        n = staging.cleanup(S.target)
        print(f"load test: removed the run's {n} keys under {S.target.prefix}:", flush=True)
    except staging.StagingError as exc:
        print(f"load test: cleanup failed: {exc}", flush=True)
    S.target = None


@events.quitting.add_listener
def _on_quitting(environment: Environment, **_: Any) -> None:
    if not _controller(environment) or S.finished:
        return
    S.finished = True
    runner = environment.runner
    if runner is not None and runner.state not in ("stopped", "ready"):
        runner.stop()  # Ctrl-C: the users stop first, the plane drains (test_stop)
    if isinstance(runner, LocalRunner) and user.PLANE is not None:
        _on_test_stop(environment)
    if isinstance(runner, MasterRunner):
        _await_final_reports(runner)
    if S.world is None:
        return
    final = S.world.stop()
    S.world = None
    if S.target is not None:
        _staging_cleanup()
    reaper.close()  # nothing of ours is left to watch; do not wait on the reaper at exit
    opts = environment.parsed_options
    figures = latency.summary(S.latency.total)
    figures["measures"] = ("plan-to-decision latency: from each plan's scheduled send time "
                           "to the reader seeing its decision on the events stream; plans "
                           "with no decision count at the time waited")
    figures["rate_target_per_process"] = opts.rate
    # select: timers to the microsecond (chaos.loadtest.loop); epoll: up to 1 ms late
    figures["event_loop"] = str(gevent.get_hub().loop.backend)
    if S.run_dir is not None and S.run_dir.is_dir():
        latency.write(S.run_dir / "latency.json", figures)
    print(latency.format_line(figures), flush=True)
    code = 0
    if final is not None and final.get("error"):
        print(f"load test: {final['error']}", flush=True)
        code = int(final.get("exit_code", EXIT_HARNESS))
    elif final is None or "exit_code" not in final:
        print("load test: the world stopped without a verdict (see its log above)", flush=True)
        code = EXIT_HARNESS if final is None else int(final.get("exit_code", EXIT_HARNESS))
    else:
        print(final.get("summary", ""), flush=True)
        print(f"run directory: {S.run_dir}", flush=True)
        code = int(final["exit_code"])
    if opts.max_p99_ms:
        code = _latency_gate(figures, final, opts.max_p99_ms, code)
    environment.process_exit_code = code


def _latency_gate(figures: dict[str, Any], final: dict[str, Any] | None, max_p99_ms: float,
                  code: int) -> int:
    """``--max-p99-ms``: above it, INVALID (1); the p99 of only part of the run's plans
    (a worker's reports lost) or of none cannot pass the gate: UNKNOWN (2)."""
    p99, measured = figures.get("p99"), int(figures.get("count") or 0)
    sent = int(((final or {}).get("coverage") or {}).get("plans_sent") or 0)
    if p99 is not None and p99 > max_p99_ms:
        print(f"load test: p99 {p99:.3f} ms is above --max-p99-ms {max_p99_ms:g}",
              flush=True)
        return EXIT_INVALID if code in (0, EXIT_UNKNOWN) else code
    if p99 is None or measured < sent * LATENCY_COVERAGE:
        what = "no plan's latency" if p99 is None else \
            f"the latency of only {measured} of the {sent} plans the history holds"
        print(f"load test: --max-p99-ms {max_p99_ms:g} not judged: the master received "
              f"{what} (UNKNOWN)", flush=True)
        return EXIT_UNKNOWN if code == 0 else code
    return code

"""The system under load: the chaos harness's pieces, in a child process of Locust's.

Why a separate process: Locust monkey-patches the standard library with gevent, and the
harness (supervisor, apply layer, recorder) runs threads and blocking SQLite; mixing the
two stalls both. So the Locust master (or local runner) starts ``python -m
chaos.loadtest.world`` once, reads the one JSON line it prints when ready (``{"ready":
true, "redis_url", "prefix", "run_dir"}``), and at the end closes its stdin (or sends
SIGTERM). The world then stops in the order of ``chaos run`` (the governors decide what
is in flight, the recorder drains, the apply layer and Redis stop), judges the run
directory with :func:`chaos.checkers.check_run` (not under gevent: the checkers may
fork) and prints a last JSON line with the verdict.

The run is a :class:`chaos.runner.Run` without workloads or faults: the Locust users
are its producers. Its ``run.json`` says ``kind: "loadtest"`` and has no
``scenario_spec`` (the load test's options are under ``loadtest``); the coverage rule
for load tests is in :mod:`chaos.checkers.coverage`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import redis

from chaos import reaper
from chaos import scenario as scn
from chaos.exchange import Exchange
from chaos.history import F
from chaos.recorder import StreamRecorder, _id_tuple
from chaos.runner import HarnessError, Run, RunOptions, RunResult, _link_latest, default_run_dir
from governor_ref.keys import GROUP_GOVERNOR

log = logging.getLogger(__name__)

ROOT = Path("reports") / "loadtests"
READY_TIMEOUT_S = 90.0  # Redis and the governors starting on a busy machine
STOP_TIMEOUT_S = 120.0  # settle + teardown + the checkers
SETTLE_S = 10.0  # what the governors get to decide the plans still in flight at the end
# What needs the ledger (what executed): not judged when the system under test has its own
# executor (--own-executor). fresh_intent, one_decision and protocol need only the streams.
LEDGER_CHECKS = ("slots", "one_position_per_symbol", "single_close", "capital")
MODEL_TIMEOUT_S = 10.0  # the sequential-model check's budget (as ``chaos suite``)
STAGING_URL_ENV = "LOADTEST_REDIS_URL"  # in the environment: a password never shows in ps


def loadtest_scenario(*, governors: int, symbols: int, seed: int = 1) -> scn.Scenario:
    """The scenario the world runs: a market and governors, no workloads, no faults."""
    return scn.Scenario(name="loadtest", governors=governors, seed=seed,
                        market=scn.MarketSpec(symbols=symbols), duration_s=0.0)


class LoadWorld(Run):
    """A :class:`Run` that stands until told to stop, for producers outside it.

    ``redis_url`` / ``prefix``: a staging Redis that :func:`chaos.loadtest.staging.
    preflight` accepted (in the Locust process, which also removes the run's keys at the
    end with ``staging.cleanup``); the world then neither checks nor deletes the prefix.
    """

    def __init__(self, opts: RunOptions, settings: dict[str, Any], *,
                 redis_url: str | None = None, prefix: str | None = None,
                 external_governor: bool = False, own_executor: bool = False) -> None:
        super().__init__(opts)
        self.settings = settings
        self.staging_url = redis_url
        self.staging_prefix = prefix
        self.external_governor = external_governor
        self.own_executor = own_executor

    def write_inputs(self) -> None:
        """Beside an external governor, write only the inputs its deployer did not (never
        over ``P:governor:config``), and record the ones in force, as ``chaos run`` records
        the ones it writes (the checkers judge capital and slots by them)."""
        if not self.external_governor:
            super().write_inputs()
            return
        assert self.keys is not None
        import redis as redis_lib

        from chaos.history import F as Fn
        from chaos.probe import PROBE_SYMBOLS
        from governor_ref.keys import GROUP_GOVERNOR

        k, m = self.keys, self.sc.market
        r = self.admin()
        cfg = r.hgetall(k.config)
        if not cfg:
            cfg = self.sc.governor_config().to_hash()
            r.hset(k.config, mapping=cfg)
        pipe = r.pipeline()
        pipe.set(k.regime, m.regime, nx=True)
        pipe.set(k.capital, str(m.capital), nx=True)
        pipe.set(k.exposure_pct, "0", nx=True)
        symbols = self.symbols()
        for s in [*symbols, *PROBE_SYMBOLS]:
            pipe.set(k.allocation(s), json.dumps({"allocation_pct": m.allocation_pct}),
                     nx=True)
        pipe.execute()
        regime, capital = r.get(k.regime), r.get(k.capital)
        with contextlib.suppress(redis_lib.ResponseError):
            r.xgroup_create(k.plans, GROUP_GOVERNOR, id="0", mkstream=True)
        op = self.writer("operator")
        op.ok(Fn.OPERATOR, key="config", config=cfg)
        op.ok(Fn.OPERATOR, key="regime-initial", regime=regime, initial=True)
        op.ok(Fn.OPERATOR, key="capital", capital=float(capital or m.capital),
              allocation_pct=m.allocation_pct, symbols=symbols)
        self.write_meta(governor_config=cfg, symbols=symbols, external_governor=True)

    def start_exchange(self) -> None:
        """With ``own_executor`` the system under test executes its permits itself: no
        apply layer and no exchange run here, only the recorder (the plans, decisions and
        results on the streams go into the history). The ledger stays empty (created, so
        that the run directory has its usual form): what executed is not known here, and
        the checks that need it are skipped (:data:`LEDGER_CHECKS`)."""
        if not self.own_executor:
            super().start_exchange()
            return
        assert self.keys is not None
        self.exchange = Exchange.create(self.run_dir / "ledger.sqlite",
                                        capital=self.sc.market.capital)
        self.recorder = StreamRecorder(self.raw_admin, self.keys, self.writer("recorder")).start()

    def start_governors(self) -> None:
        if self.external_governor:
            return  # it already serves on the prefix
        super().start_governors()

    def start_redis(self) -> None:
        if not self.staging_url:
            super().start_redis()
            return
        from chaos.redis_servers import UrlRedis
        from chaos.redis_servers import redact_url as redact
        from governor_ref.keys import Keys

        assert self.staging_prefix
        # No start(): its "prefix must be empty" rule is preflight's job (which also
        # knows an owned prefix), and no cleanup at stop: staging.cleanup removes only
        # what this run wrote.
        self.provider = UrlRedis(self.staging_url, self.staging_prefix,
                                    cleanup_on_stop=False)
        self.keys = Keys(self.staging_prefix)
        info = self.admin().info("server")
        self.write_meta(redis={"kind": "url", "version": info.get("redis_version"),
                               "url": redact(self.staging_url), "prefix": self.staging_prefix,
                               "proxy": None})

    def prepare(self) -> None:
        super().prepare()
        # A load test has no scenario: its coverage is judged by the load-test rule.
        self.meta.pop("scenario_spec", None)
        skipped = ["liveness", *(LEDGER_CHECKS if self.own_executor else ())]
        self.write_meta(kind="loadtest", scenario="loadtest", loadtest=self.settings,
                        checks_skipped=skipped, own_executor=self.own_executor)

    def start(self) -> None:
        self.phases = self.writer("runner")
        self.prepare()
        self.start_redis()
        self.write_inputs()
        self.start_exchange()
        self.start_governors()
        self.workload_op = self.phases.invoke(F.PHASE, key="workload")
        self._workload_op = self.workload_op

    def finish(self, result: RunResult, interrupted: bool) -> None:
        """End the load phase, let the governors decide what is in flight, tear down."""
        try:
            if interrupted:
                result.status = "interrupted"
                self.phases.info(F.PHASE, key="interrupted", signal="SIGTERM")
            else:
                # A governor command that never read the plan stream (it only sleeps, a
                # wrong address or prefix) did not start: a harness error (exit 255), as
                # in `chaos run`, not plans it never saw judged against it.
                self._require_governors_read(load_ran=True)
                self._require_external_governor_read()
                self.phases.ok(F.PHASE, key="workload")
                self.phases.invoke(F.PHASE, key="heal")
                if not self._settle(timeout=SETTLE_S):
                    self._cut_off_if_behind()
                self.phases.ok(F.PHASE, key="heal")
                self._healed = True
        finally:
            self.teardown(result)

    def _require_external_governor_read(self) -> None:
        """Beside an external governor (no supervisor to ask): when its group ``governor``
        delivered none of the plans this run sent, nothing read them (the governor was
        stopped or died before the load): a harness error (exit 255), not a verdict on
        plans it never saw. Preflight already refused a prefix without that group."""
        if not self.external_governor or self.keys is None:
            return
        try:
            r = self.admin()
            first = r.xrange(self.keys.plans, count=1)
            groups = {str(g["name"]): g for g in r.xinfo_groups(self.keys.plans)} \
                if first else {}
        except redis.RedisError as exc:
            log.warning("could not ask whether the external governor read the plans: %s", exc)
            return
        if not first:
            return  # nothing sent (or the plans were trimmed): nothing to say
        group = groups.get(GROUP_GOVERNOR)
        delivered = str(group["last-delivered-id"]) if group else "0-0"
        if _id_tuple(delivered) < _id_tuple(str(first[0][0])):
            raise HarnessError(
                f"the external governor did not read the plans: group {GROUP_GOVERNOR!r} on "
                f"{self.keys.plans} delivered none of this run's plans (last delivered "
                f"{delivered}, the run's first {first[0][0]}): is the governor running?")


@dataclass
class _Stop:
    """Why the world stops: stdin closed (the normal end) or a signal."""

    event: threading.Event = field(default_factory=threading.Event)
    signal: int | None = None


# The world's threads that are not on a decision's path: the apply layer (its dispatcher,
# timers, mirror and order pool: "apply-*") and the recorder. None of them starts a process
# (a child would inherit the policy: the supervisor, which restarts governors, and the main
# thread keep theirs).
BACKGROUND_THREADS = ("apply-", "recorder")
HARNESS_THREADS = ("idle", "normal")  # --harness-threads: SCHED_IDLE (to_background) or not


def to_background(threads: Sequence[threading.Thread] | None = None) -> list[str]:
    """Put the world's own threads off the decision path (BACKGROUND_THREADS) under
    Linux's SCHED_IDLE: they run on whatever CPU time Redis, the governors and Locust leave,
    and a waking Redis, governor or Locust process takes the CPU from them at once. On a
    machine with few cores this keeps the harness's executor and recorder (the world's
    largest CPU user: 40-75% of a core at 500-1,000 plans/s) out of the latency it
    measures; they lag instead, and catch up at the end (the recorder drains before the
    verdict). Threads that these create later (the apply layer's order pool) inherit the
    policy. An unprivileged thread can lower its policy this way but never raise it
    again. Returns the names of the threads moved; none where the OS has no SCHED_IDLE."""
    policy = getattr(os, "SCHED_IDLE", None)
    if policy is None:
        return []
    moved = []
    for t in threads if threads is not None else threading.enumerate():
        if t.native_id is None or not t.name.startswith(BACKGROUND_THREADS):
            continue
        try:
            os.sched_setscheduler(t.native_id, policy, os.sched_param(0))
            moved.append(t.name)
        except OSError as exc:  # the thread ended, or a sandbox without the call
            log.debug("SCHED_IDLE for thread %s: %s", t.name, exc)
    return moved


def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj, default=str) + "\n")
    sys.stdout.flush()


def serve(args: argparse.Namespace) -> int:
    """Start, print ready, wait for the end, stop, judge, print the verdict."""
    from chaos.checkers import check_run

    run_dir = Path(args.run_dir) if args.run_dir else default_run_dir("", ROOT)
    settings = json.loads(args.settings) if args.settings else {}
    opts = RunOptions(scenario=loadtest_scenario(governors=args.governors,
                                                 symbols=args.symbols, seed=args.seed),
                      governor=args.governor, governor_cmd=args.governor_cmd or None,
                      out=run_dir, progress=False, probe=False)
    world = LoadWorld(opts, settings, redis_url=os.environ.get(STAGING_URL_ENV) or None,
                      prefix=args.prefix or None, external_governor=args.external_governor,
                      own_executor=args.own_executor)
    stop = _Stop()

    def on_signal(signum: int, frame: object) -> None:
        stop.signal = signum
        stop.event.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    def watch_stdin() -> None:
        with contextlib.suppress(OSError, ValueError):
            while sys.stdin.readline():
                pass
        stop.event.set()

    result = RunResult(world.run_dir, "complete")
    try:
        try:
            world.start()
        except BaseException:
            world.teardown(RunResult(world.run_dir, "harness_error"))
            raise
        if args.link_latest:
            _link_latest(world.run_dir)
        if args.harness_threads == "idle":
            world.write_meta(background_threads=to_background())
        assert world.keys is not None and world.provider is not None
        _emit({"ready": True, "redis_url": world.provider.url, "prefix": world.keys.prefix,
               "run_dir": str(world.run_dir), "pid": os.getpid()})
        threading.Thread(target=watch_stdin, name="stdin", daemon=True).start()
        stop.event.wait()
        try:
            world.finish(result, interrupted=stop.signal is not None)
        except HarnessError:
            raise
        except Exception:  # noqa: BLE001 - torn down anyway (finish's finally): judge it
            log.exception("the load-test world failed while stopping")
    except (HarnessError, scn.ScenarioError) as exc:
        _emit({"error": str(exc), "exit_code": 255 if isinstance(exc, HarnessError) else 254})
        return 255
    verdict = check_run(world.run_dir, model_timeout_s=MODEL_TIMEOUT_S)
    _emit({"stopped": True, "status": result.status, "exit_code": verdict.exit_code,
           "valid": verdict.valid, "summary": verdict.summary(), "coverage": verdict.coverage})
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m chaos.loadtest.world", description=__doc__)
    p.add_argument("--run-dir", default=None)
    p.add_argument("--link-latest", action="store_true")
    p.add_argument("--governor", default="reference")
    p.add_argument("--governor-cmd", default=None)
    p.add_argument("--governors", type=int, default=2)
    p.add_argument("--symbols", type=int, default=40)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--prefix", default=None, help="with $LOADTEST_REDIS_URL: the key prefix")
    p.add_argument("--external-governor", action="store_true",
                   help="a governor already serves on --prefix: start none")
    p.add_argument("--own-executor", action="store_true",
                   help="the system executes its permits itself: start no apply layer, "
                        "no exchange")
    p.add_argument("--harness-threads", choices=HARNESS_THREADS, default="idle",
                   help="CPU policy of the apply layer's and recorder's threads (idle: "
                        "Linux SCHED_IDLE, off the latency the load test measures)")
    p.add_argument("--settings", default=None, help="JSON for run.json's loadtest field")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="world %(levelname)s %(name)s: %(message)s")
    return serve(args)


# --------------------------------------------------------------------------- Locust's side
class WorldError(RuntimeError):
    """The world did not start or did not stop in order; the message says why."""


@dataclass
class WorldInfo:
    redis_url: str
    prefix: str
    run_dir: str


class WorldProcess:
    """The Locust master's handle on the world child: start, wait ready, stop, verdict.

    The child runs in its own session (a Ctrl-C at the terminal reaches Locust only, which
    then stops the world in order) and is registered with :mod:`chaos.reaper`, so a
    SIGKILLed Locust still takes it (and, through the world's own reaper, Redis and the
    governors) down within a second.
    """

    def __init__(self, args: list[str], redis_url: str | None = None) -> None:
        self.args = args
        self.redis_url = redis_url
        self.proc: subprocess.Popen[str] | None = None
        self.info: WorldInfo | None = None
        self.final: dict[str, Any] | None = None

    def start(self, timeout: float = READY_TIMEOUT_S) -> WorldInfo:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "chaos.loadtest.world", *self.args],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, start_new_session=True,
            env={**os.environ, STAGING_URL_ENV: self.redis_url} if self.redis_url else None)
        reaper.watch(self.proc.pid, group=True)
        line = self._read_line(timeout)
        msg = json.loads(line) if line else {}
        if not msg.get("ready"):
            self.stop(timeout=30)
            raise WorldError(msg.get("error") or "the load-test world did not start "
                             "(its log is above)")
        self.info = WorldInfo(msg["redis_url"], msg["prefix"], msg["run_dir"])
        return self.info

    def _read_line(self, timeout: float) -> str:
        """One line of the child's stdout, or '' at EOF or after ``timeout``."""
        assert self.proc is not None and self.proc.stdout is not None
        out: IO[str] = self.proc.stdout
        box: list[str] = []
        t = threading.Thread(target=lambda: box.append(out.readline()), daemon=True)
        t.start()
        deadline = time.monotonic() + timeout
        while t.is_alive() and time.monotonic() < deadline:
            t.join(0.05)  # short joins: under gevent, other greenlets keep running
        return box[0] if box else ""

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> dict[str, Any] | None:
        """Close its stdin (the normal end), wait for its verdict line and its exit; kill
        the group if it does not exit in time. Returns the verdict message, if any."""
        proc = self.proc
        if proc is None:
            return self.final
        with contextlib.suppress(OSError, ValueError):
            assert proc.stdin is not None
            proc.stdin.close()
        if self.info is not None and self.final is None:
            line = self._read_line(timeout)
            with contextlib.suppress(ValueError):
                self.final = json.loads(line) if line else None
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            log.error("the load-test world (pid %d) did not exit: killing it", proc.pid)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)
        reaper.forget(proc.pid)
        self.proc = None
        return self.final


if __name__ == "__main__":
    sys.exit(main())

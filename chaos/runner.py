"""One chaos run: Redis, governors under test, apply layer, workloads, faults, probe.

The run directory holds everything needed to judge the run later, written
as the run goes (a killed or interrupted run still leaves a checkable one):

    run.json        scenario, options, versions, phases, status (rewritten at the end)
    scenario.toml   the scenario as given (a replay's: as chaos.scenario.dump writes it)
    history/        Jepsen-style operations, one JSONL file per process
    ledger.sqlite   the exchange: ground truth, outside the Redis under test
    logs/           every governor's output, the harness log, the Redis log

Without ``--out`` the directory is ``reports/runs/<scenario>/<timestamp>/``
and ``reports/runs/<scenario>/latest`` points at it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import redis

from chaos import scenario as scn
from chaos.apply_layer import ApplyConfig, ApplyLayer
from chaos.exchange import Exchange, Order
from chaos.history import F, HistoryWriter, Op, OpType, history_files, write_history
from chaos.probe import PROBE_SYMBOLS, ProbeOutcome, run_probe
from chaos.recorder import StreamRecorder, apply_hook, supervisor_hook
from chaos.redis_servers import EmbeddedConfig, RedisProvider, provide
from chaos.redis_servers import redact_url as _redact
from chaos.supervisor import GovernorSpec, GovernorStartError, Supervisor
from governor_ref.governor import group_drained
from governor_ref.keys import GROUP_GOVERNOR, Keys

log = logging.getLogger(__name__)

ROOT_REPORTS = Path("reports") / "runs"
DECISION_DEADLINE_MS = 60_000  # check_one_decision's deadline: a plan is overdue after it
STALL_S = 10.0  # no delivery and no ack for this long while plans wait: the governors are stuck
INTERRUPT_SETTLE_S = 2.0  # after Ctrl-C, what the governors get to decide what is in flight
VARIANTS = ("reference", "seed", "legacy")


# Loggers whose warnings are, while a fault is on, the fault doing its job (the apply layer
# retrying through an OOM, a restart or a partition; the recorder rereading after Redis lost
# data; the fault proxy): they go to logs/harness.log only, and reach the terminal when no
# fault is on or was on within the grace (a retry that outlasts its fault is a real problem).
# ERROR and above always reach the terminal.
FAULT_EFFECT_LOGGERS = ("chaos.apply_layer", "chaos.recorder", "chaos.proxy")
FAULT_EFFECT_GRACE_S = 5.0


class FaultEffectsToRunLog(logging.Filter):
    """A terminal handler's filter that keeps the expected effects of faults off it.

    ``fault_recent()`` says whether a fault is on now or stopped within the grace.
    """

    def __init__(self, fault_recent: Callable[[], bool]) -> None:
        super().__init__()
        self.fault_recent = fault_recent

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR or not record.name.startswith(FAULT_EFFECT_LOGGERS):
            return True
        return not self.fault_recent()


def _terminal_handlers() -> list[logging.Handler]:
    """The root's handlers that write to a terminal-like stream (not a run's log file)."""
    return [h for h in logging.getLogger().handlers
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]


class HarnessError(RuntimeError):
    """The harness itself could not do its job (exit 255), e.g. a governor that never starts."""


def governor_spec(governor: str = "reference", governor_cmd: str | None = None) -> GovernorSpec:
    """How to start the governor under test: ``governor_cmd`` as given, or a governor
    shipped with the project (``reference``, ``seed``, ``legacy``). ScenarioError (exit
    254) for an unknown name."""
    if governor_cmd:
        return GovernorSpec(governor_cmd)
    if governor not in VARIANTS:
        raise scn.ScenarioError(f"--governor must be one of {', '.join(VARIANTS)} "
                                f"(or use --governor-cmd)")
    return GovernorSpec("python -m governor_ref run", env={"GOVERNOR_VARIANT": governor})


@dataclass(frozen=True)
class RunOptions:
    scenario: scn.Scenario
    governor: str = "reference"
    governor_cmd: str | None = None
    redis_kind: str | None = None  # overrides scenario.redis.kind
    redis_url: str | None = None
    out: Path | None = None
    progress: bool = True
    probe: bool = True
    probe_max_wait_s: float = 120.0

    def governor_spec(self) -> GovernorSpec:
        return governor_spec(self.governor, self.governor_cmd)

    @property
    def governor_label(self) -> str:
        return f"cmd:{self.governor_cmd}" if self.governor_cmd else self.governor


@dataclass
class RunResult:
    run_dir: Path
    status: str  # complete | interrupted | harness_error
    probe: ProbeOutcome | None = None
    stats: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


def default_run_dir(name: str, root: Path = ROOT_REPORTS) -> Path:
    base = root / name
    stamp = time.strftime("%Y%m%dT%H%M%S")
    d = base / stamp
    n = 1
    while d.exists():
        n += 1
        d = base / f"{stamp}-{n}"
    return d


def _link_latest(run_dir: Path) -> None:
    latest = run_dir.parent / "latest"
    with contextlib.suppress(OSError):
        if latest.is_symlink() or latest.exists():
            latest.unlink()
        latest.symlink_to(run_dir.name)


class Run:
    """Holds every part of one run so that teardown can stop each one, in order."""

    def __init__(self, opts: RunOptions) -> None:
        self.opts = opts
        self.sc = opts.scenario
        self.run_dir = (opts.out or default_run_dir(self.sc.name)).resolve()
        self.keys: Keys | None = None
        self.provider: RedisProvider | None = None
        self.proxy: Any = None
        self.exchange: Exchange | None = None
        self.apply: ApplyLayer | None = None
        self.supervisor: Supervisor | None = None
        self.recorder: StreamRecorder | None = None
        self.nemesis: Any = None
        self.workloads: Any = None
        self.writers: list[HistoryWriter] = []
        self.meta: dict[str, Any] = {}
        self._log_handler: logging.Handler | None = None
        self._workload_op: Op | None = None  # the workload phase's start
        self._progress_at = time.monotonic()  # when group governor last moved (settle)
        self._healed = False  # the heal phase completed (an interruption after it is judged
        # by the usual rules)
        self._quiet: FaultEffectsToRunLog | None = None

    # -- helpers --------------------------------------------------------------------
    def writer(self, process: str) -> HistoryWriter:
        w = HistoryWriter(self.run_dir, process)
        self.writers.append(w)
        return w

    def admin(self) -> redis.Redis:
        """A client to the current primary (follows a Sentinel failover). Invalid UTF-8
        is replaced, not raised: XINFO STREAM (settling) shows the first and last entries,
        and a malformed plan may be one of them."""
        assert self.provider is not None
        return self.provider.client(decode_responses=True, encoding_errors="replace")

    def raw_admin(self) -> redis.Redis:
        """Like :meth:`admin` but bytes in and out (streams may hold non-UTF-8 input)."""
        assert self.provider is not None
        return self.provider.client(decode_responses=False)

    def governor_url(self) -> str:
        assert self.provider is not None
        if self.proxy is not None:
            return self.proxy.url
        if self.provider.kind == "sentinel":
            addrs = ",".join(f"{h}:{p}" for h, p in self.provider.sentinel_addresses)
            return f"redis-sentinel://{addrs}/{self.provider.master_name}"
        return self.provider.url

    def write_meta(self, **updates: Any) -> None:
        self.meta.update(updates)
        tmp = self.run_dir / "run.json.tmp"
        tmp.write_text(json.dumps(self.meta, indent=2, default=str))
        os.replace(tmp, self.run_dir / "run.json")

    # -- phases -------------------------------------------------------------------------
    def prepare(self) -> None:
        d = self.run_dir
        (d / "logs").mkdir(parents=True, exist_ok=True)
        self._log_handler = logging.FileHandler(d / "logs" / "harness.log")
        self._log_handler.setFormatter(logging.Formatter(
            "%(asctime)s %(levelname)s %(name)s [%(threadName)s] %(message)s"))
        logging.getLogger().addHandler(self._log_handler)
        if logging.getLogger().level > logging.INFO:
            logging.getLogger().setLevel(logging.INFO)
            for h in _terminal_handlers():
                h.setLevel(logging.WARNING)
        # The terminal shows the verdict, progress and real problems: the expected effects of
        # injected faults go to harness.log only (unless the user asked for INFO there).
        self._quiet = FaultEffectsToRunLog(self._fault_recent)
        for h in _terminal_handlers():
            if h.level > logging.INFO:
                h.addFilter(self._quiet)
        # As given; a scenario made in code (a replay) as chaos.scenario.dump writes it.
        text = Path(self.sc.source).read_text() if self.sc.source and \
            Path(self.sc.source).is_file() else scn.dump(self.sc)
        if self.sc.redis.url:  # never with a password
            text = text.replace(self.sc.redis.url, _redact(self.sc.redis.url))
        (d / "scenario.toml").write_text(text)
        if self.opts.out is None:
            _link_latest(d)
        self.write_meta(
            scenario=self.sc.name, exposure=self.sc.exposure, seed=self.sc.seed,
            duration_s=self.sc.duration_s, governors=self.sc.governors,
            governor=self.opts.governor_label, status="running",
            started_wall_ms=int(time.time() * 1000), python=sys.version.split()[0],
            platform=platform.platform(), scenario_spec=_redacted_spec(self.sc),
        )

    def _fault_recent(self) -> bool:
        """A fault is on (or starting, or stopping) now, or one stopped within the grace."""
        nem = self.nemesis
        if nem is None:
            return False
        if nem.active():
            return True
        since = time.monotonic_ns() - int(FAULT_EFFECT_GRACE_S * 1e9)
        return any(w.stop_ns is not None and w.stop_ns >= since for w in nem.windows())

    def start_redis(self) -> None:
        r = self.sc.redis
        kind = self.opts.redis_kind or r.kind
        cfg = EmbeddedConfig(appendonly=r.appendonly, appendfsync=r.appendfsync,
                             maxmemory=r.maxmemory, maxmemory_policy=r.maxmemory_policy)
        if kind == "url":
            url = self.opts.redis_url or r.url
            if not url:
                raise scn.ScenarioError("--redis url needs --redis-url URL")
            self.provider = provide("url", url=url)
        elif r.topology == "sentinel":
            if kind != "embedded":
                raise scn.ScenarioError("a sentinel topology is only available embedded")
            self.provider = provide("sentinel", config=cfg)
        else:
            self.provider = provide(kind, config=cfg)
        prefix = self.provider.prefix or "quantum"
        self.keys = Keys(prefix)
        if r.proxy:
            from chaos.proxy import FaultProxy

            host, port = _host_port(self.provider)
            self.proxy = FaultProxy(host, port,
                                    log_path=self.run_dir / "logs" / "harness.log").start()
        admin = self.admin()
        info = admin.info("server")
        self.write_meta(redis={"kind": self.provider.kind, "version": info.get("redis_version"),
                               "url": _redact(self.provider.url), "prefix": prefix,
                               "proxy": self.proxy.url if self.proxy else None})

    def write_inputs(self) -> None:
        """The operator's inputs, before any governor starts; recorded as operations."""
        assert self.keys is not None
        k, m = self.keys, self.sc.market
        op = self.writer("operator")
        cfg = self.sc.governor_config().to_hash()
        r = self.admin()
        symbols = self.symbols()
        pipe = r.pipeline()
        pipe.hset(k.config, mapping=cfg)
        pipe.set(k.regime, m.regime)
        pipe.set(k.capital, str(m.capital))
        pipe.set(k.exposure_pct, "0")
        for s in [*symbols, *PROBE_SYMBOLS]:
            pipe.set(k.allocation(s), json.dumps({"allocation_pct": m.allocation_pct}))
        pipe.execute()
        with contextlib.suppress(redis.ResponseError):
            r.xgroup_create(k.plans, GROUP_GOVERNOR, id="0", mkstream=True)
        op.ok(F.OPERATOR, key="config", config=cfg)
        op.ok(F.OPERATOR, key="regime-initial", regime=m.regime, initial=True)
        op.ok(F.OPERATOR, key="capital", capital=m.capital, allocation_pct=m.allocation_pct,
              symbols=symbols)
        self.write_meta(governor_config=cfg, symbols=symbols)

    def symbols(self) -> list[str]:
        return [f"S{i:03d}USDT" for i in range(self.sc.market.symbols)]

    def start_exchange(self) -> None:
        assert self.keys is not None
        a = self.sc.apply
        self.exchange = Exchange.create(self.run_dir / "ledger.sqlite", reduce_only=a.reduce_only,
                                        fenced=a.fenced, capital=self.sc.market.capital)
        for i in range(self.sc.market.initial_positions):
            sym = self.symbols()[i % len(self.symbols())]
            if sym not in self.exchange.open_positions():
                self.exchange.execute(Order(f"initial-{i}", sym, "OPEN", "LONG", "50"))
        self.exchange.mirror(self.admin(), self.keys, self.sc.market.capital)
        url = self.provider.url if self.provider is not None else ""
        # A decision entry that is not UTF-8 must not make every read of the stream fail.
        factory: Any = (lambda: self.provider.client(encoding_errors="replace")) \
            if self.provider is not None and self.provider.kind == "sentinel" else url
        self.apply = ApplyLayer(factory, self.keys, self.exchange, ApplyConfig(
            open_latency_ms=a.open_latency_ms, open_jitter_ms=a.open_jitter_ms,
            close_latency_ms=a.close_latency_ms, close_jitter_ms=a.close_jitter_ms,
            duplicate_result_prob=a.duplicate_result_prob, late_duplicate_ms=a.late_duplicate_ms,
            seed=self.sc.seed, capital=self.sc.market.capital,
        ), on_record=apply_hook(self.writer("apply")))
        self.apply.start_thread()
        self.recorder = StreamRecorder(self.raw_admin, self.keys, self.writer("recorder")).start()

    def start_governors(self) -> None:
        assert self.keys is not None
        self.supervisor = Supervisor(
            self.opts.governor_spec(), self.governor_url(), self.keys.prefix, self.sc.governors,
            self.run_dir / "logs", on_event=supervisor_hook(self.writer("supervisor")))
        try:
            self.supervisor.start()
            pids = self.supervisor.wait_ready(timeout=30)
        except GovernorStartError as exc:
            raise HarnessError(f"the governor under test did not start: {exc}") from exc
        self.write_meta(governor_command=self.opts.governor_spec().display(), governor_pids=pids)

    def _workload_ctx(self) -> Any:
        from chaos.workloads import WorkloadContext

        assert self.keys is not None
        return WorkloadContext(
            redis_url=self.provider.url if self.provider is not None else "",
            prefix=self.keys.prefix, run_dir=str(self.run_dir), seed=self.sc.seed,
            duration_s=self.sc.duration_s, symbols=self.symbols(),
            config=self.sc.governor_config().to_hash(),
            ledger_path=str(self.run_dir / "ledger.sqlite"), capital=self.sc.market.capital)

    def prestart_load(self) -> None:
        """A replay's producers start before the workload does and wait, up and connected,
        for its start: their first plans are due within tens of ms of it (at the offsets
        the recording shows), sooner than a process comes up."""
        from chaos.workloads import start_workloads

        if not any(w.kind == "replay" for w in self.sc.workloads):
            return
        self.workloads = start_workloads(list(self.sc.workloads), self._workload_ctx(),
                                         log_level=logging.WARNING, hold=True)
        if not self.workloads.wait_ready(timeout=60):
            log.warning("replay: not every producer came up within 60 s; starting anyway")

    def start_load(self, t0: float) -> None:
        from chaos.nemesis import Nemesis, NemesisContext
        from chaos.workloads import start_workloads

        assert self.keys is not None
        import random

        ctx = replace(self._workload_ctx(), start_monotonic=t0)
        if self.sc.faults:
            # Before the producers: event anchors count from the streams' ends as of now.
            nctx = NemesisContext(
                supervisor=self.supervisor, redis=self.provider, proxy=self.proxy,
                apply_layer=self.apply, keys=self.keys, config=self.sc.governor_config(),
                admin=self.admin, raw_admin=self.raw_admin,
                rng=random.Random(self.sc.seed + 7919), history=self.writer("nemesis"))
            self.nemesis = Nemesis(nctx, list(self.sc.faults))
            if self.apply is not None and any(f.after is not None and f.after.event == "take"
                                              for f in self.sc.faults):
                self.apply.on_record = _chain(self.apply.on_record,
                                              self.nemesis.on_apply_record)
            self.nemesis.start(t0)
        if self.workloads is not None:
            self.workloads.release(t0)  # prestarted (a replay)
        elif self.sc.workloads:
            # Children log to stderr: warnings only (their counts go to workloads/*.json).
            self.workloads = start_workloads(list(self.sc.workloads), ctx,
                                             log_level=logging.WARNING)

    # -- the whole run ----------------------------------------------------------------------
    def execute(self) -> RunResult:
        phases = self.writer("runner")
        result = RunResult(self.run_dir, "complete")
        try:
            self.prepare()
            self.start_redis()
            self.write_inputs()
            self.start_exchange()
            self.start_governors()
            self.prestart_load()
            self._workload_op = phases.invoke(F.PHASE, key="workload")
            t0 = time.monotonic()
            self.start_load(t0)
            self._wait(t0, self.sc.duration_s)
            self._stop_load()
            self._require_governors_read()
            phases.ok(F.PHASE, key="workload")
            phases.invoke(F.PHASE, key="heal")
            if self.nemesis is not None:
                self.nemesis.heal_all()
            if not self._settle():
                self._cut_off_if_behind()
            phases.ok(F.PHASE, key="heal")
            self._healed = True
            if self.opts.probe:
                phases.invoke(F.PHASE, key="probe")
                decision_timeout_s = 20.0
                if self.supervisor is not None and not self.supervisor.wait_ready(timeout=30):
                    # Every instance served, then kept dying (a finding, in the history): the
                    # probe goes on and fails, but a decision can only come from a restart.
                    log.warning("probe: no governor instance is serving (crash loops)")
                    decision_timeout_s = self.supervisor.restart_backoff_max_s + 2.0
                assert self.keys is not None and self.exchange is not None
                assert self.provider is not None
                result.probe = run_probe(self.provider.client(encoding_errors="replace"),
                                         self.keys, self.exchange,
                                         self.sc.governor_config(), self.writer("probe"),
                                         max_wait_s=self.opts.probe_max_wait_s,
                                         decision_timeout_s=decision_timeout_s)
                phases.ok(F.PHASE, key="probe", ok=result.probe.ok)
        except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (the CLI raises a subclass)
            result.status = "interrupted"
            phases.info(F.PHASE, key="interrupted", signal=type(exc).__name__)
            log.warning("interrupted: stopping and keeping what was recorded")
        except (HarnessError, scn.ScenarioError):
            result.status = "harness_error"
            raise
        except Exception as exc:
            result.status = "harness_error"
            result.error = f"{type(exc).__name__}: {exc}"
            log.exception("harness failure")
            raise
        finally:
            self.teardown(result)
        return result

    def _require_governors_read(self, load_ran: bool | None = None) -> None:
        """Once the load has run, every governor must have read the plan stream as the
        consumer it was named: one that never did (a wrong ``REDIS_URL`` or prefix, a command
        that only sleeps, another consumer name) did not start, whatever it says; judging its
        run would blame it for plans it never saw. When *no* instance ever read, that is a
        harness error (exit 255, as a command that exits at once); when some did, the others
        are named in the findings (``membership`` events at stop). ``load_ran``: whether
        plans were sent (by default, whether the scenario has workloads)."""
        if self.supervisor is None or not (self.sc.workloads if load_ran is None
                                           else load_ran):
            return
        seen = self.supervisor.never_in_group()
        if seen is None:
            return  # Redis cannot say now (a fault may hold it): the findings will tell
        unseen, listed = seen
        if unseen and len(unseen) == len(self.supervisor.consumers):
            assert self.keys is not None
            raise HarnessError(
                f"the governor under test did not start: no instance read {self.keys.plans} "
                f"as its GOVERNOR_CONSUMER in group {GROUP_GOVERNOR!r} during the load "
                f"(consumers the group lists: {', '.join(listed) or 'none'}); see "
                f"{self.run_dir / 'logs'}/gov-*.log")

    def _wait(self, t0: float, duration: float) -> None:
        while (elapsed := time.monotonic() - t0) < duration:
            if self.opts.progress:
                self._progress(elapsed, duration)
            time.sleep(0.25)
        if self.opts.progress:
            self._progress(duration, duration, end=True)

    def _progress(self, elapsed: float, total: float, end: bool = False) -> None:
        assert self.keys is not None
        try:
            r = self.admin()
            plans, decisions = r.xlen(self.keys.plans), r.xlen(self.keys.events)
        except redis.RedisError:
            plans = decisions = -1
        open_now = self.exchange.open_count() if self.exchange else 0
        faults = ",".join(sorted({a.kind for a in (self.nemesis.active() if self.nemesis else [])}))
        width = 24
        done = int(width * min(1.0, elapsed / total))
        line = (f"\r{self.sc.name:<18} [{'#' * done}{'.' * (width - done)}] "
                f"{elapsed:5.1f}/{total:.0f}s plans {plans:6d} decided {decisions:6d} "
                f"open {open_now:3d} {('faults: ' + faults) if faults else '':<30}")
        sys.stderr.write(line[:160] + ("\n" if end else ""))
        sys.stderr.flush()

    def _stop_load(self) -> None:
        if self.workloads is not None:
            # Each producer runs duration_s from its own start, and process start-up on a
            # busy machine takes seconds: let them finish by themselves (bounded), so every
            # producer sends for the whole duration, then stop any straggler.
            self.workloads.join(timeout=15)
            self.workloads.stop(timeout=10)
        if self.nemesis is not None:
            self.nemesis.stop()

    def _settle(self, timeout: float = 30.0, quiet: bool = False) -> bool:
        """Until the governors have decided every plan (or the timeout: that is evidence
        too). Returns whether group ``governor`` drained; when it did not, the governors'
        progress decides what may be judged (:meth:`_cut_off_if_behind`)."""
        assert self.keys is not None
        deadline = time.monotonic() + timeout
        self._progress_at = time.monotonic()
        last_state: Any = None
        while time.monotonic() < deadline:
            try:
                admin = self.admin()
                if group_drained(admin, self.keys.plans, GROUP_GOVERNOR):
                    return True
                state = _group_state(admin, self.keys.plans, GROUP_GOVERNOR)
                if state != last_state:
                    last_state, self._progress_at = state, time.monotonic()
            except redis.RedisError:
                pass
            time.sleep(0.1)
        (log.info if quiet else log.warning)("plans not all decided %.0fs after the load "
                                             "stopped", timeout)
        return False

    def _cut_off_if_behind(self) -> None:
        """The load stopped and the governors have not decided everything. The protocol
        gives a governor :data:`DECISION_DEADLINE_MS` per plan; a run that ends sooner must
        not call "never decided" what was sent within the deadline before the end, or a
        governor that is merely behind (decisions still coming) would be INVALID because of
        when the harness stopped: a ``cutoff`` phase, as for an interrupted run. A governor
        that made no progress for :data:`STALL_S` (nothing delivered, nothing acked: stuck,
        or crash-looping on an entry) is waited for until its oldest waiting plan reaches
        the deadline (at most that long), so that the plan is judged at the deadline."""
        start = self._workload_op
        if start is None:
            return
        if time.monotonic() - self._progress_at >= STALL_S:
            oldest_ms = None
            with contextlib.suppress(redis.RedisError):
                oldest_ms = _oldest_waiting_ms(self.admin(), self.keys.plans, GROUP_GOVERNOR)
            wait_s = ((oldest_ms + DECISION_DEADLINE_MS) / 1000 - time.time() + 0.5
                      if oldest_ms else 0.0)
            if wait_s > 0:
                log.warning("the governors made no progress for %.0f s with plans waiting: "
                            "waiting %.0f s more, until the oldest reaches the %d s decision "
                            "deadline", STALL_S, wait_s, DECISION_DEADLINE_MS // 1000)
                if self._settle(timeout=wait_s, quiet=True):
                    return
        else:
            log.warning("the governors were still deciding when the run ended: plans sent "
                        "within the last %d s without a decision are not judged",
                        DECISION_DEADLINE_MS // 1000)
        self._write_cutoff(start, reason="behind")

    def _write_cutoff(self, start: Op, **value: Any) -> None:
        """A ``cutoff`` phase one decision deadline before now (never before the load
        began): :func:`~chaos.checkers.invariants.check_one_decision` judges no plan sent
        after it as never decided."""
        wall_ms = int(time.time() * 1000)
        cutoff = wall_ms - DECISION_DEADLINE_MS
        t_ns = time.monotonic_ns() - DECISION_DEADLINE_MS * 1_000_000
        if cutoff < start.wall_ms:  # never before the load began: the run's time frame
            cutoff, t_ns = start.wall_ms - 1, start.time_ns - 2  # starts where it did
        write_history(self.run_dir, [
            Op(typ, str(F.PHASE), "runner", t_ns + i, cutoff, "cutoff",
               value={"deadline_ms": DECISION_DEADLINE_MS, "ended_ms": wall_ms, **value})
            for i, typ in enumerate((OpType.INVOKE, OpType.OK))], name="runner-cutoff")

    def teardown(self, result: RunResult) -> None:
        """Stop every part in order. A Ctrl-C or SIGTERM arriving meanwhile is held until
        the end (every step is bounded): aborting a teardown half-way would leave the run
        directory saying ``running`` and processes for the reaper."""
        with hold_stop_signals() as held:
            self._teardown(result)
        if held and result.status == "complete":
            # The run had ended by itself; the signal still means "stop": whoever runs
            # this run (the suite, the CLI) stops too.
            raise KeyboardInterrupt(f"signal {held[0]} during teardown")

    def _teardown(self, result: RunResult) -> None:
        steps: list[tuple[str, Callable[[], Any]]] = []
        if self.workloads is not None:
            steps.append(("workloads", lambda: self.workloads.stop(timeout=10)))
        if self.nemesis is not None:
            steps.append(("nemesis", lambda: (self.nemesis.stop(), self.nemesis.heal_all())))
        if result.status == "interrupted":
            steps.append(("interruption", self._wind_down))
        if self.recorder is not None:
            steps.append(("recorder", self._final_record))
        if self.supervisor is not None:
            steps.append(("governors", self.supervisor.stop))
        if self.apply is not None:
            steps.append(("apply", lambda: self.apply.stop(timeout=10)))
        if self.proxy is not None:
            steps.append(("proxy", self.proxy.stop))
        steps.append(("stats", lambda: result.stats.update(self._stats())))
        if self.exchange is not None:
            steps.append(("exchange", self.exchange.close))
        if self.provider is not None:
            steps.append(("redis log", self._copy_redis_log))
            steps.append(("redis", self.provider.stop))
        for name, step in steps:
            try:
                step()
            except Exception:  # noqa: BLE001 - teardown goes on whatever one step does
                log.exception("teardown: %s failed", name)
        for w in self.writers:
            w.close()
        self.write_meta(status=result.status, ended_wall_ms=int(time.time() * 1000),
                        probe=asdict(result.probe) if result.probe else None,
                        stats=result.stats, error=result.error)
        if self._log_handler is not None:
            logging.getLogger().removeHandler(self._log_handler)
            self._log_handler.close()
        if self._quiet is not None:
            for h in logging.getLogger().handlers:
                h.removeFilter(self._quiet)

    def _wind_down(self) -> None:
        """An interrupted run ends before its heal phase: no governor had the protocol's
        decision deadline to decide what was sent last, so nothing sent within the deadline
        before the end may be judged "never decided" (the ``cutoff`` phase, as in an
        import), and the probe, which never finished, is not judged (``checks_skipped``).
        The governors get a short moment to decide what is in flight, so that the history
        is as complete as the interruption allows."""
        skipped = sorted({*self.meta.get("checks_skipped", ()), "liveness"})
        self.write_meta(checks_skipped=skipped)
        if self._healed:
            return  # after the heal phase the normal rule (the end of that phase) holds
        start = self._workload_op
        if start is None:
            return  # no plan was sent
        if self.supervisor is not None and self.keys is not None:
            self._settle(timeout=INTERRUPT_SETTLE_S, quiet=True)
        self._write_cutoff(start, reason="interrupted")

    def _final_record(self) -> None:
        assert self.recorder is not None
        self.recorder.stop()
        with contextlib.suppress(redis.RedisError):
            self.recorder.drain(self.raw_admin())

    def _stats(self) -> dict[str, Any]:
        s: dict[str, Any] = {}
        if self.exchange is not None:
            s["peak_open_positions"] = self.exchange.max_open_count()
            s["double_opens"] = len(self.exchange.double_opens())
            s["double_closes"] = len(self.exchange.double_closes())
            s["orders"] = len(self.exchange.orders())
        if self.recorder is not None:
            s["decisions_recorded"] = self.recorder.counts.get(self.keys.events if self.keys
                                                               else "", 0)
            if self.keys is not None:  # coverage, as the streams showed it (entries read)
                s["plans_recorded"] = self.recorder.counts.get(self.keys.plans, 0)
                s["results_recorded"] = self.recorder.counts.get(self.keys.results, 0)
        if self.supervisor is not None:
            s["governor_status"] = {c: asdict(st) if hasattr(st, "__dataclass_fields__")
                                    else str(st) for c, st in self.supervisor.status().items()}
        if self.workloads is not None:
            s["workload_exitcodes"] = self.workloads.exitcodes()
        if self.nemesis is not None:
            if any(f.after is not None for f in self.sc.faults):
                s["anchors"] = self.nemesis.anchor_report()
            s["fault_windows"] = self.nemesis.windows()
            s["faults_launched"] = len(self.nemesis.fault_ids())
        return s

    def _copy_redis_log(self) -> None:
        src = getattr(self.provider, "log_path", None)
        if src and Path(src).is_file():
            (self.run_dir / "logs" / "redis.log").write_bytes(Path(src).read_bytes())


def _oldest_waiting_ms(r: redis.Redis, stream: str, group: str) -> int | None:
    """When the oldest plan still waiting for group ``group`` was added (its entry id's
    Redis ms): the oldest pending entry, or the first not yet delivered."""
    ids: list[Any] = []
    summary = r.xpending(stream, group)
    if summary.get("pending"):
        ids.append(summary["min"])
    for g in r.xinfo_groups(stream):
        name = g["name"].decode() if isinstance(g["name"], bytes) else g["name"]
        if name == group:
            after = g["last-delivered-id"]
            after = after.decode() if isinstance(after, bytes) else after
            ids += [eid for eid, _ in r.xrange(stream, f"({after}", "+", count=1)]
    ms = [int((i.decode() if isinstance(i, bytes) else i).split("-")[0]) for i in ids]
    return min(ms) if ms else None


def _group_state(r: redis.Redis, stream: str, group: str) -> tuple[Any, Any] | None:
    """Group ``group``'s last-delivered id and pending count: when neither moves while
    plans wait, its consumers are not working through them."""
    for g in r.xinfo_groups(stream):
        name = g["name"].decode() if isinstance(g["name"], bytes) else g["name"]
        if name == group:
            return g["last-delivered-id"], g["pending"]
    return None


@contextlib.contextmanager
def hold_stop_signals() -> Iterator[list[int]]:
    """Hold SIGINT and SIGTERM (main thread only): the signals that arrive are listed, not
    raised, so that a second Ctrl-C cannot cut a teardown short. Every teardown step is
    bounded; SIGKILL still ends everything at once (and the reaper cleans up)."""
    held: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield held
        return

    def hold(signum: int, frame: object) -> None:
        held.append(signum)
        log.warning("signal %d: already stopping (every step is bounded; SIGKILL to force)",
                    signum)

    old = {sig: signal.signal(sig, hold) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield held
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


def _host_port(provider: RedisProvider) -> tuple[str, int]:
    addr = getattr(provider, "address", None)
    if addr:
        return addr
    from urllib.parse import urlsplit

    u = urlsplit(provider.url)
    return u.hostname or "127.0.0.1", u.port or 6379


def check_out(out: Path | None) -> None:
    """Refuse an ``--out`` that is a file or already holds a run (ScenarioError, exit 254).

    A second run into the same directory would add its history files next to the first
    run's and reuse its ledger, and the checkers would judge the mix of both; ``chaos
    import`` refuses the same way.
    """
    if out is None:
        return
    if out.exists() and not out.is_dir():
        raise scn.ScenarioError(f"--out {out} is not a directory")
    used = [n for n in ("run.json", "ledger.sqlite") if (out / n).exists()]
    if history_files(out) or used:
        raise scn.ScenarioError(f"--out {out} already holds a run "
                                f"({', '.join(used) or 'history/*.jsonl'}); give a new directory")


def _chain(*hooks: Callable[[dict[str, Any]], None] | None
           ) -> Callable[[dict[str, Any]], None]:
    """One ``on_record`` calling each hook in turn (the history's first)."""
    live = [h for h in hooks if h is not None]

    def hook(rec: dict[str, Any]) -> None:
        for h in live:
            h(rec)
    return hook


def _redacted_spec(sc: scn.Scenario) -> dict[str, Any]:
    """The scenario for run.json, with a password in ``redis.url`` masked."""
    spec = asdict(sc)
    if spec.get("redis", {}).get("url"):
        spec["redis"]["url"] = _redact(spec["redis"]["url"])
    return spec


def run(opts: RunOptions) -> RunResult:
    check_out(opts.out)
    return Run(opts).execute()


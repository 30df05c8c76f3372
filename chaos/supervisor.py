"""Start, watch, kill, pause and restart the governor processes under test.

The harness tests a governor black-box (``docs/protocol.md``, "Starting a governor under
test"): every instance is started from a user-supplied command with ``REDIS_URL``,
``GOVERNOR_PREFIX`` and ``GOVERNOR_CONSUMER`` in its environment, and a restarted instance
keeps its consumer name, so that the entries it left pending are its own again.

Why it is built this way:

* Each instance runs in its own process group (``start_new_session=True``) and every
  signal goes to the group (:func:`os.killpg`). A governor started through a wrapper
  (``sh -c``, a launcher script, a worker pool) is then killed or paused *as a whole*; a
  surviving child would otherwise keep deciding under the same consumer name next to the
  restarted instance, which is a harness bug that looks exactly like a governor bug.
* Exits are detected without reaping first (``waitid(WNOWAIT)``), the group's stragglers
  are SIGKILLed while the leader is still a zombie (so its pid, which is also the group
  id, cannot have been reused), and only then is the leader reaped. All reaping goes
  through one function under one lock, so a nemesis thread and the monitor never race.
* Intentional faults go through the supervisor (:meth:`Supervisor.kill`,
  :meth:`Supervisor.pause`...) so that the event log can tell a nemesis kill from a
  governor that crashed by itself: only the latter is a ``crash``.
* "The governor command does not start" must never be reported as an invariant
  violation: :meth:`Supervisor.wait_ready` raises :class:`GovernorStartError` (with the
  command, the return code and the tail of the instance's log) when the command is not
  found, exits again and again right after starting, or neither joins consumer group
  ``governor`` nor stays up for ``ready_grace_s`` (Redis 6.2 lists a consumer blocked in
  ``XREADGROUP ... >`` only once a read returns, so a listing cannot be required).
* A governor that keeps dying during a run is restarted with a doubling backoff (capped)
  and recorded, never restarted in a busy loop. Once it has served (been ready and seen in
  the group), a crash loop is a finding about the governor, not a start error: after each
  crash the consumer's pending entries are recorded (a poison pill is the one with the
  highest delivery count), and :meth:`Supervisor.wait_ready` no longer waits for it.

Each instance's stdout and stderr are appended to ``log_dir/<consumer>.log``, with a
header line per start, across restarts.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import logging
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import redis

from chaos import reaper
from governor_ref.connection import connect
from governor_ref.keys import GROUP_GOVERNOR, Keys

log = logging.getLogger(__name__)

Event = dict[str, Any]
"""One supervisor event: ``type``, ``consumer``, ``t_mono_ns``, ``t_wall_ms`` and fields of
the type (``pid``, ``returncode``...). Types: ``start``, ``start_failed``, ``crash``,
``crash_loop``, ``gave_up``, ``kill``, ``stop``, ``exit`` (an exit the supervisor caused,
``cause`` ``kill`` or ``stop``), ``pause``, ``resume``, ``ready`` (``how``: ``listed`` in the
plan group or up for the ``grace``), ``pending`` (after a crash: what the consumer holds
pending, see :meth:`Supervisor.pending_evidence`), ``membership`` (at stop, for an instance
ready only by the grace and never seen in the group: ``listed`` now or not)."""

EventSink = Callable[[Event], None]

_PYTHON_NAMES = frozenset({"python", "python3"})
_LOG_TAIL_BYTES = 8192
_LOG_TAIL_LINES = 40
_HAVE_WAITID = hasattr(os, "waitid") and hasattr(os, "WNOWAIT")


# --------------------------------------------------------------------------- errors


class GovernorStartError(RuntimeError):
    """The governor command does not start (not found, exits at once, never joins the group).

    A distinct type so that the harness reports a broken command line as such and never
    judges the invariants of a run whose governors were not running.
    """

    def __init__(
        self,
        reason: str,
        *,
        command: str = "",
        consumer: str | None = None,
        returncode: int | None = None,
        log_tail: str = "",
        log_path: Path | None = None,
    ) -> None:
        self.reason = reason
        self.command = command
        self.consumer = consumer
        self.returncode = returncode
        self.log_tail = log_tail
        self.log_path = log_path
        super().__init__(self._message())

    def _message(self) -> str:
        lines = [f"governor command does not start: {self.reason}"]
        if self.command:
            lines.append(f"  command: {self.command}")
        if self.consumer:
            lines.append(f"  instance: {self.consumer}")
        if self.returncode is not None:
            lines.append(f"  last return code: {describe_returncode(self.returncode)}")
        if self.log_tail:
            where = f" of {self.log_path}" if self.log_path else ""
            lines.append(f"  last lines{where}:")
            lines.extend(f"    | {line}" for line in self.log_tail.splitlines())
        elif self.log_path is not None:
            lines.append(f"  log: {self.log_path} (empty)")
        return "\n".join(lines)

    def __reduce__(self) -> tuple[Any, ...]:
        # Keyword-only fields: rebuild from the reason, then restore them (pickling across
        # processes, e.g. xdist or a process pool running scenarios).
        return (self.__class__, (self.reason,), self.__dict__)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.args = (self._message(),)


class GovernorNotReady(GovernorStartError):
    """Instances stayed alive but did not join consumer group ``governor`` in time."""


def describe_returncode(rc: int) -> str:
    """``1`` or ``-9 (SIGKILL)``: Popen reports a death by signal as a negative code."""
    if rc < 0:
        with contextlib.suppress(ValueError):
            return f"{rc} ({signal.Signals(-rc).name})"
    return str(rc)


# --------------------------------------------------------------------------- spec


@dataclass(frozen=True)
class GovernorSpec:
    """How to start one governor instance: a command, extra environment, a directory.

    ``command`` is a string (split with :func:`shlex.split`, no shell: use ``sh -c '...'``
    for pipes or redirections) or an argv list. In every argument ``{python}`` becomes
    :data:`sys.executable`, and a leading bare ``python`` / ``python3`` does too, so that
    ``--governor-cmd "python -m governor_ref run"`` runs in the harness's venv rather than
    whatever ``python`` is first on PATH.
    """

    command: str | Sequence[str]
    env: Mapping[str, str] = field(default_factory=dict)
    cwd: str | os.PathLike[str] | None = None

    def __post_init__(self) -> None:
        if not self.argv():
            raise ValueError("empty governor command")

    def argv(self) -> list[str]:
        """The argv to execute, after splitting and the ``python`` substitutions."""
        raw = shlex.split(self.command) if isinstance(self.command, str) else list(self.command)
        exe = sys.executable
        if not exe:  # embedded interpreters: leave the command as given
            return [str(a) for a in raw]
        argv = [str(a).replace("{python}", exe) for a in raw]
        if argv and argv[0] in _PYTHON_NAMES:
            argv[0] = exe
        return argv

    def display(self) -> str:
        """The command as the user gave it, for messages."""
        return self.command if isinstance(self.command, str) else shlex.join(self.command)


# --------------------------------------------------------------------------- state


@dataclass(frozen=True)
class InstanceStatus:
    """A snapshot of one instance, for reports and debugging.

    ``state`` is ``running``, ``paused``, ``restarting`` (exited, restart scheduled),
    ``stopped`` (stopped on purpose, or ``restart=False`` after an exit) or ``gave_up``
    (``max_restarts_per_instance`` reached).
    """

    consumer: str
    pid: int | None
    state: str
    starts: int
    crashes: int
    last_returncode: int | None
    log_path: Path


@dataclass(eq=False)
class _Instance:
    consumer: str
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    started_mono: float = 0.0
    starts: int = 0
    want_running: bool = True
    expect: str | None = None  # "kill" / "stop": the pending exit is the supervisor's doing
    paused: bool = False
    restart_at: float | None = None
    quick_exits: int = 0  # consecutive exits within quick_exit_s of starting
    crashes: int = 0
    crash_restarts: int = 0
    spawn_failures: int = 0
    last_returncode: int | None = None
    gave_up: bool = False
    spawn_error: GovernorStartError | None = None
    crash_loop_reported: bool = False
    log_offset: int | None = None  # where this supervisor's lines start in a reused log
    extra_env: dict[str, str] | None = None  # per-instance overrides (set_instance_env)
    ready_once: bool = False  # wait_ready has reported it ready at least once
    in_group: bool = False  # seen in the plan group (listed, or holding pending entries)
    inspect_start_no: int | None = None  # a crash whose pending entries are still to read


# --------------------------------------------------------------------------- process helpers


def _has_exited(proc: subprocess.Popen[bytes]) -> bool:
    """True once the child is dead; it is *not* reaped (``WNOWAIT``) while we hold the lock,
    so its pid, which is also its process group id, stays reserved until we kill the group."""
    if proc.returncode is not None:
        return True
    if not _HAVE_WAITID:
        return proc.poll() is not None
    try:
        info = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:  # reaped behind our back (a SIGCHLD handler?)
        proc.poll()
        return True
    return info is not None


def _signal_group(pgid: int, sig: signal.Signals) -> bool:
    """Signal a whole process group; False when the group is already empty."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    except PermissionError:  # a member changed uid: nothing we may do about it
        log.warning("no permission to send %s to process group %d", sig.name, pgid)
        return False
    return True


def _wait_stopped(pid: int, timeout: float = 2.0) -> None:
    """SIGSTOP is asynchronous; on Linux wait until /proc shows the leader stopped, so that a
    nemesis that pauses and then acts observes a paused governor."""
    stat = Path(f"/proc/{pid}/stat")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = stat.read_text().rpartition(")")[2].split()[0]
        except (OSError, IndexError):
            return
        if state in ("T", "t"):
            return
        time.sleep(0.002)


def log_tail(path: Path, max_lines: int = _LOG_TAIL_LINES, since: int = 0) -> str:
    """The last lines of an instance log (where its stderr goes) after byte ``since``, for
    error messages: a log reused from an earlier run must not explain this run's failure."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            start = max(since, size - _LOG_TAIL_BYTES)
            f.seek(start)
            data = f.read()
    except OSError:
        return ""
    lines = data.decode("utf-8", "replace").splitlines()
    if start > since and lines:
        lines = lines[1:]  # first line is cut
    return "\n".join(lines[-max_lines:])


def _spawn_error_reason(exc: OSError, argv: list[str], cwd: str | None) -> str:
    """Turn Popen's OSError into what the user needs to fix."""
    exe = argv[0]
    if isinstance(exc, FileNotFoundError):
        if cwd is not None and exc.filename is not None and os.fspath(exc.filename) == cwd:
            return f"working directory not found: {cwd!r}"
        hint = "" if os.sep in exe else " (not on PATH)"
        return f"command not found: {exe!r}{hint}"
    if isinstance(exc, PermissionError):
        return f"command not executable (permission denied): {exe!r}"
    return f"command could not be executed: {exe!r}: {exc.strerror or exc}"


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _is_utf8(value: Any) -> bool:
    if not isinstance(value, bytes):
        return True
    try:
        value.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _escaped(value: Any) -> str:
    """A stream field as text: UTF-8 as is, any other byte as ``\\xNN`` (the bytes that
    crash a governor must survive into JSON and Markdown, and stay recognisable)."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    return str(value)


def _now_fields() -> dict[str, int]:
    return {"t_mono_ns": time.monotonic_ns(), "t_wall_ms": time.time_ns() // 1_000_000}


# --------------------------------------------------------------------------- supervisor

_live_supervisors: weakref.WeakSet[Supervisor] = weakref.WeakSet()


@atexit.register
def _stop_all_at_exit() -> None:
    """Safety net: governors run in their own sessions, so nothing else would stop them if
    the harness exits without calling :meth:`Supervisor.stop`."""
    for sup in list(_live_supervisors):
        with contextlib.suppress(Exception):
            sup.stop(timeout=2.0)


class Supervisor:
    """Runs ``count`` instances of a governor command as ``gov-1`` .. ``gov-N`` and keeps
    them running: an instance that exits without being asked to is recorded as a ``crash``
    and restarted, with the same consumer name, after a backoff.

    Use as a context manager (``__enter__`` starts the instances, ``__exit__`` stops them
    all) or call :meth:`start` and :meth:`stop`. Thread-safe: a nemesis may call
    :meth:`kill`, :meth:`pause` and friends from its own threads.

    ``on_event`` gets every event (see :data:`Event`) in order, outside the supervisor's
    lock, from whichever thread caused it; an exception in it is logged and ignored.
    """

    def __init__(
        self,
        spec: GovernorSpec,
        redis_url: str,
        prefix: str,
        count: int,
        log_dir: Path,
        on_event: EventSink | None = None,
        restart: bool = True,
        restart_backoff_s: float = 0.2,
        max_restarts_per_instance: int | None = None,
        *,
        restart_backoff_max_s: float = 5.0,
        quick_exit_s: float = 5.0,
        quick_exit_limit: int = 3,
        stop_timeout_s: float = 5.0,
        consumer_prefix: str = "gov",
        poll_interval_s: float = 0.02,
        ready_grace_s: float = 3.0,
    ) -> None:
        if count < 1:
            raise ValueError(f"count must be >= 1, not {count}")
        if restart_backoff_s <= 0 or restart_backoff_max_s < restart_backoff_s:
            # a zero backoff would turn a crash loop into a busy loop
            raise ValueError("need 0 < restart_backoff_s <= restart_backoff_max_s")
        if quick_exit_limit < 1:
            raise ValueError("quick_exit_limit must be >= 1")
        if max_restarts_per_instance is not None and max_restarts_per_instance < 0:
            raise ValueError("max_restarts_per_instance must be >= 0 or None")
        if ready_grace_s <= 0:
            raise ValueError("ready_grace_s must be > 0")
        self.spec = spec
        self.redis_url = redis_url
        self.prefix = prefix
        self.count = count
        self.log_dir = Path(log_dir)
        self.on_event = on_event
        self.restart_enabled = restart
        self.restart_backoff_s = restart_backoff_s
        self.restart_backoff_max_s = restart_backoff_max_s
        self.max_restarts_per_instance = max_restarts_per_instance
        self.quick_exit_s = quick_exit_s
        self.quick_exit_limit = quick_exit_limit
        self.stop_timeout_s = stop_timeout_s
        self.poll_interval_s = poll_interval_s
        self.ready_grace_s = ready_grace_s
        self._instances: dict[str, _Instance] = {
            name: _Instance(name, self.log_dir / f"{name}.log")
            for name in (f"{consumer_prefix}-{i}" for i in range(1, count + 1))
        }
        self._lock = threading.RLock()
        self._dispatch_lock = threading.RLock()  # a sink may call back into us
        self._pending: deque[Event] = deque()
        self._events: list[Event] = []
        self._wake = threading.Event()
        self._monitor: threading.Thread | None = None
        self._started = False
        self._closing = False
        self._stopped = False
        self._client: redis.Redis | None = None
        self._raw_client: redis.Redis | None = None
        self._inspector: threading.Thread | None = None

    # -- context manager ----------------------------------------------------------------
    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return (f"Supervisor({self.spec.display()!r}, prefix={self.prefix!r}, "
                f"count={self.count}, pids={self.pids()})")

    # -- queries ------------------------------------------------------------------------
    @property
    def consumers(self) -> tuple[str, ...]:
        """Consumer names, in start order (``gov-1`` .. ``gov-N``)."""
        return tuple(self._instances)

    @property
    def events(self) -> list[Event]:
        """Every event so far (a copy), whether or not an ``on_event`` sink is set."""
        with self._lock:
            return list(self._events)

    def log_path(self, consumer: str) -> Path:
        return self._get(consumer).log_path

    def instance_env(self, consumer: str) -> dict[str, str]:
        """The extra environment set with :meth:`set_instance_env` (a copy; empty if none)."""
        with self._lock:
            return dict(self._get(consumer).extra_env or {})

    def set_instance_env(self, consumer: str, env: Mapping[str, str] | None) -> None:
        """Extra environment for one instance, used from its *next* start on (the running
        process keeps its environment; :meth:`restart` it to apply). ``None`` or ``{}``
        removes the overrides. They go over the spec's ``env`` but never over
        ``REDIS_URL``, ``GOVERNOR_PREFIX`` and ``GOVERNOR_CONSUMER``. The nemesis uses it to
        run an instance under libfaketime."""
        with self._lock:
            inst = self._get(consumer)
            inst.extra_env = {str(k): str(v) for k, v in env.items()} if env else None

    def pids(self) -> dict[str, int]:
        """consumer -> pid of every instance whose process is alive (paused ones included)."""
        with self._lock:
            return {c: inst.proc.pid for c, inst in self._instances.items()
                    if inst.proc is not None and not _has_exited(inst.proc)}

    def status(self) -> dict[str, InstanceStatus]:
        with self._lock:
            return {c: self._status(inst) for c, inst in self._instances.items()}

    def _status(self, inst: _Instance) -> InstanceStatus:
        alive = inst.proc is not None and not _has_exited(inst.proc)
        if alive:
            state = "paused" if inst.paused else "running"
        elif inst.gave_up:
            state = "gave_up"
        elif inst.want_running and (inst.restart_at is not None or inst.proc is not None):
            state = "restarting"
        else:
            state = "stopped"
        return InstanceStatus(inst.consumer, inst.proc.pid if alive and inst.proc else None,
                              state, inst.starts, inst.crashes, inst.last_returncode,
                              inst.log_path)

    # -- lifecycle ----------------------------------------------------------------------
    def start(self) -> Self:
        """Start every instance and the monitor. A command that cannot be executed raises
        :class:`GovernorStartError` at once, after stopping whatever did start."""
        with self._lock:
            if self._closing:
                raise RuntimeError("supervisor already stopped; make a new one")
            if self._started:
                return self
            self._started = True
            self.log_dir.mkdir(parents=True, exist_ok=True)
            _live_supervisors.add(self)
        try:
            with self._lock:
                for inst in self._instances.values():
                    self._spawn(inst, cause="initial")
        except GovernorStartError:
            self._flush()
            self.stop()
            raise
        self._flush()
        self._monitor = threading.Thread(target=self._run_monitor, daemon=True,
                                         name=f"supervisor-{self.prefix}")
        self._monitor.start()
        log.info("supervisor: started %d instance(s) of %r on prefix %s (logs in %s)",
                 self.count, self.spec.display(), self.prefix, self.log_dir)
        return self

    def stop(self, timeout: float | None = None) -> None:
        """Stop every instance and reap it: SIGCONT (a paused governor cannot act on
        SIGTERM), SIGTERM, wait up to ``timeout``, then SIGKILL. Each group's stragglers are
        SIGKILLed once the leader is gone. Idempotent."""
        self._record_membership()
        with self._lock:
            if self._stopped:
                return
            self._closing = True
            live = []
            for inst in self._instances.values():
                inst.want_running = False
                inst.restart_at = None
                if inst.proc is not None:
                    live.append((inst, inst.proc))
                    if inst.expect is None:
                        inst.expect = "stop"
                    if not _has_exited(inst.proc):
                        self._emit("stop", inst, pid=inst.proc.pid)
                        _signal_group(inst.proc.pid, signal.SIGCONT)
                        _signal_group(inst.proc.pid, signal.SIGTERM)
                        inst.paused = False
        self._flush()
        self._wake.set()
        if self._monitor is not None and self._monitor is not threading.current_thread():
            self._monitor.join(timeout=5.0)
        self._await_exits(live, self.stop_timeout_s if timeout is None else timeout)
        if self._inspector is not None:
            self._inspector.join(timeout=5.0)  # its Redis calls time out within 3 s
        with self._lock:
            self._stopped = True
            clients = (self._client, self._raw_client)
            self._client = self._raw_client = None
        for client in clients:
            if client is not None:
                with contextlib.suppress(Exception):
                    client.close()
        _live_supervisors.discard(self)
        self._flush()
        log.info("supervisor: stopped all instances on prefix %s", self.prefix)

    # -- faults and manual control ------------------------------------------------------
    def kill(self, consumer: str) -> int | None:
        """SIGKILL the instance's process group and wait until it is reaped (on return its
        pid is gone). The monitor restarts it after ``restart_backoff_s``. Returns the
        killed pid, or None when the instance was not running."""
        with self._lock:
            inst = self._get(consumer)
            proc = inst.proc
            if proc is None or _has_exited(proc):
                return None
            inst.expect = "kill"
            _signal_group(proc.pid, signal.SIGKILL)
            self._emit("kill", inst, pid=proc.pid)
        self._flush()
        log.info("supervisor: killed %s (pid %d)", consumer, proc.pid)
        self._await_exits([(inst, proc)], 5.0)
        return proc.pid

    def pause(self, consumer: str) -> bool:
        """SIGSTOP the instance's process group; False when not running or already paused."""
        with self._lock:
            inst = self._get(consumer)
            proc = inst.proc
            if proc is None or inst.paused or _has_exited(proc):
                return False
            _signal_group(proc.pid, signal.SIGSTOP)
            inst.paused = True
            self._emit("pause", inst, pid=proc.pid)
        self._flush()
        _wait_stopped(proc.pid)
        log.info("supervisor: paused %s (pid %d)", consumer, proc.pid)
        return True

    def resume(self, consumer: str) -> bool:
        """SIGCONT the instance's process group; False when it was not paused."""
        with self._lock:
            inst = self._get(consumer)
            proc = inst.proc
            if proc is None or not inst.paused:
                return False
            _signal_group(proc.pid, signal.SIGCONT)
            inst.paused = False
            self._emit("resume", inst, pid=proc.pid)
        self._flush()
        log.info("supervisor: resumed %s (pid %d)", consumer, proc.pid)
        return True

    def stop_instance(self, consumer: str, timeout: float | None = None,
                      sig: signal.Signals = signal.SIGTERM) -> int | None:
        """Stop one instance on purpose (``sig``, SIGKILL after ``timeout``) and keep it
        stopped until :meth:`start_instance`: for kill-now, restart-later scenarios.
        Returns its return code, or None when it was not running."""
        with self._lock:
            inst = self._get(consumer)
            inst.want_running = False
            inst.restart_at = None
            proc = inst.proc
            if proc is None:
                return None
            inst.expect = "stop"
            self._emit("stop", inst, pid=proc.pid, signal=sig.name)
            _signal_group(proc.pid, signal.SIGCONT)
            _signal_group(proc.pid, sig)
            inst.paused = False
        self._flush()
        self._await_exits([(inst, proc)], self.stop_timeout_s if timeout is None else timeout)
        with self._lock:
            return inst.last_returncode

    def start_instance(self, consumer: str) -> int:
        """Start a stopped instance again under the same consumer name (no-op when it is
        running); clears its crash-loop state. Returns its pid."""
        with self._lock:
            if self._closing or not self._started:
                raise RuntimeError("supervisor is not running")
            inst = self._get(consumer)
            if inst.proc is not None:
                if not _has_exited(inst.proc):
                    inst.want_running = True
                    return inst.proc.pid
                self._reap_if_exited(inst, time.monotonic())
            inst.want_running = True
            inst.restart_at = None
            inst.quick_exits = 0
            inst.gave_up = False
            inst.crash_loop_reported = False
            inst.spawn_error = None
            pid = self._spawn(inst, cause="manual")
        self._flush()
        return pid

    def restart(self, consumer: str, timeout: float | None = None) -> int:
        """Graceful stop then start, same consumer name; returns the new pid."""
        self.stop_instance(consumer, timeout=timeout)
        return self.start_instance(consumer)

    # -- readiness ----------------------------------------------------------------------
    def wait_ready(self, timeout: float = 30.0, *, stop_on_error: bool = True) -> dict[str, int]:
        """Until every instance meant to run is alive, not paused and ready; returns consumer
        -> pid of the ready ones. Starts the supervisor if :meth:`start` was not called.

        Ready means what the protocol lets us observe, nothing more: the instance's consumer
        is listed in group ``governor`` on ``P:stream:apply.plan`` as seen since its latest
        start, *or* its process has stayed up ``ready_grace_s`` without exiting. The second
        case exists because a governor may do nothing but ``XREADGROUP ... BLOCK ... >``, and
        Redis 6.2 lists such a consumer only once a read returns entries (and does not
        refresh a restarted one's idle time while it blocks).

        An instance that has served (it was ready before and has been seen in the group) and
        now keeps dying is a finding about the governor, not a start failure: it is left out
        (neither waited for nor returned) while the supervisor goes on restarting it with its
        capped backoff; its crashes and pending entries are in the events. So this may return
        fewer instances than are running, or none.

        Raises :class:`GovernorStartError` as soon as an instance that never served has
        exited ``quick_exit_limit`` times in a row within ``quick_exit_s`` of starting (once
        with ``restart=False``), its command cannot be executed, or restarts were given up;
        :class:`GovernorNotReady` at the timeout. With ``stop_on_error`` everything is
        stopped before raising, so a caller reporting the error leaks nothing.
        """
        if not self._started:
            self.start()
        deadline = time.monotonic() + timeout
        redis_error: str | None = None
        grace_ms = self.ready_grace_s * 1000.0
        try:
            while True:
                self._raise_if_failed()
                with self._lock:
                    now = time.monotonic()
                    left_out = {c for c, inst in self._instances.items()
                                if inst.want_running and self._served_then_failing(inst)}
                    wanted = {c: (inst.proc.pid, (now - inst.started_mono) * 1000.0)
                              for c, inst in self._instances.items()
                              if inst.want_running and inst.proc is not None
                              and not inst.paused and not _has_exited(inst.proc)
                              and c not in left_out}
                    required = [c for c, inst in self._instances.items()
                                if inst.want_running and c not in left_out]
                idle, redis_error = self._consumer_idle_ms()
                # Seen since its latest start: a consumer entry survives its process, so a
                # listing only counts once the restarted instance has read the stream again.
                listed = {c for c, (_pid, elapsed_ms) in wanted.items()
                          if c in idle and idle[c] + 1 <= elapsed_ms}
                ready = {c: pid for c, (pid, elapsed_ms) in wanted.items()
                         if c in listed or elapsed_ms >= grace_ms}
                with self._lock:
                    for c in listed:
                        self._instances[c].in_group = True
                if all(c in ready for c in required):
                    self._mark_ready(ready, listed, left_out)
                    return ready
                if time.monotonic() >= deadline:
                    raise self._not_ready(timeout, required, ready, redis_error)
                time.sleep(0.05)
        except GovernorStartError:
            if stop_on_error:
                self.stop()
            raise

    def _mark_ready(self, ready: Mapping[str, int], listed: set[str],
                    left_out: set[str]) -> None:
        """Record who is ready and how (``listed`` in the group, or up for the ``grace``)."""
        with self._lock:
            for c in ready:
                inst = self._instances[c]
                inst.ready_once = True
                self._emit("ready", inst, pid=ready[c],
                           how="listed" if c in listed else "grace")
                if c not in listed:
                    log.info("supervisor: %s is ready by staying up %gs (not listed in group "
                             "%r yet: it may be blocked in its first read)", c,
                             self.ready_grace_s, GROUP_GOVERNOR)
            for c in sorted(left_out):
                inst = self._instances[c]
                log.warning("supervisor: %s served, then kept dying (%d crash(es), last return "
                            "code %s): not waited for; see %s", c, inst.crashes,
                            describe_returncode(inst.last_returncode)
                            if inst.last_returncode is not None else "?", inst.log_path)
        self._flush()

    def _failing(self, inst: _Instance) -> bool:
        """Exited again and again right after starting, given up, or exited with no restart."""
        return (inst.gave_up or inst.quick_exits >= self.quick_exit_limit
                or (not self.restart_enabled and inst.crashes > 0
                    and inst.proc is None and inst.restart_at is None))

    def _served_then_failing(self, inst: _Instance) -> bool:
        """A finding, not a start error: it was ready and seen in the group, then kept dying."""
        return inst.ready_once and inst.in_group and self._failing(inst)

    def _consumer_idle_ms(self) -> tuple[dict[str, int], str | None]:
        """consumer -> idle ms in the plan group, and the Redis error if it could not say."""
        try:
            if self._client is None:
                self._client = connect(self.redis_url, decode_responses=True,
                                       socket_timeout=2.0)
            rows = self._client.xinfo_consumers(Keys(self.prefix).plans, GROUP_GOVERNOR)
        except redis.ResponseError as exc:  # no stream / no group yet
            return {}, f"{type(exc).__name__}: {exc}"
        except (redis.RedisError, OSError) as exc:
            return {}, f"Redis unreachable: {type(exc).__name__}: {exc}"
        return {str(r["name"]): int(r["idle"]) for r in rows}, None

    # -- crash evidence -----------------------------------------------------------------
    def _start_inspector(self) -> None:
        """Read crashed consumers' pending entries in a thread of their own: Redis may be slow
        or down (the crash may be its doing), and the monitor must go on restarting."""
        with self._lock:
            if self._closing or not any(i.inspect_start_no is not None
                                        for i in self._instances.values()):
                return
            if self._inspector is not None and self._inspector.is_alive():
                return
            self._inspector = threading.Thread(target=self._inspect_crashes, daemon=True,
                                               name=f"supervisor-evidence-{self.prefix}")
            self._inspector.start()

    def _raw(self) -> redis.Redis:
        """A bytes client for evidence (fields may be non-UTF-8), short timeouts; one for the
        inspector thread and stop() alike (creating it does no I/O)."""
        with self._lock:
            if self._raw_client is None:
                self._raw_client = connect(self.redis_url, decode_responses=False,
                                           socket_timeout=2.0, socket_connect_timeout=1.0)
            return self._raw_client

    def never_in_group(self) -> tuple[list[str], list[str]] | None:
        """The instances never seen in group ``governor`` so far (asked now), and every
        consumer the group lists; None when Redis cannot say.

        The harness asks this once the load has run: by then a governor that reads the
        plan stream under its ``GOVERNOR_CONSUMER`` name is listed (even on Redis 6.2,
        where a consumer blocked in its first ``XREADGROUP ... >`` is listed once that read
        returns). An instance ready only by staying up and still not listed never read the
        stream it was started for."""
        try:
            rows = self._raw().xinfo_consumers(Keys(self.prefix).plans, GROUP_GOVERNOR)
        except (redis.RedisError, OSError) as exc:
            log.info("supervisor: group membership not readable: %s", exc)
            return None
        listed = sorted(_text(row["name"]) for row in rows)
        with self._lock:
            for inst in self._instances.values():
                if inst.consumer in listed:
                    inst.in_group = True
            unseen = sorted(c for c, inst in self._instances.items() if not inst.in_group)
        return unseen, listed

    def _record_membership(self) -> None:
        """Before stopping: for each instance that was ready only by staying up and was never
        seen in the plan group, one ``membership`` event saying whether it is listed now. A
        governor that never read the stream (a wrong address, a command that only sleeps)
        is then named in the findings instead of leaving only undecided plans behind."""
        with self._lock:
            if self._closing or not self._started:
                return
            unseen = [i for i in self._instances.values() if i.ready_once and not i.in_group]
        if not unseen:
            return
        try:
            rows = self._raw().xinfo_consumers(Keys(self.prefix).plans, GROUP_GOVERNOR)
        except (redis.RedisError, OSError) as exc:
            log.info("supervisor: group membership not readable at stop: %s", exc)
            return
        listed = {_text(row["name"]): int(row["pending"]) for row in rows}
        with self._lock:
            for inst in unseen:
                inst.in_group = inst.consumer in listed
                self._emit("membership", inst, listed=inst.in_group,
                           pending=listed.get(inst.consumer, 0))
                if not inst.in_group:
                    log.warning("supervisor: %s was never seen in group %r (ready only by "
                                "staying up %gs): did it read %s?", inst.consumer,
                                GROUP_GOVERNOR, self.ready_grace_s, Keys(self.prefix).plans)
        self._flush()

    def _inspect_crashes(self) -> None:
        """After a crash, record what the crashed consumer had pending (a ``pending`` event).

        A governor that dies on one input and is restarted under the same consumer name is
        given that entry again, so the entry it holds with the highest delivery count is the
        prime suspect of a crash loop: the event carries its id, delivery count and fields,
        so that a stored run can name it. Redis is asked outside the lock, with short
        timeouts (it may itself be down: the event then says why it could not be read).
        """
        with self._lock:
            todo = [(inst, inst.inspect_start_no) for inst in self._instances.values()
                    if inst.inspect_start_no is not None]
            for inst, _ in todo:
                inst.inspect_start_no = None
        for inst, start_no in todo:
            if self._closing:
                return
            evidence = self.pending_evidence(inst.consumer)
            with self._lock:
                if evidence.get("pending") or evidence.get("listed"):
                    inst.in_group = True
                self._emit("pending", inst, start_no=start_no, **evidence)
            self._flush()

    def pending_evidence(self, consumer: str, limit: int = 100,
                         max_tied: int = 10) -> dict[str, Any]:
        """What ``consumer`` holds pending in group ``governor`` (``XPENDING``), read
        bytes-safe: ``pending`` (count), ``listed`` (whether XINFO CONSUMERS lists it),
        ``entries`` (``[id, delivery count]``, the ``limit`` oldest, highest counts first,
        at most 10 kept) and ``top``: the entry with the highest delivery count, with its
        fields (``XRANGE``) escaped where they are not UTF-8 (named in ``non_utf8``). Entries
        read in one batch share their count, and any of them may be the one the governor
        cannot take: the others with that count go in ``top["tied"]`` (fields too, at most
        ``max_tied`` in all; ``tied_total`` says how many). ``error`` instead when Redis
        could not say."""
        keys = Keys(self.prefix)
        try:
            r = self._raw()
            rows = r.xinfo_consumers(keys.plans, GROUP_GOVERNOR)
            listed = {_text(row["name"]): int(row["pending"]) for row in rows}
            pending = r.xpending_range(keys.plans, GROUP_GOVERNOR, min="-", max="+",
                                       count=limit, consumername=consumer)
            entries = sorted(((_text(p["message_id"]), int(p["times_delivered"]),
                               int(p["time_since_delivered"])) for p in pending),
                             key=lambda e: (-e[1], e[0]))
            top: dict[str, Any] | None = None
            if entries:
                entry_id, deliveries, idle_ms = entries[0]
                tied = [e[0] for e in entries if e[1] == deliveries]
                shown = [self._entry_fields(r, keys.plans, i) for i in tied[:max_tied]]
                top = {"id": entry_id, "deliveries": deliveries, "idle_ms": idle_ms,
                       **shown[0], "tied": shown[1:], "tied_total": len(tied)}
        except (redis.RedisError, OSError) as exc:
            return {"error": f"{type(exc).__name__}: {exc}"}
        return {"pending": listed.get(consumer, len(entries)), "listed": consumer in listed,
                "entries": [[e[0], e[1]] for e in entries[:10]], "top": top}

    @staticmethod
    def _entry_fields(r: redis.Redis, stream: str, entry_id: str) -> dict[str, Any]:
        """``id``, ``fields`` (None when the entry was deleted or trimmed) and ``non_utf8``."""
        found = r.xrange(stream, min=entry_id, max=entry_id, count=1)
        raw = found[0][1] if found else None
        if raw is None:
            return {"id": entry_id, "fields": None, "non_utf8": []}
        return {"id": entry_id,
                "fields": {_escaped(k): _escaped(v) for k, v in raw.items()},
                "non_utf8": sorted(_escaped(k) for k, v in raw.items()
                                   if not (_is_utf8(k) and _is_utf8(v)))}

    def _raise_if_failed(self) -> None:
        with self._lock:
            for inst in self._instances.values():
                if not inst.want_running:
                    continue
                if inst.spawn_error is not None:
                    raise inst.spawn_error
                if self._served_then_failing(inst):
                    continue  # a finding about the governor (see wait_ready), not a start error
                reason = None
                if inst.gave_up:
                    reason = (f"{inst.consumer} kept exiting; gave up after "
                              f"{inst.crash_restarts} restart(s)")
                elif inst.quick_exits >= self.quick_exit_limit:
                    reason = (f"{inst.consumer} exited {inst.quick_exits} times in a row, each "
                              f"within {self.quick_exit_s:g}s of starting")
                elif (not self.restart_enabled and inst.crashes
                      and inst.proc is None and inst.restart_at is None):
                    reason = f"{inst.consumer} exited (restart disabled)"
                if reason is not None:
                    raise self._start_error(reason, inst)

    def _not_ready(self, timeout: float, required: list[str], ready: dict[str, int],
                   redis_error: str | None) -> GovernorNotReady:
        missing = [c for c in required if c not in ready]
        reason = (f"{', '.join(missing)} did not join consumer group {GROUP_GOVERNOR!r} on "
                  f"{Keys(self.prefix).plans} (nor stay up {self.ready_grace_s:g}s without "
                  f"exiting) within {timeout:g}s")
        if redis_error:
            reason += f" (last Redis error: {redis_error})"
        with self._lock:
            inst = self._instances[missing[0]]
            return GovernorNotReady(reason, command=self.spec.display(), consumer=inst.consumer,
                                    returncode=inst.last_returncode,
                                    log_tail=self._tail(inst), log_path=inst.log_path)

    def _start_error(self, reason: str, inst: _Instance) -> GovernorStartError:
        return GovernorStartError(reason, command=self.spec.display(), consumer=inst.consumer,
                                  returncode=inst.last_returncode,
                                  log_tail=self._tail(inst), log_path=inst.log_path)

    # -- internals ----------------------------------------------------------------------
    def _tail(self, inst: _Instance) -> str:
        return log_tail(inst.log_path, since=inst.log_offset or 0)

    def _get(self, consumer: str) -> _Instance:
        try:
            return self._instances[consumer]
        except KeyError:
            raise KeyError(f"unknown governor instance {consumer!r}; "
                           f"have {', '.join(self._instances)}") from None

    def _env(self, consumer: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update({k: str(v) for k, v in self.spec.env.items()})
        extra = self._instances[consumer].extra_env if consumer in self._instances else None
        if extra:
            env.update(extra)
        env.setdefault("PYTHONUNBUFFERED", "1")  # a Python governor's last words reach the log
        env.update(REDIS_URL=self.redis_url, GOVERNOR_PREFIX=self.prefix,
                   GOVERNOR_CONSUMER=consumer)
        return env

    def _spawn(self, inst: _Instance, cause: str) -> int:
        """Start one process for ``inst`` (lock held). Raises GovernorStartError when the
        command cannot be executed."""
        argv = self.spec.argv()
        cwd = os.fspath(self.spec.cwd) if self.spec.cwd is not None else None
        inst.starts += 1
        stamp = datetime.now(UTC).isoformat(timespec="milliseconds")
        header = (f"===== {stamp} supervisor: start #{inst.starts} of {inst.consumer} "
                  f"({cause}): {shlex.join(argv)}\n")
        with open(inst.log_path, "ab") as log_file:
            if inst.log_offset is None:
                inst.log_offset = log_file.tell()
            log_file.write(header.encode())
            log_file.flush()
            inst.started_mono = time.monotonic()
            try:
                proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log_file,
                                        stderr=subprocess.STDOUT, env=self._env(inst.consumer),
                                        cwd=cwd, start_new_session=True, close_fds=True)
            except OSError as exc:
                reason = _spawn_error_reason(exc, argv, cwd)
                log_file.write(f"===== supervisor: {reason}\n".encode())
                log.error("supervisor: %s: %s", inst.consumer, reason)
                raise GovernorStartError(reason, command=self.spec.display(),
                                         consumer=inst.consumer) from exc
        inst.proc = proc
        reaper.watch(proc.pid, group=True)  # the group dies with the harness, however it dies
        inst.spawn_error = None
        inst.spawn_failures = 0
        self._emit("start", inst, pid=proc.pid, start_no=inst.starts, cause=cause)
        log.info("supervisor: started %s pid %d (start #%d, %s)", inst.consumer, proc.pid,
                 inst.starts, cause)
        return proc.pid

    def _backoff(self, failures: int) -> float:
        """base, base, 2 base, 4 base... capped: a crash loop never becomes a busy loop."""
        exp = min(max(0, failures - 1), 30)
        return min(self.restart_backoff_max_s, self.restart_backoff_s * (2 ** exp))

    def _reap_if_exited(self, inst: _Instance, now: float) -> bool:
        """If ``inst``'s process is dead: kill its group's stragglers, reap it, record the
        exit and schedule the restart. Lock held; the only place that reaps."""
        proc = inst.proc
        if proc is None or not _has_exited(proc):
            return False
        # The leader is a zombie, so its pid (= the group id) cannot have been reused.
        _signal_group(proc.pid, signal.SIGKILL)
        try:
            rc = proc.wait(timeout=2.0)
        except subprocess.TimeoutExpired:
            return False
        reaper.forget(proc.pid)
        inst.proc = None
        inst.paused = False
        inst.last_returncode = rc
        uptime = round(now - inst.started_mono, 3)
        expect, inst.expect = inst.expect, None
        may_restart = self.restart_enabled and inst.want_running and not self._closing
        if expect is not None:
            self._emit("exit", inst, pid=proc.pid, returncode=rc, cause=expect,
                       uptime_s=uptime)
            if may_restart:
                inst.restart_at = now + self.restart_backoff_s
            return True

        inst.crashes += 1
        inst.quick_exits = inst.quick_exits + 1 if uptime < self.quick_exit_s else 0
        inst.inspect_start_no = inst.starts  # the monitor reads its pending entries next
        limit = self.max_restarts_per_instance
        if may_restart and limit is not None and inst.crash_restarts >= limit:
            may_restart = False
            inst.gave_up = True
        backoff = self._backoff(inst.quick_exits) if may_restart else None
        self._emit("crash", inst, pid=proc.pid, returncode=rc, uptime_s=uptime,
                   quick_exits=inst.quick_exits, backoff_s=backoff)
        log.warning("supervisor: %s (pid %d) exited unexpectedly (return code %s) after %.3fs%s",
                    inst.consumer, proc.pid, describe_returncode(rc), uptime,
                    f"; restarting in {backoff:g}s" if backoff is not None else "")
        if inst.quick_exits >= self.quick_exit_limit and not inst.crash_loop_reported:
            inst.crash_loop_reported = True
            self._emit("crash_loop", inst, quick_exits=inst.quick_exits, backoff_s=backoff)
            log.error("supervisor: %s is crash-looping (%d exits within %gs of starting); "
                      "see %s", inst.consumer, inst.quick_exits, self.quick_exit_s,
                      inst.log_path)
        if inst.gave_up:
            self._emit("gave_up", inst, restarts=inst.crash_restarts)
            log.error("supervisor: %s: gave up after %d restart(s)", inst.consumer,
                      inst.crash_restarts)
        if may_restart and backoff is not None:
            inst.crash_restarts += 1
            inst.restart_at = now + backoff
        return True

    def _tick(self) -> None:
        now = time.monotonic()
        with self._lock:
            if self._closing:
                return
            for inst in self._instances.values():
                self._reap_if_exited(inst, now)
                if inst.proc is not None and now - inst.started_mono >= self.quick_exit_s:
                    inst.quick_exits = 0  # it stayed up: the next exit starts a new count
                    inst.crash_loop_reported = False
                if (inst.proc is None and inst.want_running and inst.restart_at is not None
                        and now >= inst.restart_at):
                    inst.restart_at = None
                    try:
                        self._spawn(inst, cause="restart")
                    except GovernorStartError as err:
                        inst.spawn_error = err
                        inst.spawn_failures += 1
                        backoff = self._backoff(inst.spawn_failures)
                        inst.restart_at = now + backoff
                        self._emit("start_failed", inst, error=err.reason, backoff_s=backoff)

    def _run_monitor(self) -> None:
        """Poll for exits: Popen offers no exit notification that works across threads, and a
        few ms of latency is far below any backoff."""
        while not self._closing:
            try:
                self._tick()
            except Exception:  # noqa: BLE001 - the monitor must outlive any one bad tick
                log.exception("supervisor: monitor tick failed")
            self._flush()
            self._start_inspector()
            self._wake.wait(self.poll_interval_s)

    def _await_exits(self, procs: Iterable[tuple[_Instance, subprocess.Popen[bytes]]],
                     timeout: float) -> None:
        """Wait until each process has been reaped (by us or the monitor); SIGKILL the group
        of any still alive after ``timeout``, then wait a little more."""
        pending = list(procs)
        for phase_timeout, escalate in ((timeout, True), (5.0, False)):
            deadline = time.monotonic() + phase_timeout
            for delay in itertools.chain([0.0], itertools.repeat(0.005)):
                with self._lock:
                    now = time.monotonic()
                    for inst, proc in pending:
                        if inst.proc is proc:
                            self._reap_if_exited(inst, now)
                    pending = [(i, p) for i, p in pending if i.proc is p]
                self._flush()
                if not pending or time.monotonic() >= deadline:
                    break
                time.sleep(delay)
            if not pending:
                return
            if escalate:
                with self._lock:
                    for inst, proc in pending:
                        if inst.proc is proc:
                            log.warning("supervisor: %s (pid %d) still running after %gs; "
                                        "SIGKILL", inst.consumer, proc.pid, timeout)
                            _signal_group(proc.pid, signal.SIGKILL)
        for inst, proc in pending:
            log.error("supervisor: %s (pid %d) could not be reaped", inst.consumer, proc.pid)

    def _emit(self, kind: str, inst: _Instance, **fields: Any) -> None:
        """Record an event (lock held); :meth:`_flush` delivers it outside the lock."""
        event: Event = {"type": kind, "consumer": inst.consumer, **_now_fields(), **fields}
        with self._lock:
            self._events.append(event)
            self._pending.append(event)

    def _flush(self) -> None:
        """Deliver pending events in order, never under the supervisor lock, so a sink may
        call back into the supervisor or block without deadlocking the monitor."""
        if self.on_event is None:
            self._pending.clear()
            return
        with self._dispatch_lock:
            while True:
                try:
                    event = self._pending.popleft()
                except IndexError:
                    return
                try:
                    self.on_event(event)
                except Exception:  # noqa: BLE001 - a broken sink must not stop supervision
                    log.exception("supervisor: on_event failed for %s", event.get("type"))

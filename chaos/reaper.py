"""The parent-death watch: whatever kills the harness, what it started dies within a second.

Why a separate process and not ``PR_SET_PDEATHSIG``: the death signal reaches only the
direct child (a governor started through ``sh -c`` leaves its grandchildren running), it
fires when the *thread* that forked exits (the supervisor restarts governors from its
monitor thread, the nemesis restarts Redis from its own), and a SIGSTOPped child would not
act on it. So each harness process (lazily, at its first child) starts one small reaper,
``python -m chaos.reaper``, in its own session (a Ctrl-C at the terminal never reaches
it). The reaper holds the read end of a pipe whose write end only the harness holds
(close-on-exec, closed in forked children). Through that pipe the harness tells it which
pids and process groups to watch and forget, and which temp dirs it owns. On EOF (the
harness exited, however: SIGKILL, a crash, or a normal exit after its own teardown) the
reaper SIGCONTs and SIGKILLs every group and pid still registered, removes the registered
dirs, and exits. A clean exit has forgotten everything by then, so it just exits.

Reused pids: each entry carries the process's start time (``/proc/PID/stat`` field 22,
read by the harness while the child is its own, unreaped). The reaper signals a pid only
when the start time still matches; a process group only when its leader is gone (a
group's id cannot be handed out again while any member lives) or is the same process.
What remains is a race of microseconds between the check and the kill, accepted. Without
``/proc`` (not Linux) there is no check.

A child spawned in the instant between its ``fork`` and its registration, when the
harness is SIGKILLed exactly then, is not covered: accepted, documented.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- harness side


class _Client:
    """The harness's end: one reaper per process, started lazily, restarted if it died."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.owner: int | None = None  # the pid that started the reaper
        self.proc: subprocess.Popen[bytes] | None = None
        self.fd: int | None = None
        self.watched: dict[int, dict[str, Any]] = {}
        self.dirs: set[str] = set()
        self.disabled = False

    def _start(self) -> None:
        r, w = os.pipe()  # both close-on-exec; only the read end is passed on
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "chaos.reaper", str(r)], pass_fds=(r,),
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                start_new_session=True, close_fds=True,
                env={**os.environ, "PYTHONPATH": _pythonpath()})
        except OSError as exc:
            os.close(w)
            self.disabled = True
            log.warning("no reaper (children may outlive a killed harness): %s", exc)
            return
        finally:
            os.close(r)
        self.fd, self.owner = w, os.getpid()
        for msg in [*({"op": "watch", **e} for e in self.watched.values()),
                    *({"op": "dir", "path": d} for d in self.dirs)]:
            self._write(msg, replay=True)

    def send(self, msg: dict[str, Any]) -> None:
        if self.disabled:
            return
        if self.fd is None or self.owner != os.getpid():
            self._start()
            if self.fd is None:
                return
        self._write(msg)

    def _write(self, msg: dict[str, Any], replay: bool = False) -> None:
        assert self.fd is not None
        data = (json.dumps(msg) + "\n").encode()
        try:
            os.write(self.fd, data)  # short lines: atomic on a pipe
        except BrokenPipeError:
            if replay:
                self.disabled = True
                log.warning("the reaper died at start; children may outlive a killed harness")
                return
            log.warning("the reaper (pid %s) died; starting another",
                        self.proc.pid if self.proc else "?")
            os.close(self.fd)
            self.fd = None
            if self.proc is not None:
                with contextlib.suppress(OSError, subprocess.TimeoutExpired):
                    self.proc.wait(timeout=1)
            self._start()  # replays the table, which already holds this message's effect

    def after_fork_in_child(self) -> None:
        """A forked child is not the harness: it must not hold the pipe open (the reaper
        would then outlive the harness's death) nor tell the harness's reaper anything."""
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.fd)
        self.__init__()  # type: ignore[misc]


_client = _Client()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_client.after_fork_in_child)


@atexit.register
def _close_at_exit() -> None:
    """A normal exit (registered before the other modules' cleanups, so it runs after
    them): what they stopped is forgotten; the reaper mops up anything they missed and is
    gone before this process is, so whoever waits for the harness finds nothing of it."""
    c = _client
    with c.lock:
        if c.fd is None or c.owner != os.getpid():
            return
        with contextlib.suppress(OSError):
            os.close(c.fd)
        c.fd, c.disabled = None, True
        if c.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                c.proc.wait(timeout=5)


def close() -> None:
    """End this process's watch now, as a normal exit would (everything it started is
    stopped and forgotten): for a process whose exit must not wait on the reaper, e.g.
    under gevent, where waiting at exit lets other greenlets run on closed files."""
    _close_at_exit()


def _pythonpath() -> str:
    """The reaper imports ``chaos`` from wherever this process did."""
    root = str(Path(__file__).resolve().parent.parent)
    return os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (``/proc/PID/stat`` field 22)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rpartition(")")[2].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def watch(pid: int, *, group: bool = False) -> None:
    """Kill ``pid`` (``group``: its whole process group, of which it is the leader) if the
    harness dies first. Call right after starting it, while it is still unreaped."""
    entry = {"pid": pid, "group": group, "start": start_time(pid)}
    with _client.lock:
        if _client.owner not in (None, os.getpid()):
            _client.after_fork_in_child()
        _client.watched[pid] = entry
        _client.send({"op": "watch", **entry})


def forget(pid: int) -> None:
    """``pid`` was stopped and reaped by the harness: nothing left to do for it."""
    with _client.lock:
        if _client.owner != os.getpid() or _client.watched.pop(pid, None) is None:
            return
        _client.send({"op": "forget", "pid": pid})


def watch_dir(path: str | os.PathLike[str]) -> None:
    """Remove ``path`` (a temp dir of ours) if the harness dies before it does."""
    p = os.fspath(path)
    with _client.lock:
        if _client.owner not in (None, os.getpid()):
            _client.after_fork_in_child()
        _client.dirs.add(p)
        _client.send({"op": "dir", "path": p})


def forget_dir(path: str | os.PathLike[str]) -> None:
    p = os.fspath(path)
    with _client.lock:
        if _client.owner != os.getpid() or p not in _client.dirs:
            return
        _client.dirs.discard(p)
        _client.send({"op": "forget_dir", "path": p})


@contextlib.contextmanager
def sigint_ignored_while_spawning() -> Iterator[None]:
    """Around the start of ``multiprocessing`` children (main thread only): a spawned child
    leaves the terminal's process group only once its own code runs (``os.setsid``), and in
    the fraction of a second before that, Python's start-up would turn the terminal's
    Ctrl-C into a KeyboardInterrupt traceback. An ignored SIGINT stays ignored across exec,
    so the child starts immune; the harness ignores it only for the few milliseconds
    ``start()`` takes (a Ctrl-C in exactly that instant is lost: press it again)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old if old is not None else signal.SIG_DFL)


def reaper_pid() -> int | None:
    """The pid of this process's reaper, if one was started (tests, debugging)."""
    with _client.lock:
        return _client.proc.pid if _client.proc is not None and \
            _client.owner == os.getpid() else None


# --------------------------------------------------------------------------- reaper side


def _signal_entry(entry: dict[str, Any]) -> None:
    pid, start, group = int(entry["pid"]), entry.get("start"), bool(entry.get("group"))
    now = start_time(pid)
    if now is not None and start is not None and now != start:
        return  # the pid is another process now (and the old group, if any, is empty)
    for sig in (signal.SIGCONT, signal.SIGKILL):  # SIGCONT: a stopped member too
        if group:
            try:
                os.killpg(pid, sig)
                continue
            except ProcessLookupError:
                pass  # not (or no longer) a group leader's group: the process alone
            except PermissionError:
                continue
        if now is None and start is not None:
            continue  # gone
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def exited(pid: int) -> bool:
    """Gone, or a zombie (nothing left that could write into a dir, or send anything)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] in "ZX"
    except (OSError, IndexError):
        return True


def _reap(watched: dict[int, dict[str, Any]], dirs: set[str]) -> None:
    for entry in watched.values():
        with contextlib.suppress(Exception):
            _signal_entry(entry)
    if dirs:  # a Redis being killed must not write into its dir while it is removed
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline and not all(exited(p) for p in watched):
            time.sleep(0.01)
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    """``python -m chaos.reaper FD``: read registrations from FD until EOF, then reap."""
    args = sys.argv[1:] if argv is None else argv
    fd = int(args[0])
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
        # Only EOF may end the watch: a stray signal must not leave the children behind.
        signal.signal(sig, signal.SIG_IGN)
    watched: dict[int, dict[str, Any]] = {}
    dirs: set[str] = set()
    with os.fdopen(fd, "rb", buffering=0) as pipe:
        buf = b""
        while chunk := pipe.read(65536):
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for line in lines:
                try:
                    msg = json.loads(line)
                except ValueError:
                    continue
                op = msg.get("op")
                if op == "watch":
                    watched[int(msg["pid"])] = msg
                elif op == "forget":
                    watched.pop(int(msg["pid"]), None)
                elif op == "dir":
                    dirs.add(str(msg["path"]))
                elif op == "forget_dir":
                    dirs.discard(str(msg["path"]))
    _reap(watched, dirs)
    return 0


if __name__ == "__main__":
    sys.exit(main())

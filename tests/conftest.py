"""Shared fixtures: real embedded Redis servers, per test or per xdist worker."""

from __future__ import annotations

import contextlib
import os
import signal
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import redis
from govtools import Desk

from chaos.exchange import Exchange
from chaos.redis_servers import EmbeddedRedis, kill_all, running_pids


@pytest.fixture
def redis_server() -> Iterator[EmbeddedRedis]:
    """A fresh embedded server for one test; the test may kill or pause it."""
    server = EmbeddedRedis(name="test").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_client(redis_server: EmbeddedRedis) -> Iterator[redis.Redis]:
    """A ``decode_responses`` client on :func:`redis_server`."""
    client = redis_server.client()
    yield client
    client.close()


@pytest.fixture(scope="session")
def shared_redis() -> Iterator[EmbeddedRedis]:
    """One server per xdist worker, for tests that need no faults.

    Tests using it share its keyspace: keep every key under the ``prefix`` fixture and
    never flush, kill or pause it.
    """
    with EmbeddedRedis(name="shared") as server:
        yield server


@pytest.fixture
def r(shared_redis: EmbeddedRedis) -> Iterator[redis.Redis]:
    """A client of the shared server (keys under ``prefix`` only)."""
    client = shared_redis.client()
    yield client
    client.close()


@pytest.fixture
def ex(tmp_path: Path) -> Exchange:
    """A fresh exchange (ledger in the test's tmp dir) with 1000 USD of capital."""
    return Exchange.create(tmp_path / "ledger.db", capital=1000)


@pytest.fixture
def prefix() -> str:
    """A key prefix unique to this test (``t`` + 8 hex digits, no trailing ':')."""
    return f"t{uuid.uuid4().hex[:8]}"


@pytest.fixture
def make_desk(shared_redis: EmbeddedRedis, prefix: str) -> Iterator[Callable[..., Desk]]:
    """Factory of governor desks (a prefix with the operator's inputs) on the shared server.

    ``make_desk(variant="reference", start=True, **config)`` writes the config,
    starts one in-process governor of ``variant`` unless ``start=False``, and
    stops every governor it started at teardown.
    """
    desks: list[Desk] = []

    def make(variant: str = "reference", start: bool = True, **config: Any) -> Desk:
        desk = Desk(shared_redis.url, f"{prefix}{len(desks)}", shared_redis.client(),
                    config=config)
        desks.append(desk)
        desk.setup()
        if start:
            desk.start(variant=variant)
        return desk

    yield make
    for d in desks:
        d.stop_all()


@pytest.fixture
def no_leftover_governors(prefix: str) -> Iterator[None]:
    """After the test: no process started with this test's GOVERNOR_PREFIX may be running.

    For modules that start governors as processes (``pytestmark = usefixtures(...)``):
    survivors are killed and the test fails.
    """
    yield
    leftovers = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if proc.pid != os.getpid() and proc.environ().get(
                "GOVERNOR_PREFIX", ""
            ).startswith(prefix):
                leftovers.append(proc)
    for proc in leftovers:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    assert not leftovers, f"processes left running: {[(p.pid, p.name()) for p in leftovers]}"


def _redis_children() -> set[int]:
    """redis-server processes that are children of this worker (whatever started them)."""
    pids = set(running_pids())
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if child.name().startswith("redis-server") or "redis-server" in " ".join(
                child.cmdline()[:1]
            ):
                pids.add(child.pid)
    return pids


@pytest.fixture(scope="session", autouse=True)
def _no_leaked_redis_servers() -> Iterator[None]:
    """Session-finish safety check: torn down after every other fixture of this worker, it
    fails the run if any redis-server this worker started is still alive (and kills it)."""
    yield
    leaked = sorted(_redis_children())
    if not leaked:
        return
    kill_all()
    for pid in leaked:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    pytest.fail(f"redis-server process(es) still running at session end (now killed): {leaked}")

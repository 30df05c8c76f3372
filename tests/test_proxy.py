"""The fault proxy against a real redis-server: it forwards faithfully, and injects each
network fault it promises (latency, resets, partitions) and nothing else."""

from __future__ import annotations

import socket
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

import psutil
import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from chaos.proxy import FaultProxy, ProxyError
from chaos.redis_servers import EmbeddedRedis

pytestmark = pytest.mark.timeout(60)

Events = list[tuple[str, str, dict[str, Any]]]


@pytest.fixture
def make_proxy(shared_redis: EmbeddedRedis) -> Iterator[Callable[..., FaultProxy]]:
    """Start proxies in front of the worker's shared server; all are stopped at teardown.

    The shared server is safe here: faults live in the proxy, the server is never touched.
    """
    started: list[FaultProxy] = []

    def make(**kw: Any) -> FaultProxy:
        proxy = FaultProxy("127.0.0.1", shared_redis.port, **kw).start()
        started.append(proxy)
        return proxy

    yield make
    for proxy in started:
        proxy.stop()


def client(url: str, timeout: float = 2.0) -> redis.Redis:
    """A client that fails at once: redis-py's default retries would hide the faults."""
    return redis.Redis.from_url(
        url,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
        decode_responses=True,
    )


def wait_until(predicate: Callable[[], bool], timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def ping_seconds(c: redis.Redis, n: int = 5) -> float:
    """Median PING round trip, in seconds."""
    times = []
    for _ in range(n):
        t = time.perf_counter()
        assert c.ping()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def test_forwards_commands_and_counts_bytes(
    make_proxy: Callable[..., FaultProxy], shared_redis: EmbeddedRedis, prefix: str
) -> None:
    proxy = make_proxy()
    assert proxy.url == f"redis://127.0.0.1:{proxy.port}/0"
    c = client(proxy.url)
    assert c.set(f"{prefix}:k", "v")
    assert c.get(f"{prefix}:k") == "v"
    before = proxy.stats()

    pipe = c.pipeline(transaction=False)
    for i in range(1000):
        pipe.rpush(f"{prefix}:list", i)
    assert pipe.execute() == list(range(1, 1001))

    after = proxy.stats()
    assert after["bytes_to_upstream"] - before["bytes_to_upstream"] > 1000 * 20
    assert after["bytes_to_client"] - before["bytes_to_client"] > 1000 * 3
    assert after["connections_accepted"] >= 1
    assert after["bytes_held"] == 0
    assert not after["partitioned"]
    # what went through the proxy is really in the server
    assert shared_redis.client().llen(f"{prefix}:list") == 1000
    c.close()


def test_jitter_never_reorders_bytes(make_proxy: Callable[..., FaultProxy], prefix: str) -> None:
    proxy = make_proxy(seed=7)
    proxy.set_latency(2, jitter_ms=2)
    c = client(proxy.url)
    for _ in range(5):  # several request chunks, each with its own random delay
        pipe = c.pipeline(transaction=False)
        for _ in range(200):
            pipe.incr(f"{prefix}:n")
        values = pipe.execute()
        assert values == list(range(values[0], values[0] + 200))
    assert c.get(f"{prefix}:n") == "1000"
    c.close()


def test_latency_delays_both_directions_and_clear_restores(
    make_proxy: Callable[..., FaultProxy],
) -> None:
    proxy = make_proxy()
    c = client(proxy.url)
    assert ping_seconds(c) < 0.05
    proxy.set_latency(100)
    assert proxy.stats()["latency_ms"] == 100
    slow = ping_seconds(c)
    assert slow >= 0.19, slow  # 100 ms up + 100 ms down
    assert slow < 1.0, slow
    proxy.clear()
    assert ping_seconds(c) < 0.05
    c.close()


def test_drop_resets_connections(make_proxy: Callable[..., FaultProxy]) -> None:
    proxy = make_proxy()
    proxy.set_drop(1.0)
    c = client(proxy.url)
    with pytest.raises(redis.ConnectionError):
        c.ping()
    # A drop is a reset, not silence: a raw socket sees ECONNRESET, not a hang.
    with socket.create_connection(proxy.address, timeout=2) as s:
        s.sendall(b"*1\r\n$4\r\nPING\r\n")
        with pytest.raises(ConnectionResetError):
            s.recv(100)
    assert proxy.stats()["connections_dropped"] >= 2

    proxy.clear()
    assert proxy.stats()["drop_prob"] == 0
    assert client(proxy.url).ping()
    assert c.ping()  # the pool reconnects


def test_partition_freezes_then_heal_delivers_held_bytes(
    make_proxy: Callable[..., FaultProxy], shared_redis: EmbeddedRedis, prefix: str
) -> None:
    proxy = make_proxy()
    direct = shared_redis.client()
    stream = f"{prefix}:events"
    c = client(proxy.url, timeout=0.3)
    assert c.ping()  # connection established before the partition

    proxy.partition()
    t = time.perf_counter()
    with pytest.raises(redis.TimeoutError):
        c.xadd(stream, {"intent": "open"})
    assert time.perf_counter() - t < 2.0
    with pytest.raises((redis.TimeoutError, redis.ConnectionError)):
        client(proxy.url, timeout=0.3).ping()  # new connections hang too
    stats = proxy.stats()
    assert stats["partitioned"] and stats["partition_mode"] == "freeze"
    assert stats["bytes_held"] > 0
    assert stats["connections_pending"] >= 1
    time.sleep(0.2)
    assert direct.xlen(stream) == 0  # black-holed, not lost...

    proxy.heal()
    assert wait_until(lambda: direct.xlen(stream) == 1)  # ...and delivered late, once
    assert direct.xrange(stream)[0][1] == {"intent": "open"}
    assert client(proxy.url, timeout=0.3).ping()
    assert c.ping()
    assert wait_until(lambda: proxy.stats()["bytes_held"] == 0)
    time.sleep(0.1)
    assert direct.xlen(stream) == 1


def test_partition_reset_refuses_until_heal(make_proxy: Callable[..., FaultProxy]) -> None:
    proxy = make_proxy()
    c = client(proxy.url)
    assert c.ping()

    proxy.partition(mode="reset")
    with pytest.raises(redis.ConnectionError):
        c.ping()  # the established connection was reset
    with pytest.raises(redis.ConnectionError):
        client(proxy.url).ping()  # and new ones are reset on accept
    stats = proxy.stats()
    assert stats["partition_mode"] == "reset"
    assert stats["connections_reset"] >= 1
    assert stats["connections_refused"] >= 1
    assert stats["connections_active"] == 0

    proxy.heal()
    assert c.ping()
    assert client(proxy.url).ping()
    assert not proxy.stats()["partitioned"]


def test_upstream_down_resets_clients(redis_server: EmbeddedRedis) -> None:
    with FaultProxy("127.0.0.1", redis_server.port) as proxy:
        assert client(proxy.url).ping()
        redis_server.stop()
        with pytest.raises(redis.ConnectionError):
            client(proxy.url).ping()
        assert proxy.stats()["upstream_connect_errors"] >= 1


@pytest.mark.parametrize(
    "host", ["10.0.0.1", "192.168.1.10", "8.8.8.8", "0.0.0.0", "::", "example.com", "fe80::1"]
)
def test_non_loopback_upstream_is_refused(host: str) -> None:
    with pytest.raises(ValueError, match="refused"):
        FaultProxy(host, 6379)


def test_loopback_upstreams_accepted_and_bad_settings_refused() -> None:
    assert FaultProxy("::1", 6379).upstream_host == "::1"
    assert FaultProxy("localhost", 6379).upstream_host == "127.0.0.1"
    proxy = FaultProxy("127.0.0.1", 6379)
    with pytest.raises(ValueError):
        proxy.set_latency(-1)
    with pytest.raises(ValueError):
        proxy.set_drop(1.5)
    with pytest.raises(ValueError):
        proxy.partition(mode="bogus")  # type: ignore[arg-type]
    with pytest.raises(ProxyError):
        proxy.set_latency(10)  # not started
    with pytest.raises(ValueError):
        FaultProxy("127.0.0.1", 0)


def test_on_fault_reports_every_window(shared_redis: EmbeddedRedis) -> None:
    events: Events = []
    proxy = FaultProxy("127.0.0.1", shared_redis.port, on_fault=lambda *e: events.append(e))
    with proxy:
        pid = proxy.pid
        proxy.set_latency(50)
        proxy.set_latency(50)  # unchanged: no event
        proxy.set_latency(20, jitter_ms=5)  # changed: stop the old window, start a new one
        proxy.set_drop(0.25)
        proxy.partition()
        proxy.heal()
        proxy.heal()  # not partitioned: no event
        proxy.partition(mode="reset")
        proxy.clear()
        proxy.set_drop(0.5)
        assert proxy.active_faults == {"drop": {"prob": 0.5}}
    assert events == [
        ("latency", "start", {"ms": 50.0, "jitter_ms": 0.0}),
        ("latency", "stop", {"ms": 50.0, "jitter_ms": 0.0}),
        ("latency", "start", {"ms": 20.0, "jitter_ms": 5.0}),
        ("drop", "start", {"prob": 0.25}),
        ("partition", "start", {"mode": "freeze"}),
        ("partition", "stop", {"mode": "freeze"}),
        ("partition", "start", {"mode": "reset"}),
        ("latency", "stop", {"ms": 20.0, "jitter_ms": 5.0}),
        ("drop", "stop", {"prob": 0.25}),
        ("partition", "stop", {"mode": "reset"}),
        ("drop", "start", {"prob": 0.5}),
        ("drop", "stop", {"prob": 0.5}),  # stop() closes open windows
    ]
    # stop() reaped the proxy process; stats survive it
    assert pid is not None and not psutil.pid_exists(pid)
    assert proxy.stats()["running"] is False
    proxy.stop()  # twice is fine

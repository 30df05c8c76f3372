"""Staging safety of load tests (issue 11), against a separately started real Redis that
holds another system's keys: refusals, cleanup of only the run's keys, no byte changed
outside the prefix, and a least-privilege ACL user that suffices for a whole small run."""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from govtools import wait_for

from chaos.apply_layer import ApplyConfig, ApplyLayer
from chaos.exchange import Exchange
from chaos.loadtest.staging import (
    DEFAULT_REMOTE_MAX_RATE,
    GOVERNOR_COMMANDS,
    LOADTEST_COMMANDS,
    RateCeiling,
    StagingError,
    StagingTarget,
    acl_setuser_args,
    cleanup,
    is_loopback_url,
    preflight,
)
from chaos.redis_servers import EmbeddedRedis
from governor_ref.keys import GROUP_APPLY, GROUP_GOVERNOR, GROUP_GOVERNOR_RESULTS, Keys
from governor_ref.protocol import GovernorConfig

SECRET = "Sekr1t-pw"
FAST = ApplyConfig(open_latency_ms=2, open_jitter_ms=2, close_latency_ms=2, close_jitter_ms=2,
                   block_ms=50, drain_timeout_s=2, mirror_interval_s=0.2)


@pytest.fixture(scope="module")
def staging() -> Iterator[EmbeddedRedis]:
    """The shared "staging" server: started apart from the code under test."""
    with EmbeddedRedis(name="staging") as server:
        yield server


@pytest.fixture
def admin(staging: EmbeddedRedis) -> Iterator[redis.Redis]:
    c = staging.client(decode_responses=False)
    yield c
    c.close()


@pytest.fixture
def pfx() -> str:
    return f"lt{uuid.uuid4().hex[:8]}"


def _all_keys(c: redis.Redis) -> set[bytes]:
    return set(c.scan_iter(match="*", count=1000))


def _snapshot(c: redis.Redis, keys: set[bytes]) -> dict[bytes, tuple[bytes | None, int]]:
    return {k: (c.dump(k), c.pttl(k)) for k in keys}


@pytest.fixture
def foreign(admin: redis.Redis, pfx: str) -> Iterator[set[bytes]]:
    """Another system's keys, some right beside the prefix; at teardown every one of them
    must be there with the same bytes (DUMP) and a TTL that only ran down."""
    other = f"other-{uuid.uuid4().hex[:6]}"
    admin.set(f"{other}:plain", "v")
    admin.set(f"{other}:ttl", "v", px=3_600_000)
    admin.hset(f"{other}:h", mapping={"a": "1", "b": "2"})
    admin.xadd(f"{other}:stream", {"f": "v"})
    admin.xgroup_create(f"{other}:stream", "workers", id="0")
    admin.xreadgroup("workers", "w1", {f"{other}:stream": ">"})  # one pending entry
    admin.set(f"{pfx}x:foo", "near")          # shares the prefix's leading characters
    admin.set(f"{pfx}-prod:k", "near")
    admin.hset(f"{pfx}x:stream:apply.plan", mapping={"not": "ours"})
    admin.set(pfx, "the bare prefix is not under prefix:")
    keys = {k for k in _all_keys(admin) if not k.startswith(f"{pfx}:".encode())}
    before = _snapshot(admin, keys)
    t0 = time.monotonic()
    yield keys
    elapsed_ms = (time.monotonic() - t0) * 1000
    after = _snapshot(admin, keys)
    for k, (dump, ttl) in before.items():
        dump2, ttl2 = after[k]
        assert dump2 == dump, f"{k!r} changed"
        if ttl < 0:
            assert ttl2 == ttl, f"{k!r} TTL changed"
        else:
            assert ttl - elapsed_ms - 1000 <= ttl2 <= ttl, f"{k!r} TTL changed"


def _under(c: redis.Redis, prefix: str) -> set[bytes]:
    return set(c.scan_iter(match=f"{prefix}:*", count=1000))


def _pre(url: str, prefix: str | None, **kw: Any) -> StagingTarget:
    opts = {"allow_remote": False, "external_governor": False, "owned_prefix": False}
    opts.update(kw)
    return preflight(url, prefix, **opts)


# --------------------------------------------------------------------------- offline checks


@pytest.mark.parametrize("url", ["redis://127.0.0.1:99999/0", "http://127.0.0.1:6379",
                                 "redis://127.0.0.1:6379/db", "redis:///0", "unix://",
                                 f"redis://:{SECRET}@127.0.0.1:6379/x"])
def test_a_malformed_url_is_refused_in_one_line(url: str) -> None:
    with pytest.raises(StagingError) as err:
        _pre(url, None)
    assert "\n" not in str(err.value) and SECRET not in str(err.value)


@pytest.fixture
def no_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to open a Redis connection fails the test."""
    def refuse(*_a: Any, **_k: Any) -> None:
        raise AssertionError("a connection was attempted")
    monkeypatch.setattr(redis.connection.AbstractConnection, "connect", refuse)


@pytest.mark.parametrize("url", [f"redis://:{SECRET}@192.0.2.1:6379/0",
                                 "rediss://user@192.0.2.1:6380/0", "redis://staging.example:1/0",
                                 "redis://[2001:db8::1]:6379/0", "redis://10.1.2.3:6379/0"])
@pytest.mark.usefixtures("no_connection")
def test_a_non_loopback_host_is_refused_before_any_connection(url: str) -> None:
    t0 = time.monotonic()
    with pytest.raises(StagingError, match="not a loopback") as err:
        _pre(url, "p")
    assert time.monotonic() - t0 < 0.5
    assert "\n" not in str(err.value) and SECRET not in str(err.value)
    # With the flag the check passes and the next step is the connection (refused here).
    with pytest.raises(AssertionError, match="connection was attempted"):
        _pre(url, "p", allow_remote=True)


@pytest.mark.parametrize("url,loop", [
    ("redis://127.0.0.1:1/0", True), ("redis://127.9.8.7:1/0", True),
    ("redis://localhost:1/0", True), ("redis://LOCALHOST:1", True), ("redis://[::1]:1/0", True),
    ("redis://[::ffff:127.0.0.1]:1/0", True), ("unix:///tmp/redis.sock", True),
    ("redis://192.0.2.1:1/0", False), ("redis://0.0.0.0:1/0", False),
    ("redis://localhost.example:1/0", False), ("redis://128.0.0.1:1/0", False)])
def test_what_counts_as_loopback(url: str, loop: bool) -> None:
    assert is_loopback_url(url) is loop


@pytest.mark.parametrize("prefix", ["", "p*", "a:b", "x[y]", "q?", "sp ace", "back\\slash",
                                    "x" * 101])
@pytest.mark.usefixtures("no_connection")
def test_a_prefix_that_is_not_a_safe_token_is_refused(prefix: str) -> None:
    with pytest.raises(StagingError, match="safe token"):
        _pre("redis://127.0.0.1:6379/0", prefix)


def test_the_rate_ceiling() -> None:
    remote = StagingTarget("redis://192.0.2.1:1/0", "p", False, False, remote=True)
    local = StagingTarget("redis://127.0.0.1:1/0", "p", False, False)
    assert RateCeiling.for_target(remote).max_rate == DEFAULT_REMOTE_MAX_RATE == 1000
    assert RateCeiling.for_target(local).max_rate == math.inf
    RateCeiling.for_target(remote).check(1000)
    with pytest.raises(StagingError, match="above the ceiling"):
        RateCeiling.for_target(remote).check(1000.5)
    RateCeiling.for_target(remote, 5000).check(5000)
    with pytest.raises(StagingError, match="ceiling"):
        RateCeiling(50).check(51)
    for bad in (0, -1, float("nan"), True, "10"):
        with pytest.raises(StagingError):
            RateCeiling(bad)  # type: ignore[arg-type]
        with pytest.raises(StagingError):
            RateCeiling(10).check(bad)  # type: ignore[arg-type]


def test_the_command_lists_never_grant_what_a_shared_server_must_not_get() -> None:
    for args in (acl_setuser_args("u", "pw", "p", include_governor=True),
                 acl_setuser_args("u", "pw", "p", include_governor=False)):
        granted = {a[1:].split("|")[0] for a in args if a.startswith("+")}
        assert not granted & {"flushall", "flushdb", "config", "debug", "keys", "shutdown",
                              "acl", "client", "eval", "module", "save", "bgsave", "replicaof"}
        assert args[:6] == ["u", "reset", "on", ">pw", "~p:*", "-@all"]
        assert not any(a.startswith(("&", "allchannels", "allkeys", "~*", "+@")) for a in args)
    assert "evalsha" in GOVERNOR_COMMANDS and "evalsha" not in LOADTEST_COMMANDS
    with pytest.raises(StagingError):
        acl_setuser_args("u", "two words", "p", include_governor=False)
    with pytest.raises(StagingError):
        acl_setuser_args("u", "pw", "p*", include_governor=False)


# --------------------------------------------------------------------------- on the server


def test_unreachable_and_wrong_password_are_one_line_without_the_password(
        staging: EmbeddedRedis, admin: redis.Redis) -> None:
    host, port = staging.address
    user = f"u{uuid.uuid4().hex[:6]}"
    admin.execute_command("ACL", "SETUSER", *acl_setuser_args(user, SECRET, "p",
                                                             include_governor=False))
    try:
        for url in (f"redis://{user}:{SECRET}x@{host}:{port}/0",
                    f"redis://{host}:{port}/0?username={user}&password=wrong{SECRET}"):
            with pytest.raises(StagingError, match="refused the credentials") as err:
                _pre(url, None)
            msg = str(err.value)
            assert "\n" not in msg and SECRET not in msg and "***" in msg, msg
        with socket_closed() as free:
            with pytest.raises(StagingError, match="does not answer") as err:
                _pre(f"redis://:{SECRET}@127.0.0.1:{free}/0", None)
            assert "\n" not in str(err.value) and SECRET not in str(err.value)
    finally:
        admin.execute_command("ACL", "DELUSER", user)


class socket_closed:  # noqa: N801 - used as a context manager
    """A loopback port nothing listens on (bound, then closed)."""

    def __enter__(self) -> int:
        import socket
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        return port

    def __exit__(self, *_exc: object) -> None:
        return None


def test_a_fresh_prefix_is_unused_and_cleanup_removes_only_the_runs_keys(
        staging: EmbeddedRedis, admin: redis.Redis, foreign: set[bytes]) -> None:
    target = _pre(staging.url, None)
    assert target.prefix.startswith("lt-") and not target.owned and not target.remote
    assert target.preexisting == frozenset() and _under(admin, target.prefix) == set()
    c = target.client()
    pipe = c.pipeline(transaction=False)
    for i in range(1234):  # more than one SCAN page and one UNLINK batch
        pipe.set(f"{target.prefix}:k{i}", i)
    pipe.xadd(f"{target.prefix}:stream:apply.plan", {"plan_id": "x"})
    pipe.execute()
    c.close()
    assert cleanup(target) == 1235
    assert _under(admin, target.prefix) == set()
    assert cleanup(target) == 0


@pytest.mark.parametrize("kind,write", [
    ("plans", lambda r, k: r.xadd(k.plans, {"plan_id": "p1"})),
    ("results", lambda r, k: r.xadd(k.results, {"plan_id": "p1", "status": "executed"})),
    ("decisions", lambda r, k: r.xadd(k.events, {"plan_id": "p1", "decision": "PERMIT"})),
    ("positions", lambda r, k: r.hset(k.position("BTCUSDT"), mapping={"position_id": "x"})),
    ("permits", lambda r, k: r.set(k.permit("p1"), "{}")),
    ("keys it did not write", lambda r, k: r.set(f"{k.prefix}:billing:invoice", "1")),
    ("keys it did not write", lambda r, k: r.hset(k.positions, "BTCUSDT", "{}")),
])
@pytest.mark.parametrize("external", [False, True])
def test_a_used_prefix_is_refused_and_its_keys_survive(
        staging: EmbeddedRedis, admin: redis.Redis, foreign: set[bytes], pfx: str, kind: str,
        write: Callable[[redis.Redis, Keys], Any], external: bool) -> None:
    write(admin, Keys(pfx))
    if external and kind in ("plans", "results", "decisions"):
        # The protocol group is there too: entries make it traffic all the same.
        group = {"plans": GROUP_GOVERNOR, "results": GROUP_GOVERNOR_RESULTS,
                 "decisions": GROUP_APPLY}[kind]
        key = {"plans": Keys(pfx).plans, "results": Keys(pfx).results,
               "decisions": Keys(pfx).events}[kind]
        admin.xgroup_create(key, group, id="$")
    mine = _under(admin, pfx)
    before = _snapshot(admin, mine)
    with pytest.raises(StagingError) as err:
        _pre(staging.url, pfx, external_governor=external)
    msg = str(err.value)
    assert f"holds {kind}" in msg and pfx in msg and "\n" not in msg, msg
    assert _snapshot(admin, mine) == before
    # Declared the load test's: accepted, and its cleanup keeps what was there.
    target = _pre(staging.url, pfx, external_governor=external, owned_prefix=True)
    assert target.owned and target.preexisting == frozenset(mine)
    run = target.client()
    run.set(f"{pfx}:gov:decision:mine", "1")
    streams = {key for key in mine if admin.type(key) == b"stream"}
    entries = {key: admin.xrange(key) for key in streams}
    groups = {key: _groups_of(admin, key) for key in streams}
    for key in streams:  # the run adds entries and a group to a stream that was there
        run.xadd(key, {"plan_id": "run-1"})
        run.xgroup_create(key, "lt-extra", id="0")
    run.close()
    assert cleanup(target) == 1
    # A stream that was there keeps its entries and groups; not its bytes: its last id moved.
    assert {key: admin.xrange(key) for key in streams} == entries
    assert {key: _groups_of(admin, key) for key in streams} == groups
    plain = mine - streams
    assert _snapshot(admin, plain) == {k: before[k] for k in plain}
    assert _under(admin, pfx) == mine
    admin.unlink(*mine)


def _groups_of(c: redis.Redis, key: bytes) -> list[tuple[Any, ...]]:
    """Groups as the run could change them (7.x adds lag / entries-read, which an XADD moves)."""
    return [(g["name"], g["consumers"], g["pending"], g["last-delivered-id"])
            for g in c.xinfo_groups(key)]


def _start_governor(url: str, prefix: str, consumer: str, log_path: Path
                    ) -> subprocess.Popen[bytes]:
    env = dict(os.environ, REDIS_URL=url, GOVERNOR_PREFIX=prefix, GOVERNOR_CONSUMER=consumer,
               GOVERNOR_LOG_LEVEL="INFO")
    with log_path.open("wb") as log_file:
        return subprocess.Popen([sys.executable, "-m", "governor_ref", "run"], env=env,
                                stdin=subprocess.DEVNULL, stdout=log_file,
                                stderr=subprocess.STDOUT)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _operator_inputs(c: redis.Redis, k: Keys, symbols: list[str]) -> None:
    """What the load test's operator writes before governors start (as in chaos.runner)."""
    pipe = c.pipeline()
    pipe.hset(k.config, mapping=GovernorConfig().to_hash())
    pipe.set(k.regime, "BASE")
    pipe.set(k.capital, "10000")
    pipe.set(k.exposure_pct, "0")
    for s in symbols:
        pipe.set(k.allocation(s), '{"allocation_pct": 0.25}')
    pipe.execute()
    try:
        c.xgroup_create(k.plans, GROUP_GOVERNOR, id="0", mkstream=True)
    except redis.ResponseError as exc:
        assert "BUSYGROUP" in str(exc)


def _plans(c: redis.Redis, k: Keys, n: int, tag: str) -> list[str]:
    now = str(int(time.time() * 1000))
    ids = []
    pipe = c.pipeline(transaction=False)
    for i in range(n):
        pid = f"{tag}-{i}"
        ids.append(pid)
        fields = {"plan_id": pid, "symbol": f"S{i % 6:02d}USDT", "action": "OPEN",
                  "side": "LONG", "notional": "100", "source": "intent_bridge",
                  "intent_created_at_ms": now}
        if i % 5 == 4:  # duplicate closes and a malformed plan, as the task mix has
            fields = {"plan_id": pid, "symbol": "S00USDT", "action": "CLOSE",
                      "source": "exit_monitor", "intent_created_at_ms": now}
        if i == n - 1:
            fields = {"plan_id": pid, "symbol": "bad symbol", "action": "FLY"}
        pipe.xadd(k.plans, fields)
    pipe.execute()
    return ids


def _decided(c: redis.Redis, k: Keys, ids: list[str]) -> dict[str, str]:
    out = {}
    for _i, f in c.xrange(k.events):
        if f.get("decision") in ("PERMIT", "BLOCK"):
            out[f["plan_id"]] = f["decision"]
    return out if set(ids) <= set(out) else {}


def test_an_external_governor_that_does_not_serve_there_is_refused(
        staging: EmbeddedRedis, admin: redis.Redis, pfx: str) -> None:
    """``--external-governor`` on a prefix where no governor serves (a wrong prefix, a
    governor not running) is refused before anything starts: a run there would judge a
    governor that never saw its plans. Its group on the plan stream is what says one
    serves (every governor creates it when it starts)."""
    k = Keys(pfx)
    with pytest.raises(StagingError, match="no governor serves there") as err:
        _pre(staging.url, pfx, external_governor=True)
    assert k.plans in str(err.value) and "\n" not in str(err.value)
    admin.xgroup_create(k.results, GROUP_GOVERNOR_RESULTS, id="$", mkstream=True)
    with pytest.raises(StagingError, match="no governor serves there"):
        _pre(staging.url, pfx, external_governor=True)  # another group is not enough
    admin.xgroup_create(k.plans, GROUP_GOVERNOR, id="$", mkstream=True)
    try:
        assert _pre(staging.url, pfx, external_governor=True).external_governor
    finally:
        admin.delete(k.plans, k.results)


def test_an_external_governors_idle_keys_are_accepted_and_kept(
        staging: EmbeddedRedis, admin: redis.Redis, foreign: set[bytes], pfx: str,
        tmp_path: Path) -> None:
    k = Keys(pfx)
    user = f"lt-{uuid.uuid4().hex[:6]}"
    admin.execute_command("ACL", "LOG", "RESET")
    admin.hset(k.config, mapping=GovernorConfig().to_hash())  # its deployer wrote it
    gov = _start_governor(staging.url, pfx, "ext-1", tmp_path / "gov.log")
    try:
        wait_for(lambda: admin.exists(k.plans, k.results, k.last_seen) == 3, 15,
              "the external governor's streams")
        idle = _under(admin, pfx)
        assert {x.decode() for x in idle} == {k.config, k.plans, k.results, k.last_seen}
        # The harness side runs as a user limited to LOADTEST_COMMANDS (the governor is
        # someone else's, with its own credentials): preflight, run and cleanup included.
        host, port = staging.address
        admin.execute_command("ACL", "SETUSER", *acl_setuser_args(user, SECRET, pfx,
                                                                 include_governor=False))
        url = f"redis://{user}:{SECRET}@{host}:{port}/0"
        with pytest.raises(StagingError, match="holds"):
            _pre(url, pfx)
        with pytest.raises(StagingError, match="needs its prefix|give it"):
            _pre(url, None, external_governor=True)
        target = _pre(url, pfx, external_governor=True)
        assert target.external_governor and not target.owned
        assert target.preexisting == frozenset(idle)
        config_before = admin.dump(k.config)
        # The run: what a load test starts beside an external governor (apply layer and
        # exchange), plans, decisions, results.
        c = target.client()
        _operator_inputs_missing_only(c, k, [f"S{i:02d}USDT" for i in range(6)])
        layer = ApplyLayer(target.url, k, Exchange.create(tmp_path / "l.db", capital=10_000),
                           FAST)
        layer.start_thread()
        assert layer.started.wait(10)
        try:
            ids = _plans(c, k, 10, "ext")
            wait_for(lambda: _decided(c, k, ids), 15, "decisions")
            wait_for(lambda: c.xlen(k.results) > 0, 10, "results")
        finally:
            layer.stop()
        c.close()
        removed = cleanup(target)
        assert removed > 5
        left = _under(admin, pfx)
        assert left == idle, left ^ idle
        assert admin.dump(k.config) == config_before
        assert admin.xlen(k.plans) == 0 and admin.xlen(k.results) == 0
        assert [g["name"] for g in admin.xinfo_groups(k.plans)] == [GROUP_GOVERNOR.encode()]
        assert [g["name"] for g in admin.xinfo_groups(k.results)] == [
            GROUP_GOVERNOR_RESULTS.encode()]
        assert gov.poll() is None, "the external governor kept running"
    finally:
        _stop(gov)
        admin.unlink(*_under(admin, pfx))
        log = admin.execute_command("ACL", "LOG")
        admin.execute_command("ACL", "DELUSER", user)
    assert b"NOPERM" not in (tmp_path / "gov.log").read_bytes()
    assert {o for o in map(lambda e: _field(e, "object"), log) if not o.startswith("client")} \
        == set(), log


def _operator_inputs_missing_only(c: redis.Redis, k: Keys, symbols: list[str]) -> None:
    """Beside an external governor the load test writes the inputs its deployer did not
    (here: not the config)."""
    c.set(k.regime, "BASE")
    c.set(k.capital, "10000")
    for s in symbols:
        c.set(k.allocation(s), '{"allocation_pct": 0.25}')


def test_the_acl_limited_user_suffices_for_a_small_load_test(
        staging: EmbeddedRedis, admin: redis.Redis, foreign: set[bytes], pfx: str,
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    host, port = staging.address
    user = f"lt-{uuid.uuid4().hex[:6]}"
    admin.execute_command("ACL", "LOG", "RESET")
    admin.execute_command("ACL", "SETUSER", *acl_setuser_args(user, SECRET, pfx,
                                                             include_governor=True))
    url = f"redis://{user}:{SECRET}@{host}:{port}/0"
    gov: subprocess.Popen[bytes] | None = None
    try:
        target = preflight(url, pfx, allow_remote=False, external_governor=False,
                           owned_prefix=False)
        k = target.keys
        c = target.client()
        assert c.info("server")["redis_version"]
        _operator_inputs(c, k, [f"S{i:02d}USDT" for i in range(6)])
        gov = _start_governor(url, pfx, "g1", tmp_path / "gov.log")
        wait_for(lambda: any(x["name"] == "g1" for x in c.xinfo_consumers(k.plans, GROUP_GOVERNOR))
              or gov.poll() is not None, 15, "the governor's consumer")
        assert gov.poll() is None, (tmp_path / "gov.log").read_text()
        layer = ApplyLayer(url, k, Exchange.create(tmp_path / "l.db", capital=10_000), FAST)
        layer.start_thread()
        assert layer.started.wait(10)
        try:
            ids = _plans(c, k, 20, "acl")
            # The reader follows the events stream without a group, as the Locust one does.
            cursor = c.xinfo_stream(k.plans)["first-entry"][0]
            assert c.xread({k.events: "0"}, count=100, block=2000)
            assert cursor
            decided = wait_for(lambda: _decided(c, k, ids), 15, "decisions")
            assert "PERMIT" in decided.values() and "BLOCK" in decided.values()
            wait_for(lambda: c.xlen(k.results) > 0, 10, "results")
            wait_for(lambda: c.xpending(k.events, GROUP_APPLY)["pending"] == 0, 10, "apply acks")
            assert c.xrevrange(k.results, count=1)
            assert wait_for(lambda: c.exists(k.position("S00USDT"))
                         or c.exists(k.position("S01USDT")), 5, "the mirror")
        finally:
            layer.stop()
        _stop(gov)
        assert cleanup(target) > 10
        assert _under(admin, pfx) == set()
        # The whole run, preflight and cleanup included, was refused nothing but redis-py's
        # optional CLIENT SETINFO on connect (CLIENT as a whole is not granted on purpose;
        # redis-py ignores the refusal).
        run_log = admin.execute_command("ACL", "LOG")
        assert {_field(e, "object") for e in run_log if not
                _field(e, "object").startswith("client")} == set(), run_log
        # Forbidden for this user: the commands a load test never sends, and other keys.
        for cmd in (["FLUSHALL"], ["FLUSHDB"], ["CONFIG", "GET", "*"], ["KEYS", "*"],
                    ["DEBUG", "SLEEP", "0"], ["SHUTDOWN", "NOSAVE"], ["EVAL", "return 1", "0"],
                    ["GET", next(iter(foreign)).decode()], ["SET", "elsewhere", "1"]):
            with pytest.raises(redis.ResponseError) as refusal:
                c.execute_command(*cmd)
            # Redis 7 refuses DEBUG by configuration (enable-debug-command) before the ACL.
            assert isinstance(refusal.value, redis.exceptions.NoPermissionError) or (
                cmd[0] == "DEBUG" and "not allowed" in str(refusal.value)), refusal.value
        c.close()
        assert admin.get("elsewhere") is None
    finally:
        if gov is not None:
            _stop(gov)
        admin.execute_command("ACL", "DELUSER", user)
    gov_log = (tmp_path / "gov.log").read_text()
    assert "NOPERM" not in gov_log and "Traceback" not in gov_log, gov_log
    assert not [r for r in caplog.records if "NOPERM" in r.getMessage()]


def _field(entry: Any, name: str) -> str:
    pairs = dict(zip(entry[::2], entry[1::2], strict=True)) if isinstance(entry, list) else entry
    value = pairs.get(name.encode(), pairs.get(name, b""))
    return value.decode() if isinstance(value, bytes) else str(value)


# --------------------------------------------------------------------------- own executor


def _ext_governor(cmd: list[str], url: str, prefix: str, log_path: Path
                  ) -> subprocess.Popen[bytes]:
    env = dict(os.environ, REDIS_URL=url, GOVERNOR_PREFIX=prefix, GOVERNOR_CONSUMER="ext-1")
    with log_path.open("wb") as log_file:
        return subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=log_file,
                                stderr=subprocess.STDOUT)


@pytest.mark.timeout(150)
@pytest.mark.parametrize("governor", ["reference", "trivial"])
def test_own_executor_judges_without_a_ledger(
        staging: EmbeddedRedis, admin: redis.Redis, foreign: set[bytes], pfx: str,
        tmp_path: Path, governor: str) -> None:
    """``--external-governor --own-executor`` on a staging Redis where a governor and the
    system's own executor (an apply layer started here, as the staging system would run
    it) already serve on the prefix: the load test starts neither an apply layer nor an
    exchange, measures decisions, skips the checks that need the ledger and is never
    VALID: UNKNOWN (exit 2) when the checks it ran held (the reference), INVALID (exit 1)
    when one did not (the trivial governor permits stale plans: fresh_intent)."""
    from test_loadtest import ROOT, _locust

    k = Keys(pfx)
    admin.hset(k.config, mapping=GovernorConfig().to_hash())  # its deployer wrote it
    cmd = [sys.executable, "-m", "governor_ref", "run"] if governor == "reference" else \
        [sys.executable, str(ROOT / "loadtests" / "trivial_governor.py")]
    gov = _ext_governor(cmd, staging.url, pfx, tmp_path / "gov.log")
    executor = ApplyLayer(staging.url, k, Exchange.create(tmp_path / "own.db", capital=10_000),
                          FAST)
    try:
        wait_for(lambda: admin.exists(k.plans) and (governor == "trivial" or admin.exists(
            k.results, k.last_seen) == 2), 15, "the external governor's keys")
        executor.start_thread()
        assert executor.started.wait(10)
        kept = _under(admin, pfx)
        p = _locust(tmp_path, "--redis-url", staging.url, "--prefix", pfx,
                    "--external-governor", "--own-executor", "--rate", "100",
                    "--mix", "open=60,close=20,stale=20", seconds=3)
        out = p.stdout + p.stderr
        assert gov.poll() is None, (tmp_path / "gov.log").read_text()[-2000:]
    finally:
        executor.stop()
        _stop(gov)
    run = tmp_path / "run"
    assert (run / "results.json").exists(), out[-3000:]
    results = json.loads((run / "results.json").read_text())
    inv = results["invariants"]
    for name in ("slots", "one_position_per_symbol", "single_close", "capital", "liveness"):
        assert inv[name]["valid"] == "unknown" and "skipped" in inv[name]["note"], inv[name]
    assert inv["one_decision"]["valid"] is True and inv["protocol"]["valid"] is True
    cov = results["coverage"]
    assert cov["plans_sent"] > 150 and cov["permits"] > 0
    assert any("own executor" in w for w in cov["not_exercised"]), cov
    assert "with its own executor" in out
    assert not list((run / "history").glob("apply-*.jsonl"))  # no apply layer of ours
    assert Exchange(run / "ledger.sqlite").orders() == []
    assert executor.exchange.orders(), "the system's executor executed the permits"
    meta = json.loads((run / "run.json").read_text())
    assert meta["own_executor"] is True and meta["loadtest"]["own_executor"] is True
    if governor == "reference":
        assert p.returncode == 2, out[-4000:]
        assert results["valid"] == "unknown" and inv["fresh_intent"]["valid"] is True
        assert "verdict: UNKNOWN" in out
    else:
        assert p.returncode == 1, out[-4000:]
        assert results["valid"] is False and inv["fresh_intent"]["valid"] is False
    # Cleanup removed what the run wrote: its plans and the inputs it added. The system
    # (its governor and executor ran until now) may still have reacted to the run's last
    # permits after that: its mirror, results and private keys are its own state.
    left = {x.decode()[len(pfx) + 1:] for x in _under(admin, pfx) - kept}
    assert admin.xlen(k.plans) == 0
    assert not {x for x in left if x.startswith(("slots:", "portfolio:capital",
                                                 "capital:allocation:"))}, left
    admin.unlink(*_under(admin, pfx))

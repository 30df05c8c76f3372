"""Staging safety for load tests: a shared Redis is someone else's server.

A load test aimed at a staging Redis shares it with other systems, possibly with a
governor that already serves there. Everything here exists so that the run cannot
damage them:

* :func:`preflight` refuses, before the first write, a URL that is malformed, a
  non-loopback host without an explicit flag (checked before any connection), a
  server that does not answer or refuses the credentials, and a prefix that already
  holds plans, results, positions or any key the run did not write (live traffic),
  apart from what an idle external governor leaves (see :data:`EXTERNAL_GOVERNOR_KEYS`).
  Every refusal is one line, with the password masked.
* :func:`cleanup` removes only the keys this run created under its prefix, found by
  ``SCAN MATCH <prefix>:*`` (never ``KEYS``, which blocks a shared server), and keeps
  every key that was there at preflight (an external governor's streams, groups and
  config), minus the stream entries and groups the run added to them.
* :data:`LOADTEST_COMMANDS` / :data:`GOVERNOR_COMMANDS` list every command the load
  test and the governor it starts may send, and :func:`acl_setuser_args` turns them
  into a least-privilege ACL user limited to ``~<prefix>:*``. Running the load test as
  that user proves the list (the tests do): a command outside it is refused NOPERM.
  Nothing here ever sends FLUSHALL, FLUSHDB, CONFIG, DEBUG, KEYS or SHUTDOWN.
* :class:`RateCeiling` caps the plan rate asked of a remote server.

See docs/staging.md for the user-facing rules.
"""

from __future__ import annotations

import ipaddress
import math
import re
import secrets
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from chaos.redis_servers import check_url, redact_url
from governor_ref.keys import GROUP_APPLY, GROUP_GOVERNOR, GROUP_GOVERNOR_RESULTS, Keys


class StagingError(ValueError):
    """A staging rule refused the run; the message is one line naming what is wrong
    (never the password), so the CLI can print it and exit 254 before anything starts."""


# --------------------------------------------------------------------------- commands

# Harness side. Names are lower case, as ACL rules and COMMAND INFO spell them;
# ``cmd|sub`` grants one subcommand only.
LOADTEST_COMMANDS: tuple[str, ...] = (
    # every client: liveness check at preflight and in health checks; SELECT when the
    # URL names a database other than 0 (redis-py sends it on connect)
    "ping", "select",
    # run.json records the server version (INFO server), as `chaos run` does; read-only
    "info",
    # operator inputs (config, regime, capital, allocations) and the plan group the
    # harness creates before governors start (XGROUP CREATE ... MKSTREAM)
    "hset", "set", "get", "hgetall", "exists", "xgroup|create",
    # producers: XADD plans; their view of positions and regime (HGETALL, GET) in a
    # pipeline without MULTI
    "xadd",
    # decision reader (one per process), recorder, liveness probe: follow the streams
    # without a group; stream length and last id
    "xread", "xrange", "xrevrange", "xlen", "xinfo|stream",
    # supervisor readiness (consumer listed in group `governor`, pending entries)
    "xinfo|groups", "xinfo|consumers", "xpending",
    # apply layer: group `apply` on the events stream, reclaim from a dead consumer,
    # single-use permits (GETDEL), result + ack in one MULTI/EXEC
    "xreadgroup", "xautoclaim", "xack", "getdel", "multi", "exec", "discard",
    # exchange mirror: rewrite P:position:* (SCAN, DEL, HSET) and exposure (SET), in MULTI
    "scan", "del",
    # preflight and cleanup: classify keys, remove this run's keys in batches, take the
    # run's entries and groups out of streams that existed before it
    "type", "unlink", "xdel", "xgroup|destroy",
)

# The reference governor (`python -m governor_ref run`), and its seed/legacy variants.
GOVERNOR_COMMANDS: tuple[str, ...] = (
    # stream loop (governor_ref/governor.py): groups `governor` / `governor-results`
    # created with MKSTREAM, own pending entries first, then new ones, reclaim idle ones
    "xgroup|create", "xreadgroup", "xautoclaim", "xack", "ping", "select",
    # reference: every decision is one Lua script, called by SHA and loaded on NOSCRIPT
    # (after a restart or failover the script cache is empty); reconcile SCANs the mirror
    "evalsha", "script|load", "scan",
    # what the scripts call (governor_ref/lua/*.lua): ACL checks these too
    "get", "set", "del", "exists", "incr", "time",
    "hget", "hset", "hdel", "hexists", "hgetall", "hkeys", "hlen", "hmget", "hvals",
    "zadd", "zrange", "zrangebyscore", "zrem", "xadd",
    # seed and legacy variants (governor_ref/seed.py, decisions.py): one command per step
    "decr", "decrby", "incrby", "pexpire", "setnx",
)

FORBIDDEN_COMMANDS: frozenset[str] = frozenset(
    {"flushall", "flushdb", "config", "debug", "keys", "shutdown"})
"""Never sent by a load test and never granted by :func:`acl_setuser_args`."""

assert not FORBIDDEN_COMMANDS & {c.split("|")[0] for c in LOADTEST_COMMANDS + GOVERNOR_COMMANDS}


# --------------------------------------------------------------------------- names

_PREFIX_RE = re.compile(r"[A-Za-z0-9_.{}-]{1,100}")
"""A prefix is a safe token: no glob character (``* ? [ ] \\``) can widen SCAN MATCH, and
no ':' so that ``P:*`` is the whole namespace and nothing else."""

_USERNAME_RE = re.compile(r"[A-Za-z0-9_.@-]{1,64}")

DEFAULT_REMOTE_MAX_RATE = 1000.0
"""Plans/s allowed against a non-loopback Redis unless the caller sets another ceiling:
a shared staging server must not be saturated by a load test by accident."""


def check_prefix(prefix: str) -> str:
    """``prefix`` if it is a safe token, else :class:`StagingError`."""
    if not isinstance(prefix, str) or not _PREFIX_RE.fullmatch(prefix):
        raise StagingError(
            f"prefix {prefix!r} is not a safe token: use 1-100 letters, digits and _-.{{}} "
            f"(no ':' and no glob character, so SCAN MATCH '<prefix>:*' matches only it)")
    return prefix


def acl_setuser_args(username: str, password: str, prefix: str, *,
                     include_governor: bool) -> list[str]:
    """Arguments of ``ACL SETUSER`` (username first) for a least-privilege load-test user.

    ``r.execute_command("ACL", "SETUSER", *acl_setuser_args(...))``; on redis-cli,
    ``ACL SETUSER`` followed by the same words. The user starts from ``reset`` (no
    password, no keys, no channels, no commands), is given ``password``, the keys
    ``~<prefix>:*`` only, and :data:`LOADTEST_COMMANDS` (plus :data:`GOVERNOR_COMMANDS`
    with ``include_governor``, when the load test starts the governor as this user).
    No pub/sub channel is granted: nothing uses one.
    """
    if not _USERNAME_RE.fullmatch(username or ""):
        raise StagingError(f"username {username!r}: use 1-64 letters, digits and _.@-")
    if not password or any(ch.isspace() for ch in password):
        raise StagingError("the ACL user needs a non-empty password without whitespace")
    check_prefix(prefix)
    commands = list(dict.fromkeys(
        LOADTEST_COMMANDS + (GOVERNOR_COMMANDS if include_governor else ())))
    return [username, "reset", "on", f">{password}", f"~{prefix}:*", "-@all",
            *(f"+{c}" for c in commands)]


# --------------------------------------------------------------------------- hosts


def is_loopback_url(url: str) -> bool:
    """True for a unix socket, ``localhost``, 127.0.0.0/8 and ::1 (also IPv4-mapped).

    No DNS lookup: a name other than ``localhost`` counts as remote, whatever it resolves
    to, so the check needs no network and cannot be fooled by a resolver.
    """
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return True
    host = (parts.hostname or "").lower()
    if host == "localhost":
        return True
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_loopback


def _secrets_of(url: str) -> list[str]:
    """Every password the URL carries, to scrub from server and client error messages."""
    try:
        parts = urlsplit(url)
        found = [parts.password or ""]
        found += [v for k, vs in parse_qs(parts.query).items() if "pass" in k.lower()
                  for v in vs]
    except ValueError:
        return []
    return [s for s in found if s]


def _one_line(exc: BaseException, url: str) -> str:
    msg = " ".join(str(exc).split()) or type(exc).__name__
    for secret in _secrets_of(url):
        msg = msg.replace(secret, "***")
    return msg


# --------------------------------------------------------------------------- target


@dataclass(frozen=True)
class StreamMark:
    """A stream that existed at preflight: its last id and groups then, so that cleanup
    removes only the entries and groups the run added."""

    last_id: str
    groups: frozenset[str]


EXTERNAL_GOVERNOR_KEYS: dict[str, str] = {
    "stream:apply.plan": "stream",
    "stream:apply.result": "stream",
    "stream:governor.events": "stream",
    "governor:config": "hash",
    "gov:last_seen": "string",
}
"""What an idle external governor leaves under ``P``, accepted with ``external_governor``
(suffix after ``P:`` -> type). Measured on the reference: its start creates the plan and
result streams empty with groups ``governor`` / ``governor-results`` (XGROUP CREATE
MKSTREAM) and its reconcile writes ``P:gov:last_seen``; the config hash is written by whoever
deployed it (the protocol: before governors start). The events stream is accepted when
empty, with at most the group ``apply`` of the system's own executor. Each stream must be
empty and carry only its protocol group: an entry is traffic."""

OWN_EXECUTOR_KEYS: dict[str, str] = {"portfolio:exposure_pct": "string"}
"""What an idle executor of the system under test leaves besides (with ``own_executor``):
the exposure it keeps current (the protocol's inputs table); its group ``apply`` on the
events stream is accepted with the governor's keys. Positions are state: refused."""

_STREAM_GROUPS: dict[str, frozenset[str]] = {
    "stream:apply.plan": frozenset({GROUP_GOVERNOR}),
    "stream:apply.result": frozenset({GROUP_GOVERNOR_RESULTS}),
    "stream:governor.events": frozenset({GROUP_APPLY}),
}


@dataclass
class StagingTarget:
    """A Redis that preflight accepted, and the prefix the run writes under.

    ``owned``: the caller declared the prefix the load test's (``owned_prefix``): keys
    found there were accepted. ``external_governor``: a governor already serves on the
    prefix. In both cases the keys found at preflight (``preexisting``) are kept by
    :func:`cleanup`. ``remote``: the host is not loopback (sets the default rate ceiling).
    """

    url: str
    prefix: str
    owned: bool
    external_governor: bool
    remote: bool = False
    preexisting: frozenset[bytes] = frozenset()
    streams: dict[bytes, StreamMark] = field(default_factory=dict)

    @property
    def namespace(self) -> str:
        """Every key of the run starts with this (``prefix:``)."""
        return f"{self.prefix}:"

    @property
    def keys(self) -> Keys:
        """The protocol's key names under :attr:`prefix`."""
        return Keys(self.prefix)

    @property
    def shown_url(self) -> str:
        """The URL with its password masked, for logs and run.json."""
        return redact_url(self.url)

    def client(self, **kw: Any) -> redis.Redis:
        """A ``decode_responses`` client of the target; keyword arguments override."""
        opts: dict[str, Any] = {"decode_responses": True}
        opts.update(kw)
        return redis.Redis.from_url(self.url, **opts)


def _admin(url: str) -> redis.Redis:
    """Bytes, short timeouts, no retries: preflight must fail fast and see raw key names."""
    return redis.Redis.from_url(url, decode_responses=False, socket_timeout=5,
                                socket_connect_timeout=5, retry=Retry(NoBackoff(), 0))


def _scan(c: redis.Redis, prefix: str, count: int = 1000) -> Any:
    return c.scan_iter(match=f"{prefix}:*", count=count)


def _show(key: bytes) -> str:
    return key.decode("utf-8", "backslashreplace")


def _kind(suffix: str) -> str:
    """What a key under the prefix tells about traffic, for the refusal message."""
    if suffix == "stream:apply.plan":
        return "plans"
    if suffix == "stream:apply.result":
        return "results"
    if suffix == "stream:governor.events":
        return "decisions"
    if suffix.startswith("position:"):
        return "positions"
    if suffix.startswith("permit:"):
        return "permits"
    return "keys it did not write"


def _groups(c: redis.Redis, key: bytes) -> frozenset[str]:
    return frozenset(g["name"].decode() if isinstance(g["name"], bytes) else str(g["name"])
                     for g in c.xinfo_groups(key))


def preflight(url: str, prefix: str | None, *, allow_remote: bool, external_governor: bool,
              owned_prefix: bool, own_executor: bool = False) -> StagingTarget:
    """Check that a load test may run on ``url`` under ``prefix``; raise :class:`StagingError`.

    In order, so that the cheap, offline checks refuse before anything connects: the URL's
    form, the prefix's form, a non-loopback host without ``allow_remote``; then PING
    (unreachable, wrong password); then the prefix. ``prefix=None`` picks a fresh
    ``lt-<hex>`` nobody uses. A given prefix must hold nothing, unless ``owned_prefix``
    (anything is accepted and kept) or ``external_governor`` (exactly what an idle
    governor leaves: :data:`EXTERNAL_GOVERNOR_KEYS`, and with ``own_executor`` what its
    idle executor leaves: :data:`OWN_EXECUTOR_KEYS`). Keys are found with SCAN, never KEYS.
    """
    shown = redact_url(url)
    try:
        check_url(url)
    except ValueError as exc:
        raise StagingError(str(exc)) from None
    if prefix is not None:
        check_prefix(prefix)
    elif external_governor:
        raise StagingError("an external governor serves on a known prefix: give it (--prefix)")
    remote = not is_loopback_url(url)
    if remote and not allow_remote:
        raise StagingError(f"{shown} is not a loopback address; a load test on a shared server "
                           f"needs the explicit flag (--allow-remote)")
    c = _admin(url)
    try:
        try:
            c.ping()
        except redis.AuthenticationError as exc:
            raise StagingError(f"Redis at {shown} refused the credentials: "
                               f"{_one_line(exc, url)}") from None
        except (redis.RedisError, OSError) as exc:
            raise StagingError(f"Redis at {shown} does not answer: "
                               f"{_one_line(exc, url)}") from None
        try:
            if prefix is None:
                return _fresh(c, url, remote)
            return _given(c, url, prefix, remote, external_governor, owned_prefix,
                          own_executor)
        except redis.RedisError as exc:
            raise StagingError(f"Redis at {shown}: preflight failed: "
                               f"{_one_line(exc, url)}") from None
    finally:
        c.close()


def _fresh(c: redis.Redis, url: str, remote: bool) -> StagingTarget:
    for _ in range(5):
        prefix = f"lt-{secrets.token_hex(6)}"
        if next(iter(_scan(c, prefix)), None) is None:
            return StagingTarget(url, prefix, owned=False, external_governor=False,
                                 remote=remote)
    raise StagingError(f"no unused lt-<hex> prefix found on {redact_url(url)} in 5 tries")


def _given(c: redis.Redis, url: str, prefix: str, remote: bool, external_governor: bool,
           owned_prefix: bool, own_executor: bool = False) -> StagingTarget:
    ns = f"{prefix}:".encode()
    found: set[bytes] = set()
    allowed = {**(EXTERNAL_GOVERNOR_KEYS if external_governor else {}),
               **(OWN_EXECUTOR_KEYS if external_governor and own_executor else {})}
    for key in _scan(c, prefix):
        if not key.startswith(ns):  # SCAN MATCH cannot widen a safe token; checked anyway
            continue
        found.add(key)
        suffix = _show(key[len(ns):])
        if not owned_prefix and suffix not in allowed:
            _refuse(url, prefix, key, suffix)
    streams: dict[bytes, StreamMark] = {}
    for key in sorted(found):
        suffix = _show(key[len(ns):])
        kind = _show(c.type(key))
        if not owned_prefix and kind != allowed[suffix]:
            raise StagingError(f"prefix {prefix!r} on {redact_url(url)}: {_show(key)} is a "
                               f"{kind}, not the {allowed[suffix]} a governor leaves")
        if kind != "stream":
            continue
        info = c.xinfo_stream(key)
        groups = _groups(c, key)
        if not owned_prefix:
            if int(info["length"]) > 0:
                _refuse(url, prefix, key, suffix, f" ({info['length']} entries)")
            extra = groups - _STREAM_GROUPS[suffix]
            if extra:
                raise StagingError(f"prefix {prefix!r} on {redact_url(url)}: {_show(key)} has "
                                   f"group(s) {sorted(extra)} that no idle governor creates")
        last = info["last-generated-id"]
        streams[key] = StreamMark(last.decode() if isinstance(last, bytes) else str(last),
                                  groups)
    plans = Keys(prefix).plans.encode()
    if external_governor and not owned_prefix and (
            plans not in streams or GROUP_GOVERNOR not in streams[plans].groups):
        # Every governor reads its plans as group `governor` and creates it when it starts
        # (the protocol): without it nothing serves here, and a run would judge a governor
        # that never saw its plans.
        raise StagingError(
            f"prefix {prefix!r} on {redact_url(url)}: no governor serves there "
            f"({plans.decode()} has no consumer group {GROUP_GOVERNOR!r}, which every "
            f"governor creates when it starts): is the prefix right, is the governor running?")
    return StagingTarget(url, prefix, owned=owned_prefix, external_governor=external_governor,
                         remote=remote, preexisting=frozenset(found), streams=streams)


def _refuse(url: str, prefix: str, key: bytes, suffix: str,
            detail: str = "") -> None:
    raise StagingError(
        f"prefix {prefix!r} on {redact_url(url)} holds {_kind(suffix)} (e.g. {_show(key)}"
        f"{detail}): live traffic or another system's; omit the prefix for a fresh one, or "
        f"declare it the load test's (--owned-prefix)")


# --------------------------------------------------------------------------- cleanup


def cleanup(target: StagingTarget, *, batch: int = 500) -> int:
    """Remove what this run wrote under the prefix; return the number of keys removed.

    Keys found at preflight are kept; from the streams among them only the entries added
    since (ids above the last id at preflight, XDEL) and the groups created since (XGROUP
    DESTROY) are removed, so an external governor keeps its streams, groups and config.
    Every other key under ``prefix:`` is UNLINKed in batches, found by SCAN. A key outside
    the prefix is never touched: the match is a safe token, and each name is checked again
    before deletion. Call it once the run's writers (and an external governor's work on the
    run's plans) have stopped: what they write afterwards is not seen.
    """
    ns = target.namespace.encode()
    c = _admin(target.url)
    removed = 0
    try:
        todo: list[bytes] = []
        for key in _scan(c, target.prefix, count=batch):
            if not key.startswith(ns) or key in target.preexisting:
                continue
            todo.append(key)
            if len(todo) >= batch:
                removed += int(c.unlink(*todo))
                todo.clear()
        if todo:
            removed += int(c.unlink(*todo))
        for key, mark in target.streams.items():
            _restore_stream(c, key, mark, batch)
    except redis.RedisError as exc:
        raise StagingError(f"cleanup of prefix {target.prefix!r} on {target.shown_url} "
                           f"failed: {_one_line(exc, target.url)}") from None
    finally:
        c.close()
    return removed


def _restore_stream(c: redis.Redis, key: bytes, mark: StreamMark, batch: int) -> None:
    """Take out of a pre-existing stream what the run added: entries, then groups."""
    if c.type(key) != b"stream":
        return  # gone or replaced since preflight: nothing of the original left to keep
    while True:
        ids = [i for i, _f in c.xrange(key, min=f"({mark.last_id}", max="+", count=batch)]
        if not ids:
            break
        c.xdel(key, *ids)
    for name in _groups(c, key) - mark.groups:
        c.xgroup_destroy(key, name)


# --------------------------------------------------------------------------- rate


class RateCeiling:
    """The highest plan rate (plans/s, whole run) a load test may ask of its target.

    Against a non-loopback Redis the default is :data:`DEFAULT_REMOTE_MAX_RATE` (1000
    plans/s): a shared server is protected from a typo in ``--rate``. Against loopback
    there is none (``math.inf``). Either is settable (``--max-rate``).
    """

    def __init__(self, max_rate: float) -> None:
        if isinstance(max_rate, bool) or not isinstance(max_rate, int | float) or \
                math.isnan(max_rate) or max_rate <= 0:
            raise StagingError(f"rate ceiling must be a number > 0 plans/s, got {max_rate!r}")
        self.max_rate = float(max_rate)

    @classmethod
    def for_target(cls, target: StagingTarget, max_rate: float | None = None) -> RateCeiling:
        """``max_rate`` if given, else the default for the target's host."""
        if max_rate is not None:
            return cls(max_rate)
        return cls(DEFAULT_REMOTE_MAX_RATE if target.remote else math.inf)

    def check(self, rate: float) -> None:
        """Raise :class:`StagingError` if ``rate`` plans/s is not a positive number within
        the ceiling."""
        if isinstance(rate, bool) or not isinstance(rate, int | float) or math.isnan(rate) \
                or rate <= 0:
            raise StagingError(f"rate must be a number > 0 plans/s, got {rate!r}")
        if rate > self.max_rate:
            raise StagingError(f"rate {rate:g} plans/s is above the ceiling of "
                               f"{self.max_rate:g} plans/s for this target; raise it "
                               f"explicitly (--max-rate) if the server is meant to take it")

    def __repr__(self) -> str:
        return f"RateCeiling({self.max_rate:g})"

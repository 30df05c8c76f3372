"""Redis connections from a URL, including Sentinel.

``redis://`` and ``rediss://`` URLs go to ``redis.Redis.from_url``. A
Sentinel topology is given as
``redis-sentinel://host1:port1,host2:port2/<master-name>[?db=0]``: the client
asks the sentinels for the current primary, so a governor follows a failover
by reconnecting.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs, urlsplit

import redis
from redis.sentinel import Sentinel

SENTINEL_SCHEME = "redis-sentinel"


def connect(url: str, *, decode_responses: bool = False, **kwargs: Any) -> redis.Redis:
    """A client for ``url``; socket timeouts default to values that notice a paused server."""
    kwargs.setdefault("socket_timeout", 5.0)
    kwargs.setdefault("socket_connect_timeout", 2.0)
    kwargs.setdefault("health_check_interval", 0)
    parts = urlsplit(url)
    if parts.scheme == SENTINEL_SCHEME:
        hosts = []
        for item in parts.netloc.split(","):
            host, _, port = item.rpartition(":")
            hosts.append((host.strip("[]") or "127.0.0.1", int(port or 26379)))
        master = parts.path.strip("/") or "mymaster"
        db = int(parse_qs(parts.query).get("db", ["0"])[0])
        sentinel = Sentinel(hosts, socket_timeout=kwargs["socket_timeout"],
                            socket_connect_timeout=kwargs["socket_connect_timeout"])
        return sentinel.master_for(master, db=db, decode_responses=decode_responses, **kwargs)
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise ValueError(
            f"unsupported Redis URL scheme {parts.scheme!r}: "
            f"use redis://, rediss://, unix:// or {SENTINEL_SCHEME}://h:p,h:p/master"
        )
    return redis.Redis.from_url(url, decode_responses=decode_responses, **kwargs)

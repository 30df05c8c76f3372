"""Staging safety: a url Redis is someone else's server.

- The url provider refuses a prefix that already holds keys (its stop deletes every key
  under its prefix, so taking a used one would delete another system's keys).
- A password in the URL, in any form, is never written: not in run.json, not in the logs,
  not on the terminal.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import redis
from govtools import small_scenario

from chaos import redis_servers as rs
from chaos.importer import masked_url
from chaos.redis_servers import EmbeddedRedis, provide

SECRET = "Sekr1t-pw"


def test_url_provider_refuses_a_prefix_that_holds_keys_and_they_survive(
        redis_server: EmbeddedRedis) -> None:
    other = redis_server.client()
    other.set("billing:a", "1")
    other.hset("billing:h", mapping={"x": "1"})
    other.sadd("billing:s", "m")
    other.rpush("billing:l", "v")
    other.xadd("billing:stream", {"f": "v"})
    other.xgroup_create("billing:stream", "workers", id="0")
    before = sorted(other.keys("*"))
    for prefix in ("billing", "billing:"):
        with pytest.raises(rs.PrefixInUse, match="billing"):
            provide("url", url=redis_server.url, prefix=prefix)
    assert sorted(other.keys("*")) == before
    assert other.xinfo_groups("billing:stream")[0]["name"] == "workers"
    # A prefix that only shares leading characters is another namespace: accepted, and its
    # stop removes only the keys written under it.
    with provide("url", url=redis_server.url, prefix="bill") as mine:
        mine.client().set("bill:k", "1")
    assert sorted(other.keys("*")) == before


def test_url_provider_stop_removes_only_what_the_run_wrote(redis_server: EmbeddedRedis) -> None:
    other = redis_server.client()
    other.set("keep:me", "1")
    with provide("url", url=redis_server.url, prefix="fresh") as mine:
        pipe = mine.client().pipeline()
        for i in range(50):
            pipe.set(f"fresh:k{i}", i)
        pipe.execute()
    assert other.keys("fresh:*") == [] and other.get("keep:me") == "1"


@pytest.mark.parametrize("url", [
    "redis://:{pw}@h:1/0", "redis://user:{pw}@h:1/0", "rediss://user:{pw}@h:6380/0",
    "redis://h:1/0?password={pw}", "redis://h:1/0?db=1&password={pw}&x=1",
    "redis://h/0?sentinel_password={pw}", "redis-sentinel://:{pw}@h1:1,h2:2/gov",
    "redis-sentinel://h1:1,h2:2/gov?password={pw}", "unix:///tmp/r.sock?password={pw}",
    "redis://:{pw}#x@h:1/0",
])
def test_every_form_of_password_is_masked(url: str) -> None:
    u = url.format(pw=SECRET)
    assert SECRET not in rs.redact_url(u)
    assert "***" in rs.redact_url(u)
    assert masked_url(u) == rs.redact_url(u), "the importer uses the same function"


@pytest.fixture
def secured(redis_server: EmbeddedRedis):  # type: ignore[no-untyped-def]
    """The embedded server, with a password (set after start: the provider's own readiness
    check has none); reset before the fixture stops it."""
    admin = redis_server.client()
    admin.config_set("requirepass", SECRET)
    yield redis_server
    admin.execute_command("AUTH", SECRET)
    admin.config_set("requirepass", "")
    admin.close()


@pytest.mark.parametrize("form", ["query", "user", "scenario"])
def test_a_run_writes_no_password(tmp_path: Path, secured: EmbeddedRedis, form: str) -> None:
    """``query``: ``--redis-url ...?password=``; ``user``: ``redis://default:pw@``;
    ``scenario``: the URL in the scenario file's ``[redis]`` table."""
    host, port = secured.address
    url = (f"redis://{host}:{port}/0?password={SECRET}" if form == "query"
           else f"redis://default:{SECRET}@{host}:{port}/0")
    spec = tmp_path / "s.toml"
    extra = f'\n[redis]\nkind = "url"\nurl = "{url}"\n' if form == "scenario" else ""
    spec.write_text(small_scenario("pw", 1.5, extra))
    out = tmp_path / "run"
    url_args = [] if form == "scenario" else ["--redis-url", url]
    p = subprocess.run([sys.executable, "-m", "chaos", "run", "--scenario", str(spec),
                        *url_args, "--out", str(out), "--quiet", "--probe-max-wait", "5"],
                       capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    assert SECRET not in p.stdout + p.stderr
    assert "***" in (out / "run.json").read_text()
    assert (out / "logs" / "harness.log").exists()
    leaks = [str(f.relative_to(out)) for f in out.rglob("*")
             if f.is_file() and SECRET.encode() in f.read_bytes()]
    assert leaks == [], f"the password is written in {leaks}"
    r = redis.Redis(host=host, port=port, password=SECRET)
    assert r.dbsize() == 0, "the run removed its keys (and only its keys)"
    r.close()

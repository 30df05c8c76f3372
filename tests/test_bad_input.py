"""Every bad input is refused before anything starts: exit 254, one line naming the field.

Each case runs the real command line in a fresh working directory and checks that the
answer is one line on stderr naming the field, that it came back fast (no Redis, governor
or producer was started: a run takes seconds just to start those), and that nothing was
created: no ``reports/`` under the working directory and no ``--out`` directory. The
table in docs/harness.md ("Bad inputs and what each gets") lists the same inputs.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from govtools import small_scenario

from chaos import scenario as scn
from chaos.redis_servers import EmbeddedRedis

# Far below what a run needs to start a Redis and governors, far above an interpreter
# start on a busy host.
FAST_S = 5.0


def chaos(cwd: Path, *args: str, timeout: float = 60) -> tuple[subprocess.CompletedProcess[str],
                                                                float]:
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "chaos", *args], capture_output=True, text=True,
                       timeout=timeout, cwd=cwd)
    return p, time.monotonic() - t0


def fault(kind: str, body: str = "", at: float = 0.5) -> str:
    return f'\n[[fault]]\nkind = "{kind}"\nat = {at}\n{body}\n'


# A scenario file: the small test scenario with one thing changed. Fields the small scenario
# already sets are changed by replacing their line.
def sc(extra: str = "", replace: tuple[str, str] | None = None, head: str = "") -> str:
    text = small_scenario("bad", 3, extra)
    if replace is not None:
        assert replace[0] in text
        text = text.replace(replace[0], replace[1])
    return head + text


NAME_LINE = 'name = "small-bad"'
DUR_LINE = "duration_s = 3"
GOV_LINE = "governors = 2"
WL = '[[workload]]\nkind = "open_storm"\nprocesses = 2\nrate = 200'

# (id, scenario text or None for the built-in open-storm, extra args, what the line names)
SCENARIO_CASES = [
    ("fault-param-typo", sc(fault("pause_governor", "durattion = 3")), [],
     "fault[0].durattion"),
    ("fault-target-unknown", sc(fault("pause_governor", 'duration = 1\ntarget = "gov-99"')), [],
     "fault[0].target"),
    ("fault-target-garbage", sc(fault("kill_governor", 'target = "gov-1; rm"')), [],
     "fault[0].target"),
    ("fault-target-after-governors-override",
     sc(fault("kill_governor", 'target = "gov-2"')), ["--governors", "1"], "fault[0].target"),
    ("fault-at-after-the-end", sc(fault("kill_governor", at=30)), [], "fault[0].at"),
    ("fault-duration-inf", sc(fault("pause_governor", "duration = inf")), [],
     "fault[0].duration"),
    ("fault-prob-above-1", sc("[redis]\nproxy = true\n" + fault("drop", "prob = 1.5")), [],
     "fault[0].prob"),
    ("fault-latency-negative", sc("[redis]\nproxy = true\n" +
                                  fault("latency", "latency_ms = -5")), [],
     "fault[0].latency_ms"),
    ("fault-partition-mode", sc("[redis]\nproxy = true\n" +
                                fault("partition", 'mode = "sideways"')), [],
     "fault[0].mode"),
    ("fault-memory-policy", sc(fault("memory_pressure", 'policy = "lol"')), [],
     "fault[0].policy"),
    ("workload-param-typo", sc(replace=(WL, WL + "\nnotional_mn = 3")), [], "notional_mn"),
    ("workload-param-nan", sc(replace=(WL, WL + "\nnotional_min = nan")), [],
     "notional_min"),
    ("workload-param-range", sc('\n[[workload]]\nkind = "stale"\nstale_fraction = 2\n'), [],
     "stale_fraction"),
    ("workload-rate-huge", sc(replace=("rate = 200", "rate = 1e12")), [], "workload[0].rate"),
    ("workload-processes-huge", sc(replace=("processes = 2", "processes = 100000")), [],
     "workload[0].processes"),
    ("duration-nan-in-file", sc(replace=(DUR_LINE, "duration_s = nan")), [], "duration_s"),
    ("duration-inf-in-file", sc(replace=(DUR_LINE, "duration_s = inf")), [], "duration_s"),
    ("governors-huge", sc(replace=(GOV_LINE, "governors = 100000")), [], "governors"),
    ("seed-negative", sc(head="seed = -3\n"), [], "seed"),
    ("capital-negative", sc("[market]\ncapital = -5"), [], "market.capital"),
    ("allocation-negative", sc("[market]\nallocation_pct = -0.1"), [],
     "market.allocation_pct"),
    ("allocation-above-1", sc("[market]\nallocation_pct = 3"), [], "market.allocation_pct"),
    ("initial-positions-huge", sc("[market]\ninitial_positions = 100000000"), [],
     "market.initial_positions"),
    ("initial-positions-above-slots", sc("[market]\ninitial_positions = 5"), [],
     "market.initial_positions"),
    ("latency-negative", sc(replace=("open_latency_ms = 5", "open_latency_ms = -5")), [],
     "apply.open_latency_ms"),
    ("duplicate-prob-above-1", sc(replace=("close_jitter_ms = 10",
                                           "close_jitter_ms = 10\nduplicate_result_prob = 1.5")),
     [], "apply.duplicate_result_prob"),
    ("maxmemory-garbage", sc('[redis]\nmaxmemory = "lots"'), [], "redis.maxmemory"),
    ("name-path", sc(replace=(NAME_LINE, 'name = "../../x"')), [], "name"),
    ("name-slash", sc(replace=(NAME_LINE, 'name = "a/b"')), [], "name"),
    ("redis-url-in-file-scheme", sc('[redis]\nkind = "url"\nurl = "http://h"'), [],
     "redis.url"),
    (None, None, ["--duration", "nan"], "--duration"),
    (None, None, ["--duration", "inf"], "--duration"),
    (None, None, ["--governors", "100000"], "--governors"),
    (None, None, ["--probe-max-wait", "nan"], "--probe-max-wait"),
    (None, None, ["--redis-url", "http://x:1/0"], "--redis-url"),
    (None, None, ["--redis-url", "redis://:pw@127.0.0.1:99999/0"], "--redis-url"),
    (None, None, ["--redis-url", "redis:///0"], "--redis-url"),
    (None, None, ["--redis-url", "redis://h:1/zero"], "--redis-url"),
    (None, None, ["--redis", "embedded", "--redis-url", "redis://127.0.0.1:1/0"],
     "--redis-url"),
    (None, None, ["--governor-cmd", " "], "--governor-cmd"),
    ("redis-kind-url-without-url", sc('[redis]\nkind = "url"'), [], "--redis-url"),
    ("sentinel-on-a-url-redis", sc('[redis]\ntopology = "sentinel"'),
     ["--redis-url", "redis://127.0.0.1:1/0"], "redis.topology"),
]


def _ids() -> list[str]:
    out = []
    for case in SCENARIO_CASES:
        out.append(case[0] or " ".join(case[2]).replace("/", "_"))
    return out


def assert_refused(p: subprocess.CompletedProcess[str], took: float, cwd: Path, field: str,
                   *, out: Path | None = None) -> None:
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 254, p.stdout + p.stderr
    assert len(lines) == 1, p.stderr
    assert field in lines[0], lines[0]
    assert took < FAST_S, f"{took:.1f}s: something started before the refusal"
    assert not (cwd / "reports").exists(), "a run directory was created"
    if out is not None:
        assert not out.exists(), f"{out} was created"
    assert "pw" not in p.stderr.replace("pw@", "")  # a password never reaches the terminal


@pytest.mark.parametrize("name,text,args,field", SCENARIO_CASES, ids=_ids())
def test_chaos_run_refuses(tmp_path: Path, name: str | None, text: str | None,
                           args: list[str], field: str) -> None:
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    if text is None:
        scenario = "open-storm"
    else:
        (cwd / "s.toml").write_text(text)
        scenario = "s.toml"
    out = tmp_path / "out"
    p, took = chaos(cwd, "run", "--scenario", scenario, "--out", str(out), *args)
    assert_refused(p, took, cwd, field, out=out)


def test_a_non_utf8_scenario_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "s.toml").write_bytes(b'name = "t\xff"\n')
    p, took = chaos(tmp_path, "run", "--scenario", "s.toml")
    assert_refused(p, took, tmp_path, "s.toml")


@pytest.mark.parametrize("args,field", [
    (["--redis-url", "http://x:1/0"], "--redis-url"),
    (["--redis", "docker", "--redis-url", "redis://127.0.0.1:1/0"], "--redis-url"),
    (["--seeds", "100000"], "--seeds"),
], ids=["scheme", "redis-embedded-with-url", "seeds-huge"])
def test_chaos_suite_refuses(tmp_path: Path, args: list[str], field: str) -> None:
    p, took = chaos(tmp_path, "suite", "--quick", *args)
    assert_refused(p, took, tmp_path, field)


def test_chaos_suite_refuses_an_out_that_holds_a_suite(tmp_path: Path) -> None:
    out = tmp_path / "suite"
    (out / "open-storm" / "history").mkdir(parents=True)
    (out / "open-storm" / "history" / "runner.jsonl").write_text("{}\n")
    p, took = chaos(tmp_path, "suite", "--quick", "--out", str(out))
    assert_refused(p, took, tmp_path, "--out")
    assert sorted(x.name for x in out.iterdir()) == ["open-storm"]


def test_chaos_import_refuses_a_stream_id_above_2_64(tmp_path: Path) -> None:
    out = tmp_path / "o"
    p, took = chaos(tmp_path, "import", "--redis-url", "redis://127.0.0.1:1/0", "--prefix", "q",
                    "--since", "99999999999999999999999-0", "--out", str(out))
    assert_refused(p, took, tmp_path, "--since", out=out)


def test_chaos_import_refuses_an_out_that_is_a_file(tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    p, took = chaos(tmp_path, "import", "--redis-url", "redis://127.0.0.1:1/0", "--prefix", "q",
                    "--out", str(f))
    assert_refused(p, took, tmp_path, "--out")
    assert f.read_text() == "x"


def test_chaos_run_refuses_an_out_that_is_a_file(tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    p, took = chaos(tmp_path, "run", "--scenario", "open-storm", "--out", str(f))
    assert_refused(p, took, tmp_path, "--out")


def test_chaos_run_refuses_an_out_that_holds_a_run(tmp_path: Path) -> None:
    """A second run into a run directory would merge two histories and judge the mix."""
    out = tmp_path / "run"
    (out / "history").mkdir(parents=True)
    (out / "history" / "runner.jsonl").write_text("{}\n")
    (out / "run.json").write_text(json.dumps({"status": "complete"}))
    p, took = chaos(tmp_path, "run", "--scenario", "open-storm", "--out", str(out))
    assert_refused(p, took, tmp_path, "--out")
    assert sorted(x.name for x in (out / "history").iterdir()) == ["runner.jsonl"]
    assert sorted(x.name for x in out.iterdir()) == ["history", "run.json"]


# -- --redis-url: implied, and an unreachable server is one line (exit 255) -----------------
def test_redis_url_alone_means_url_and_an_unreachable_one_is_one_line(tmp_path: Path) -> None:
    """Without --redis url the URL was ignored and an embedded Redis used; an unreachable
    URL then printed a long traceback and left a run directory behind."""
    out = tmp_path / "out"
    p, took = chaos(tmp_path, "run", "--scenario", "open-storm", "--out", str(out),
                    "--redis-url", "redis://:hunter2@127.0.0.1:1/0")
    assert p.returncode == 255, p.stdout + p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot reach Redis" in lines[0], p.stderr
    assert "hunter2" not in p.stderr and ":***@" in p.stderr
    assert not out.exists() and not (tmp_path / "reports").exists()
    assert took < FAST_S


def test_a_wrong_password_is_one_line_and_leaves_nothing(tmp_path: Path,
                                                         redis_server: EmbeddedRedis) -> None:
    admin = redis_server.client()
    admin.config_set("requirepass", "right-pass")
    try:
        host, port = redis_server.address
        for cmd in (["run", "--scenario", "open-storm", "--out", str(tmp_path / "out")],
                    ["suite", "--quick", "--out", str(tmp_path / "suite")]):
            p, _ = chaos(tmp_path, *cmd, "--redis-url", f"redis://:wrong-pass@{host}:{port}/0")
            assert p.returncode == 255, p.stdout + p.stderr
            lines = p.stderr.strip().splitlines()
            assert len(lines) == 1 and "wrong-pass" not in p.stderr, p.stderr
            assert not (tmp_path / "out").exists() and not (tmp_path / "suite").exists()
            assert not (tmp_path / "reports").exists()
    finally:
        admin.execute_command("AUTH", "right-pass")
        admin.config_set("requirepass", "")
        admin.close()


# -- the limits, at the library level ---------------------------------------------------------
def test_every_builtin_scenario_is_within_the_limits() -> None:
    for name in scn.builtin_names():
        scn.load(name)


def test_every_fault_kind_declares_its_parameters() -> None:
    assert set(scn.FAULT_PARAMS) == set(scn.FAULT_KINDS)
    text = small_scenario("ok", 3, "[redis]\nproxy = true\n" + fault("latency",
                                                                     "latency_ms = 40"))
    s = scn.parse(text)
    assert s.faults[0].params == {"latency_ms": 40}


def test_the_fault_parameter_table_names_what_the_nemesis_reads() -> None:
    """FAULT_PARAMS is the one list of each fault's parameters: every name the nemesis
    reads from a spec's params must be in it (else a valid parameter would be refused),
    and every name in it must be read (else a typo-like name would be accepted)."""
    import re

    import chaos.nemesis as nem

    src = Path(nem.__file__).read_text()
    read = set(re.findall(r'_num\(self\.params, "(\w+)"', src))
    read |= set(re.findall(r'self\.params\.get\("(\w+)"', src))
    declared = {name for params in scn.FAULT_PARAMS.values() for name in params}
    assert read == declared

"""``chaos import``: a production Redis's streams and mirror, checked like a recorded run.

Histories are built by hand on a real redis-server (stream entries with chosen ids, so
times are known), imported through the command line, and judged by the same checkers.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
import redis
from govtools import small_scenario

from chaos import importer
from chaos.checkers import check_run
from chaos.exchange import Exchange
from chaos.history import F, read_history
from chaos.redis_servers import EmbeddedRedis, running_pids
from governor_ref.keys import Keys

SLOTS = 2
FULL = "active_slots_waiting_rotation_close"


def chaos(*args: str, env: dict[str, str] | None = None,
          timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "chaos", *args], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


class Book:
    """A governor's record in Redis, written by hand: plans, decisions, results, mirror.

    ``at`` is ms after ``t0`` (ten minutes ago, so the window is longer than the decision
    deadline); entry ids are chosen, so stream times are exactly these.
    """

    def __init__(self, r: redis.Redis, prefix: str) -> None:
        self.r = r
        self.k = Keys(prefix)
        self.t0 = int(time.time() * 1000) - 600_000
        self._last: dict[str, tuple[int, int]] = {}
        self.fence = 0

    def setup(self, symbols: tuple[str, ...] = ("AUSDT", "BUSDT", "CUSDT", "DUSDT")) -> Book:
        self.r.hset(self.k.config, mapping={"slots_BASE": str(SLOTS), "max_positions": "10",
                                            "permit_ttl_ms": "60000"})
        self.r.set(self.k.regime, "BASE")
        self.r.set(self.k.capital, "10000")
        self.r.set(self.k.exposure_pct, "0")
        for s in symbols:
            self.r.set(self.k.allocation(s), json.dumps({"allocation_pct": 0.25}))
        return self

    def _add(self, stream: str, at: int, fields: dict[str, str]) -> str:
        ms = self.t0 + at
        last_ms, last_seq = self._last.get(stream, (0, -1))
        seq = last_seq + 1 if ms == last_ms else 0
        assert ms >= last_ms, "entries in time order"
        self._last[stream] = (ms, seq)
        return self.r.xadd(stream, fields, id=f"{ms}-{seq}")

    def plan(self, at: int, pid: str, symbol: str, action: str) -> str:
        f = {"plan_id": pid, "symbol": symbol, "action": action, "source": "intent_bridge",
             "intent_created_at_ms": str(self.t0 + at)}
        if action == "OPEN":
            f.update(side="LONG", notional="100")
        return self._add(self.k.plans, at, f)

    def decide(self, at: int, pid: str, symbol: str, action: str, decision: str = "PERMIT",
               reason: str = "") -> str:
        f = {"plan_id": pid, "symbol": symbol, "action": action, "decision": decision,
             "reason": reason, "governor": "gov-1", "decided_at_ms": str(self.t0 + at)}
        if action == "CLOSE" and decision == "PERMIT":
            self.fence += 1
            f["fence"] = str(self.fence)
        return self._add(self.k.events, at, f)

    def result(self, at: int, pid: str, symbol: str, action: str, status: str = "executed",
               position_id: str = "") -> str:
        return self._add(self.k.results, at, {
            "plan_id": pid, "symbol": symbol, "action": action, "status": status,
            "position_id": position_id or f"pos-{symbol}", "notional": "100", "fence": "",
            "reason": "", "executed_at_ms": str(self.t0 + at)})

    def trade(self, at: int, pid: str, symbol: str, action: str,
              status: str = "executed") -> None:
        """A plan permitted 10 ms after it was added and executed 10 ms later."""
        self.plan(at, pid, symbol, action)
        self.decide(at + 10, pid, symbol, action)
        self.result(at + 20, pid, symbol, action, status)

    def blocked(self, at: int, pid: str, symbol: str, action: str, reason: str) -> None:
        self.plan(at, pid, symbol, action)
        self.decide(at + 10, pid, symbol, action, "BLOCK", reason)

    def mirror(self, *symbols: str) -> None:
        for s in symbols:
            self.r.hset(self.k.position(s), mapping={
                "position_id": f"pos-{s}", "symbol": s, "side": "LONG", "notional": "100",
                "opened_at_ms": str(self.t0), "pnl_pct": "0"})


@pytest.fixture
def book(redis_client: redis.Redis, prefix: str) -> Book:
    return Book(redis_client, prefix).setup()


def valid_history(b: Book) -> None:
    """Two slots: A and B open, C blocked while full, A closed, C opened; the mirror agrees.
    A plan added in the last minute has no decision yet: not expected to."""
    b.trade(0, "o1", "AUSDT", "OPEN")
    b.trade(1_000, "o2", "BUSDT", "OPEN")
    b.blocked(2_000, "o3", "CUSDT", "OPEN", FULL)
    b.trade(3_000, "c1", "AUSDT", "CLOSE")
    b.trade(4_000, "o4", "CUSDT", "OPEN")
    b.trade(5_000, "o5", "DUSDT", "OPEN", status="rejected")
    b.plan(200_000, "late", "DUSDT", "OPEN")
    b.mirror("BUSDT", "CUSDT")


def imported(url: str, prefix: str, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return chaos("import", "--redis-url", url, "--prefix", prefix, "--out", str(out),
                 "--no-report", *extra)


def results_of(out: Path) -> dict[str, Any]:
    return json.loads((out / "results.json").read_text())


# -- (1) a valid history ------------------------------------------------------------------------
def test_a_valid_history_imports_and_checks_valid(redis_server: EmbeddedRedis, book: Book,
                                                   prefix: str, tmp_path: Path) -> None:
    valid_history(book)
    out = tmp_path / "imp"
    p = chaos("import", "--redis-url", redis_server.url, "--prefix", prefix, "--out", str(out))
    assert p.returncode == 0, p.stdout + p.stderr
    assert "verdict: VALID" in p.stdout and str(out) in p.stdout
    res = results_of(out)
    assert res["valid"] is True
    assert res["invariants"]["liveness"]["valid"] == "unknown"
    assert "skipped" in res["invariants"]["liveness"]["note"]
    assert res["invariants"]["one_decision"]["valid"] is True, \
        "the plan newer than the cutoff is not expected to be decided yet"
    assert (out / "report.html").exists() and (out / "report.md").exists()

    meta = json.loads((out / "run.json").read_text())
    assert meta["kind"] == "import" and meta["status"] == "complete"
    assert meta["checks_skipped"] == ["liveness"]
    assert meta["counts"]["plans"] == 7 and meta["counts"]["decisions"] == 6
    assert meta["counts"]["results"] == 5
    assert meta["governor_config"]["slots_BASE"] == str(SLOTS)
    assert meta["regime"]["value"] == "BASE" and "unknown" in meta["regime"]["note"]
    assert meta["ledger"]["derived_from"] == "apply.result"
    assert meta["mirror_vs_replay"]["agree"] is True
    assert meta["cutoff_ms"] == book.t0 + 200_000 - 60_000
    assert json.loads((out / "positions.json").read_text())["positions"].keys() == \
        {"BUSDT", "CUSDT"}

    # The history: the recorder's shapes, a submit pair per plan, the inputs, the cutoff.
    ops = read_history(out)
    plans = [op for op in ops if op.f == F.PLAN]
    assert len(plans) == 7 and plans[0].value["entry_id"] == f"{book.t0}-0"
    assert plans[0].value["entry_ms"] == plans[0].wall_ms == book.t0
    submits = [op for op in ops if op.f == F.SUBMIT]
    assert [op.type for op in submits[:2]] == ["invoke", "ok"]
    assert submits[0].process == "imported" and submits[0].value["plan"]["plan_id"] == "o1"
    assert submits[1].value == {"entry_id": f"{book.t0}-0"}
    assert [(op.f, op.type) for op in ops if op.key == "o1"] == [
        ("submit", "invoke"), ("plan", "ok"), ("submit", "ok"), ("decision", "ok"),
        ("result", "ok")]
    operator = {op.key: op.value for op in ops if op.f == F.OPERATOR}
    assert operator["regime-initial"]["initial"] is True
    assert operator["capital"]["capital"] == 10000 and operator["capital"][
        "allocation_pct"] == 0.25
    assert {op.type for op in ops if op.f == F.PHASE and op.key == "cutoff"} == {"invoke", "ok"}

    # The ledger, replayed from the executed results (the rejected one is no order).
    orders = Exchange(out / "ledger.sqlite").orders()
    assert [(o.plan_id, o.effect, o.open_count_after) for o in orders] == [
        ("o1", "open", 1), ("o2", "open", 2), ("c1", "close", 1), ("o4", "open", 2)]
    assert orders[0].issued_at_ms == book.t0 + 10 and orders[0].wall_ms == book.t0 + 20
    assert orders[2].fence is None  # the result carried none


def test_an_undecided_plan_before_the_cutoff_is_invalid(redis_server: EmbeddedRedis,
                                                         book: Book, prefix: str,
                                                         tmp_path: Path) -> None:
    book.trade(0, "o1", "AUSDT", "OPEN")
    book.plan(1_000, "lost", "BUSDT", "OPEN")
    book.plan(200_000, "recent", "CUSDT", "OPEN")
    book.mirror("AUSDT")
    p = imported(redis_server.url, prefix, tmp_path / "imp")
    assert p.returncode == 1, p.stdout + p.stderr
    vs = results_of(tmp_path / "imp")["violations"]
    assert [(v["invariant"], v["plan_ids"]) for v in vs] == [("one_decision", ["lost"])]


# -- (2) violations -----------------------------------------------------------------------------
def test_a_double_close_is_invalid_by_single_close(redis_server: EmbeddedRedis, book: Book,
                                                    prefix: str, tmp_path: Path) -> None:
    book.trade(0, "o1", "AUSDT", "OPEN")
    book.trade(1_000, "c1", "AUSDT", "CLOSE")
    book.trade(2_000, "c2", "AUSDT", "CLOSE")  # the same position, closed again
    p = imported(redis_server.url, prefix, tmp_path / "imp")
    assert p.returncode == 1, p.stdout + p.stderr
    res = results_of(tmp_path / "imp")
    assert res["invariants"]["single_close"]["valid"] is False
    assert {v["invariant"] for v in res["violations"]} == {"single_close"}
    assert "c2" in res["violations"][0]["plan_ids"]
    meta = json.loads((tmp_path / "imp" / "run.json").read_text())
    assert meta["ledger"]["effects"] == {"open": 1, "close": 1, "flip": 1}


def test_an_open_executed_with_the_slots_full_is_invalid_by_slots(
        redis_server: EmbeddedRedis, book: Book, prefix: str, tmp_path: Path) -> None:
    book.trade(0, "o1", "AUSDT", "OPEN")
    book.trade(1_000, "o2", "BUSDT", "OPEN")
    book.trade(2_000, "o3", "CUSDT", "OPEN")  # a third position with two slots
    book.mirror("AUSDT", "BUSDT", "CUSDT")
    p = imported(redis_server.url, prefix, tmp_path / "imp")
    assert p.returncode == 1, p.stdout + p.stderr
    res = results_of(tmp_path / "imp")
    assert res["invariants"]["slots"]["valid"] is False
    assert [v["plan_ids"] for v in res["violations"] if v["invariant"] == "slots"] == [["o3"]]


def test_a_repeated_result_is_one_order(redis_server: EmbeddedRedis, book: Book, prefix: str,
                                        tmp_path: Path) -> None:
    """Results are delivered at least once: a second 'executed' of a plan is not a second
    order (it would look like a double open)."""
    book.trade(0, "o1", "AUSDT", "OPEN")
    book.result(100, "o1", "AUSDT", "OPEN")
    book.mirror("AUSDT")
    p = imported(redis_server.url, prefix, tmp_path / "imp")
    assert p.returncode == 0, p.stdout + p.stderr
    meta = json.loads((tmp_path / "imp" / "run.json").read_text())
    assert meta["ledger"]["orders"] == 1 and meta["ledger"]["duplicate_results"] == 1


def test_since_reads_a_close_of_an_earlier_position_in_the_governors_favour(
        redis_server: EmbeddedRedis, book: Book, prefix: str, tmp_path: Path) -> None:
    book.trade(0, "o1", "AUSDT", "OPEN")
    book.trade(5_000, "o2", "BUSDT", "OPEN")
    book.trade(10_000, "c1", "AUSDT", "CLOSE")
    book.mirror("BUSDT")
    since = f"{book.t0 + 1_000}-0"
    out = tmp_path / "imp"
    p = imported(redis_server.url, prefix, out, "--since", since)
    assert p.returncode == 0, p.stdout + p.stderr
    meta = json.loads((out / "run.json").read_text())
    assert meta["window"]["cuts_start"] is True and meta["counts"]["plans"] == 2
    assert meta["ledger"]["pre_window_closes"] == 1
    assert any("--since cuts the window" in c for c in meta["caveats"])
    assert [o.effect for o in Exchange(out / "ledger.sqlite").orders()] == ["open", "close"]

    # The same window by time (ISO-8601) and an --until that leaves out the close.
    iso = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime((book.t0 + 1_000) / 1000)) + \
        f".{(book.t0 + 1_000) % 1000:03d}Z"
    out2 = tmp_path / "imp2"
    p = imported(redis_server.url, prefix, out2, "--since", iso, "--until",
                 str(book.t0 + 9_000))
    assert p.returncode == 0, p.stdout + p.stderr
    meta = json.loads((out2 / "run.json").read_text())
    assert meta["counts"]["plans"] == 1 and meta["counts"]["results"] == 1


def test_small_pages_read_every_entry_once(redis_server: EmbeddedRedis, book: Book,
                                           prefix: str, tmp_path: Path) -> None:
    """XRANGE page by page (here 2 entries a page, entries sharing a ms): nothing read twice
    or skipped, and the progress callback sees the counts grow."""
    valid_history(book)
    for i in range(5):
        book.plan(300_000, f"same-ms-{i}", "AUSDT", "OPEN")
    seen: list[dict[str, int]] = []
    small = importer.import_run(importer.ImportOptions(
        prefix=prefix, redis_url=redis_server.url, out=tmp_path / "small", page=2,
        progress=seen.append))
    big = importer.import_run(importer.ImportOptions(
        prefix=prefix, redis_url=redis_server.url, out=tmp_path / "big"))
    assert small.meta["counts"] == big.meta["counts"]
    assert small.meta["counts"]["plans"] == 12
    assert [op.to_json() for op in read_history(tmp_path / "small") if op.f != F.OPERATOR] == \
        [op.to_json() for op in read_history(tmp_path / "big") if op.f != F.OPERATOR]
    assert len(seen) > 5 and seen[-1]["final"] == 1 and seen[-1]["plans"] == 12


def test_malformed_plans_without_a_usable_id_are_not_expected_to_be_answered(
        redis_server: EmbeddedRedis, book: Book, prefix: str, tmp_path: Path) -> None:
    book.trade(0, "o1", "AUSDT", "OPEN")
    book._add(book.k.plans, 100, {"symbol": "BUSDT", "action": "OPEN"})  # no plan_id
    book._add(book.k.plans, 200, {"plan_id": "bad", "symbol": b"\xff\xfe"})  # answerable
    book.decide(210, "bad", "", "", "BLOCK", "invalid_plan")
    book.mirror("AUSDT")
    p = imported(redis_server.url, prefix, tmp_path / "imp")
    assert p.returncode == 0, p.stdout + p.stderr
    meta = json.loads((tmp_path / "imp" / "run.json").read_text())
    assert meta["counts"]["malformed_plans"] == 2


# -- (3) read-only --------------------------------------------------------------------------
def _snapshot(server: EmbeddedRedis) -> tuple[int, dict[bytes, bytes | None], int]:
    c = server.client(decode_responses=False)
    try:
        dumps = {k: c.dump(k) for k in c.scan_iter(count=1000)}
        changes = int(c.info("persistence")["rdb_changes_since_last_save"])
        return int(c.dbsize()), dumps, changes
    finally:
        c.close()


def test_the_importer_never_writes(redis_server: EmbeddedRedis, redis_client: redis.Redis,
                                   book: Book, prefix: str, tmp_path: Path) -> None:
    """Through a user that may only run the importer's read commands, and with every key's
    DUMP and the server's change counter unchanged."""
    valid_history(book)
    redis_client.execute_command("ACL", "SETUSER", "reader", "on", ">s3cret", "~*",
                                 "resetchannels", "-@all", "+xrange", "+scan", "+hgetall",
                                 "+get", "+ping")
    before = _snapshot(redis_server)
    url = f"redis://reader:s3cret@127.0.0.1:{redis_server.port}/0"
    out = tmp_path / "imp"
    p = imported(url, prefix, out)
    assert p.returncode == 0, p.stdout + p.stderr
    assert _snapshot(redis_server) == before
    meta_text = (out / "run.json").read_text()
    assert "s3cret" not in meta_text and "reader:***@" in meta_text


# -- (4) from a dump ----------------------------------------------------------------------------
def _servers_under(path: Path) -> list[int]:
    """redis-server processes whose working dir is under ``path`` (the importer's temp dir)."""
    found = []
    for proc in psutil.process_iter(["name"]):
        try:
            if (proc.info["name"] or "").startswith("redis-server") and \
                    Path(proc.cwd()).is_relative_to(path):
                found.append(proc.pid)
        except psutil.Error:
            continue
    return found


def test_an_rdb_dump_imports_like_the_live_server(redis_server: EmbeddedRedis,
                                                  redis_client: redis.Redis, book: Book,
                                                  prefix: str, tmp_path: Path) -> None:
    book.trade(0, "o1", "AUSDT", "OPEN")
    book.trade(1_000, "c1", "AUSDT", "CLOSE")
    book.trade(2_000, "c2", "AUSDT", "CLOSE")
    redis_client.save()
    dump = tmp_path / "prod.rdb"
    shutil.copyfile(redis_server.data_dir / "dump.rdb", dump)
    live = tmp_path / "live"
    assert imported(redis_server.url, prefix, live).returncode == 1

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    out = tmp_path / "rdb"
    p = chaos("import", "--rdb", str(dump), "--prefix", prefix, "--out", str(out),
              "--no-report", env={"TMPDIR": str(tmp)})
    assert p.returncode == 1, p.stdout + p.stderr
    assert results_of(out)["invariants"] == results_of(live)["invariants"]
    assert json.loads((out / "run.json").read_text())["source"] == {"rdb": str(dump)}
    assert _servers_under(tmp) == [] and list(tmp.iterdir()) == [], \
        "the private redis-server is stopped and its dir removed"


def test_an_unreadable_dump_is_a_harness_failure_and_leaves_no_server(tmp_path: Path) -> None:
    bad = tmp_path / "bad.rdb"
    bad.write_bytes(b"REDIS9999 this is not a dump")
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    p = chaos("import", "--rdb", str(bad), "--prefix", "quantum", "--out",
              str(tmp_path / "o"), env={"TMPDIR": str(tmp)})
    assert p.returncode == 255, p.stdout + p.stderr
    assert "could not load" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert _servers_under(tmp) == [] and list(tmp.iterdir()) == []


def test_the_dump_server_is_stopped_when_the_import_fails(
        redis_server: EmbeddedRedis, redis_client: redis.Redis, book: Book, prefix: str,
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    book.trade(0, "o1", "AUSDT", "OPEN")
    redis_client.save()
    before = running_pids()

    def boom(*_a: Any, **_k: Any) -> None:
        assert len(running_pids()) == len(before) + 1, "the dump is served while importing"
        raise RuntimeError("disk full")

    monkeypatch.setattr(importer._Importer, "run", boom)
    opts = importer.ImportOptions(prefix=prefix, rdb=redis_server.data_dir / "dump.rdb",
                                  out=tmp_path / "o")
    with pytest.raises(RuntimeError, match="disk full"):
        importer.import_run(opts)
    assert running_pids() == before
    assert json.loads((tmp_path / "o" / "run.json").read_text())["status"] == "harness_error"


# -- (5) bad arguments ------------------------------------------------------------------------
@pytest.mark.parametrize(("args", "named"), [
    (["--prefix", "quantum"], "--redis-url"),
    (["--redis-url", "redis://127.0.0.1:1/0", "--rdb", "x.rdb", "--prefix", "q"], "--rdb"),
    (["--redis-url", "redis://127.0.0.1:1/0"], "--prefix"),
    (["--redis-url", "redis://127.0.0.1:1/0", "--prefix", "q", "--since", "yesterday"],
     "--since"),
    (["--redis-url", "redis://127.0.0.1:1/0", "--prefix", "q", "--until", "12-ab"], "--until"),
    (["--redis-url", "redis://127.0.0.1:1/0", "--prefix", "q", "--since", "20-0",
      "--until", "10-0"], "--since"),
    (["--rdb", "/nonexistent/dump.rdb", "--prefix", "q"], "--rdb"),
    (["--redis-url", "http://127.0.0.1:1/", "--prefix", "q"], "--redis-url"),
])
def test_bad_arguments_exit_254_naming_the_option(args: list[str], named: str,
                                                  tmp_path: Path) -> None:
    p = chaos("import", "--out", str(tmp_path / "o"), *args)
    assert p.returncode == 254, p.stdout + p.stderr
    assert named in p.stderr
    assert not (tmp_path / "o").exists()


def test_an_out_dir_holding_a_run_is_refused(redis_server: EmbeddedRedis, book: Book,
                                             prefix: str, tmp_path: Path) -> None:
    valid_history(book)
    out = tmp_path / "imp"
    assert imported(redis_server.url, prefix, out).returncode == 0
    p = imported(redis_server.url, prefix, out)
    assert p.returncode == 254 and "--out" in p.stderr


def test_a_prefix_with_nothing_recorded_exits_254(redis_server: EmbeddedRedis, prefix: str,
                                                  tmp_path: Path) -> None:
    p = chaos("import", "--redis-url", redis_server.url, "--prefix", prefix, "--out",
              str(tmp_path / "o"))
    assert p.returncode == 254 and "--prefix" in p.stderr
    assert not (tmp_path / "o").exists()


def test_an_unreachable_redis_exits_255_with_one_line(tmp_path: Path) -> None:
    p = chaos("import", "--redis-url", "redis://:pw@127.0.0.1:1/0", "--prefix", "q",
              "--out", str(tmp_path / "o"))
    assert p.returncode == 255, p.stdout + p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and "cannot reach" in p.stderr
    assert "pw" not in p.stderr


def test_passwords_are_masked_in_the_source() -> None:
    assert importer.masked_url("redis://u:pw@h:1/0") == "redis://u:***@h:1/0"
    assert importer.masked_url("redis://h:1/0?password=pw&db=1") == \
        "redis://h:1/0?password=***&db=1"
    assert "pw" not in importer.masked_url("redis-sentinel://:pw@h1:1,h2:2/gov")


def test_parse_bound_forms() -> None:
    assert importer.parse_bound("1795514182279-3").as_min() == "1795514182279-3"
    assert importer.parse_bound("1795514182279").as_max() == f"1795514182279-{2**64 - 1}"
    assert importer.parse_bound("1970-01-01T00:00:01Z").ms == 1000
    assert importer.parse_bound("1970-01-01T01:00:01+01:00").ms == 1000
    assert importer.parse_bound("1970-01-01 00:00:02").ms == 2000  # no zone: UTC
    with pytest.raises(ValueError):
        importer.parse_bound("last tuesday")


# -- end to end: a real run, imported from the Redis it ran on ---------------------------------
def test_a_real_run_imported_from_its_redis_agrees_with_its_own_verdict(
        redis_server: EmbeddedRedis, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``chaos run --redis url`` removes its keys at the end; here the provider keeps them
    (``cleanup_on_stop=False``), so the run's Redis is there to import from."""
    from chaos import runner
    from chaos import scenario as scn
    from chaos.redis_servers import provide

    def keeping(kind: str = "embedded", **options: Any) -> Any:
        if kind == "url":
            options["cleanup_on_stop"] = False
        return provide(kind, **options)

    monkeypatch.setattr(runner, "provide", keeping)
    spec = tmp_path / "s.toml"
    spec.write_text(small_scenario("imp", 2))
    run_dir = tmp_path / "run"
    res = runner.run(runner.RunOptions(scenario=scn.load(str(spec)), redis_kind="url",
                                       redis_url=redis_server.url, out=run_dir,
                                       progress=False))
    assert res.status == "complete"
    assert check_run(run_dir).valid is True
    run_prefix = json.loads((run_dir / "run.json").read_text())["redis"]["prefix"]

    out = tmp_path / "imp"
    p = imported(redis_server.url, run_prefix, out)
    assert p.returncode == 0, p.stdout + p.stderr
    meta = json.loads((out / "run.json").read_text())
    recorded = read_history(run_dir)
    assert meta["counts"]["plans"] == sum(op.f == F.PLAN for op in recorded)
    assert meta["counts"]["decisions"] == sum(op.f == F.DECISION for op in recorded)
    assert meta["counts"]["results"] == sum(op.f == F.RESULT for op in recorded)
    # Results may reach the stream in another order than the exchange executed them (two
    # apply threads), so the orders are compared as sets.
    ran = {(o.plan_id, o.effect) for o in Exchange(run_dir / "ledger.sqlite").orders()
           if o.executed}
    derived = {(o.plan_id, o.effect) for o in Exchange(out / "ledger.sqlite").orders()}
    assert derived == ran and derived, "the derived ledger is the exchange's"
    assert meta["mirror_vs_replay"]["agree"] is True

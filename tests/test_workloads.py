"""Workloads: pure generators, and worker processes against a real Redis.

Each test that starts worker processes stops them through the ``start``
fixture, which also checks that none survives the test.
"""

from __future__ import annotations

import json
import os
import random
import signal
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import redis
from govtools import SYMBOLS

from chaos.exchange import Exchange, Order
from chaos.history import F, Op, OpType, read_history
from chaos.redis_servers import EmbeddedRedis
from chaos.scenario import WORKLOAD_KINDS, WorkloadSpec
from chaos.workloads import (
    CLOSE_SOURCES,
    GENERATORS,
    MALFORMED_VALID,
    MALFORMED_WAYS,
    REGIMES,
    InitialRegime,
    Malformed,
    MarketView,
    NotSent,
    SetPnl,
    SetRegime,
    SubmitPlan,
    Unknown,
    WorkloadContext,
    WorkloadError,
    WorkloadGroup,
    make_generator,
    read_summaries,
    start_workloads,
    submit_plans,
)
from governor_ref.keys import Keys
from governor_ref.protocol import Action, Plan, PlanError

NOW = 1_800_000_000_000
# replay sends a recorded list: no seed, no pace (tests/test_replay.py)
PLAN_KINDS = sorted(k for k in WORKLOAD_KINDS if k not in ("regime_flip", "replay"))
VALID_KINDS = [k for k in PLAN_KINDS if k != "malformed"]


def ctx_for(url: str, prefix: str, run_dir: Path, duration_s: float = 1.0,
            **kw: Any) -> WorkloadContext:
    return WorkloadContext(redis_url=url, prefix=prefix, run_dir=str(run_dir), seed=11,
                           duration_s=duration_s, symbols=list(SYMBOLS), **kw)


@pytest.fixture
def start() -> Iterator[Callable[..., WorkloadGroup]]:
    groups: list[WorkloadGroup] = []

    def _start(specs: list[WorkloadSpec], ctx: WorkloadContext, **kw: Any) -> WorkloadGroup:
        g = start_workloads(specs, ctx, **kw)
        groups.append(g)
        return g

    yield _start
    pids = [pid for g in groups for pid in g.pids().values() if pid]
    for g in groups:
        g.stop(timeout=5)
        assert not g.alive(), f"workload processes survived: {g.alive()}"
    for pid in pids:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie", pid


def finish(g: WorkloadGroup, timeout: float = 20.0) -> None:
    """Wait for the workers to end by themselves, cleanly."""
    assert g.join(timeout), f"workers still running: {g.alive()}"
    assert set(g.exitcodes().values()) == {0}, g.exitcodes()


def stream_entries(client: redis.Redis, prefix: str) -> dict[str, dict[bytes, bytes]]:
    raw = client.xrange(Keys(prefix).plans)
    return {eid.decode(): fields for eid, fields in raw}


def pairs(ops: list[Op], f: str = F.SUBMIT) -> dict[tuple[str, str], list[Op]]:
    out: dict[tuple[str, str], list[Op]] = defaultdict(list)
    for op in ops:
        if op.f == f:
            out[(op.process, str(op.key))].append(op)
    return out


def submitted(ops: list[Op], process_prefix: str) -> list[tuple[Op, Op]]:
    """(invoke, completion) of every plan of the processes whose name starts so."""
    out = []
    for (proc, _key), seq in pairs(ops).items():
        if proc.startswith(process_prefix):
            assert [o.type for o in seq][:1] == [OpType.INVOKE], seq
            assert len(seq) == 2, seq
            out.append((seq[0], seq[1]))
    return sorted(out, key=lambda p: p[0].time_ns)


def write_mirror(client: redis.Redis, prefix: str, symbols: list[str],
                 exposure: str = "0.5") -> dict[str, str]:
    k = Keys(prefix)
    ids = {}
    for i, s in enumerate(symbols):
        ids[s] = f"pos-{s}-{i + 1}"
        client.hset(k.position(s), mapping={"position_id": ids[s], "symbol": s, "side": "LONG",
                                             "notional": "100", "opened_at_ms": str(NOW),
                                             "pnl_pct": "0"})
    client.set(k.exposure_pct, exposure)
    return ids


# ============================================================== pure generators (no Redis)
def test_every_kind_has_a_generator() -> None:
    assert set(GENERATORS) == set(WORKLOAD_KINDS)


@pytest.mark.parametrize("kind", PLAN_KINDS)
def test_generators_are_deterministic_and_follow_the_contract(tmp_path: Path, kind: str) -> None:
    ctx = ctx_for("redis://127.0.0.1:1/0", "p", tmp_path, ledger_path=str(tmp_path / "l"))
    view = MarketView(positions={"S01USDT": {"position_id": "pos-S01USDT-1"}},
                      exposure_pct=0.4, ledger_open=("S01USDT",))

    def run(seed: int) -> list[Any]:
        gen = make_generator(WorkloadSpec(kind, symbols=10), 3, ctx, random.Random(seed))
        out: list[Any] = []
        for i in range(300):
            for s in gen.streams():
                out += gen.next(s.name, NOW + i, view)
        return out

    a, b = run(5), run(5)
    assert a == b and a != run(6)
    plans = [e for e in a if isinstance(e, SubmitPlan)]
    assert plans
    ids = [e.key for e in plans]
    assert len(set(ids)) == len(ids)
    for e in plans:
        if kind == "malformed" and e.meta["invalid"]:
            with pytest.raises(PlanError):
                Plan.from_fields(e.fields)
            continue
        p = Plan.from_fields(e.fields)
        assert p.plan_id == e.key and p.plan_id.startswith(f"{kind[:4]}-3-")
        if p.action is Action.OPEN:
            assert p.symbol in SYMBOLS[:10] and 10 <= float(p.notional or 0) <= 150
    if kind == "rotation_pressure":
        assert any(isinstance(e, SetPnl) and e.symbol == "S01USDT" for e in a)


@pytest.mark.parametrize("way", MALFORMED_WAYS)
def test_each_malformed_way_breaks_the_contract(tmp_path: Path, way: str) -> None:
    gen = Malformed(WorkloadSpec("malformed"), 0, ctx_for("redis://x:1/0", "p", tmp_path),
                    random.Random(1))
    em = gen.breach(way, NOW)
    assert em.meta == {"malformed": way, "invalid": way not in MALFORMED_VALID}
    if way in MALFORMED_VALID:
        assert Plan.from_fields(em.fields).plan_id == em.key
    else:
        with pytest.raises(PlanError):
            Plan.from_fields(em.fields)
    if way == "no_plan_id":
        assert "plan_id" not in em.fields and em.key.startswith("noid-0-")


def test_duplicate_close_generator(tmp_path: Path) -> None:
    ctx = ctx_for("redis://x:1/0", "p", tmp_path)
    gen = make_generator(WorkloadSpec("duplicate_close", params={"spread_ms": 3}), 0, ctx)
    # Nothing open: an OPEN to make something to close.
    (seed,) = gen.next("burst", NOW, MarketView())
    assert isinstance(seed, SubmitPlan) and seed.fields["action"] == "OPEN"
    assert seed.meta == {"seeding": True}
    view = MarketView(positions={"S07USDT": {"position_id": "pos-S07USDT-9"}})
    burst = gen.next("burst", NOW, view)
    assert [type(e) for e in burst] == [SubmitPlan] * 3
    plans = [Plan.from_fields(e.fields) for e in burst]  # type: ignore[union-attr]
    assert {p.source for p in plans} == set(CLOSE_SOURCES)
    assert {(p.symbol, p.action, p.position_id) for p in plans} == {
        ("S07USDT", Action.CLOSE, "pos-S07USDT-9")}
    delays = [e.delay_ms for e in burst]  # type: ignore[union-attr]
    assert delays[0] == 0 and delays == sorted(delays) and delays[-1] <= 3
    no_pid = make_generator(WorkloadSpec("duplicate_close",
                                         params={"with_position_id": False}), 1, ctx)
    assert all("position_id" not in e.fields for e in no_pid.next("burst", NOW, view))


def test_regime_generator_always_flips(tmp_path: Path) -> None:
    gen = make_generator(WorkloadSpec("regime_flip"), 0, ctx_for("redis://x:1/0", "p", tmp_path))
    assert gen.next("initial", NOW, MarketView(regime="CHOP")) == [InitialRegime("CHOP")]
    current = "CHOP"
    for n in range(1, 31):
        (em,) = gen.next("flip", NOW, MarketView(regime=current))
        assert isinstance(em, SetRegime) and em.regime in REGIMES and em.regime != current
        assert em.previous == current and em.key == f"regime-0-{n}"
        current = em.regime
    # A start-up read that failed records no "initial" regime (it would be a guess).
    late = make_generator(WorkloadSpec("regime_flip"), 1, ctx_for("redis://x:1/0", "p", tmp_path))
    assert late.next("initial", NOW, MarketView()) == []
    assert [type(e) for e in late.next("flip", NOW, MarketView(regime="BASE"))] == [SetRegime]


@pytest.mark.parametrize(("kind", "params", "message"), [
    ("open_storm", {"notional_mn": 1}, "unknown param 'notional_mn'"),
    ("stale", {"stale_fraction": "half"}, "stale_fraction must be a number"),
    ("stale", {"stale_fraction": 2}, "stale_fraction must be in [0, 1]"),
    ("same_symbol", {"burst": 2.5}, "burst must be an integer"),
    ("duplicate_close", {"with_position_id": 1}, "with_position_id must be true or false"),
    ("open_storm", {"notional_min": 200}, "notional_min <= notional_max"),
])
def test_bad_params_fail_before_any_process_starts(tmp_path: Path, kind: str,
                                                   params: dict[str, Any], message: str) -> None:
    ctx = ctx_for("redis://x:1/0", "p", tmp_path)
    with pytest.raises(WorkloadError, match=message.replace("[", r"\[").replace("]", r"\]")):
        start_workloads([WorkloadSpec("open_storm"), WorkloadSpec(kind, params=params)], ctx)
    assert not (tmp_path / "history").exists()


# ============================================================== worker processes on Redis
def test_producers_write_plans_and_history(shared_redis: EmbeddedRedis, prefix: str,
                                           tmp_path: Path, start: Callable[..., WorkloadGroup]
                                           ) -> None:
    r = shared_redis.client(decode_responses=False)
    write_mirror(r, prefix, ["S01USDT", "S02USDT", "S03USDT"], exposure="0.5")
    ctx = ctx_for(shared_redis.url, prefix, tmp_path, 1.2, config={"max_intent_age_ms": "2000"})
    specs = [WorkloadSpec("open_storm", rate=60, symbols=8),
             WorkloadSpec("same_symbol", rate=60, params={"hot": 2, "burst": 4}),
             WorkloadSpec("stale", rate=60, params={"extra_ms": 500}),
             WorkloadSpec("drift", rate=60, params={"drift_max": 3})]
    finish(start(specs, ctx))
    ops = read_history(tmp_path)
    entries = stream_entries(r, prefix)
    seen_ids = set()
    for kind in ("open_storm", "same_symbol", "stale", "drift"):
        subs = submitted(ops, kind)
        assert len(subs) >= 20, (kind, len(subs))
        for inv, done in subs:
            assert done.type is OpType.OK and inv.value["workload"] == kind
            fields = entries[done.value["entry_id"]]
            seen_ids.add(done.value["entry_id"])
            plan = Plan.from_fields(fields)
            assert plan.plan_id == inv.key == inv.value["plan"]["plan_id"]
            assert plan.symbol == inv.symbol and plan.action is Action.OPEN
        plans = [(inv, Plan.from_fields(entries[done.value["entry_id"]])) for inv, done in subs]
        if kind == "open_storm":
            assert {p.symbol for _, p in plans} <= set(SYMBOLS[:8])
        if kind == "same_symbol":
            assert {p.symbol for _, p in plans} <= {"S00USDT", "S01USDT"}
            bursts = Counter(inv.value["burst"] for inv, _ in plans)
            assert set(bursts.values()) == {4}
        if kind == "stale":
            stale = [(inv, p) for inv, p in plans if inv.value["stale"]]
            fresh = [(inv, p) for inv, p in plans if not inv.value["stale"]]
            assert stale and fresh
            for inv, p in stale:
                assert inv.wall_ms - p.intent_created_at_ms > 2000
                assert inv.wall_ms - p.intent_created_at_ms <= 2000 + 500 + 50
            for inv, p in fresh:
                assert abs(inv.wall_ms - p.intent_created_at_ms) < 1000
        if kind == "drift":
            counts = [p.snapshot_position_count for _, p in plans]
            exps = [float(p.snapshot_exposure_pct or "nan") for _, p in plans]
            assert all(inv.value["observed_count"] == 3 for inv, _ in plans)
            assert all(inv.value["observed_exposure"] == 0.5 for inv, _ in plans)
            assert all(c is not None and 0 <= c <= 6 for c in counts)
            assert any(c != 3 for c in counts)
            assert all(0.2 - 1e-9 <= e <= 0.8 + 1e-9 for e in exps)
            assert any(abs(e - 0.5) > 0.01 for e in exps)
    assert seen_ids == set(entries)  # nothing in the stream that the history does not explain
    assert {s["stopped_by"] for s in read_summaries(tmp_path).values()} == {"duration"}


def test_malformed_workload(shared_redis: EmbeddedRedis, prefix: str, tmp_path: Path,
                            start: Callable[..., WorkloadGroup]) -> None:
    r = shared_redis.client(decode_responses=False)
    ctx = ctx_for(shared_redis.url, prefix, tmp_path, 1.0)
    finish(start([WorkloadSpec("malformed", rate=250, params={"bad_fraction": 0.5})], ctx))
    ops = read_history(tmp_path)
    entries = stream_entries(r, prefix)
    ways: Counter[str] = Counter()
    valid = 0
    for inv, done in submitted(ops, "malformed"):
        assert done.type is OpType.OK, done
        fields = entries[done.value["entry_id"]]
        way = inv.value["malformed"]
        if way is None or way in MALFORMED_VALID:
            assert Plan.from_fields(fields).plan_id == inv.key
            valid += 1
        else:
            assert inv.value["invalid"] is True
            with pytest.raises(PlanError):
                Plan.from_fields(fields)
        if way is not None:
            ways[way] += 1
        if way == "no_plan_id":
            assert b"plan_id" not in fields and str(inv.key).startswith("noid-")
        if way == "binary_field":
            with pytest.raises(UnicodeDecodeError):
                fields[b"symbol"].decode()
    assert set(ways) == set(MALFORMED_WAYS), ways
    assert valid > 30


def test_duplicate_close_workload(shared_redis: EmbeddedRedis, prefix: str, tmp_path: Path,
                                  start: Callable[..., WorkloadGroup]) -> None:
    r = shared_redis.client(decode_responses=False)
    ids = write_mirror(r, prefix, ["S04USDT", "S09USDT"])
    ctx = ctx_for(shared_redis.url, prefix, tmp_path, 1.0)
    spec = WorkloadSpec("duplicate_close", params={"period_ms": 50, "spread_ms": 3})
    finish(start([spec], ctx))
    entries = stream_entries(r, prefix)
    bursts: dict[str, list[tuple[Op, Plan]]] = defaultdict(list)
    for inv, done in submitted(read_history(tmp_path), "duplicate_close"):
        assert done.type is OpType.OK
        bursts[inv.value["burst"]].append((inv, Plan.from_fields(entries[done.value["entry_id"]])))
    assert len(bursts) >= 8
    for burst in bursts.values():
        assert {p.source for _, p in burst} == set(CLOSE_SOURCES)
        ((sym, action, pid),) = {(p.symbol, p.action, p.position_id) for _, p in burst}
        assert action is Action.CLOSE and pid == ids[sym]
        assert max(inv.value["delay_ms"] for inv, _ in burst) <= 3
        span_ms = (burst[-1][0].time_ns - burst[0][0].time_ns) / 1e6
        assert span_ms <= 3 + 50, span_ms  # 3 ms planned; slack for a loaded machine


def test_rotation_pressure_sets_pnl_on_the_ledger(shared_redis: EmbeddedRedis, prefix: str,
                                                  tmp_path: Path,
                                                  start: Callable[..., WorkloadGroup]) -> None:
    ledger = tmp_path / "ledger.sqlite"
    ex = Exchange.create(ledger)
    for i, s in enumerate(["S01USDT", "S02USDT", "S03USDT"]):
        ex.execute(Order(f"seed-{i}", s, "OPEN", "LONG", "100"))
    ctx = ctx_for(shared_redis.url, prefix, tmp_path, 1.0, ledger_path=str(ledger))
    spec = WorkloadSpec("rotation_pressure", rate=30, params={"pnl_period_ms": 100})
    finish(start([spec], ctx))
    ops = read_history(tmp_path)
    pnl_ops = [o for o in ops if o.f == F.OPERATOR and o.type is OpType.OK]
    assert len(pnl_ops) >= 5
    assert all(-5 <= o.value["pnl_pct"] <= 5 for o in pnl_ops)
    pnl = {s: p.pnl_pct for s, p in ex.open_positions().items()}
    last: dict[str, float] = {}
    for o in pnl_ops:
        last[str(o.symbol)] = o.value["pnl_pct"]
    assert last and all(pnl[s] == v for s, v in last.items())
    assert len(submitted(ops, "rotation_pressure")) >= 20
    ex.close()


def test_regime_flip_changes_the_regime(shared_redis: EmbeddedRedis, prefix: str,
                                        tmp_path: Path,
                                        start: Callable[..., WorkloadGroup]) -> None:
    r = shared_redis.client()
    r.set(Keys(prefix).regime, "BASE")
    ctx = ctx_for(shared_redis.url, prefix, tmp_path, 1.1)
    finish(start([WorkloadSpec("regime_flip", params={"period_s": 0.2})], ctx))
    ops = [o for o in read_history(tmp_path) if o.f == F.OPERATOR]
    assert ops[0].type is OpType.OK and ops[0].value == {"regime": "BASE", "initial": True,
                                                         "target": "regime"}
    flips = [(seq[0], seq[1]) for (_p, key), seq in pairs(ops, F.OPERATOR).items()
             if key != "regime-initial"]
    assert len(flips) >= 3
    current = "BASE"
    for inv, done in flips:
        assert done.type is OpType.OK
        assert inv.value["previous"] == current and inv.value["regime"] != current
        current = inv.value["regime"]
    assert r.get(Keys(prefix).regime) == current


def test_workers_stop_by_themselves(shared_redis: EmbeddedRedis, prefix: str, tmp_path: Path,
                                    start: Callable[..., WorkloadGroup]) -> None:
    ctx = ctx_for(shared_redis.url, prefix, tmp_path, 0.5)
    t0 = time.monotonic()
    g = start([WorkloadSpec("open_storm", rate=100, processes=2)], ctx)
    finish(g, timeout=20)
    assert time.monotonic() - t0 < 15
    assert g.names == ["open_storm-0", "open_storm-1"]
    s = read_summaries(tmp_path)
    assert {v["stopped_by"] for v in s.values()} == {"duration"}
    assert all(0.45 <= v["elapsed_s"] < 1.5 for v in s.values())
    # max_plans bounds the count as well.
    ctx2 = ctx_for(shared_redis.url, prefix + "m", tmp_path / "m", 30)
    finish(start([WorkloadSpec("open_storm", rate=0)], ctx2, max_plans=7))
    (m,) = read_summaries(tmp_path / "m").values()
    assert m["plans"] == 7 and m["stopped_by"] == "max_plans"
    assert len(stream_entries(shared_redis.client(decode_responses=False), prefix + "m")) == 7


def _wait_history(run_dir: Path, pred: Callable[[list[Op]], bool], timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (run_dir / "history").exists() and pred(read_history(run_dir)):
            return
        time.sleep(0.05)
    raise AssertionError("history condition not reached")


def test_stop_kills_stragglers(shared_redis: EmbeddedRedis, prefix: str, tmp_path: Path,
                               start: Callable[..., WorkloadGroup]) -> None:
    ctx = ctx_for(shared_redis.url, prefix, tmp_path, 60)
    g = start([WorkloadSpec("open_storm", rate=50, processes=2)], ctx)
    _wait_history(tmp_path, lambda ops: {o.process for o in ops} == set(g.names))
    stuck = g.pids()["open_storm-1"]
    assert stuck is not None
    os.kill(stuck, signal.SIGSTOP)  # a straggler that cannot see the stop event
    t0 = time.monotonic()
    codes = g.stop(timeout=0.5)
    assert time.monotonic() - t0 < 8
    assert not g.alive()
    assert codes["open_storm-0"] == 0 and codes["open_storm-1"] == -signal.SIGKILL
    assert not psutil.pid_exists(stuck)
    assert g.stop(timeout=0.1) == codes  # idempotent


def test_redis_down_is_recorded_and_survived(redis_server: EmbeddedRedis, prefix: str,
                                             tmp_path: Path,
                                             start: Callable[..., WorkloadGroup]) -> None:
    ctx = ctx_for(redis_server.url, prefix, tmp_path, 30)
    g = start([WorkloadSpec("open_storm", rate=200)], ctx)

    def oks(ops: list[Op]) -> list[Op]:
        return [o for o in ops if o.type is OpType.OK]

    _wait_history(tmp_path, lambda ops: len(oks(ops)) >= 20)
    redis_server.kill()
    _wait_history(tmp_path, lambda ops: sum(o.type in (OpType.FAIL, OpType.INFO)
                                            for o in ops) >= 3)
    down = read_history(tmp_path)
    assert g.alive() == ["open_storm-0"]
    redis_server.restart()
    restarted_ms = int(time.time() * 1000)
    _wait_history(tmp_path, lambda ops: sum(o.wall_ms > restarted_ms for o in oks(ops)) >= 20)
    assert g.stop(timeout=5) == {"open_storm-0": 0}
    ops = read_history(tmp_path)
    failed = [o for o in down if o.type in (OpType.FAIL, OpType.INFO)]
    assert all(o.value["error"] for o in failed)
    assert any(o.type is OpType.FAIL for o in failed)  # refused connections: surely not sent
    # Every invoke got exactly one completion; the ok ones are in the (new) stream.
    for seq in pairs(ops).values():
        assert [o.type for o in seq][0] is OpType.INVOKE and len(seq) == 2
    entries = stream_entries(redis_server.client(decode_responses=False), prefix)
    after = {o.value["entry_id"] for o in oks(ops) if o.wall_ms > restarted_ms}
    assert after <= set(entries)
    (summary,) = read_summaries(tmp_path).values()
    assert summary["stopped_by"] == "stop" and summary["fail"] + summary["info"] >= 3


def test_sustained_rate(shared_redis: EmbeddedRedis, prefix: str, tmp_path: Path,
                        start: Callable[..., WorkloadGroup]) -> None:
    ctx = ctx_for(shared_redis.url, prefix, tmp_path, 2.0)
    finish(start([WorkloadSpec("open_storm", rate=0)], ctx))
    (s,) = read_summaries(tmp_path).values()
    print(f"open_storm rate 0: {s['plans_per_s']:.0f} plans/s")
    assert s["ok"] == s["plans"] and s["plans_per_s"] >= 1000, s


def test_paced_rate(shared_redis: EmbeddedRedis, prefix: str, tmp_path: Path,
                    start: Callable[..., WorkloadGroup]) -> None:
    ctx = ctx_for(shared_redis.url, prefix, tmp_path, 1.0)
    finish(start([WorkloadSpec("open_storm", rate=200)], ctx))
    (s,) = read_summaries(tmp_path).values()
    assert 160 <= s["plans"] <= 201, s
    invokes = [o.time_ns for o in read_history(tmp_path) if o.type is OpType.INVOKE]
    gaps = sorted(b - a for a, b in zip(invokes, invokes[1:], strict=False))
    assert gaps[len(gaps) // 2] == pytest.approx(5e6, rel=0.3)  # median gap 5 ms


def test_summary_is_json(tmp_path: Path) -> None:
    (tmp_path / "workloads").mkdir()
    (tmp_path / "workloads" / "x-0.json").write_text(json.dumps({"plans": 1}))
    assert read_summaries(tmp_path) == {"x-0": {"plans": 1}}


def test_submit_plans_in_one_pipeline_judges_each(redis_server: EmbeddedRedis, prefix: str,
                                                 tmp_path: Path) -> None:
    """A batch: every invoke is in the file before the pipeline leaves, then one completion
    per plan: ok with its entry id, fail for an error reply (that plan only: a WRONGTYPE
    stream key), fail for all when no connection can be made."""
    from chaos.history import HistoryWriter
    from chaos.workloads import _Sender

    keys = Keys(prefix)
    r = redis_server.client(decode_responses=True)
    send = _Sender(redis.Redis.from_url(redis_server.url, decode_responses=True))
    hist = HistoryWriter(tmp_path, "batch")
    plans = [SubmitPlan(f"p{i}", "S000USDT", {"plan_id": f"p{i}", "symbol": "S000USDT"},
                        meta={"n": i}) for i in range(3)]
    r.set(f"{prefix}:not-a-stream", "x")
    replies = submit_plans(send, hist, keys.plans, [(p, {"workload": "w"}) for p in plans[:2]])
    replies += submit_plans(send, hist, f"{prefix}:not-a-stream", [(plans[2], {})])
    assert isinstance(replies[2], NotSent) and "WRONGTYPE" in str(replies[2])
    assert [e for e, _f in r.xrange(keys.plans)] == replies[:2]
    redis_server.kill()
    down = submit_plans(send, hist, keys.plans, [(p, {}) for p in plans[:2]])
    assert all(isinstance(x, NotSent | Unknown) for x in down)
    hist.close()
    ops = read_history(tmp_path)
    assert [(o.type, o.key) for o in ops[:4]] == [
        (OpType.INVOKE, "p0"), (OpType.INVOKE, "p1"), (OpType.OK, "p0"), (OpType.OK, "p1")]
    assert ops[0].value == {"plan": {"plan_id": "p0", "symbol": "S000USDT"}, "workload": "w",
                            "n": 0}
    assert ops[2].value == {"entry_id": replies[0]}
    assert [o.type for o in ops[4:6]] == [OpType.INVOKE, OpType.FAIL]
    assert [o.type for o in ops[6:]] == [OpType.INVOKE, OpType.INVOKE, OpType.FAIL, OpType.FAIL]
    assert all(a.time_ns < b.time_ns for a, b in zip(ops, ops[1:], strict=False))

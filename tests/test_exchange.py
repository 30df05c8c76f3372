"""The simulated exchange: one-way positions, double opens/closes recorded, several
processes on one ledger, and the Redis mirror written from it."""

from __future__ import annotations

import multiprocessing
import random
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import redis

from chaos.exchange import Effect, Exchange, Order, OrderRecord, Position
from governor_ref.keys import Keys
from governor_ref.protocol import Permit

BTC, ETH = "BTCUSDT", "ETHUSDT"


def open_(plan_id: str, symbol: str = BTC, side: str = "LONG", notional: str = "100",
          **kw: Any) -> Order:
    return Order(plan_id, symbol, "OPEN", side, notional, **kw)


def close(plan_id: str, symbol: str = BTC, side: str = "LONG", notional: str = "100",
          **kw: Any) -> Order:
    return Order(plan_id, symbol, "CLOSE", side, notional, **kw)


def replay(orders: list[OrderRecord]) -> dict[str, str]:
    """Rebuild the open positions from the ledger alone, checking each recorded effect and
    open count against the state before it; returns symbol -> position_id."""
    open_pos: dict[str, str] = {}
    for o in orders:
        effect = Effect(o.effect)
        if effect is Effect.OPEN or effect is Effect.FLIP:
            assert o.symbol not in open_pos, o
            assert o.position_id == f"pos-{o.symbol}-{o.seq}"
            open_pos[o.symbol] = o.position_id
        elif effect is Effect.ADD:
            assert open_pos.get(o.symbol) == o.position_id, o
        elif effect is Effect.CLOSE:
            assert open_pos.pop(o.symbol, None) == o.position_id, o
        else:
            assert o.position_id == "", o
        assert o.open_count_after == len(open_pos), o
    return open_pos


def test_open_on_flat_symbol_opens_a_position(ex: Exchange) -> None:
    fill = ex.execute(open_("p1", notional="150.50", issued_at_ms=123))
    assert (fill.seq, fill.effect, fill.position_id) == (1, "open", "pos-BTCUSDT-1")
    assert (fill.open_count_after, fill.issued_at_ms, fill.notional) == (1, 123, "150.5")
    assert fill.executed
    pos = ex.open_positions()[BTC]
    assert (pos.position_id, pos.side, pos.notional, pos.open_seq) == ("pos-BTCUSDT-1", "LONG",
                                                                       "150.5", 1)
    assert ex.open_count() == 1


def test_second_open_adds_to_the_position_and_is_recorded_as_double_open(ex: Exchange) -> None:
    first = ex.execute(open_("p1", notional="100"))
    second = ex.execute(open_("p2", notional="50"))
    assert second.effect == Effect.ADD and second.executed
    assert second.position_id == first.position_id
    assert second.open_count_after == 1
    assert ex.open_positions()[BTC].notional == "150"
    assert [o.plan_id for o in ex.double_opens()] == ["p2"]
    assert ex.double_closes() == []


def test_close_closes_the_open_position(ex: Exchange) -> None:
    opened = ex.execute(open_("p1", notional="80"))
    fill = ex.execute(close("c1", notional="80", fence=1))
    assert (fill.effect, fill.position_id, fill.open_count_after) == ("close", opened.position_id,
                                                                      0)
    assert fill.notional == "80" and fill.position_side == "LONG"
    assert ex.open_positions() == {}
    closed = ex.positions()[0]
    assert closed.close_seq == fill.seq and closed.closed_at_ms == fill.wall_ms


def test_close_on_flat_symbol_flips_into_the_opposite_side(ex: Exchange) -> None:
    ex.execute(open_("p1", side="LONG", notional="80"))
    ex.execute(close("c1", notional="80"))
    flip = ex.execute(close("c2", notional="80"))
    assert flip.effect == Effect.FLIP and flip.executed
    assert flip.position_id == f"pos-BTCUSDT-{flip.seq}" and flip.open_count_after == 1
    pos = ex.open_positions()[BTC]
    assert (pos.side, pos.notional, pos.position_id) == ("SHORT", "80", flip.position_id)
    assert [o.plan_id for o in ex.double_closes()] == ["c2"]


def test_flip_without_side_or_notional_mirrors_the_last_position(ex: Exchange) -> None:
    ex.execute(open_("p1", side="SHORT", notional="42"))
    ex.execute(close("c1", side="", notional="0"))
    flip = ex.execute(close("c2", side="", notional="0"))
    assert (flip.effect, flip.position_side, flip.notional) == ("flip", "LONG", "42")


def test_reduce_only_rejects_a_close_on_a_flat_symbol(tmp_path: Path) -> None:
    ex = Exchange.create(tmp_path / "ledger.db", reduce_only=True)
    ex.execute(open_("p1"))
    assert ex.execute(close("c1")).effect == Effect.CLOSE
    rejected = ex.execute(close("c2"))
    assert rejected.effect == Effect.REJECTED_REDUCE_ONLY and not rejected.executed
    assert (rejected.position_id, rejected.open_count_after) == ("", 0)
    assert ex.open_positions() == {} and ex.double_closes() == []
    assert len(ex.orders()) == 3  # the rejected order is on the record too


@pytest.mark.parametrize("notional", ["abc", "NaN", "-NaN", "sNaN", "Infinity", "1e999999"])
def test_an_open_whose_notional_is_not_a_number_is_rejected_not_raised(
        ex: Exchange, notional: str) -> None:
    # A governor that permits a malformed plan: the exchange refuses the order (the
    # apply layer then publishes a rejected result) instead of failing the order thread.
    bad = ex.execute(open_("p1", notional=notional))
    assert bad.effect == Effect.REJECTED_INVALID_NOTIONAL and not bad.executed
    assert ex.open_positions() == {}
    ex.execute(open_("p2"))
    # A close takes the position's notional whatever the order says.
    shut = ex.execute(close("c1", notional=notional))
    assert (shut.effect, shut.notional) == (Effect.CLOSE, "100")


def test_fenced_exchange_rejects_an_order_whose_fence_is_not_newer(tmp_path: Path) -> None:
    ex = Exchange.create(tmp_path / "ledger.db", fenced=True)
    ex.execute(open_("p1"))
    assert ex.execute(close("c5", fence=5)).effect == Effect.CLOSE
    ex.execute(open_("p2"))
    assert ex.execute(close("c3", fence=3)).effect == Effect.REJECTED_STALE_FENCE
    assert ex.execute(close("c5b", fence=5)).effect == Effect.REJECTED_STALE_FENCE
    assert ETH not in ex.open_positions()
    # Fences are per symbol; orders without one are not fenced.
    ex.execute(open_("e1", symbol=ETH))
    assert ex.execute(close("e2", symbol=ETH, fence=1)).effect == Effect.CLOSE
    assert ex.execute(close("c6", fence=6)).effect == Effect.CLOSE
    assert ex.execute(open_("p3")).effect == Effect.OPEN


def test_unfenced_exchange_ignores_fences(ex: Exchange) -> None:
    ex.execute(open_("p1"))
    ex.execute(close("c5", fence=5))
    ex.execute(open_("p2"))
    assert ex.execute(close("c3", fence=3)).effect == Effect.CLOSE


def test_a_rejected_order_does_not_raise_the_fence(tmp_path: Path) -> None:
    ex = Exchange.create(tmp_path / "ledger.db", fenced=True, reduce_only=True)
    assert ex.execute(close("c9", fence=9)).effect == Effect.REJECTED_REDUCE_ONLY
    ex.execute(open_("p1"))
    assert ex.execute(close("c4", fence=4)).effect == Effect.CLOSE


def test_open_count_after_tracks_every_order_and_the_max(ex: Exchange) -> None:
    for i, sym in enumerate(["AAUSDT", "BBUSDT", "CCUSDT"]):
        ex.execute(open_(f"o{i}", symbol=sym))
    ex.execute(close("c0", symbol="AAUSDT"))
    ex.execute(open_("o3", symbol="BBUSDT"))
    assert [o.open_count_after for o in ex.orders()] == [1, 2, 3, 2, 2]
    assert ex.max_open_count() == 3 and ex.open_count() == 2
    assert replay(ex.orders()) == {s: p.position_id for s, p in ex.open_positions().items()}


def test_close_all_closes_every_position_as_recorded_orders(ex: Exchange) -> None:
    ex.execute(open_("o1", symbol=BTC))
    ex.execute(open_("o2", symbol=ETH, side="SHORT"))
    fills = ex.close_all()
    assert [(f.symbol, f.effect, f.open_count_after) for f in fills] == [(BTC, "close", 1),
                                                                        (ETH, "close", 0)]
    assert ex.open_positions() == {} and replay(ex.orders()) == {}


def test_set_pnl_marks_the_open_position_only(ex: Exchange) -> None:
    ex.execute(open_("o1"))
    assert ex.set_pnl(BTC, -1.25) is True
    assert ex.set_pnl(ETH, 3.0) is False
    assert ex.open_positions()[BTC].pnl_pct == -1.25


def test_records_round_trip_through_json(ex: Exchange) -> None:
    order = open_("o1", fence=7, issued_at_ms=5)
    assert Order.from_json(order.to_json()) == order
    fill = ex.execute(order)
    assert OrderRecord.from_json(fill.to_json()) == fill
    pos = ex.open_positions()[BTC]
    assert Position.from_json(pos.to_json()) == pos


def test_order_from_permit_carries_fence_and_issue_time() -> None:
    permit = Permit("c1", BTC, "CLOSE", "LONG", "80", "12", 1_700_000_000_000)
    assert Order.from_permit(permit) == Order("c1", BTC, "CLOSE", "LONG", "80", 12,
                                              1_700_000_000_000)
    no_fence = Permit("o1", BTC, "OPEN", "LONG", "80", "", 1)
    assert Order.from_permit(no_fence).fence is None


def test_opening_a_ledger_that_does_not_exist_fails(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        Exchange(tmp_path / "typo.db").orders()
    assert not (tmp_path / "typo.db").exists()


def test_create_is_idempotent_and_keeps_the_ledger(ex: Exchange) -> None:
    ex.execute(open_("o1"))
    again = Exchange.create(ex.path)
    assert [o.plan_id for o in again.orders()] == ["o1"]


def test_take_remembers_the_first_consumer(ex: Exchange) -> None:
    assert ex.take("p1", "apply-1") is None
    assert ex.take("p1", "apply-2") == "apply-1"
    assert ex.take("p1", "apply-1") == "apply-1"


# -- several processes on one ledger ------------------------------------------------------

SYMBOLS = ["AAUSDT", "BBUSDT", "CCUSDT", "DDUSDT", "EEUSDT"]


def _trade(ex: Exchange, worker: int, n: int) -> None:
    rng = random.Random(worker)
    for i in range(n):
        sym = rng.choice(SYMBOLS)
        action = rng.choice(["OPEN", "CLOSE"])
        ex.execute(Order(f"w{worker}-{i}", sym, action, rng.choice(["LONG", "SHORT"]),
                         str(rng.randint(1, 100)), fence=rng.randint(1, 50)))


def test_concurrent_processes_keep_one_consistent_ledger(tmp_path: Path) -> None:
    ex = Exchange.create(tmp_path / "ledger.db", fenced=True)
    ex.execute(open_("warm-up", symbol="ZZUSDT"))  # the parent's connection exists at fork
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_trade, args=(ex, w, 200)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    try:
        assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    orders = ex.orders()
    assert [o.seq for o in orders] == list(range(1, 802))
    assert len({o.pid for o in orders}) == 5
    assert len({o.plan_id for o in orders}) == 801
    assert {Effect(o.effect) for o in orders} >= {Effect.OPEN, Effect.CLOSE, Effect.ADD,
                                                 Effect.FLIP, Effect.REJECTED_STALE_FENCE}
    # Times are taken under the write lock: the global order is the time order.
    assert all(a.mono_ns <= b.mono_ns for a, b in zip(orders, orders[1:], strict=False))
    final = replay(orders)
    assert final == {s: p.position_id for s, p in ex.open_positions().items()}
    assert ex.max_open_count() == max(o.open_count_after for o in orders)
    # Accepted fences rise per symbol.
    last: dict[str, int] = {}
    for o in orders:
        if o.executed and o.fence is not None:
            assert o.fence > last.get(o.symbol, 0), o
            last[o.symbol] = o.fence


def test_a_handle_shared_by_threads_serialises_their_orders(ex: Exchange) -> None:
    import threading

    def trade(w: int) -> None:
        _trade(ex, w, 50)

    threads = [threading.Thread(target=trade, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    orders = ex.orders()
    assert len(orders) == 200
    replay(orders)


# -- the Redis mirror -------------------------------------------------------------------------


def test_mirror_writes_open_positions_deletes_flat_ones_and_sets_exposure(
        ex: Exchange, shared_redis: Any, prefix: str) -> None:
    r: redis.Redis = shared_redis.client()
    keys = Keys(prefix)
    ex.execute(open_("o1", symbol=BTC, notional="100"))
    ex.execute(open_("o2", symbol=ETH, side="SHORT", notional="150"))
    ex.execute(close("c1", symbol=ETH))
    ex.set_pnl(BTC, -0.5)
    r.hset(keys.position(ETH), mapping={"position_id": "stale"})
    r.hset(keys.position("XRPUSDT"), mapping={"position_id": "stray"})
    try:
        assert ex.mirror(r, keys) == 1
        btc = ex.open_positions()[BTC]
        assert r.hgetall(keys.position(BTC)) == {
            "position_id": btc.position_id, "symbol": BTC, "side": "LONG", "notional": "100",
            "opened_at_ms": str(btc.opened_at_ms), "pnl_pct": "-0.5"}
        assert not r.exists(keys.position(ETH)) and not r.exists(keys.position("XRPUSDT"))
        assert r.get(keys.exposure_pct) == "0.1"
    finally:
        r.delete(keys.position(BTC), keys.exposure_pct)
        r.close()


def test_mirror_symbol_rewrites_one_symbol_and_exposure(
        tmp_path: Path, shared_redis: Any, prefix: str) -> None:
    ex = Exchange.create(tmp_path / "ledger.db")  # no capital: taken from Redis
    r: redis.Redis = shared_redis.client()
    keys = Keys(prefix)
    r.set(keys.capital, "400")
    try:
        ex.execute(open_("o1", notional="100"))
        pos = ex.mirror_symbol(r, keys, BTC)
        assert pos is not None and r.hget(keys.position(BTC), "position_id") == pos.position_id
        assert Decimal(r.get(keys.exposure_pct) or "") == Decimal("0.25")
        ex.execute(close("c1"))
        assert ex.mirror_symbol(r, keys, BTC) is None
        assert not r.exists(keys.position(BTC)) and r.get(keys.exposure_pct) == "0"
    finally:
        r.delete(keys.capital, keys.exposure_pct, keys.position(BTC))
        r.close()

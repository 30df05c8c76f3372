"""Many governor processes, many producer processes, one exchange: the invariants hold.

Governors are real ``python -m governor_ref run`` processes; producers are
separate processes; the apply layer executes permits on the SQLite exchange,
whose ledger (not the governor's own view) is what the assertions read.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import random
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from chaos.apply_layer import ApplyConfig, ApplyLayer
from chaos.exchange import Exchange, Order
from governor_ref.governor import group_drained
from governor_ref.keys import GROUP_GOVERNOR, Keys
from governor_ref.protocol import GovernorConfig

SYMBOLS = [f"C{i:02d}USDT" for i in range(40)]


def _produce(url: str, prefix: str, worker: int, plans: list[dict[str, str]],
             seed: int) -> None:
    r = redis.Redis.from_url(url)
    rng = random.Random(seed)
    k = Keys(prefix)
    for f in plans:
        f = dict(f, intent_created_at_ms=str(int(time.time() * 1000)))
        r.xadd(k.plans, f)
        if rng.random() < 0.05:
            time.sleep(rng.random() * 0.01)


class Cluster:
    """N governor processes + an apply layer + an exchange, on one prefix."""

    def __init__(self, url: str, prefix: str, tmp: Path, variant: str = "reference",
                 **config: Any) -> None:
        self.url, self.prefix, self.k = url, prefix, Keys(prefix)
        self.variant = variant
        self.r = redis.Redis.from_url(url, decode_responses=True)
        cfg = GovernorConfig().to_hash() | {n: str(v) for n, v in config.items()}
        self.r.hset(self.k.config, mapping=cfg)
        self.r.set(self.k.regime, "BASE")
        self.r.set(self.k.capital, "100000")
        self.r.set(self.k.exposure_pct, "0")
        for s in SYMBOLS:
            self.r.set(self.k.allocation(s), json.dumps({"allocation_pct": 0.05}))
        self.r.xgroup_create(self.k.plans, GROUP_GOVERNOR, id="0", mkstream=True)
        self.exchange = Exchange.create(tmp / "ledger.db")
        self.apply = ApplyLayer(url, self.k, self.exchange,
                                ApplyConfig(open_latency_ms=5, open_jitter_ms=15,
                                            close_latency_ms=5, close_jitter_ms=15,
                                            mirror_interval_s=0.5, capital=100000))
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, governors: int) -> None:
        self.apply.start_thread()
        for i in range(governors):
            env = dict(os.environ, REDIS_URL=self.url, GOVERNOR_PREFIX=self.prefix,
                       GOVERNOR_CONSUMER=f"cg{i}", GOVERNOR_VARIANT=self.variant,
                       GOVERNOR_LOG_LEVEL="WARNING")
            self.procs.append(subprocess.Popen([sys.executable, "-m", "governor_ref", "run"],
                                               env=env, stdout=subprocess.DEVNULL))

    def produce(self, plans: list[dict[str, str]], producers: int, seed: int) -> None:
        ctx = mp.get_context("spawn")
        chunks = [plans[i::producers] for i in range(producers)]
        ps = [ctx.Process(target=_produce, args=(self.url, self.prefix, i, c, seed + i))
              for i, c in enumerate(chunks)]
        for p in ps:
            p.start()
        for p in ps:
            p.join(120)
            assert p.exitcode == 0

    def drained(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if group_drained(self.r, self.k.plans, GROUP_GOVERNOR):
                return
            time.sleep(0.05)
        raise AssertionError("plans not drained")

    def decisions(self) -> Counter[str]:
        return Counter(f["plan_id"] for _i, f in self.r.xrange(self.k.events)
                       if f.get("decision") in ("PERMIT", "BLOCK"))

    def plan_ids(self) -> set[str]:
        return {f["plan_id"] for _i, f in self.r.xrange(self.k.plans)}

    def stop(self) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.apply.stop(timeout=10)
        self.exchange.close()


@pytest.fixture
def cluster(shared_redis: Any, prefix: str, tmp_path: Path) -> Iterator[Any]:
    made: list[Cluster] = []

    def make(**kw: Any) -> Cluster:
        c = Cluster(shared_redis.url, prefix, tmp_path, **kw)
        made.append(c)
        return c

    yield make
    for c in made:
        c.stop()


def _opens(n: int, seed: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    return [{"plan_id": f"o{i}", "symbol": rng.choice(SYMBOLS), "action": "OPEN",
             "side": rng.choice(["LONG", "SHORT"]), "notional": f"{rng.randint(10, 150)}",
             "source": "intent_bridge"} for i in range(n)]


def test_open_storm_never_exceeds_slots_nor_opens_a_symbol_twice(cluster: Any) -> None:
    c = cluster(slots_BASE=4, max_total_notional=100000)
    c.start(governors=4)
    c.produce(_opens(2000, seed=1), producers=8, seed=100)
    c.drained()
    time.sleep(0.3)  # let the last orders execute
    c.drained()
    decided = c.decisions()
    assert set(decided) == c.plan_ids(), "every plan (and every rotation plan) is decided"
    assert max(decided.values()) == 1, "exactly one decision per plan"
    orders = c.exchange.orders()
    opens = [o for o in orders if o.action == "OPEN" and o.executed]
    rotations = [p for p in decided if p.startswith("rot_")]
    print(f"opens executed {len(opens)}, rotations {len(rotations)}, "
          f"max open {c.exchange.max_open_count()}")
    assert len(opens) > 4 and rotations, "rotation churned the slots: the bound was exercised"
    assert c.exchange.max_open_count() <= 4
    assert c.exchange.double_opens() == []
    assert c.exchange.double_closes() == []


def test_duplicate_close_storm_closes_each_position_once(cluster: Any) -> None:
    c = cluster(slots_BASE=20, max_positions=20, max_total_notional=100000)
    c.start(governors=4)
    targets = SYMBOLS[:20]
    c.produce([{"plan_id": f"open-{s}", "symbol": s, "action": "OPEN", "side": "LONG",
                "notional": "100", "source": "intent_bridge"} for s in targets],
              producers=2, seed=7)
    deadline = time.monotonic() + 30
    while len(c.exchange.open_positions()) < 20 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(c.exchange.open_positions()) == 20
    c.drained()
    closes = [{"plan_id": f"cl-{src}-{n}-{s}", "symbol": s, "action": "CLOSE", "source": src}
              for n in range(5) for s in targets
              for src in ("harvest_brain", "exit_monitor", "kill_switch")]
    assert len(closes) == 300
    c.produce(closes, producers=3, seed=9)
    c.drained()
    time.sleep(0.5)
    c.drained()
    decided = c.decisions()
    assert max(decided.values()) == 1
    closes_by_position = Counter(o.position_id for o in c.exchange.orders()
                                 if o.action == "CLOSE" and o.executed)
    assert len(closes_by_position) == 20, "every position was closed"
    assert max(closes_by_position.values()) == 1, "no position closed twice"
    assert c.exchange.double_closes() == []
    assert c.exchange.open_positions() == {}


def test_exchange_flip_is_what_a_double_close_looks_like(tmp_path: Path) -> None:
    """Guards the assertion above: the ledger does record a second close as a flip."""
    ex = Exchange.create(tmp_path / "l.db")
    ex.execute(Order("a", "XXUSDT", "OPEN", "LONG", "100"))
    ex.execute(Order("b", "XXUSDT", "CLOSE"))
    ex.execute(Order("c", "XXUSDT", "CLOSE"))
    assert len(ex.double_closes()) == 1
    ex.close()


@pytest.mark.parametrize("variant", ["legacy", "reference"])
def test_seed_incident_legacy_opens_more_than_ten_reference_never(cluster: Any,
                                                                  variant: str) -> None:
    """The seed's incident: 17 positions open when the limit was 10 (SCAN-based count)."""
    c = cluster(variant=variant, slots_BASE=10, max_positions=10, max_total_notional=100000)
    c.start(governors=4)
    c.produce(_opens(600, seed=3), producers=8, seed=300)
    c.drained()
    time.sleep(0.3)
    c.drained()
    peak = c.exchange.max_open_count()
    print(f"{variant}: peak open positions {peak} (limit 10)")
    if variant == "legacy":
        assert peak > 10
    else:
        assert peak <= 10
        assert c.exchange.double_opens() == []

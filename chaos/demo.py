"""A short demo load: governors, producers, apply layer and exchange on an embedded Redis.

Open storms over a few symbols, and duplicate closes from three emitters
within milliseconds of each other, against N governor processes; then the
exchange ledger (the ground truth) is read back: peak open positions
against the slot limit, double opens, double closes, decisions by reason.
It is the smallest whole run of the system, and what the README's first
command starts until the chaos suite takes over.
"""

from __future__ import annotations

import json
import logging
import os
import random
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import redis

from chaos import reaper
from chaos.apply_layer import ApplyConfig, ApplyLayer
from chaos.exchange import Exchange
from chaos.redis_servers import EmbeddedRedis
from governor_ref.governor import group_drained
from governor_ref.keys import GROUP_GOVERNOR, Keys
from governor_ref.protocol import GovernorConfig

log = logging.getLogger(__name__)

EMITTERS = ("harvest_brain", "exit_monitor", "kill_switch")


@dataclass
class DemoResult:
    variant: str
    governors: int
    seconds: float
    plans: int
    decisions: Counter[str] = field(default_factory=Counter)
    slots: int = 0
    peak_open: int = 0
    opens_executed: int = 0
    closes_executed: int = 0
    double_opens: int = 0
    double_closes: int = 0
    run_dir: Path | None = None

    @property
    def ok(self) -> bool:
        return self.peak_open <= self.slots and not self.double_opens and not self.double_closes


def _producer(r: redis.Redis, k: Keys, stop: threading.Event, rng: random.Random,
              symbols: list[str], rate: float, counter: list[int]) -> None:
    """intent_bridge: OPEN plans at about ``rate`` per second."""
    n = 0
    while not stop.is_set():
        sym = rng.choice(symbols)
        r.xadd(k.plans, {"plan_id": f"ib-{os.getpid()}-{n}", "symbol": sym, "action": "OPEN",
                         "side": rng.choice(["LONG", "SHORT"]),
                         "notional": str(rng.randint(20, 150)), "source": "intent_bridge",
                         "intent_created_at_ms": str(int(time.time() * 1000))})
        n += 1
        counter[0] += 1
        stop.wait(rng.expovariate(rate))


def _closers(r: redis.Redis, k: Keys, stop: threading.Event, rng: random.Random,
             counter: list[int]) -> None:
    """harvest_brain, exit_monitor and kill_switch close the same position within ms."""
    n = 0
    while not stop.wait(0.15):
        open_syms = [key.split(":")[-1] for key in r.scan_iter(match=k.position_pattern)]
        if not open_syms:
            continue
        sym = rng.choice(open_syms)
        for src in EMITTERS:
            r.xadd(k.plans, {"plan_id": f"cl-{n}-{src}", "symbol": sym, "action": "CLOSE",
                             "source": src, "intent_created_at_ms": str(int(time.time() * 1000))})
            counter[0] += 1
            time.sleep(rng.random() * 0.003)
        n += 1


def run_demo(seconds: float = 10.0, governors: int = 3, variant: str = "reference",
             seed: int = 1, run_dir: Path | None = None,
             progress: bool = True) -> DemoResult:
    run_dir = run_dir or Path("reports") / "runs" / "demo" / time.strftime("%Y%m%dT%H%M%S")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "logs").mkdir(exist_ok=True)
    symbols = [f"D{i:02d}USDT" for i in range(12)]
    cfg = GovernorConfig(slots_BASE=4, max_total_notional=100000)
    result = DemoResult(variant, governors, seconds, 0, slots=cfg.slots_for("BASE"),
                        run_dir=run_dir)
    server = EmbeddedRedis(name="demo").start()
    procs: list[subprocess.Popen[bytes]] = []
    apply = None
    exchange = Exchange.create(run_dir / "ledger.sqlite")
    try:
        r = server.client()
        k = Keys("quantum")
        r.hset(k.config, mapping=cfg.to_hash())
        r.set(k.regime, "BASE")
        r.set(k.capital, "100000")
        r.set(k.exposure_pct, "0")
        for s in symbols:
            r.set(k.allocation(s), json.dumps({"allocation_pct": 0.05}))
        r.xgroup_create(k.plans, GROUP_GOVERNOR, id="0", mkstream=True)
        (run_dir / "config.json").write_text(json.dumps(
            {"variant": variant, "governors": governors, "seconds": seconds, "seed": seed,
             "redis": server.url, "governor_config": cfg.to_hash()}, indent=2))
        for i in range(governors):
            env = dict(os.environ, REDIS_URL=server.url, GOVERNOR_PREFIX=k.prefix,
                       GOVERNOR_CONSUMER=f"gov-{i + 1}", GOVERNOR_VARIANT=variant)
            logf = open(run_dir / "logs" / f"gov-{i + 1}.log", "ab")  # noqa: SIM115
            # Own session: Ctrl-C is the demo's to handle (it stops the governors itself).
            procs.append(subprocess.Popen([sys.executable, "-m", "governor_ref", "run"],
                                          env=env, stdout=logf, stderr=subprocess.STDOUT,
                                          start_new_session=True))
            reaper.watch(procs[-1].pid, group=True)
            logf.close()
        apply = ApplyLayer(server.url, k, exchange,
                           ApplyConfig(open_latency_ms=10, open_jitter_ms=30,
                                       close_latency_ms=10, close_jitter_ms=30,
                                       capital=100000, seed=seed))
        apply.start_thread()
        stop = threading.Event()
        counter = [0]
        threads = [threading.Thread(target=_producer, args=(server.client(), k, stop,
                                                            random.Random(seed + i), symbols,
                                                            60.0, counter), daemon=True)
                   for i in range(2)]
        threads.append(threading.Thread(target=_closers, args=(server.client(), k, stop,
                                                               random.Random(seed + 99),
                                                               counter), daemon=True))
        for t in threads:
            t.start()
        t0 = time.monotonic()
        while (elapsed := time.monotonic() - t0) < seconds:
            if progress:
                _bar(elapsed, seconds, counter[0], exchange.open_count())
            time.sleep(0.2)
        stop.set()
        for t in threads:
            t.join(5)
        _drain(r, k, 15)
        time.sleep(0.2)
        if progress:
            _bar(seconds, seconds, counter[0], exchange.open_count(), end=True)
        result.plans = r.xlen(k.plans)
        for _i, f in r.xrange(k.events):
            if f.get("decision") in ("PERMIT", "BLOCK"):
                result.decisions[f["decision"] if f["decision"] == "PERMIT"
                                 else f["reason"]] += 1
        orders = exchange.orders()
        result.peak_open = exchange.max_open_count()
        result.opens_executed = sum(1 for o in orders if o.action == "OPEN" and o.executed)
        result.closes_executed = sum(1 for o in orders if o.action == "CLOSE" and o.executed)
        result.double_opens = len(exchange.double_opens())
        result.double_closes = len(exchange.double_closes())
    finally:
        if apply is not None:
            apply.stop(timeout=10)
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            reaper.forget(p.pid)
        exchange.close()
        server.stop()
    return result


def _drain(r: redis.Redis, k: Keys, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if group_drained(r, k.plans, GROUP_GOVERNOR):
            return
        time.sleep(0.05)
    log.warning("plans not drained within %.0fs", timeout)


def _bar(elapsed: float, total: float, plans: int, open_now: int, end: bool = False) -> None:
    width = 30
    done = int(width * min(1.0, elapsed / total))
    sys.stderr.write(f"\r[{'#' * done}{'.' * (width - done)}] {elapsed:4.1f}/{total:.0f}s "
                     f"plans {plans:5d}  open now {open_now:2d}")
    if end:
        sys.stderr.write("\n")
    sys.stderr.flush()


def format_result(res: DemoResult) -> str:
    lines = [
        f"variant {res.variant}, {res.governors} governor processes, {res.seconds:.0f}s, "
        f"{res.plans} plans",
        f"  peak open positions   {res.peak_open} (slot limit {res.slots})",
        f"  opens executed        {res.opens_executed}",
        f"  closes executed       {res.closes_executed}",
        f"  double opens          {res.double_opens}",
        f"  double closes         {res.double_closes}",
        "  decisions: " + ", ".join(f"{k} {v}" for k, v in res.decisions.most_common()),
        f"  verdict: {'OK' if res.ok else 'VIOLATED'}   (run dir {res.run_dir})",
    ]
    return "\n".join(lines)

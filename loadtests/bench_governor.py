"""Throughput and latency of the reference governor, against the server's own ceiling.

For 1, 2 and 4 governor processes (real ``python -m governor_ref run``
processes on an embedded redis-server) it measures

* decisions/s while draining a backlog of plans (batched reads),
* p50/p99 decision latency at a paced load of half that throughput
  (from the producer's XADD to the decision event reaching a reader),
* peak resident memory of each governor process;

and, in the same run, the ceiling of the same Lua scripts on the same
server: the same plans sent as pipelined EVALSHA calls with no stream
reading, parsing or acknowledging (``redis-benchmark`` cannot send a plan
mix, so a pipelined loop from two client processes is used). The ratio
governor / ceiling is what the loop costs. Every figure is the median of
``--repeat`` rounds; machines are noisy.

    python loadtests/bench_governor.py [--plans 20000] [--repeat 3] [--procs 1,2,4]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import random
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil
import redis

from chaos.redis_servers import EmbeddedConfig, EmbeddedRedis
from governor_ref.governor import group_drained
from governor_ref.keys import GROUP_GOVERNOR, Keys
from governor_ref.protocol import GovernorConfig, Plan
from governor_ref.reference import plan_args
from governor_ref.scripts import ScriptSet

ROOT = Path(__file__).resolve().parents[1]
SYMBOLS = [f"B{i:02d}USDT" for i in range(40)]


def make_plans(n: int, seed: int, tag: str) -> list[dict[str, str]]:
    """A plan mix: 80% OPEN over 40 symbols, 20% CLOSE, ids unique per round."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        sym = rng.choice(SYMBOLS)
        f = {"plan_id": f"{tag}-{i}", "symbol": sym, "source": "intent_bridge",
             "intent_created_at_ms": "0"}
        if rng.random() < 0.8:
            f.update(action="OPEN", side=rng.choice(["LONG", "SHORT"]),
                     notional=f"{rng.randint(20, 150)}.00")
        else:
            f.update(action="CLOSE", source=rng.choice(["harvest_brain", "exit_monitor"]))
        out.append(f)
    return out


def setup_prefix(r: redis.Redis, prefix: str) -> None:
    k = Keys(prefix)
    cfg = GovernorConfig(max_total_notional=1e9, slots_BASE=4).to_hash()
    pipe = r.pipeline()
    pipe.hset(k.config, mapping=cfg)
    pipe.set(k.regime, "BASE")
    pipe.set(k.capital, "100000")
    pipe.set(k.exposure_pct, "0")
    for s in SYMBOLS:
        pipe.set(k.allocation(s), json.dumps({"allocation_pct": 0.1}))
    pipe.execute()
    r.xgroup_create(k.plans, GROUP_GOVERNOR, id="0", mkstream=True)


def fresh(plans: list[dict[str, str]]) -> list[dict[str, str]]:
    now = str(int(time.time() * 1000))
    return [dict(p, intent_created_at_ms=now) for p in plans]


# -- ceiling -----------------------------------------------------------------------------
def _ceiling_worker(url: str, prefix: str, plans: list[dict[str, str]], batch: int,
                    start: mp.Event, out: mp.Queue) -> None:
    r = redis.Redis.from_url(url)
    scripts = ScriptSet()
    scripts.load(r)
    calls = []
    k = Keys(prefix)
    for f in plans:
        p = Plan.from_fields(f)
        s = scripts["decide_open" if p.action == "OPEN" else "decide_close"]
        calls.append((s.sha, plan_args(prefix, "ceiling", "", p)))
    start.wait()
    t0 = time.perf_counter()
    for i in range(0, len(calls), batch):
        pipe = r.pipeline(transaction=False)
        for sha, args in calls[i:i + batch]:
            pipe.evalsha(sha, 1, k.config, *args)
        pipe.execute()
    out.put(time.perf_counter() - t0)


def ceiling(url: str, r: redis.Redis, plans: list[dict[str, str]], tag: str,
            clients: int = 2, batch: int = 128) -> float:
    prefix = f"bc{tag}"
    setup_prefix(r, prefix)
    plans = fresh(plans)
    ctx = mp.get_context("spawn")
    start, out = ctx.Event(), ctx.Queue()
    chunks = [plans[i::clients] for i in range(clients)]
    procs = [ctx.Process(target=_ceiling_worker, args=(url, prefix, c, batch, start, out))
             for c in chunks]
    for p in procs:
        p.start()
    time.sleep(1.0)  # let the workers build their call lists
    t0 = time.perf_counter()
    start.set()
    [out.get(timeout=300) for _ in procs]
    wall = time.perf_counter() - t0
    for p in procs:
        p.join()
    n = r.xlen(Keys(prefix).events)
    assert n >= len(plans), f"ceiling decided {n} of {len(plans)}"
    return len(plans) / wall


# -- governors ---------------------------------------------------------------------------
@dataclass
class GovRound:
    procs: int
    decisions_per_s: float
    p50_ms: float
    p99_ms: float
    rss_mb_max: float


def _spawn(url: str, prefix: str, i: int) -> subprocess.Popen[bytes]:
    env = dict(os.environ, REDIS_URL=url, GOVERNOR_PREFIX=prefix, GOVERNOR_CONSUMER=f"bg{i}",
               GOVERNOR_LOG_LEVEL="WARNING")
    return subprocess.Popen([sys.executable, "-m", "governor_ref", "run"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def governor_round(url: str, r: redis.Redis, plans: list[dict[str, str]], nprocs: int,
                   tag: str) -> GovRound:
    prefix = f"bg{tag}"
    k = Keys(prefix)
    setup_prefix(r, prefix)
    procs = [_spawn(url, prefix, i) for i in range(nprocs)]
    rss: dict[int, float] = {}
    stop_sampling = threading.Event()

    def sample() -> None:
        ps = [psutil.Process(p.pid) for p in procs]
        while not stop_sampling.is_set():
            for p in ps:
                with contextlib.suppress(psutil.Error):
                    rss[p.pid] = max(rss.get(p.pid, 0.0), p.memory_info().rss / 2**20)
            stop_sampling.wait(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        deadline = time.monotonic() + 30
        while len(r.xinfo_consumers(k.plans, GROUP_GOVERNOR)) < nprocs:
            if time.monotonic() > deadline:
                raise RuntimeError("governors did not start")
            time.sleep(0.05)
        # Throughput: drain a backlog.
        batch = fresh(plans)
        t0 = time.perf_counter()
        for i in range(0, len(batch), 1000):
            pipe = r.pipeline(transaction=False)
            for f in batch[i:i + 1000]:
                pipe.xadd(k.plans, f)
            pipe.execute()
        while not group_drained(r, k.plans, GROUP_GOVERNOR):
            time.sleep(0.005)
        wall = time.perf_counter() - t0
        decided = r.xlen(k.events)
        rate = decided / wall
        # Latency: paced at half that rate for ~3 s.
        lat = paced_latency(r, k, plans, rate / 2, tag)
    finally:
        stop_sampling.set()
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    return GovRound(nprocs, rate, lat[0], lat[1], max(rss.values(), default=0.0))


def paced_latency(r: redis.Redis, k: Keys, plans: list[dict[str, str]], rate: float,
                  tag: str, seconds: float = 3.0) -> tuple[float, float]:
    n = max(50, min(len(plans), int(rate * seconds)))
    sent: dict[str, float] = {}
    seen: dict[str, float] = {}
    last_id = r.xinfo_stream(k.events)["last-generated-id"]
    done = threading.Event()
    reader = redis.Redis(connection_pool=r.connection_pool)

    def read() -> None:
        cursor = last_id
        while not done.is_set() or len(seen) < len(sent):
            resp = reader.xread({k.events: cursor}, count=1000, block=200)
            now = time.perf_counter()
            for _s, entries in resp or []:
                for eid, f in entries:
                    cursor = eid
                    pid = f[b"plan_id"].decode()
                    seen.setdefault(pid, now)
            if done.is_set() and time.perf_counter() - end > 10:
                return

    end = float("inf")
    t = threading.Thread(target=read, daemon=True)
    t.start()
    interval = 1.0 / rate
    nxt = time.perf_counter()
    for i, f in enumerate(plans[:n]):
        pid = f"{tag}-lat-{i}"
        f = dict(f, plan_id=pid, intent_created_at_ms=str(int(time.time() * 1000)))
        while time.perf_counter() < nxt:
            pass
        sent[pid] = time.perf_counter()
        r.xadd(k.plans, f)
        nxt += interval
    end = time.perf_counter()
    done.set()
    t.join(15)
    lats = sorted((seen[p] - sent[p]) * 1000 for p in sent if p in seen)
    if not lats:
        return float("nan"), float("nan")
    return lats[len(lats) // 2], lats[min(len(lats) - 1, int(len(lats) * 0.99))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plans", type=int, default=20000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--procs", default="1,2,4")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--out", type=Path, default=ROOT / "reports" / "bench" / "governor.json")
    args = ap.parse_args()
    counts = [int(x) for x in args.procs.split(",")]
    plans = make_plans(args.plans, args.seed, "x")
    server = EmbeddedRedis(EmbeddedConfig()).start()
    try:
        r = server.client(decode_responses=False)
        version = r.info("server")["redis_version"]
        print(f"redis-server {version} at {server.url}; {args.plans} plans per round, "
              f"{args.repeat} rounds, {os.cpu_count()} cores")
        ceilings: list[float] = []
        rounds: dict[int, list[GovRound]] = {n: [] for n in counts}
        for rep in range(args.repeat):
            tagged = [dict(p, plan_id=f"c{rep}-{p['plan_id']}") for p in plans]
            ceilings.append(ceiling(server.url, r, tagged, f"{rep}"))
            print(f"  round {rep + 1}: ceiling {ceilings[-1]:,.0f}/s", flush=True)
            for n in counts:
                tagged = [dict(p, plan_id=f"g{rep}n{n}-{p['plan_id']}") for p in plans]
                g = governor_round(server.url, r, tagged, n, f"{rep}n{n}")
                rounds[n].append(g)
                print(f"  round {rep + 1}: {n} governor(s) {g.decisions_per_s:,.0f}/s "
                      f"p50 {g.p50_ms:.2f} ms p99 {g.p99_ms:.2f} ms rss {g.rss_mb_max:.1f} MB",
                      flush=True)
            r.flushall()  # our own embedded server: keep memory flat between rounds
    finally:
        server.stop()
    ceil = statistics.median(ceilings)
    print()
    print(f"ceiling (same scripts, pipelined EVALSHA, no stream loop): {ceil:,.0f} decisions/s")
    print(f"{'governors':>9} {'decisions/s':>12} {'ratio':>6} {'p50 ms':>7} {'p99 ms':>7} "
          f"{'max RSS MB':>10}")
    summary = []
    for n in counts:
        med = GovRound(
            n,
            statistics.median(g.decisions_per_s for g in rounds[n]),
            statistics.median(g.p50_ms for g in rounds[n]),
            statistics.median(g.p99_ms for g in rounds[n]),
            max(g.rss_mb_max for g in rounds[n]),
        )
        summary.append(asdict(med) | {"ratio": med.decisions_per_s / ceil})
        print(f"{n:>9} {med.decisions_per_s:>12,.0f} {med.decisions_per_s / ceil:>6.2f} "
              f"{med.p50_ms:>7.2f} {med.p99_ms:>7.2f} {med.rss_mb_max:>10.1f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"redis_version": version, "plans": args.plans,
                                    "repeat": args.repeat, "ceiling": ceil,
                                    "ceilings": ceilings, "governors": summary}, indent=2))
    print(f"\nwritten {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

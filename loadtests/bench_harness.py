"""Throughput of one workload producer, and what recording the history costs it.

Against an embedded redis-server, each round measures

* one ``open_storm`` producer process at rate 0 (as fast as it can: one XADD
  at a time, no pipelining, an ``invoke`` and an ``ok`` recorded per plan,
  exactly as in a chaos run): sustained plans/s;
* the same process with history recording off (``record_history=False``,
  a benchmark-only switch): the ratio on/off is what recording costs;
* the :class:`~chaos.history.HistoryWriter` alone, in this process, with no
  Redis: invoke+ok pairs of plan-sized values, in ops/s (one op = one line,
  written and flushed).

Every figure is the median of ``--repeat`` rounds (machines are noisy). The
producer's figure comes from the worker's own summary (ok plans / time in
its loop), so process start-up is not counted.

    python loadtests/bench_harness.py [--duration 3] [--repeat 3] [--ops 100000]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from chaos.history import F, HistoryWriter
from chaos.redis_servers import EmbeddedConfig, EmbeddedRedis
from chaos.scenario import WorkloadSpec
from chaos.workloads import WorkloadContext, read_summaries, start_workloads

ROOT = Path(__file__).resolve().parents[1]
SYMBOLS = [f"B{i:02d}USDT" for i in range(40)]


def producer_round(url: str, prefix: str, duration: float, record: bool) -> float:
    """Plans/s of one open_storm process at rate 0."""
    with tempfile.TemporaryDirectory(prefix="bench-harness-") as run_dir:
        ctx = WorkloadContext(redis_url=url, prefix=prefix, run_dir=run_dir, seed=7,
                              duration_s=duration, symbols=SYMBOLS, record_history=record)
        with start_workloads([WorkloadSpec("open_storm", rate=0, symbols=40)], ctx) as group:
            if not group.join(duration + 60):
                raise RuntimeError(f"producer did not finish: {group.alive()}")
            codes = group.exitcodes()
        if set(codes.values()) != {0}:
            raise RuntimeError(f"producer failed: {codes}")
        (summary,) = read_summaries(run_dir).values()
        if summary["fail"] or summary["info"]:
            raise RuntimeError(f"errors during the round: {summary}")
        return float(summary["plans_per_s"])


def writer_round(ops: int) -> float:
    """Ops/s of the HistoryWriter alone (ops/2 invoke+ok pairs, plan-sized values)."""
    pairs = ops // 2
    now = str(int(time.time() * 1000))
    with tempfile.TemporaryDirectory(prefix="bench-history-") as run_dir:
        w = HistoryWriter(run_dir, "bench")
        t0 = time.perf_counter()
        for i in range(pairs):
            key = f"open-0-{i}"
            plan = {"plan_id": key, "symbol": SYMBOLS[i % 40], "action": "OPEN",
                    "source": "intent_bridge", "intent_created_at_ms": now, "side": "LONG",
                    "notional": "87.25"}
            w.invoke(F.SUBMIT, key=key, symbol=plan["symbol"], plan=plan,
                     workload="open_storm")
            w.ok(F.SUBMIT, key=key, symbol=plan["symbol"], entry_id=f"{now}-{i}")
        elapsed = time.perf_counter() - t0
        w.close()
    return 2 * pairs / elapsed


@dataclass
class Series:
    rounds: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.rounds)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=3.0, help="seconds per producer round")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--ops", type=int, default=100_000, help="history ops per writer round")
    ap.add_argument("--out", type=Path, default=ROOT / "reports" / "bench" / "harness.json")
    args = ap.parse_args()
    on, off, writer = Series(), Series(), Series()
    server = EmbeddedRedis(EmbeddedConfig(), name="bench-harness").start()
    try:
        r = server.client()
        version = r.info("server")["redis_version"]
        print(f"redis-server {version} at {server.url}; {args.duration:g} s per producer round, "
              f"{args.repeat} rounds, {os.cpu_count()} cores")
        for rep in range(args.repeat):
            on.rounds.append(producer_round(server.url, f"bh{rep}on", args.duration, True))
            r.flushall()  # our own server: keep memory flat between rounds
            off.rounds.append(producer_round(server.url, f"bh{rep}off", args.duration, False))
            r.flushall()
            writer.rounds.append(writer_round(args.ops))
            print(f"  round {rep + 1}: producer {on.rounds[-1]:,.0f} plans/s with history, "
                  f"{off.rounds[-1]:,.0f} without; writer {writer.rounds[-1]:,.0f} ops/s",
                  flush=True)
    finally:
        server.stop()
    ratio = on.median / off.median
    cost_us = 1e6 / on.median - 1e6 / off.median
    print()
    print(f"{'measure':<40} {'median':>12}  rounds")
    for label, s, unit in (("producer, history on", on, "plans/s"),
                           ("producer, history off", off, "plans/s"),
                           ("history writer alone", writer, "ops/s")):
        rounds = ", ".join(f"{x:,.0f}" for x in s.rounds)
        print(f"{label + ' (' + unit + ')':<40} {s.median:>12,.0f}  {rounds}")
    print(f"\nrecording on / off: {ratio:.2f} (recording costs {1 - ratio:.0%} of the "
          f"throughput, {cost_us:.0f} µs per plan = 2 ops; the writer alone takes "
          f"{2e6 / writer.median:.0f} µs per 2 ops)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "redis_version": version, "cores": os.cpu_count(), "duration_s": args.duration,
        "repeat": args.repeat, "writer_ops": args.ops,
        "producer_history_on_plans_per_s": on.median, "producer_history_on_rounds": on.rounds,
        "producer_history_off_plans_per_s": off.median,
        "producer_history_off_rounds": off.rounds,
        "history_writer_ops_per_s": writer.median, "history_writer_rounds": writer.rounds,
        "recording_ratio_on_off": ratio, "recording_cost_us_per_plan": cost_us,
    }, indent=2))
    shown = args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out
    print(f"\nwritten {shown}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

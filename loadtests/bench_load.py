"""What the Locust load test itself can do, and what it adds to a governor's latency.

Each Locust run is a subprocess (``locust -f loadtests/locustfile.py --headless``, one
Locust process, its own embedded Redis and run directory): Locust is never imported
here (its import monkey-patches gevent into this process). A round measures

* (a) the highest rate one Locust process sustains: ``--rate`` stepped up
  (``--steps``, default 1000,1500,2000,2500,3000,4000,5000 plans/s, ``--step-s`` each) against
  ``loadtests/trivial_governor.py`` (it PERMITs every plan at once, so the governor is
  not the bottleneck). A step is *sustained* when Locust's achieved request rate (CSV,
  Aggregated ``Requests/s``) is at least 95% of the target, its HDR p99 is under 50 ms
  and no plan went undecided; the figure is the highest sustained step below the first
  step that is not (the steps stop there);
* (b) the harness's latency floor: the trivial governor at 500 plans/s
  (``--floor-s``): p50/p99/p99.9 from ``latency.json``. Beside it, on an embedded
  redis-server of the same binary and configuration, measured from this process with
  redis-py: a PING round trip, and an XADD + XREAD pipelined in one round trip
  (``--rtt-n`` each, every one timed); and ``redis-benchmark -t ping -c 1`` (one
  client, its own p50/p99) when the binary is on PATH;
* (c) the reference (2 governors, the default mix) at 500 plans/s (``--ref-s``):
  p50/p99/p99.9 and the run's verdict (``results.json``).

Every figure is the median of ``--rounds`` rounds (default 3) with its range; ``--quick``
is one round of shorter runs. Run directories go under ``reports/bench/load/`` (one per
Locust run, overwritten next time); the summary to ``reports/bench/load.json``.

    python loadtests/bench_load.py [--rounds 3] [--quick]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from chaos.redis_servers import EmbeddedConfig, EmbeddedRedis

ROOT = Path(__file__).resolve().parents[1]
LOCUSTFILE = ROOT / "loadtests" / "locustfile.py"
TRIVIAL = f"{sys.executable} {ROOT / 'loadtests' / 'trivial_governor.py'}"
OUT = ROOT / "reports" / "bench" / "load"
SUSTAIN_SHARE = 0.95
SUSTAIN_P99_MS = 50.0


@dataclass
class Run:
    rate: float
    achieved: float
    count: int
    fails: int
    p50: float
    p99: float
    p999: float
    valid: object
    broken: list[str]
    exit_code: int
    wall_s: float


def locust_bin() -> str:
    exe = Path(sys.executable).parent / "locust"
    return str(exe) if exe.exists() else (shutil.which("locust") or "locust")


def run_locust(tag: str, rate: float, secs: int, governor_cmd: str | None) -> Run:
    """One headless Locust run in a subprocess; its figures from the files it leaves."""
    run_dir = OUT / tag
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    csv_prefix = OUT / f"{tag}-csv"
    users = max(20, int(rate // 50))
    cmd = [locust_bin(), "-f", str(LOCUSTFILE), "--headless", "-u", str(users),
           "-r", str(users), "-t", f"{secs}s", "--rate", f"{rate:g}",
           "--run-dir", str(run_dir), "--csv", str(csv_prefix), "--only-summary"]
    if governor_cmd:
        cmd += ["--governor-cmd", governor_cmd]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=secs + 180)
    wall = time.monotonic() - t0
    (OUT / f"{tag}.log").write_text(proc.stdout)
    lat_path = run_dir / "latency.json"
    if not lat_path.exists():
        raise RuntimeError(f"{tag}: no latency.json (exit {proc.returncode}); "
                           f"see {OUT / (tag + '.log')}")
    lat = json.loads(lat_path.read_text())
    achieved, count, fails = 0.0, 0, 0
    with open(f"{csv_prefix}_stats.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            if row["Name"] == "Aggregated":
                achieved = float(row["Requests/s"])
                count, fails = int(row["Request Count"]), int(row["Failure Count"])
    valid: object = "unknown"
    broken: list[str] = []
    res_path = run_dir / "results.json"
    if res_path.exists():
        res = json.loads(res_path.read_text())
        valid = res.get("valid")
        broken = [k for k, v in (res.get("invariants") or {}).items()
                  if isinstance(v, dict) and v.get("valid") is False]
    return Run(rate, achieved, count, fails, lat.get("p50") or 0.0, lat.get("p99") or 0.0,
               lat.get("p99.9") or 0.0, valid, broken, proc.returncode, wall)


def sustained(r: Run) -> bool:
    return (r.achieved >= SUSTAIN_SHARE * r.rate and r.p99 < SUSTAIN_P99_MS
            and r.fails == 0)


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


def round_trips(n: int) -> dict[str, float]:
    """PING and pipelined XADD+XREAD round trips (ms), and redis-benchmark's PING, one
    client, on an embedded redis-server of the same binary and configuration."""
    server = EmbeddedRedis(EmbeddedConfig(), name="bench-load").start()
    out: dict[str, float] = {}
    try:
        r = server.client(decode_responses=False)
        for _ in range(200):
            r.ping()
        ping = []
        for _ in range(n):
            t = time.perf_counter_ns()
            r.ping()
            ping.append((time.perf_counter_ns() - t) / 1e6)
        stream = "bench:rtt"
        last = r.xadd(stream, {"x": "0"})
        rtt = []
        for i in range(n):
            t = time.perf_counter_ns()
            pipe = r.pipeline(transaction=False)
            pipe.xadd(stream, {"plan_id": f"p{i}", "symbol": "S000USDT", "action": "OPEN"},
                      maxlen=1000, approximate=True)
            pipe.xread({stream: last}, count=1)
            new_id, entries = pipe.execute()
            rtt.append((time.perf_counter_ns() - t) / 1e6)
            assert entries and entries[0][1][0][0] == new_id
            last = new_id
        out |= {"ping_p50": pct(ping, 50), "ping_p99": pct(ping, 99),
                "xadd_xread_p50": pct(rtt, 50), "xadd_xread_p99": pct(rtt, 99)}
        rb = shutil.which("redis-benchmark")
        if rb:
            p = subprocess.run([rb, "-h", "127.0.0.1", "-p", str(server.port), "-t", "ping",
                                "-n", "20000", "-c", "1", "--csv"], capture_output=True,
                               text=True, timeout=120)
            for row in csv.DictReader(p.stdout.splitlines()):
                if row.get("test") == "PING_MBULK":
                    out |= {"rb_p50": float(row["p50_latency_ms"]),
                            "rb_p99": float(row["p99_latency_ms"]),
                            "rb_rps": float(row["rps"])}
    finally:
        server.stop()
    return out


def med(values: list[float]) -> str:
    if not values:
        return "-"
    m = statistics.median(values)
    fmt = (lambda v: f"{v:,.0f}") if m >= 100 else (lambda v: f"{v:.2f}")
    if len(values) == 1:
        return fmt(m)
    return f"{fmt(m)} ({fmt(min(values))}-{fmt(max(values))})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="1 round, shorter runs")
    ap.add_argument("--steps", default="1000,1500,2000,2500,3000,4000,5000")
    ap.add_argument("--step-s", type=int, default=8)
    ap.add_argument("--floor-s", type=int, default=10)
    ap.add_argument("--ref-s", type=int, default=20)
    ap.add_argument("--rtt-n", type=int, default=5000)
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.step_s, args.floor_s, args.ref_s = 1, 5, 6, 10
    steps = [float(s) for s in args.steps.split(",")]
    t_start = time.monotonic()
    print(f"{os.cpu_count()} cores; {args.rounds} round(s); steps {args.steps} plans/s "
          f"x {args.step_s} s; floor 500/s x {args.floor_s} s; reference 500/s x "
          f"{args.ref_s} s", flush=True)
    best: list[float] = []
    step_runs: list[list[dict]] = []
    floors: list[Run] = []
    refs: list[Run] = []
    rtts: list[dict[str, float]] = []
    for k in range(args.rounds):
        top, runs = 0.0, []
        for rate in steps:
            r = run_locust(f"r{k}-step{rate:g}", rate, args.step_s, TRIVIAL)
            ok = sustained(r)
            runs.append(asdict(r) | {"sustained": ok})
            print(f"  round {k + 1}: step {rate:,.0f}/s achieved {r.achieved:,.0f}/s "
                  f"p99 {r.p99:.2f} ms fails {r.fails} -> "
                  f"{'sustained' if ok else 'NOT sustained'} ({r.wall_s:.0f} s)", flush=True)
            if not ok:
                break
            top = rate
        best.append(top)
        step_runs.append(runs)
        f = run_locust(f"r{k}-floor", 500, args.floor_s, TRIVIAL)
        floors.append(f)
        print(f"  round {k + 1}: floor (trivial governor) 500/s: p50 {f.p50:.2f} p99 "
              f"{f.p99:.2f} p99.9 {f.p999:.2f} ms ({f.wall_s:.0f} s)", flush=True)
        rt = round_trips(args.rtt_n)
        rtts.append(rt)
        print(f"  round {k + 1}: round trips: " +
              ", ".join(f"{key} {v:.3f}" for key, v in rt.items()), flush=True)
        g = run_locust(f"r{k}-reference", 500, args.ref_s, None)
        refs.append(g)
        print(f"  round {k + 1}: reference 500/s: p50 {g.p50:.2f} p99 {g.p99:.2f} p99.9 "
              f"{g.p999:.2f} ms, achieved {g.achieved:,.0f}/s, valid {g.valid}, exit "
              f"{g.exit_code} ({g.wall_s:.0f} s)", flush=True)
    total = time.monotonic() - t_start

    def col(runs: list[Run], attr: str) -> list[float]:
        return [float(getattr(x, attr)) for x in runs]

    def rcol(key: str) -> list[float]:
        return [x[key] for x in rtts if key in x]

    print()
    print(f"highest sustained rate, one Locust process (>= {SUSTAIN_SHARE:.0%} of target, "
          f"p99 < {SUSTAIN_P99_MS:g} ms, no undecided plan): {med(best)} plans/s "
          f"(target >= 2,000)")
    print()
    print(f"{'at 500 plans/s unless said':<44} {'p50 ms':>20} {'p99 ms':>20} "
          f"{'p99.9 ms':>20}")
    rows = [("trivial governor (harness floor)", col(floors, "p50"), col(floors, "p99"),
             col(floors, "p999")),
            ("reference, 2 governors", col(refs, "p50"), col(refs, "p99"),
             col(refs, "p999")),
            ("redis-py PING round trip", rcol("ping_p50"), rcol("ping_p99"), []),
            ("redis-py XADD+XREAD, one pipeline", rcol("xadd_xread_p50"),
             rcol("xadd_xread_p99"), []),
            ("redis-benchmark PING, 1 client", rcol("rb_p50"), rcol("rb_p99"), [])]
    for name, a, b, c in rows:
        print(f"{name:<44} {med(a):>20} {med(b):>20} {med(c):>20}")
    verdicts = [f"{x.valid}/exit {x.exit_code}" for x in refs]
    p99 = statistics.median(col(refs, "p99"))
    print()
    print(f"reference verdicts: {', '.join(verdicts)}; p99 at 500/s {p99:.2f} ms "
          f"(target <= 5 ms: {'met' if p99 <= 5 else 'MISSED'}); total {total:.0f} s")
    summary = {"rounds": args.rounds, "quick": args.quick, "cores": os.cpu_count(),
               "steps": steps, "step_s": args.step_s, "floor_s": args.floor_s,
               "ref_s": args.ref_s, "sustained_rule": {"share": SUSTAIN_SHARE,
                                                       "p99_ms": SUSTAIN_P99_MS},
               "highest_sustained": best, "step_runs": step_runs,
               "floor": [asdict(x) for x in floors], "reference": [asdict(x) for x in refs],
               "round_trips": rtts, "total_s": total,
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    (OUT.parent / "load.json").write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

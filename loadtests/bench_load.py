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
  step that is not (the steps stop there). The same steps again with ``--own-executor``
  (the world runs no apply layer and no exchange, which otherwise execute every permit
  of the trivial governor and take most of a core): the sender's own capacity. Each step
  prints the CPU of each part (% of one core, psutil, over the steady part of the load):
  the Locust process, the world, Redis, the governors, and ``others`` (the rest of the
  machine: other users of a shared host);
* (b) the harness's latency floor: the trivial governor at 500 plans/s
  (``--floor-s``): p50/p99/p99.9 from ``latency.json``. Beside it, on an embedded
  redis-server of the same binary and configuration, measured from this process with
  redis-py: a PING round trip, and an XADD + XREAD pipelined in one round trip
  (``--rtt-n`` each, every one timed); and ``redis-benchmark -t ping -c 1`` (one
  client, its own p50/p99) when the binary is on PATH;
  and the same path without Locust: the same world with the trivial governor, driven by
  a plain client in this process (one thread sending each plan at its scheduled time,
  one XREAD reader; :func:`plain_client`), ``--floor-s`` at 500/s. The gap between the
  round trips and this is what the machine takes for the four process hops of a
  decision; the gap between this and the trivial governor under Locust is Locust's;
* (c) the reference (2 governors, the default mix) at 500 plans/s (``--ref-s``):
  p50/p99/p99.9 and the run's verdict (``results.json``). Just before it, the host's
  own noise: how late a lone 1 ms ``time.sleep`` wakes (``--noise-n`` sleeps) while
  nothing of ours runs. On a shared VM this moves from minute to minute (p99 0.6 ms
  one hour, 3.7 ms the next) and bounds what any latency measured here can be.

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
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

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
    cpu: dict[str, float] = field(default_factory=dict)  # % of one core, by part
    loop: str = ""  # the Locust process's gevent loop backend (latency.json)


def _part(p: psutil.Process, root: int) -> str:
    """Which part of a load-test run a process is, for the CPU shares."""
    if p.pid == root:
        return "locust"
    cmd = " ".join(p.cmdline())
    if "chaos.loadtest.world" in cmd:
        return "world"
    if "redis-server" in cmd:
        return "redis"
    if "chaos.reaper" in cmd:
        return "reapers"
    return "governors"


def cpu_shares(proc: subprocess.Popen[str], started: Path, secs: int) -> dict[str, float]:
    """CPU of each part of the run (% of one core) over the load's steady part (from 1 s
    after the first plan to 1 s before the end), and of everything else on the machine
    (``others``: other users of the host, measured as busy time minus the run's)."""
    deadline = time.monotonic() + 120
    while not list(started.glob("locust-*.jsonl")) and time.monotonic() < deadline:
        if proc.poll() is not None:
            return {}
        time.sleep(0.1)
    time.sleep(1)
    root = psutil.Process(proc.pid)

    def snap() -> dict[int, tuple[str, float]]:
        out = {}
        for p in [root, *root.children(recursive=True)]:
            try:
                t = p.cpu_times()
                out[p.pid] = (_part(p, proc.pid), t.user + t.system)
            except psutil.Error:
                continue
        return out

    def busy() -> float:
        t = psutil.cpu_times()
        return t.user + t.nice + t.system + t.irq + t.softirq + getattr(t, "steal", 0.0)

    a, b0, t0 = snap(), busy(), time.monotonic()
    time.sleep(max(1.0, secs - 2.5))
    b, b1, dt = snap(), busy(), time.monotonic() - t0
    shares: dict[str, float] = {}
    for pid, (part, used) in b.items():
        if pid in a:
            shares[part] = shares.get(part, 0.0) + (used - a[pid][1]) / dt * 100
    mine = sum(shares.values())
    shares["others"] = max(0.0, (b1 - b0) / dt * 100 - mine)
    return {k: round(v, 1) for k, v in shares.items()}


def locust_bin() -> str:
    exe = Path(sys.executable).parent / "locust"
    return str(exe) if exe.exists() else (shutil.which("locust") or "locust")


def run_locust(tag: str, rate: float, secs: int, governor_cmd: str | None,
               *extra: str) -> Run:
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
    cmd += extra
    t0 = time.monotonic()
    log_path = OUT / f"{tag}.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True)
        try:
            cpu = cpu_shares(proc, run_dir / "history", secs)
            proc.wait(timeout=secs + 180)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    wall = time.monotonic() - t0
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
               lat.get("p99.9") or 0.0, valid, broken, proc.returncode, wall, cpu,
               str(lat.get("event_loop") or ""))


def sustained(r: Run) -> bool:
    return (r.achieved >= SUSTAIN_SHARE * r.rate and r.p99 < SUSTAIN_P99_MS
            and r.fails == 0)


def _cpu(shares: dict[str, float]) -> str:
    order = ("locust", "world", "redis", "governors", "reapers", "others")
    return " ".join(f"{k} {shares[k]:.0f}" for k in order if k in shares) or "-"


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


def plain_client(tag: str, rate: float, secs: int, governor_cmd: str) -> dict[str, float]:
    """The decision path without Locust or gevent: the same world (embedded Redis, two
    governors of ``governor_cmd``, apply layer, exchange, recorder) started as the load
    test starts it, driven from this process by one thread that sends each plan with a
    plain XADD at its scheduled time (``time.sleep``, to the microsecond) and one thread
    that reads the events stream with XREAD BLOCK, as the Locust reader does. Latency from
    the scheduled time, as in the load test. What this gives with the trivial governor is
    what the machine itself takes for the hops every decision needs (producer -> Redis ->
    governor -> Redis -> reader): the floor under the load test's own floor."""
    import random
    import threading

    import redis

    from chaos.loadtest.world import WorldProcess

    run_dir = OUT / tag
    shutil.rmtree(run_dir, ignore_errors=True)
    world = WorldProcess(["--run-dir", str(run_dir), "--governor-cmd", governor_cmd,
                          "--governors", "2"])
    info = world.start()
    try:
        plans = f"{info.prefix}:stream:apply.plan"
        events = f"{info.prefix}:stream:governor.events"
        w = redis.Redis.from_url(info.redis_url, single_connection_client=True)
        rd = redis.Redis.from_url(info.redis_url, single_connection_client=True)
        last = rd.xrevrange(events, "+", "-", count=1)
        cursor = last[0][0] if last else b"0-0"
        scheduled: dict[bytes, float] = {}
        late: list[float] = []
        done = threading.Event()

        def read() -> None:
            nonlocal cursor
            while not done.is_set() or scheduled:
                resp = rd.xread({events: cursor}, count=5000, block=100)
                now = time.perf_counter()
                for _stream, entries in resp or ():
                    for _id, fields in entries:
                        at = scheduled.pop(fields.get(b"plan_id", b""), None)
                        if at is not None:
                            late.append((now - at) * 1000)
                    cursor = entries[-1][0]
                if done.is_set() and not resp:
                    break

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        rng, base = random.Random(1), random.randrange(10**8)
        t0, n = time.perf_counter() + 0.05, int(rate * secs)
        for k in range(n):
            at = t0 + k / rate
            delay = at - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            pid = f"plain-{base}-{k}"
            scheduled[pid.encode()] = at
            w.xadd(plans, {"plan_id": pid, "symbol": f"S{rng.randrange(40):03d}USDT",
                           "action": "OPEN", "source": "intent_bridge",
                           "intent_created_at_ms": str(time.time_ns() // 1_000_000),
                           "side": rng.choice(("LONG", "SHORT")), "notional": "100.00"})
        done.set()
        reader.join(timeout=10)
        w.close()
        rd.close()
    finally:
        world.stop()
    return {"plain_count": len(late), "plain_sent": n, "plain_p50": pct(late, 50),
            "plain_p99": pct(late, 99), "plain_p999": pct(late, 99.9)}


def machine_noise(n: int) -> dict[str, float]:
    """How late a lone sleeper wakes on this machine right now (ms past a 1 ms sleep, n
    times): nothing of ours runs, so this is the host's own scheduling noise (other
    virtual machines on it, its vCPU stalls), the floor under every latency here."""
    late = []
    for _ in range(n):
        t = time.perf_counter()
        time.sleep(0.001)
        late.append((time.perf_counter() - t) * 1000 - 1.0)
    return {"sleep_late_p50": pct(late, 50), "sleep_late_p99": pct(late, 99),
            "sleep_late_p999": pct(late, 99.9), "sleep_late_max": max(late)}


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
    ap.add_argument("--noise-n", type=int, default=3000,
                    help="1 ms sleeps timed before each reference run (the host's noise)")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.step_s, args.floor_s, args.ref_s = 1, 5, 6, 10
    steps = [float(s) for s in args.steps.split(",")]
    t_start = time.monotonic()
    print(f"{os.cpu_count()} cores; {args.rounds} round(s); steps {args.steps} plans/s "
          f"x {args.step_s} s; floor 500/s x {args.floor_s} s; reference 500/s x "
          f"{args.ref_s} s", flush=True)
    best: list[float] = []
    best_own: list[float] = []
    step_runs: list[list[dict]] = []
    floors: list[Run] = []
    refs: list[Run] = []
    rtts: list[dict[str, float]] = []

    def climb(k: int, label: str, *extra: str) -> tuple[float, list[dict]]:
        top, runs = 0.0, []
        for rate in steps:
            tag = f"r{k}-{label}{rate:g}"
            r = run_locust(tag, rate, args.step_s, TRIVIAL, *extra)
            # Read: its run directory goes (a 5,000/s step leaves ~120 MB of history, a
            # whole benchmark 3 GB); its log and Locust's CSVs stay.
            shutil.rmtree(OUT / tag, ignore_errors=True)
            ok = sustained(r)
            runs.append(asdict(r) | {"sustained": ok, "world": label})
            print(f"  round {k + 1}: {label} {rate:,.0f}/s achieved {r.achieved:,.0f}/s "
                  f"p99 {r.p99:.2f} ms fails {r.fails} -> "
                  f"{'sustained' if ok else 'NOT sustained'} ({r.wall_s:.0f} s); CPU % "
                  f"{_cpu(r.cpu)}", flush=True)
            if not ok:
                break
            top = rate
        return top, runs

    for k in range(args.rounds):
        top, runs = climb(k, "step")
        best.append(top)
        own, runs_own = climb(k, "own-executor", "--own-executor")
        best_own.append(own)
        step_runs.append(runs + runs_own)
        f = run_locust(f"r{k}-floor", 500, args.floor_s, TRIVIAL)
        floors.append(f)
        print(f"  round {k + 1}: floor (trivial governor) 500/s: p50 {f.p50:.2f} p99 "
              f"{f.p99:.2f} p99.9 {f.p999:.2f} ms ({f.wall_s:.0f} s)", flush=True)
        rt = round_trips(args.rtt_n)
        rtts.append(rt)
        print(f"  round {k + 1}: round trips: " +
              ", ".join(f"{key} {v:.3f}" for key, v in rt.items()), flush=True)
        plain = plain_client(f"r{k}-plain", 500, args.floor_s, TRIVIAL)
        rt |= plain
        print(f"  round {k + 1}: no Locust (a plain paced client), trivial governor, 500/s: "
              f"p50 {plain['plain_p50']:.2f} p99 {plain['plain_p99']:.2f} p99.9 "
              f"{plain['plain_p999']:.2f} ms ({plain['plain_count']} of "
              f"{plain['plain_sent']} decided)", flush=True)
        noise = machine_noise(args.noise_n)
        rt |= noise
        print(f"  round {k + 1}: idle machine, a 1 ms sleep wakes late by p50 "
              f"{noise['sleep_late_p50']:.3f} p99 {noise['sleep_late_p99']:.3f} p99.9 "
              f"{noise['sleep_late_p999']:.3f} max {noise['sleep_late_max']:.2f} ms",
              flush=True)
        g = run_locust(f"r{k}-reference", 500, args.ref_s, None)
        refs.append(g)
        print(f"  round {k + 1}: reference 500/s: p50 {g.p50:.2f} p99 {g.p99:.2f} p99.9 "
              f"{g.p999:.2f} ms, achieved {g.achieved:,.0f}/s, valid {g.valid}, exit "
              f"{g.exit_code}, {g.loop} loop ({g.wall_s:.0f} s)", flush=True)
    total = time.monotonic() - t_start

    def col(runs: list[Run], attr: str) -> list[float]:
        return [float(getattr(x, attr)) for x in runs]

    def rcol(key: str) -> list[float]:
        return [x[key] for x in rtts if key in x]

    print()
    print(f"highest sustained rate, one Locust process (>= {SUSTAIN_SHARE:.0%} of target, "
          f"p99 < {SUSTAIN_P99_MS:g} ms, no undecided plan): {med(best)} plans/s "
          f"(target >= 2,000); the sender alone (--own-executor: no apply layer or exchange "
          f"competing for the cores): {med(best_own)} plans/s")
    print()
    print(f"{'at 500 plans/s unless said':<44} {'p50 ms':>20} {'p99 ms':>20} "
          f"{'p99.9 ms':>20}")
    rows = [("trivial governor (harness floor)", col(floors, "p50"), col(floors, "p99"),
             col(floors, "p999")),
            ("reference, 2 governors", col(refs, "p50"), col(refs, "p99"),
             col(refs, "p999")),
            ("no Locust: plain client, trivial governor", rcol("plain_p50"),
             rcol("plain_p99"), rcol("plain_p999")),
            ("redis-py PING round trip", rcol("ping_p50"), rcol("ping_p99"), []),
            ("redis-py XADD+XREAD, one pipeline", rcol("xadd_xread_p50"),
             rcol("xadd_xread_p99"), []),
            ("redis-benchmark PING, 1 client", rcol("rb_p50"), rcol("rb_p99"), []),
            ("idle machine: a 1 ms sleep wakes late by", rcol("sleep_late_p50"),
             rcol("sleep_late_p99"), rcol("sleep_late_p999"))]
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
               "highest_sustained": best, "highest_sustained_own_executor": best_own,
               "step_runs": step_runs,
               "floor": [asdict(x) for x in floors], "reference": [asdict(x) for x in refs],
               "round_trips": rtts, "total_s": total,
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    (OUT.parent / "load.json").write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

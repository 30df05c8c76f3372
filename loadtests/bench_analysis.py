"""Benchmark the analysis layer on a synthetic ~10^6-operation run directory.

    python loadtests/bench_analysis.py [--ops 1000000] [--rounds 3] [--keep DIR]

The run directory is the one ``bench_checkers.py`` generates (a plain valid workload:
submit, plan, decision, take, order and result operations per plan, and its ledger),
plus a workload phase, fault windows and regime flips so that every plot has them to
draw, and its results.json (``check_run``, as every ``chaos run`` writes one).

Each round runs in fresh processes (nothing cached between rounds):

- baseline: ``chaos.checkers.gather(run_dir)`` alone: the one read of the run every
  consumer (checkers, report, analysis) pays;
- analysis: ``load_run(run_dir)`` (that same gather), then every frame of the contract,
  then every function of ``chaos.analysis.plots`` drawn to a PNG (rendered, as a notebook
  or the report renders it).

It prints each step's median and range over the rounds, and the ratio of the analysis
total (load + frames + plots) to the gather baseline measured in the same run.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "loadtests"))

from bench_checkers import T0_MS, make_run  # noqa: E402

from chaos.history import Op, OpType, write_history  # noqa: E402

PLOTS = ("positions", "slot_leases", "capital", "capital_symbols", "exit_locks", "latency",
         "decisions_by_reason", "block_reasons_over_time")


def decorate(run_dir: Path) -> None:
    """A workload phase, fault windows and regime flips over the generated history."""
    last = max(int(line.split(b'"wall_ms":')[1].split(b",")[0])
               for p in (run_dir / "history").glob("*.jsonl")
               for line in [p.read_bytes().rstrip(b"\n").rsplit(b"\n", 1)[-1]])
    span = last - T0_MS
    ops: list[Op] = []

    def op(typ: OpType, f: str, ms: int, key: str, **value: object) -> None:
        ops.append(Op(typ, f, "harness", ms * 1_000_000, ms, key, None, dict(value)))

    op(OpType.INVOKE, "phase", T0_MS, "workload")
    op(OpType.OK, "phase", last, "workload")
    for i in range(10):
        start = T0_MS + span * (i + 1) // 12
        for typ, phase, at in ((OpType.INVOKE, "start", start), (OpType.OK, "start", start),
                               (OpType.INVOKE, "stop", start + span // 60),
                               (OpType.OK, "stop", start + span // 60)):
            op(typ, "fault", at, f"fault-{i}", kind=("kill_governor", "partition")[i % 2],
               phase=phase)
    for i in range(6):
        at = T0_MS + span * (2 * i + 1) // 13
        regime = ("CHOP", "TREND_STRONG", "BASE")[i % 3]
        op(OpType.INVOKE, "operator", at, f"regime-{i}", regime=regime)
        op(OpType.OK, "operator", at + 5, f"regime-{i}", regime=regime)
    write_history(run_dir, ops, "bench-harness")


def _clock() -> tuple[float, float]:
    """Wall time, and CPU time of this process and its reaped children (the forked scan
    workers of gather): on a shared machine the CPU time is the steadier figure."""
    ch = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.perf_counter(), time.process_time() + ch.ru_utime + ch.ru_stime


def measure(run_dir: str, what: str) -> dict[str, float]:
    from chaos.checkers import gather

    out: dict[str, float] = {}

    def step(key: str, fn: Any) -> Any:
        w, c = _clock()
        res = fn()
        w2, c2 = _clock()
        out[f"{key}_s"], out[f"{key}_cpu"] = w2 - w, c2 - c
        return res

    if what == "gather":
        out["ops"] = step("gather", lambda: gather(run_dir)).ops
        return out
    from chaos.analysis import COLUMNS, load_run, plots

    run = step("load", lambda: load_run(run_dir))
    out["ops"] = run.facts.ops
    rows = step("frames", lambda: {name: len(getattr(run, name)) for name in COLUMNS})
    out.update({f"rows_{k}": v for k, v in rows.items()})
    for name in PLOTS:
        step(f"plot_{name}", lambda name=name: getattr(plots, name)(run).savefig(
            io.BytesIO(), format="png", dpi=100))
    for unit in ("s", "cpu"):
        out[f"plots_{unit}"] = sum(out[f"plot_{n}_{unit}"] for n in PLOTS)
        out[f"total_{unit}"] = out[f"load_{unit}"] + out[f"frames_{unit}"] + out[f"plots_{unit}"]
    return out


def _sub(run_dir: Path, what: str) -> dict[str, float]:
    res = subprocess.run([sys.executable, __file__, "--measure", str(run_dir), "--what", what],
                         check=True, capture_output=True, text=True, cwd=ROOT)
    return json.loads(res.stdout.strip().splitlines()[-1])


def _fmt(xs: list[float]) -> str:
    return f"{statistics.median(xs):6.2f} s ({min(xs):.2f}-{max(xs):.2f})"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ops", type=int, default=1_000_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--keep", default=None, help="generate the run dir here and keep it")
    ap.add_argument("--measure", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--what", default="analysis", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.measure:
        print(json.dumps(measure(a.measure, a.what)))
        return
    base = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="bench-analysis-"))
    run_dir = base / f"n{a.ops}"
    try:
        if not (run_dir / "results.json").exists():
            t0 = time.perf_counter()
            info = make_run(run_dir, a.ops)
            decorate(run_dir)
            from chaos.checkers import check_run

            check_run(run_dir, models=False)
            print(f"generated {info['ops']} ops / {info['plans']} plans and checked them in "
                  f"{time.perf_counter() - t0:.1f} s", file=sys.stderr)
        base_runs, runs = [], []
        for _ in range(a.rounds):  # interleaved: both see the same machine load
            base_runs.append(_sub(run_dir, "gather"))
            runs.append(_sub(run_dir, "analysis"))
    finally:
        if not a.keep:
            shutil.rmtree(base, ignore_errors=True)
    print(f"history: {runs[0]['ops']:.0f} operations; rows: " + ", ".join(
        f"{k[5:]} {v:.0f}" for k, v in runs[0].items() if k.startswith("rows_")))
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; median (range) of "
          f"{a.rounds} rounds, each in a fresh process:")
    print(f"  {'':<33} {'wall':<22} cpu")
    table = [("gather alone (baseline)", base_runs, "gather"),
             ("load_run (gather, results.json)", runs, "load"),
             ("every frame", runs, "frames"), ("every plot, rendered", runs, "plots")]
    table += [(f"  plots.{n}", runs, f"plot_{n}") for n in PLOTS]
    table.append(("analysis total", runs, "total"))
    for label, rs, key in table:
        print(f"  {label:<33} {_fmt([r[key + '_s'] for r in rs]):<22} "
              f"{_fmt([r[key + '_cpu'] for r in rs])}")
    for unit in ("s", "cpu"):
        g = statistics.median(r[f"gather_{unit}"] for r in base_runs)
        tot = statistics.median(r[f"total_{unit}"] for r in runs)
        per = [r[f"total_{unit}"] / r[f"load_{unit}"] for r in runs]
        print(f"  ratio ({'wall' if unit == 's' else 'cpu'}): total / gather baseline "
              f"{tot / g:.2f}x; total / its own load_run {statistics.median(per):.2f}x "
              f"({min(per):.2f}-{max(per):.2f})")

if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    main()

"""How late an event-anchored fault starts after its event, against a time-scheduled one.

Runs ``chaos run`` (reference governors, embedded Redis) on a scenario with one anchored
fault per event kind and one fault at a fixed time, ``--repeat`` rounds, and reads the lags
from each run's history:

* anchored: ``anchor_lag_ms`` of the start invoke (event to the nemesis recording the start:
  from the entry id, whole ms, for stream events, so up to 1 ms too much; on the monotonic
  clock for ``take``), and to the start's ``ok`` (the fault applied: SIGSTOP sent, knobs
  turned...);
* the baseline, in the same runs: the time-scheduled fault's start invoke after ``t0 + at``.

    python loadtests/bench_anchors.py [--repeat 3] [--governor seed]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from govtools import small_scenario  # noqa: E402

from chaos.history import F, OpType, read_history  # noqa: E402

FAULTS = """
[[workload]]
kind = "duplicate_close"
period_ms = 200

[[fault]]
kind = "pause_governor"
duration = 0.3
target = "gov-1"
after = { event = "permit", action = "OPEN", instance = "gov-1", n = 3 }

[[fault]]
kind = "pause_governor"
duration = 0.3
target = "gov-2"
after = { event = "block", n = 5 }

[[fault]]
kind = "slow_exchange"
duration = 0.3
after = { event = "take", n = 10 }

[[fault]]
kind = "redelivery"
duration = 0.3
after = { event = "result", status = "executed", n = 12 }

[[fault]]
kind = "kill_governor"
target = "gov-1"
after = { event = "exit_lock", n = 2 }

[[fault]]
kind = "pause_governor"
duration = 0.3
target = "gov-2"
after = { event = "submit", n = 150 }

[[fault]]
kind = "pause_governor"
duration = 0.2
target = "gov-2"
at = AT
"""
AT_S = 2.5


def lags(run_dir: Path) -> dict[str, list[tuple[float, float | None]]]:
    """Per anchor event ("time" for the scheduled fault): (to invoke, to ok) in ms; the
    second is None when the start failed (another fault held the governor)."""
    ops = read_history(run_dir)
    t0 = next(op.time_ns for op in ops if op.f == F.PHASE and op.key == "workload"
              and op.type == OpType.INVOKE)
    done = {op.key: op for op in ops if op.f == F.FAULT and op.type != OpType.INVOKE
            and op.value.get("phase") == "start"}
    out: dict[str, list[tuple[float, float | None]]] = defaultdict(list)
    for start in ops:
        if start.f != F.FAULT or start.type != OpType.INVOKE or \
                start.value.get("phase") != "start":
            continue
        if "anchor_lag_ms" in start.value:
            lag = float(start.value["anchor_lag_ms"])
            event = start.value["after"]["event"]
        else:
            lag = (start.time_ns - t0) / 1e6 - AT_S * 1000
            event = "time (baseline)"
        end = done.get(start.key)
        applied = lag + (end.time_ns - start.time_ns) / 1e6 \
            if end is not None and end.type == OpType.OK else None
        out[event].append((lag, applied))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--governor", default="reference")
    args = ap.parse_args()
    text = small_scenario("anchors", 4).replace("processes = 2\nrate = 200", "rate = 60") \
        + FAULTS.replace("at = AT", f"at = {AT_S}")
    allr: dict[str, list[tuple[float, float | None]]] = defaultdict(list)
    with tempfile.TemporaryDirectory() as tmp:
        scn = Path(tmp) / "anchors.toml"
        scn.write_text(text)
        for i in range(args.repeat):
            out = Path(tmp) / f"run{i}"
            p = subprocess.run([sys.executable, "-m", "chaos", "run", "--scenario", str(scn),
                                "--governor", args.governor, "--out", str(out), "--quiet",
                                "--no-report", "--no-probe"], capture_output=True, text=True)
            if not (out / "history").is_dir():
                print(p.stdout + p.stderr, file=sys.stderr)
                return 1
            for event, xs in lags(out).items():
                allr[event] += xs
    print(f"{'event':<16} {'n':>3} {'to start: median':>17} {'max':>8} "
          f"{'to applied: median':>19} {'max':>8}")
    for event, xs in sorted(allr.items()):
        inv, ok = [x for x, _ in xs], [y for _, y in xs if y is not None]
        applied = (f"{statistics.median(ok):>16.2f} ms {max(ok):>5.2f} ms ({len(ok)} applied)"
                   if ok else "  (none applied)")
        print(f"{event:<16} {len(xs):>3} {statistics.median(inv):>14.2f} ms {max(inv):>5.2f} ms "
              f"{applied}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

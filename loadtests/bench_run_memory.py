"""Peak resident memory of a whole chaos run: harness, governors, producers, Redis, proxy.

Starts ``chaos run`` and samples the summed RSS of its whole process tree
every 100 ms (children are in their own sessions, so the tree is followed by
parent links, not process groups). Prints the peak and the largest processes
at that moment; ``--repeat`` rounds, median of the peaks.

    python loadtests/bench_run_memory.py --scenario governor-crash [--governor seed]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil


def tree_rss(root: psutil.Process) -> tuple[int, list[tuple[int, str]]]:
    procs = [root]
    with contextlib.suppress(psutil.Error):
        procs += root.children(recursive=True)
    total, each = 0, []
    for p in procs:
        try:
            rss = p.memory_info().rss
            name = " ".join(p.cmdline()[:4])[-60:]
        except psutil.Error:
            continue
        total += rss
        each.append((rss, name))
    return total, sorted(each, reverse=True)


def one_round(args: argparse.Namespace) -> tuple[int, list[tuple[int, str]], int]:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "chaos", "run", "--scenario", args.scenario,
               "--governor", args.governor, "--out", str(Path(tmp) / "run"), "--quiet"]
        if args.duration:
            cmd += ["--duration", str(args.duration)]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        root = psutil.Process(proc.pid)
        peak, at_peak, count = 0, [], 0
        while proc.poll() is None:
            total, each = tree_rss(root)
            if total > peak:
                peak, at_peak, count = total, each, len(each)
            time.sleep(0.1)
        return peak, at_peak, count


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenario", default="governor-crash")
    ap.add_argument("--governor", default="reference")
    ap.add_argument("--duration", type=float)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    peaks = []
    for i in range(args.repeat):
        peak, at_peak, count = one_round(args)
        peaks.append(peak)
        print(f"round {i + 1}: peak {peak / 2**20:,.0f} MiB over {count} processes; largest:")
        for rss, name in at_peak[:4]:
            print(f"    {rss / 2**20:7.1f} MiB  {name}")
    print(f"\n{args.scenario} ({args.governor}): median peak resident memory of the whole run "
          f"{statistics.median(peaks) / 2**20:,.0f} MiB (limit 2048 MiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

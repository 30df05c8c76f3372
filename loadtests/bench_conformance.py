"""Benchmark ``chaos conformance`` against its floor, measured in the same run.

    python loadtests/bench_conformance.py [--rounds 3] [--governor reference]

The conformance cases start one governor process per case (the protocol passes the
prefix at start), so their floor is that many process lifetimes. Baseline: the same
number of sequential start -> ready (listed in group ``governor``) -> stop cycles of the
governor on one embedded Redis, through the same Supervisor, with nothing else done.
Measured: the whole conformance run (every case, the next case's instance started while
the current case runs). Printed: medians and ranges of both, and their ratio; below 1
means the overlap of starts hides more than the cases cost.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from chaos import conformance as cf  # noqa: E402
from chaos.redis_servers import EmbeddedRedis  # noqa: E402
from chaos.runner import governor_spec  # noqa: E402
from chaos.supervisor import Supervisor  # noqa: E402


def baseline(governor: str, cycles: int) -> float:
    """``cycles`` sequential start -> ready -> stop cycles of the governor, in seconds."""
    spec = governor_spec(governor)
    with EmbeddedRedis(name="bench") as server, tempfile.TemporaryDirectory() as logs:
        r = server.client()
        t0 = time.monotonic()
        for i in range(cycles):
            prefix = f"bench{i}"
            r.xgroup_create(f"{prefix}:stream:apply.plan", "governor", id="0", mkstream=True)
            sup = Supervisor(spec, server.url, prefix, 1, Path(logs) / prefix, restart=False)
            sup.start()
            sup.wait_ready(timeout=30)
            sup.stop()
        r.close()
        return time.monotonic() - t0


def conformance(governor: str) -> float:
    report = cf.run_conformance(governor_spec(governor))
    if not report.passed and governor == "reference":
        raise SystemExit(f"the reference did not pass: {report.summary()}")
    return report.seconds


def _stats(xs: list[float]) -> str:
    return f"median {statistics.median(xs):.2f} s (range {min(xs):.2f}-{max(xs):.2f})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--governor", default="reference", choices=["reference", "seed", "legacy"])
    args = ap.parse_args()
    n = len(cf.CASES)
    base, conf = [], []
    for _ in range(args.rounds):  # interleaved: both see the same machine load
        base.append(baseline(args.governor, n))
        conf.append(conformance(args.governor))
    ratio = statistics.median(conf) / statistics.median(base)
    print(f"baseline: {n} start/ready/stop cycles of {args.governor}: {_stats(base)}")
    print(f"conformance: {n} cases against {args.governor}: {_stats(conf)}")
    print(f"ratio conformance / baseline: {ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""How faithfully ``chaos run --replay`` sends a recorded run again.

Runs a mixed scenario (every workload kind, one anchored fault) once, then replays it
``--repeat`` times, and prints per replay: whether every producer sent the same things in
the same order, and the timing no harness controls: each op's offset from the workload
start against the original's (median, p99, max of |difference|) and each plan's age
(``intent_created_at_ms`` to send) against the original's. The baseline is a second plain
run of the same scenario and seed: how far two ordinary runs drift apart.

    python loadtests/bench_replay.py [--repeat 3] [--governor seed]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from govtools import small_scenario  # noqa: E402
from test_replay import MIXED  # noqa: E402

from chaos.replay import sent_by_producer  # noqa: E402


def run(*args: str) -> None:
    p = subprocess.run([sys.executable, "-m", "chaos", "run", *args, "--quiet", "--no-report",
                        "--no-probe"], capture_output=True, text=True)
    if p.returncode not in (0, 1, 2):
        raise SystemExit(p.stdout + p.stderr)


def compare(original: Path, other: Path) -> str:
    a, b = sent_by_producer(original), sent_by_producer(other)
    same = a.keys() == b.keys() and all([x.what for x in a[i]] == [x.what for x in b[i]]
                                        for i in a)
    pairs = [(x, y) for i in a for x, y in zip(a[i], b.get(i, []), strict=False)]
    dt = sorted(abs(x.offset_s - y.offset_s) * 1000 for x, y in pairs)
    dage = [abs(x.age_ms - y.age_ms) for x, y in pairs
            if x.age_ms is not None and y.age_ms is not None]
    n = sum(map(len, a.values()))
    return (f"same sends: {'yes' if same else 'NO'} ({n} ops); offset diff median "
            f"{statistics.median(dt):.2f} ms, p99 {dt[int(0.99 * (len(dt) - 1))]:.2f} ms, max "
            f"{dt[-1]:.2f} ms; age diff max {max(dage, default=0)} ms")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--governor", default="reference")
    args = ap.parse_args()
    text = small_scenario("mixed", 3).replace("processes = 2\nrate = 200", "rate = 40") + MIXED
    with tempfile.TemporaryDirectory() as tmp:
        scn = Path(tmp) / "mixed.toml"
        scn.write_text(text)
        first = Path(tmp) / "first"
        run("--scenario", str(scn), "--governor", args.governor, "--out", str(first))
        plain = Path(tmp) / "plain"
        run("--scenario", str(scn), "--governor", args.governor, "--out", str(plain))
        print(f"baseline, a second plain run: {compare(first, plain)}")
        for i in range(args.repeat):
            again = Path(tmp) / f"replay{i}"
            run("--replay", str(first), "--governor", args.governor, "--out", str(again))
            print(f"replay {i + 1}: {compare(first, again)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark the minimal-witness search against the check it follows.

    python loadtests/bench_minimize.py [--sizes 100000,1000000] [--rounds 3] [--keep DIR]

For each size N the run directory of ``bench_checkers.py`` (N history operations and
their ledger, a plain valid workload) is generated, then broken on purpose so that every
invariant the ledger and the history can show has many violations:

- every 50th OPEN order executed as an add to an open position (one_position_per_symbol);
- every 50th CLOSE order on a flat symbol (a flip: single_close);
- every 70th OPEN order with 4 positions open against 3 slots (slots);
- every 200th plan decided a second time (one_decision), in a history file of its own;
- stale CLOSE plans permitted (fresh_intent), one per 2,000 operations, each on its own
  symbol.

Then, each in a fresh process, 3 rounds interleaved: ``check_run(write=False,
models=False, minimize=False)`` (the baseline) and the same with the search on, at its
default bounds. Printed: medians and ranges, the ratio, and what the search found (per
invariant: violations, minimised, witness sizes, how many shown 1-minimal).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "loadtests"))

from bench_checkers import T0_MS, make_run, measure_in_child  # noqa: E402

from chaos.history import Op, OpType, write_history  # noqa: E402


def break_run(run_dir: Path, n_ops: int) -> dict[str, int]:
    """Violations of five invariants, in the ledger and in a history file of their own."""
    con = sqlite3.connect(run_dir / "ledger.sqlite")
    with con:
        adds = con.execute("UPDATE orders SET effect = 'add' WHERE action = 'OPEN' AND "
                           "seq % 100 = 1").rowcount
        flips = con.execute("UPDATE orders SET effect = 'flip' WHERE action = 'CLOSE' AND "
                            "seq % 100 = 2").rowcount
        slots = con.execute("UPDATE orders SET open_count_after = 4 WHERE action = 'OPEN' AND "
                            "effect = 'open' AND seq % 140 = 3").rowcount
        plans = [r[0] for r in con.execute("SELECT plan_id FROM orders WHERE seq % 200 = 5")]
        decided = {r[0]: r[1:] for r in con.execute(
            "SELECT plan_id, symbol, action, issued_at_ms FROM orders WHERE seq % 200 = 5")}
    con.close()
    ops: list[Op] = []
    for pid in plans:
        sym, action, ms = decided[pid]
        ms = int(ms) + 1
        ops.append(Op(OpType.OK, "decision", "recorder", ms * 1_000_000 + 7, ms, pid, sym, {
            "plan_id": pid, "symbol": sym, "action": action, "decision": "PERMIT",
            "reason": "", "governor": "gov-1", "entry_ms": ms, "entry_id": f"{ms}-7",
            "fence": "2" if action == "CLOSE" else ""}))
    stale = 0
    for i in range(n_ops // 2000):
        t = T0_MS + 2 * i * 1000 + 1
        pid, sym = f"stale-{i}", f"STALE{i:05d}USDT"
        plan = {"plan_id": pid, "symbol": sym, "action": "CLOSE", "side": "LONG",
                "notional": "100", "source": "exit_monitor",
                "intent_created_at_ms": str(t - 120_000)}
        ops += [Op(OpType.INVOKE, "submit", "producer", t * 1_000_000 + 3, t, pid, sym,
                   {"plan": plan}),
                Op(OpType.OK, "submit", "producer", t * 1_000_000 + 4, t, pid, sym,
                   {"entry_id": f"{t}-3"}),
                Op(OpType.OK, "decision", "recorder", (t + 1) * 1_000_000 + 5, t + 1, pid, sym,
                   {"plan_id": pid, "symbol": sym, "action": "CLOSE", "decision": "PERMIT",
                    "reason": "", "governor": "gov-1", "entry_ms": t + 1,
                    "entry_id": f"{t + 1}-5", "fence": "9"})]
        stale += 1
    write_history(run_dir, ops, "injected")
    return {"adds": adds, "flips": flips, "slots": slots, "double_decisions": len(plans),
            "stale": stale}


def measure(run_dir: str, minimize: bool) -> dict[str, object]:
    from chaos.checkers import check_run

    t0 = time.perf_counter()
    verdict = check_run(run_dir, write=False, models=False, minimize=minimize)
    out: dict[str, object] = {"s": time.perf_counter() - t0, "ops": verdict.stats["ops"],
                              "violations": len(verdict.violations)}
    if minimize:
        per: dict[str, dict[str, object]] = {}
        for v in verdict.violations:
            w = v.minimal_witness
            if not w:
                continue
            p = per.setdefault(v.invariant, {"sizes": [], "one_minimal": 0, "searched": set()})
            p["sizes"].append(w["size"])  # type: ignore[union-attr]
            p["one_minimal"] += bool(w.get("one_minimal"))  # type: ignore[operator]
            p["searched"].add(w.get("searched"))  # type: ignore[union-attr]
        out["found"] = {k: {**x, "searched": sorted(map(str, x["searched"]))}  # type: ignore
                        for k, x in per.items()}
        out["summary"] = verdict.stats["minimal_witnesses"]["per_invariant"]
    return out


def _sub(args: list[str]) -> dict:
    return measure_in_child(args, __file__)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="100000,1000000")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--keep", default=None, help="generate run dirs here and keep them")
    ap.add_argument("--measure", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--minimize", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.measure:
        print(json.dumps(measure(a.measure, a.minimize)))
        return
    base = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="bench-minimize-"))
    try:
        for n in (int(x) for x in a.sizes.split(",")):
            run_dir = base / f"n{n}"
            if not (run_dir / "ledger.sqlite").exists():
                t0 = time.perf_counter()
                info = make_run(run_dir, n)
                broken = break_run(run_dir, n)
                print(f"generated {info['ops']} ops, broken {broken} in "
                      f"{time.perf_counter() - t0:.1f} s", file=sys.stderr)
            base_s, with_s = [], []
            found = None
            for _ in range(a.rounds):  # interleaved: the machine's load hits both alike
                base_s.append(_sub(["--measure", str(run_dir)])["s"])
                m = _sub(["--measure", str(run_dir), "--minimize"])
                with_s.append(m["s"])
                found = m
            assert found is not None
            mb, mw = statistics.median(base_s), statistics.median(with_s)
            print(f"\n{found['ops']} ops, {found['violations']} violations, {a.rounds} rounds")
            print(f"  check alone        median {mb:.2f} s (range {min(base_s):.2f}-"
                  f"{max(base_s):.2f})")
            print(f"  check + witnesses  median {mw:.2f} s (range {min(with_s):.2f}-"
                  f"{max(with_s):.2f})")
            print(f"  ratio {mw / mb:.2f}x (medians); the search alone about {mw - mb:.2f} s")
            for inv, s in found["summary"].items():
                f = found["found"].get(inv, {})
                sizes = f.get("sizes") or [0]
                print(f"  {inv:<24} {s['violations']:>6} violations, {s['minimised']} minimised"
                      f" ({s['left']} left), witness sizes {min(sizes)}-{max(sizes)}, "
                      f"{f.get('one_minimal', 0)} shown 1-minimal, from "
                      f"{', '.join(f.get('searched') or ['-'])}")
    finally:
        if not a.keep:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    main()

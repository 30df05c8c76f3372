"""Benchmark the checkers on synthetic run directories, and the model checker.

    python loadtests/bench_checkers.py [--sizes 10000,100000,1000000] [--keep DIR]

For each size N a run directory with N history operations (written with
``chaos.history.write_history``, in chunks of 100k ops so memory stays flat)
and its ledger (``Exchange.create``, then rows inserted in bulk with sqlite3
following the schema in chaos/exchange.py) is generated. The workload is a
plain one: at most 3 positions open on a 3-slot config; an OPEN is permitted
and executed while a slot is free, otherwise a blocked OPEN
(``active_slots_waiting_rotation_close``) and a permitted, executed CLOSE of the
oldest position. Each plan has the operations a real run records for it, with
the same fields (see a run's ``history/``): submit invoke (the plan) and ok
(the entry id), plan, decision, take (with the permit), order (with the fill)
and result. The history is valid.

Each measurement runs in its own subprocess (peak RSS via getrusage):
``chaos.checkers.check_run(run_dir, write=False, models=False)``, the invariant
checkers with their gather pass (median of 3 rounds; the verdict keeps the facts for the
report, and the time to drop it is shown apart), and ``check_model`` on the
same facts for sizes up to 10^5. Then the linearizability checker on a 100,000-operation per-symbol
exit-lock history (1,000 symbols, overlapping busy blocks), median of 3.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from chaos.exchange import Exchange  # noqa: E402
from chaos.history import Op, OpType, write_history  # noqa: E402

T0_MS = 1_800_000_000_000
CHUNK = 100_000


def make_run(run_dir: Path, n_ops: int) -> dict[str, int]:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "run.json").write_text(json.dumps({
        "status": "complete", "governor_config": {"slots_BASE": "3", "capital_reservation_ttl_ms":
                                                  "600000", "permit_ttl_ms": "60000"}}))
    ex = Exchange.create(run_dir / "ledger.sqlite")
    con = sqlite3.connect(ex.path)
    rows: list[tuple] = []
    chunk: list[Op] = []
    chunks = 0
    ops = 0
    t = 0
    open_pos: list[tuple[str, str]] = []  # (symbol, position_id)
    plan_no = 0
    next_sym = 0

    def emit(typ: OpType, f: str, key: str, sym: str, value: dict, proc: str) -> None:
        nonlocal ops, chunks, chunk
        chunk.append(Op(typ, f, proc, (T0_MS + t) * 1_000_000 + ops, T0_MS + t, key, sym,
                        value))
        ops += 1
        if len(chunk) >= CHUNK:
            write_history(run_dir, chunk, f"bench-{chunks:04d}")
            chunks += 1
            chunk = []

    while ops < n_ops:
        t += 2
        if len(open_pos) < 3:
            sym = f"S{next_sym % 1000:04d}USDT"
            next_sym += 1
            action, plan_id = "OPEN", f"open-{plan_no}"
        else:
            # A blocked OPEN (slots full), then the CLOSE of the oldest position.
            bid = f"open-{plan_no}"
            plan_no += 1
            bsym = f"S{(next_sym + 500) % 1000:04d}USDT"
            plan = {"plan_id": bid, "symbol": bsym, "action": "OPEN", "side": "LONG",
                    "notional": "100", "source": "intent_bridge",
                    "intent_created_at_ms": str(T0_MS + t)}
            emit(OpType.INVOKE, "submit", bid, bsym, {"plan": plan}, "producer")
            emit(OpType.OK, "submit", bid, bsym, {"entry_id": f"{T0_MS + t}-0"}, "producer")
            emit(OpType.OK, "plan", bid, bsym, {**plan, "entry_ms": T0_MS + t}, "recorder")
            emit(OpType.OK, "decision", bid, bsym, {
                "plan_id": bid, "symbol": bsym, "action": "OPEN", "decision": "BLOCK",
                "reason": "active_slots_waiting_rotation_close", "governor": "gov-0",
                "entry_ms": T0_MS + t + 1, "entry_id": f"{T0_MS + t + 1}-0"}, "recorder")
            t += 2
            sym, pos_id = open_pos.pop(0)
            action, plan_id = "CLOSE", f"close-{plan_no}"
        plan_no += 1
        plan = {"plan_id": plan_id, "symbol": sym, "action": action, "side": "LONG",
                "notional": "100", "source": "intent_bridge" if action == "OPEN" else
                "exit_monitor", "intent_created_at_ms": str(T0_MS + t)}
        emit(OpType.INVOKE, "submit", plan_id, sym, {"plan": plan}, "producer")
        emit(OpType.OK, "submit", plan_id, sym, {"entry_id": f"{T0_MS + t}-0"}, "producer")
        emit(OpType.OK, "plan", plan_id, sym, {**plan, "entry_ms": T0_MS + t}, "recorder")
        dec_ms = T0_MS + t + 1
        emit(OpType.OK, "decision", plan_id, sym, {
            "plan_id": plan_id, "symbol": sym, "action": action, "decision": "PERMIT",
            "reason": "", "governor": "gov-0", "entry_ms": dec_ms, "entry_id": f"{dec_ms}-0",
            "fence": "1" if action == "CLOSE" else ""}, "recorder")
        fence = "1" if action == "CLOSE" else ""
        emit(OpType.OK, "take", plan_id, sym, {
            "permit": {"plan_id": plan_id, "symbol": sym, "action": action, "side": "LONG",
                       "notional": "100", "fence": fence, "issued_at_ms": dec_ms},
            "entry_id": f"{dec_ms}-0", "consumer": "apply-1"}, "apply")
        t += 1
        wall = T0_MS + t
        if action == "OPEN":
            pos_id = f"pos-{plan_no}"
            open_pos.append((sym, pos_id))
            effect = "open"
        else:
            effect = "close"
        rows.append((plan_id, sym, action, "LONG", "100", 1 if action == "CLOSE" else None,
                     effect, pos_id, "LONG", len(open_pos), wall, wall * 1_000_000, 1, dec_ms))
        emit(OpType.OK, "order", plan_id, sym, {"fill": {
            "seq": len(rows), "plan_id": plan_id, "symbol": sym, "action": action,
            "side": "LONG", "notional": "100", "fence": fence, "effect": effect,
            "position_id": pos_id, "position_side": "LONG", "open_count_after": len(open_pos),
            "wall_ms": wall, "mono_ns": wall * 1_000_000, "pid": 1, "issued_at_ms": dec_ms},
            "consumer": "apply-1"}, "apply")
        emit(OpType.OK, "result", plan_id, sym, {
            "plan_id": plan_id, "symbol": sym, "action": action, "status": "executed",
            "entry_ms": wall + 1}, "recorder")
        if len(rows) >= 50_000:
            _insert(con, rows)
            rows = []
    if chunk:
        write_history(run_dir, chunk, f"bench-{chunks:04d}")
    _insert(con, rows)
    con.close()
    return {"ops": ops, "plans": plan_no}


def _insert(con: sqlite3.Connection, rows: list[tuple]) -> None:
    with con:
        con.executemany(
            "INSERT INTO orders (plan_id, symbol, action, side, notional, fence, effect, "
            "position_id, position_side, open_count_after, wall_ms, mono_ns, pid, issued_at_ms) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)


def measure(run_dir: str, with_model: bool) -> dict[str, object]:
    from chaos.checkers import check_run

    t0 = time.perf_counter()
    verdict = check_run(run_dir, write=False, models=False)  # the invariant checkers
    out: dict[str, object] = {"check_run_s": time.perf_counter() - t0, "valid": verdict.valid,
                              "ops": verdict.stats["ops"]}
    # The verdict keeps the facts (for the report); freeing them is timed on its own.
    t0 = time.perf_counter()
    del verdict
    out["free_s"] = time.perf_counter() - t0
    if with_model:
        from chaos.checkers.facts import gather
        from chaos.checkers.model import check_model

        facts = gather(run_dir)
        t0 = time.perf_counter()
        res = check_model(facts, timeout_s=120)
        out["model_s"] = time.perf_counter() - t0
        out["model_valid"] = {k: r.valid for k, r in res.items()}
        out["model_ops"] = sum(r.stats["ops"] for r in res.values())
    out["maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    # The scan workers' peak (the largest one), for long histories scanned in parallel.
    out["worker_maxrss_mb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return out


def exit_lock_history(n_ops: int, n_symbols: int = 1000) -> list:
    from chaos.checkers.model import Operation

    ops: list = []
    per = n_ops // n_symbols
    for s in range(n_symbols):
        sym = f"S{s:04d}"
        t = s % 7
        k = 0
        while k < per:
            ops.append(Operation(f"o{s}-{k}", ("opened", sym), t, "ok", t + 1))
            # A CLOSE permit, two busy blocks overlapping it, then its unlock.
            ops.append(Operation(f"c{s}-{k}", ("lock", sym), t + 2, "PERMIT", t + 6))
            ops.append(Operation(f"b{s}-{k}", ("busy", sym), t + 3, "BLOCK", t + 8))
            ops.append(Operation(f"d{s}-{k}", ("busy", sym), t + 5, "BLOCK", t + 9))
            ops.append(Operation(f"c{s}-{k}", ("unlock", sym, "close"), t + 10, "ok"))
            k += 5
            t += 12
    return ops


def bench_model(rounds: int = 3) -> dict[str, object]:
    from chaos.checkers.model import ExitLockModel, check

    ops = exit_lock_history(100_000)
    times = []
    res = None
    for _ in range(rounds):
        t0 = time.perf_counter()
        res = check(ExitLockModel(), ops, timeout_s=60)
        times.append(time.perf_counter() - t0)
    assert res is not None
    return {"ops": len(ops), "median_s": statistics.median(times), "valid": res.valid,
            "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def measure_in_child(args: list[str], script: str = __file__) -> dict:
    """``script`` run with ``args`` in a fresh interpreter (its own memory high-water
    mark); the JSON object its last line prints."""
    out = subprocess.run([sys.executable, script, *args], check=True, capture_output=True,
                         text=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--keep", default=None, help="generate run dirs here and keep them")
    ap.add_argument("--measure", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--with-model", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model-only", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.measure:
        print(json.dumps(measure(a.measure, a.with_model)))
        return
    if a.model_only:
        print(json.dumps(bench_model()))
        return
    base = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="bench-checkers-"))
    rows = []
    try:
        for n in (int(x) for x in a.sizes.split(",")):
            run_dir = base / f"n{n}"
            if not (run_dir / "ledger.sqlite").exists():
                t0 = time.perf_counter()
                info = make_run(run_dir, n)
                print(f"generated {info['ops']} ops / {info['plans']} plans in "
                      f"{time.perf_counter() - t0:.1f} s", file=sys.stderr)
            rounds = 3
            extra = ["--with-model"] if n <= 100_000 else []
            ms = [measure_in_child(["--measure", str(run_dir), *extra]) for _ in range(rounds)]
            med = statistics.median(m["check_run_s"] for m in ms)
            mod = (statistics.median(m["model_s"] for m in ms) if "model_s" in ms[0] else None)
            rows.append({"n": ms[0]["ops"], "rounds": rounds, "check_run_s": med,
                         "free_s": statistics.median(m["free_s"] for m in ms),
                         "events_per_s": ms[0]["ops"] / med, "valid": ms[0]["valid"],
                         "rss_mb": max(m["maxrss_mb"] for m in ms),
                         "worker_rss_mb": max(m["worker_maxrss_mb"] for m in ms), "model_s": mod,
                         "model_ops": ms[0].get("model_ops"),
                         "model_valid": ms[0].get("model_valid")})
        m = measure_in_child(["--model-only"])
    finally:
        if not a.keep:
            shutil.rmtree(base, ignore_errors=True)
    print(f"{'history ops':>12} {'rounds':>6} {'check s':>8} {'events/s':>10} "
          f"{'growth':>7} {'n log n':>7} {'free s':>7} {'RSS MB':>7} {'worker':>7} "
          f"{'valid':>6}  check_model (ops, s, valid)")
    prev = None
    for r in rows:
        if prev:
            growth = f"{r['check_run_s'] / prev['check_run_s']:.1f}x"
            nlogn = f"{r['n'] * math.log(r['n']) / (prev['n'] * math.log(prev['n'])):.1f}x"
        else:
            growth = nlogn = "-"
        prev = r
        model = (f"{r['model_ops']} ops, {r['model_s']:.2f} s, {r['model_valid']}"
                 if r["model_s"] is not None else "not run")
        print(f"{r['n']:>12} {r['rounds']:>6} {r['check_run_s']:>8.2f} "
              f"{r['events_per_s']:>10.0f} {growth:>7} {nlogn:>7} {r['free_s']:>7.2f} "
              f"{r['rss_mb']:>7.0f} "
              f"{r['worker_rss_mb']:>7.0f} {str(r['valid']):>6}  {model}")
    print("check s: median wall time of check_run(models=False) (gather + the seven invariant "
          "checkers), each round in a fresh process; free s: dropping the verdict afterwards "
          "(it keeps the facts, for the report); RSS: that process's peak; worker: the "
          "peak of its largest scan worker (long histories are scanned in parallel); valid: "
          "None because a synthetic history has no liveness probe (the other six hold)")
    print(f"exit-lock model, {m['ops']} ops per symbol (1000 symbols): median "
          f"{m['median_s']:.2f} s over 3, valid={m['valid']}, peak RSS {m['maxrss_mb']:.0f} MB")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    main()

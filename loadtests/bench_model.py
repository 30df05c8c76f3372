"""Time the linearizability checker on the generated hard histories, against the search
it replaced (issue 15), measured in the same run.

    python loadtests/bench_model.py [--rounds 3] [--timeout 10] [--big]

Each history of ``chaos.checkers.histories.suite()`` (verdicts known by construction) is
checked ``--rounds`` times by ``chaos.checkers.model.check`` and by ``old_check`` below
(the sequential per-partition search as it was, the baseline), each with the same time
limit; medians and ranges, the verdicts, and the ratio old / new. ``--big`` adds the
governor models at scale (slots 10^5 and 10^6 ops, exit lock 1.5 * 10^5, the invalid slots
history at 2,000 and 4,000 ops). Then the deadline: a history whose search cannot finish
(40 concurrent increments, an impossible read) with limits of 0.5, 2 and 10 s, the time
past the limit.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from chaos.checkers import histories as H  # noqa: E402
from chaos.checkers.model import (  # noqa: E402
    INF,
    LinResult,
    Model,
    Operation,
    _fmt,
    check,
)


# -- the baseline: chaos/checkers/model.py's search before issue 15, unchanged ---------------
class _Timeout(Exception):
    pass


def _check_one(model: Any, ops: Sequence[Operation], deadline: float) -> tuple[bool, str,
                                                                                 tuple]:
    n = len(ops)
    if n == 0:
        return True, "", ()
    events = []
    for i, op in enumerate(ops):
        events.append((op.call_ms, 0, i))
        events.append((op.return_ms, 1, i))
    events.sort()
    m = len(events)
    head, tail = m, m + 1
    nxt = list(range(1, m + 1)) + [0, 0]
    prv = [head] + list(range(0, m - 1)) + [0, 0]
    nxt[head] = 0
    prv[tail] = m - 1
    nxt[m - 1] = tail
    is_ret = [e[1] == 1 for e in events]
    ret_inf = [e[1] == 1 and e[0] == INF for e in events]
    opid = [e[2] for e in events]
    match = [0] * m
    call_node = [0] * n
    for k, e in enumerate(events):
        if e[1] == 0:
            call_node[e[2]] = k
    for k, e in enumerate(events):
        if e[1] == 1:
            match[call_node[e[2]]] = k

    state = model.init()
    linearized = 0
    stack: list[tuple[int, Any]] = []
    cache: set[tuple[int, Any]] = set()
    best_depth = -1
    best: tuple[int, int, tuple[int, ...], Any, list[int]] | None = None
    step = model.step
    entry = nxt[head]
    iters = 0
    while True:
        iters += 1
        if iters & 0x3FF == 0 and time.monotonic() > deadline:
            raise _Timeout
        if entry == tail or ret_inf[entry]:
            return True, "", ()
        if not is_ret[entry]:
            i = opid[entry]
            op = ops[i]
            ok, new_state = step(state, op.input, op.output)
            if ok:
                nl = linearized | (1 << i)
                key = (nl, new_state)
                if key not in cache:
                    cache.add(key)
                    stack.append((entry, state))
                    state, linearized = new_state, nl
                    c, r = entry, match[entry]
                    prv[nxt[c]] = prv[c]
                    nxt[prv[c]] = nxt[c]
                    prv[nxt[r]] = prv[r]
                    nxt[prv[r]] = nxt[r]
                    entry = nxt[head]
                    continue
            entry = nxt[entry]
            continue
        # The return of an op not linearized: backtrack.
        if len(stack) > best_depth:
            best_depth = len(stack)
            tried = []
            k = nxt[head]
            while k != entry and len(tried) < 6:
                if not is_ret[k]:
                    tried.append(opid[k])
                k = nxt[k]
            best = (len(stack), opid[entry], tuple(opid[e] for e, _ in stack[-4:]), state,
                    tried)
        if not stack:
            break
        top, prev_state = stack.pop()
        state = prev_state
        linearized &= ~(1 << opid[top])
        c, r = top, match[top]
        nxt[prv[r]] = r
        prv[nxt[r]] = r
        nxt[prv[c]] = c
        prv[nxt[c]] = c
        entry = nxt[top]
    assert best is not None
    depth, stuck, last, st, tried = best
    lines = [f"no linearization: at most {depth} of {n} ops linearize; then "
             f"{_fmt(ops[stuck])} cannot take effect before it returns",
             f"  state there: {model.describe(st)}"]
    lines += [f"  linearized just before: {_fmt(ops[i])}" for i in last]
    lines += [f"  pending, none applies: {_fmt(ops[i])}" for i in tried if i != stuck]
    involved = tuple(ops[i] for i in (*last, stuck))
    return False, "\n".join(lines), involved


def old_check(model: Any, ops: Sequence[Operation], timeout_s: float = 10.0) -> LinResult:
    """The search before issue 15 (partitions one after another, one bitset over the
    whole partition), kept as the baseline."""
    deadline = time.monotonic() + timeout_s
    parts = model.partition(ops)
    if parts is None:
        parts = [list(ops)]
    unknown: list[int] = []
    checked = 0
    for idx, part in enumerate(parts):
        try:
            ok, why, involved = _check_one(model, part, deadline)
        except _Timeout:
            unknown.append(idx)
            continue
        checked += len(part)
        if not ok:
            return LinResult(False, idx, why, checked, involved)
    if unknown:
        return LinResult(None, None, f"timed out after {timeout_s} s in {len(unknown)} of "
                         f"{len(parts)} partitions (first: {unknown[0]})", checked)
    return LinResult(True, None, "", checked)


# -- the benchmark ---------------------------------------------------------------------------
def _time(fn: Any, rounds: int) -> tuple[list[float], Any]:
    times, res = [], None
    for _ in range(rounds):
        gc.collect()
        t0 = time.perf_counter()
        res = fn()
        times.append(time.perf_counter() - t0)
    return times, res


def _fmt_t(ts: list[float]) -> str:
    return f"{statistics.median(ts):7.3f} [{min(ts):.3f}-{max(ts):.3f}]"


def _word(v: bool | None) -> str:
    return {True: "valid", False: "invalid", None: "unknown"}[v]


class Counter(Model):
    def init(self) -> int:
        return 0

    def step(self, state: Any, input: Any, output: Any) -> tuple[bool, Any]:  # noqa: A002
        return (True, state + input[1]) if input[0] == "inc" else (state == output, state)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=10.0)
    ap.add_argument("--big", action="store_true")
    a = ap.parse_args()
    hs = H.suite()
    if a.big:
        hs += [H.slots(n=100_000), H.slots(n=1_000_000), H.exit_lock(per_symbol=1000),
               H.slots(n=2000, valid=False), H.slots(n=4000, valid=False)]
    print(f"{'history':26} {'ops':>8} {'expect':>7}  {'new verdict':>11} "
          f"{'new s (median [range])':>24}  {'old verdict':>11} {'old s':>24} {'old/new':>8}")
    for h in hs:
        nt, nr = _time(lambda h=h: check(h.model, h.ops, a.timeout), a.rounds)
        ot, orr = _time(lambda h=h: old_check(h.model, h.ops, a.timeout), a.rounds)
        print(f"{h.name:26} {len(h.ops):>8} {_word(h.valid):>7}  {_word(nr.valid):>11} "
              f"{_fmt_t(nt):>24}  {_word(orr.valid):>11} {_fmt_t(ot):>24} "
              f"{statistics.median(ot) / statistics.median(nt):>7.1f}x", flush=True)
    ops = [Operation(f"i{k}", ("inc", 1 << k), 0, "ok", 100) for k in range(40)]
    ops.append(Operation("r", ("read",), 0, -1, 100))
    for limit in (0.5, 2.0, 10.0):
        nt, nr = _time(lambda limit=limit: check(Counter(), ops, limit), a.rounds)
        ot, _ = _time(lambda limit=limit: old_check(Counter(), ops, limit), a.rounds)
        print(f"deadline {limit:4} s: new {_word(nr.valid)}, past the limit "
              f"{_fmt_t([t - limit for t in nt])} s; old past it "
              f"{_fmt_t([t - limit for t in ot])} s")
    print("times: wall seconds of check(model, ops, timeout) per round (median [min-max]), "
          "the time limit included; old: the search this replaced, same limit")


if __name__ == "__main__":
    main()

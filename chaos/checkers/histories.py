"""Hard histories for the linearizability checker, generated with their verdicts known by
construction (deterministic seeds): the regression suite of tests/test_model_checker.py
and loadtests/bench_model.py.

A valid history is a real sequential execution: every op gets a random interval (each
client's ops one after another) and a linearization point inside it; the ops are applied
to the model in the order of those points and take the outputs the model gives. So that
order is a linearization: the history is linearizable, however hard it is to find. A
few ops time out (output :data:`~chaos.checkers.model.UNKNOWN`, return +inf); they were
applied at their point or not at all, both allowed for such an op.

An invalid one is a valid one with one op added that no linearization can place, for a
reason stated where it is made (a read of a value nobody wrote, an acquire when every
slot is surely taken, a second exit lock while the first is surely held).
"""

from __future__ import annotations

import bisect
import random
from collections import defaultdict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any

from chaos.checkers.model import (
    INF,
    UNKNOWN,
    ExitLockModel,
    Model,
    Operation,
    SlotsModel,
)


class RegisterModel(Model):
    """A register with read, write and compare-and-set (Porcupine's etcd model)."""

    def init(self) -> Hashable:
        return 0

    def step(self, state: Any, input: Any, output: Any) -> tuple[bool, Any]:  # noqa: A002
        if input[0] == "read":
            return output is UNKNOWN or output == state, state
        if input[0] == "write":
            return True, input[1]
        hit = state == input[1]  # ("cas", from, to) -> True / False
        if output is UNKNOWN:
            return True, input[2] if hit else state
        return hit == output, input[2] if hit else state

    def interchangeable(self, input: Any, output: Any) -> Hashable | None:  # noqa: A002
        return input if output is UNKNOWN else None  # timed-out writes of one value

    def read_only(self, input: Any, output: Any) -> bool:  # noqa: A002
        return bool(input[0] == "read")


class KVModel(Model):
    """A key-value store of strings with get, put and append, partitioned per key
    (Porcupine's kv model, the one of its 50-client histories)."""

    def init(self) -> Hashable:
        return ""

    def step(self, state: Any, input: Any, output: Any) -> tuple[bool, Any]:  # noqa: A002
        if input[0] == "get":
            return output is UNKNOWN or output == state, state
        if input[0] == "put":
            return True, input[2]
        return True, state + input[2]

    def read_only(self, input: Any, output: Any) -> bool:  # noqa: A002
        return bool(input[0] == "get")

    def partition(self, ops: Sequence[Operation]) -> list[list[Operation]]:
        by: dict[Any, list[Operation]] = defaultdict(list)
        for op in ops:
            by[op.input[1]].append(op)
        return [by[k] for k in sorted(by)]


@dataclass
class History:
    name: str
    model: Model
    ops: list[Operation]
    valid: bool  # the verdict by construction
    note: str = ""


def _timeline(rng: random.Random, clients: int, per_client: int, gap: float,
              width: float) -> list[tuple[str, float, float, float]]:
    """``(client, call, point, return)`` per op, each client's ops one after another."""
    out = []
    for c in range(clients):
        t = rng.uniform(0, gap)
        for _ in range(per_client):
            call = t + rng.uniform(0, gap)
            point = call + rng.uniform(0, width)
            ret = point + rng.uniform(0, width)
            out.append((f"c{c}", call, point, ret))
            t = ret
    return out


def _execute(model: Model, timeline: list[tuple[str, float, float, float]],
             make: Callable[[str, int], tuple[Any, float]], rng: random.Random,
             state: Any = None) -> list[Operation]:
    """Apply the ops in the order of their points: ``make(client, k)`` gives an input and
    the chance that the op times out."""
    state = model.init() if state is None else state
    ops = []
    for k, (client, call, _point, ret) in enumerate(sorted(timeline, key=lambda x: x[2])):
        inp, p_unknown = make(client, k)
        if rng.random() < p_unknown:
            if rng.random() < 0.5:  # it took effect, or it did not
                state = model.step(state, inp, UNKNOWN)[1]
            ops.append(Operation(client, inp, call, UNKNOWN))
            continue
        out = _output(model, state, inp)
        ok, state = model.step(state, inp, out)
        assert ok, (inp, out, state)
        ops.append(Operation(client, inp, call, out, ret))
    return ops


def _output(model: Model, state: Any, inp: Any) -> Any:
    if isinstance(model, RegisterModel):
        return {"read": state, "write": "ok"}.get(inp[0], state == inp[1] if inp[0] == "cas"
                                                  else None)
    if isinstance(model, KVModel):
        return state if inp[0] == "get" else "ok"
    raise TypeError(model)


def register(seed: int = 1, clients: int = 7, per_client: int = 60, valid: bool = True,
             width: float = 3.0, p_unknown: float = 0.02) -> History:
    """Reads, writes and compare-and-sets of values 0-4 by ``clients`` clients whose ops
    overlap a lot; invalid: one read of 99 (never written) near the end, overlapping the
    others, so the search has to exhaust every order of the ops around it first."""
    rng = random.Random(seed)
    m = RegisterModel()

    def make(_client: str, _k: int) -> tuple[Any, float]:
        r = rng.random()
        if r < 0.4:
            return ("read",), 0.0
        if r < 0.7:
            return ("write", rng.randrange(5)), p_unknown
        return ("cas", rng.randrange(5), rng.randrange(5)), p_unknown

    tl = _timeline(rng, clients, per_client, gap=1.0, width=width)
    ops = _execute(m, tl, make, rng)
    if not valid:
        t = sorted(op.call_ms for op in ops)[int(len(ops) * 0.9)]
        ops.append(Operation("bad", ("read",), t, 99, t + 3.0))
    return History(f"register-cas-c{clients}-{'ok' if valid else 'bad'}", m, ops, valid)


def kv(seed: int = 1, clients: int = 50, keys: int = 10, per_client: int = 40,
       valid: bool = True, cheap_bad_key: bool = False, width: float = 2.0,
       p_unknown: float = 0.0, gets: float = 0.5) -> History:
    """A key-value store with ``clients`` clients over ``keys`` keys, appends of unique
    strings and gets (Porcupine's c50 shape). Invalid: a get of a value nobody wrote on
    the last key, either near the end of a full partition or (``cheap_bad_key``) on a key
    of its own with four ops, the case where one cheap partition fails and the others are
    hard valid ones."""
    rng = random.Random(seed)
    m = KVModel()
    n_keys = keys - 1 if cheap_bad_key else keys

    def make(client: str, k: int) -> tuple[Any, float]:
        key = f"k{rng.randrange(n_keys)}"
        r = rng.random()
        if r < gets:
            return ("get", key), 0.0
        if r < gets + 0.05:
            return ("put", key, f"[{client} {k}]"), p_unknown
        return ("append", key, f"[{client} {k}]"), p_unknown

    # One sequential execution over all keys is one per key too (ops on other keys commute).
    tl = _timeline(rng, clients, per_client, gap=1.0, width=width)
    state: dict[str, str] = defaultdict(str)
    ops: list[Operation] = []
    for k, (client, call, _point, ret) in enumerate(sorted(tl, key=lambda x: x[2])):
        inp, p_unknown = make(client, k)
        key = inp[1]
        if rng.random() < p_unknown:
            if rng.random() < 0.5:
                state[key] = m.step(state[key], inp, UNKNOWN)[1]
            ops.append(Operation(client, inp, call, UNKNOWN))
            continue
        out = _output(m, state[key], inp)
        state[key] = m.step(state[key], inp, out)[1]
        ops.append(Operation(client, inp, call, out, ret))
    last = f"k{keys - 1}"
    if cheap_bad_key:
        end = max(op.return_ms for op in ops if op.return_ms != INF)
        ops += [Operation("w", ("append", last, "a"), 0, "ok", 1),
                Operation("r1", ("get", last), 2, "a", 3),
                Operation("w", ("append", last, "b"), 4, "ok", 5),
                Operation("r2", ("get", last), end, "ab", end + 1)]
    if not valid:
        own = [op for op in ops if op.input[1] == last]
        t = sorted(op.call_ms for op in own)[len(own) // 2 if cheap_bad_key else
                                             int(len(own) * 0.9)]
        ops.append(Operation("bad", ("get", last), t, "[nobody]", t + 0.5))
    shape = "-cheapbad" if cheap_bad_key else ""
    return History(f"kv-c{clients}{shape}-{'ok' if valid else 'bad'}", m, ops, valid)


SLOTS_CAP = {"BASE": 3, "CHOP": 1, "TREND": 5}


def slots(seed: int = 1, n: int = 10_000, valid: bool = True) -> History:
    """A governor's slot history: OPEN plans arriving at random (one per time unit on
    average), each decided within two units (a PERMIT when a slot is free at its point,
    else a ``full`` BLOCK), so about two overlap, each permit's release a while
    later (``[event, +inf)``), adopted positions, and regime writes (some timing out),
    about ``n`` ops. Invalid: without adopts (a checker may leave an adopt for later, so
    they weaken the bound), one more PERMIT, short, at a time when surely every slot is
    taken: the PERMITs returned before it, minus every release called before it, already
    fill the largest capacity of a regime that may be in force then."""
    rng = random.Random(seed)
    m = SlotsModel(SLOTS_CAP, 0, "BASE")
    count, regime = 0, "BASE"
    ops: list[Operation] = []
    holds: list[float] = []  # release times of the slots taken
    t = 0.0
    k = 0
    while len(ops) < n:
        t += rng.expovariate(1.0)  # plans arrive at random
        holds.sort()
        while holds and holds[0] <= t:  # the releases due by now take effect now
            ops.append(Operation(f"rel-{k}", ("release", f"S{k % 50}"), holds.pop(0), "ok"))
            count -= 1
            k += 1
        r = rng.random()
        call, ret = t - rng.uniform(0, 1.0), t + rng.uniform(0, 1.0)
        if r < 0.01:  # a timed-out write never asks for more slots (see _possible_cap)
            known = rng.random() < 0.7
            regime = rng.choice(sorted(SLOTS_CAP) if known else ["BASE", "CHOP"])
            ops.append(Operation(f"reg-{k}", ("regime", regime), call,
                                 "ok" if known else UNKNOWN, ret))
        elif r < 0.03 and valid:
            ops.append(Operation(f"adopt-{k}", ("adopt", f"S{k % 50}"), t, "ok"))
            count += 1
            holds.append(t + rng.uniform(5, 40))
        elif count < SLOTS_CAP[regime]:
            ops.append(Operation(f"open-{k}", ("acquire", f"S{k % 50}"), call, "PERMIT", ret))
            count += 1
            holds.append(t + rng.uniform(5, 40))
        else:
            ops.append(Operation(f"open-{k}", ("full", f"S{k % 50}"), call, "BLOCK", ret))
        k += 1
    if not valid:
        finite = sorted(op.return_ms for op in ops if op.input[0] == "acquire")
        rels = sorted(op.call_ms for op in ops if op.input[0] == "release")
        regs = [op for op in ops if op.input[0] == "regime"]
        # The first time after 80% of the history where surely all slots are taken.
        for t in sorted(op.call_ms for op in ops)[int(len(ops) * 0.8):]:
            if (_count_before(finite, t) - _count_before(rels, t + 0.5)
                    >= _possible_cap(regs, t, t + 0.5)):
                break
        else:
            raise ValueError("no time with every slot surely taken; another seed")
        ops.append(Operation("bad", ("acquire", "BAD"), t, "PERMIT", t + 0.5))
    return History(f"slots-{len(ops)}-{'ok' if valid else 'bad'}", m, ops, valid)


def _count_before(sorted_times: list[float], t: float) -> int:
    """How many of the times are strictly before ``t``."""
    return bisect.bisect_left(sorted_times, t)


def _possible_cap(regs: list[Operation], t0: float, t1: float) -> int:
    """The largest capacity of a regime that may be in force somewhere in ``[t0, t1]``:
    the initial one or that of the last write returned before ``t0``, and of every write
    that may take effect after that one (called before ``t1`` and returning after its
    call, or timed out)."""
    done = [op for op in regs if op.return_ms < t0 and op.output is not UNKNOWN]
    last = max(done, key=lambda op: op.return_ms, default=None)
    caps = [SLOTS_CAP[last.input[1] if last else "BASE"]]
    caps += [SLOTS_CAP[op.input[1]] for op in regs if op.call_ms <= t1 and
             (last is None or op.return_ms > last.call_ms) and op is not last]
    return max(caps)


def exit_lock(seed: int = 1, symbols: int = 100, per_symbol: int = 200, valid: bool = True
              ) -> History:
    """Per symbol: open, a CLOSE permit (the exit lock) overlapped by busy blocks, its
    unlock ``[end, +inf)`` (close, or none: rejected, and the lock is taken again), one
    symbol ten times as long as the others (a partition the checker splits). Invalid: on
    the long symbol, a second lock PERMIT after the first lock returned and before its
    unlock's event (nothing can free the lock in between)."""
    rng = random.Random(seed)
    ops: list[Operation] = []
    bad_at: tuple[float, str] | None = None
    for s in range(symbols):
        sym = f"S{s:03d}"
        t = rng.uniform(0, 5)
        length = per_symbol * (10 if s == 0 else 1)
        k = 0
        while k < length:
            ops.append(Operation(f"o{s}-{k}", ("opened", sym), t, "ok", t + 1))
            k += 1
            while True:
                t0 = t + rng.uniform(2, 3)
                ret = t0 + rng.uniform(1, 4)
                ops.append(Operation(f"c{s}-{k}", ("lock", sym), t0, "PERMIT", ret))
                for b in range(rng.randrange(3)):
                    bt = ret + rng.uniform(0, 2)
                    ops.append(Operation(f"b{s}-{k}-{b}", ("busy", sym), bt - rng.uniform(0, 3),
                                         "BLOCK", bt + rng.uniform(0, 3)))
                end = ret + rng.uniform(6, 9)
                if s == 0 and bad_at is None and k > length * 0.8:
                    bad_at = (ret + 1, sym)
                closes = rng.random() < 0.8
                ops.append(Operation(f"c{s}-{k}", ("unlock", sym, "close" if closes else
                                                   "none"), end, "ok"))
                k += 2
                t = end + rng.uniform(0.5, 2)
                if closes:
                    break
    if not valid:
        assert bad_at is not None
        t, sym = bad_at
        ops.append(Operation("bad", ("lock", sym), t, "PERMIT", t + 0.5))
    return History(f"exit-lock-{len(ops)}-{'ok' if valid else 'bad'}", ExitLockModel(), ops,
                   valid)


def suite(scale: float = 1.0) -> list[History]:
    """The regression suite; ``scale`` multiplies the governor histories' lengths (the
    invalid slots history grows the least: see docs/harness.md, the model checker)."""
    n = int(10_000 * scale)
    return [register(valid=True), register(valid=False),
            kv(valid=True), kv(valid=False),
            # one cheap partition fails, nine valid ones are hard (seconds each)
            kv(valid=False, cheap_bad_key=True, width=1.5, gets=0.35),
            slots(n=n, valid=True), slots(n=max(500, n // 10), valid=False),
            exit_lock(per_symbol=max(10, n // 100), valid=True),
            exit_lock(per_symbol=max(10, n // 100), valid=False)]

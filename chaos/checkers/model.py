"""A Porcupine/Knossos-style linearizability checker and the governor models it checks.

Generic core
------------
A :class:`Model` is Porcupine's interface: ``init() -> state``,
``step(state, input, output) -> (ok, new_state)``, ``partition(ops)`` (a list of
independent sub-histories, or None) and ``describe(state)``. States must be
hashable. An :class:`Operation` is ``(client, input, call_ms, output,
return_ms)``. ``output`` may be :data:`UNKNOWN` (Knossos's ``:info``): the op may
or may not have taken effect, so its return time is +infinity, it may be
linearized at any point after its call, and it may be left out entirely. For
such an op ``step(state, input, UNKNOWN)`` returns the state after the op took
effect with whatever output the model would give; leaving it out covers "did
not happen". Any op whose return is +infinity (known output or not) may be left
out: nothing after the end of the history can observe it, so leaving it out is
the same as linearizing it last.

:func:`check` runs the Wing-Gong-Lowe search as Porcupine implements it: call
and return events sorted by time (calls before returns on ties) in a doubly
linked list; a call is *lifted* (it and its return unlinked) when the op is
linearized and *unlifted* on backtracking; a cache of ``(linearized ops as an
int bitset, state)`` prunes states already explored. Reaching the return event
of an op not yet linearized forces a backtrack; once every op with a finite
return is linearized the history is linearizable. It gives ``valid=None``
(unknown) when the deadline passes. Beyond Porcupine, none of which changes a
verdict (the tests compare with the plain search): the partitions' searches
take turns and the first failure decides (:func:`check`); read-only ops are
placed as soon as they apply and interchangeable pending ops in call order
(:func:`_search`); a long partition is split into segments (:func:`_segmented`);
and each failed or unfinished partition gets its longest linearizable prefix
(:class:`Progress`, ``stats.explanations`` in results.json).

Governor models: which history events become which operations
--------------------------------------------------------------
All built from :class:`~chaos.checkers.facts.Facts` by :func:`slots_ops` and
:func:`exit_lock_ops`. A decision's call is the plan's first stream entry time
(``plans[pid].entry_ms``; the decision time minus 1 ms when absent), its
return the decision's stream-entry time: the governor decided somewhere in
between.

``SlotsModel`` (one global history; state ``(slots_in_use, regime)``):

* OPEN PERMIT -> ``("acquire", symbol)``, output ``"PERMIT"``: ok iff
  in_use < ``config.slots_for(regime)``; then in_use + 1.
* OPEN BLOCK ``active_slots_waiting_rotation_close`` -> ``("full", symbol)``,
  output ``"BLOCK"``: ok iff in_use >= capacity; state unchanged.
* ``("release", symbol)``, interval ``[event, +inf)``, when a reserved slot is
  freed: the permit's order was rejected (ledger ``rejected_*``, at the order
  time), its permit was missing (``take`` fail, at that time), it never
  executed (lease expiry at decision + ``capital_reservation_ttl_ms``), or the
  symbol's position was closed by an executed CLOSE (effect ``close``, one
  release per slot the symbol holds, at the order time).
* ``("adopt", symbol)``, ``[order time, +inf)``: a position opened by an order
  no OPEN permit in the history accounts for (a ``flip``, or an OPEN without a
  PERMIT decision after the history began). Always ok, in_use + 1.
  Positions opened before the first decision (``initial-*``) are counted in the
  initial state instead (an acquire at -infinity).
* ``("regime", r)`` from ``Facts.regimes``: call/return of the operator's write,
  :data:`UNKNOWN` output (return +inf) when its completion is ``info``.

``ExitLockModel`` (partitioned per symbol; state ``(position_open, lock_held)``):

* CLOSE PERMIT -> ``("lock", symbol)``: ok iff position open and lock free;
  then lock held.
* CLOSE BLOCK ``exit_lock_busy_double_close_prevention`` -> ``("busy", symbol)``:
  ok iff the lock is held.
* ``("unlock", symbol, effect)``, ``[end, +inf)`` at the end of the CLOSE
  permit as ``check_single_close`` defines it (first of: its order, a missing
  permit, a non-executed result; else decision + ``permit_ttl_ms``). Effect
  ``close`` -> position closed, ``flip`` -> position open, anything else
  (rejected, missing, expired) -> position unchanged; the lock is released.
* An executed OPEN (``open``/``add``, ``initial-*`` included) -> ``("opened",
  symbol)`` on ``[order time, order time + 1]``.

Why releases and unlocks are ``[event, +inf)``: a governor can only learn of a
release after it happened (from the result stream, the mirror or a TTL), and it
may learn late, so the release may take effect at any point after the event -
never before it. Linearizing one late only makes the governor more
conservative, which no invariant forbids.
"""

from __future__ import annotations

import gc
import math
import time
from collections import defaultdict, deque
from collections.abc import Generator, Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Any

from chaos.checkers.facts import Decision, Facts
from chaos.checkers.invariants import CheckResult, Violation

INF = math.inf


class _Unknown:
    _inst: _Unknown | None = None

    def __new__(cls) -> _Unknown:
        if cls._inst is None:
            cls._inst = super().__new__(cls)
        return cls._inst

    def __repr__(self) -> str:
        return "UNKNOWN"


UNKNOWN: Any = _Unknown()


@dataclass(frozen=True)
class Operation:
    client: str
    input: Any
    call_ms: float
    output: Any
    return_ms: float = INF

    def __post_init__(self) -> None:
        if self.output is UNKNOWN and self.return_ms != INF:
            object.__setattr__(self, "return_ms", INF)
        if self.return_ms < self.call_ms:
            object.__setattr__(self, "return_ms", self.call_ms)


@dataclass
class LinResult:
    valid: bool | None
    partition_failed: int | None = None
    explanation: str = ""
    ops_checked: int = 0
    failed_ops: tuple[Operation, ...] = ()
    n_partitions: int = 1
    # per partition that failed or ran out of time: :func:`_partition_info`
    partitions: list[dict[str, Any]] = field(default_factory=list)


class Model:
    """Porcupine's model interface; subclass and override.

    Three additions: ``interchangeable(input, output)`` names ops with a +inf return that
    have the same effect in every state (None: none), ``read_only(input, output)`` says
    an op never changes the state, and ``split = True`` lets
    :func:`check` cut a partition's history into segments (:func:`_segmented`); both only
    make the search faster, never change its verdict."""

    split = False

    def interchangeable(self, input: Any, output: Any) -> Hashable | None:  # noqa: A002
        return None

    def read_only(self, input: Any, output: Any) -> bool:  # noqa: A002
        """Does the op leave every state as it was (when it applies)?"""
        return False

    def init(self) -> Hashable:
        raise NotImplementedError

    def step(self, state: Any, input: Any, output: Any) -> tuple[bool, Any]:  # noqa: A002
        raise NotImplementedError

    def partition(self, ops: Sequence[Operation]) -> list[list[Operation]] | None:
        return None

    def describe(self, state: Any) -> str:
        return repr(state)


# -- the search ------------------------------------------------------------------------------
SLICE = 1024  # search iterations between two looks at the clock / turns of the partitions
# Memory of the searches' caches: freeing one entry (a tuple, its bitset and state) took
# 0.5-2.2 us here (2 million: 1.1-4.4 s, with the machine's load), so the clock stops a
# search 1.2 us an entry early; beyond CACHE_MAX entries states are no longer remembered
# (the search stays exact, only slower), which bounds what is left to free to ~1-2 s.
FREE_S_PER_ENTRY = 1.2e-6
CACHE_MAX = 1_000_000
SEGMENT_MIN_OPS = 200  # a split history's segments are at least this long (the last aside)
_TAIL = 4  # linearized ops shown before the one that cannot be placed


def _fmt(op: Operation) -> str:
    def t(x: float) -> str:
        return "inf" if x == INF else ("-inf" if x == -INF else str(int(x)))
    return f"{op.client}: {op.input!r} -> {op.output!r} [{t(op.call_ms)}, {t(op.return_ms)}]"


def op_dict(op: Operation) -> dict[str, Any]:
    """An operation as results.json gives it (``return_ms`` None for +infinity)."""
    return {"client": op.client, "input": list(op.input) if isinstance(op.input, tuple)
            else op.input, "output": str(op.output), "call_ms": op.call_ms,
            "return_ms": None if op.return_ms == INF else op.return_ms}


@dataclass
class Progress:
    """The longest linearizable prefix one partition's search reached (Porcupine's
    visualization shows the same): how many ops, the last few of them, the first op that
    could not be placed after them (it returns before it can take effect) with the model
    state there, and the pending ops none of which applied either."""

    depth: int = -1
    last: tuple[Operation, ...] = ()
    stuck: Operation | None = None
    state: Any = None
    tried: tuple[Operation, ...] = ()


_End = tuple  # (state, pending ops): all finite ops of a segment linearized


def _search(model: Model, ops: Sequence[Operation], state: Any, prog: Progress,
            base: int = 0, mem: list[int] | None = None) -> Iterator[_End | None]:
    """Wing-Gong-Lowe search over ``ops`` from ``state``, resumable: yields None every
    :data:`SLICE` iterations (and during setup) so that a caller can interleave partitions
    and look at the clock, and yields ``(state, pending)`` each time every op with a finite
    return is linearized (``pending``: the ops with a +inf return not linearized). Resumed
    after such a yield it backtracks and looks for the next one (a split history needs
    them all, see :func:`_segmented`); exhausted, it returns. ``prog`` keeps the longest
    prefix (``base`` ops were linearized before ``ops``); ``mem[0]`` counts the cache
    entries of all live searches.

    Interchangeable ops (``model.interchangeable`` gives them the same key; +inf return)
    are linearized in call order only: swapping two of them in a linearization gives
    another one (same effect, and the earlier call can take the later one's place), so no
    linearization is lost, and the search no longer tries every subset of, say, a hundred
    pending releases."""
    n = len(ops)
    if n == 0:
        yield (state, ())
        return
    # Calls sort before returns at the same time; candidates are tried in call order, as
    # Porcupine does. (Trying ops with a +inf return last instead, to leave them pending,
    # was measured: 24 ops of a real run took 13 s instead of 1 ms, every subset of 19
    # busy blocks tried under a lock whose unlock was left pending.)
    events: list[tuple[float, int, int]] = []
    for i, op in enumerate(ops):
        events.append((op.call_ms, 0, i))
        events.append((op.return_ms, 1, i))
        if i & 0xFFF == 0xFFF:
            yield None
    events.sort()
    yield None
    m = len(events)
    head, tail = m, m + 1
    nxt = list(range(1, m + 1)) + [0, 0]
    prv = [head] + list(range(0, m - 1)) + [0, 0]
    nxt[head] = 0
    prv[tail] = m - 1
    nxt[m - 1] = tail
    is_ret = [e[1] == 1 for e in events]
    opid = [e[2] for e in events]
    match = [0] * m
    call_node = [0] * n
    after = [-1] * n  # interchangeable ops: the one before in call order must go first
    last_of: dict[Hashable, int] = {}
    key_of = model.interchangeable
    inf_ops: list[int] = []
    for k, e in enumerate(events):
        i = e[2]
        if e[1] == 0:
            call_node[i] = k
            op = ops[i]
            if op.return_ms == INF:
                inf_ops.append(i)
                key = key_of(op.input, op.output)
                if key is not None:
                    after[i] = last_of.get(key, -1)
                    last_of[key] = i
        else:
            match[call_node[i]] = k
        if k & 0xFFF == 0xFFF:
            yield None

    mem = [0] if mem is None else mem
    # An op that never changes the state (a read, a BLOCK), with a finite return, is placed
    # as soon as it applies and no other candidate is tried in its stead: if a
    # linearization exists from here, one exists with it next (moving it forward leaves
    # every state as it was, and every op that precedes it in real time is placed already,
    # or it would not be a candidate). Without this, k concurrent BLOCKs at a full count
    # cost 2^k states on the way to proving that an acquire among them cannot be placed.
    read_only = model.read_only
    forced = [op.return_ms != INF and read_only(op.input, op.output) for op in ops]
    n_finite = n - len(inf_ops)
    placed_finite = 0
    linearized = 0
    stack: list[tuple[int, Any, bool]] = []
    cache: set[tuple[int, Any]] = set()
    step = model.step
    entry = nxt[head]
    iters = 0
    try:
        while True:
            iters += 1
            if iters & (SLICE - 1) == 0:
                yield None
            if placed_finite == n_finite:
                yield (state, tuple(ops[i] for i in inf_ops if not linearized >> i & 1))
            elif not is_ret[entry]:
                i = opid[entry]
                op = ops[i]
                a = after[i]
                if a < 0 or linearized >> a & 1:
                    ok, new_state = step(state, op.input, op.output)
                    if ok:
                        nl = linearized | (1 << i)
                        key = (nl, new_state)
                        if key not in cache:
                            if mem[0] < CACHE_MAX:
                                cache.add(key)
                                mem[0] += 1
                            stack.append((entry, state, forced[i]))
                            state, linearized = new_state, nl
                            placed_finite += op.return_ms != INF
                            c, r = entry, match[entry]
                            prv[nxt[c]] = prv[c]
                            nxt[prv[c]] = nxt[c]
                            prv[nxt[r]] = prv[r]
                            nxt[prv[r]] = nxt[r]
                            entry = nxt[head]
                            continue
                        if not forced[i]:
                            entry = nxt[entry]
                            continue
                        # else: placing it now was tried already, and nothing else is
                        # worth trying here (see above): back
                    else:
                        entry = nxt[entry]
                        continue
                else:
                    entry = nxt[entry]
                    continue
            elif base + len(stack) > prog.depth:
                # The return of an op not linearized: the longest prefix so far?
                tried = []
                k = nxt[head]
                while k != entry and len(tried) < 6:
                    if not is_ret[k] and opid[k] != opid[entry]:
                        tried.append(ops[opid[k]])
                    k = nxt[k]
                prog.depth, prog.stuck, prog.state = base + len(stack), ops[opid[entry]], state
                prog.last = tuple(ops[opid[e]] for e, _, _ in stack[-_TAIL:])
                prog.tried = tuple(tried)
            # Backtrack, past ops that were placed as soon as they applied (forced).
            while True:
                if not stack:
                    return
                top, state, was_forced = stack.pop()
                linearized &= ~(1 << opid[top])
                placed_finite -= ops[opid[top]].return_ms != INF
                c, r = top, match[top]
                nxt[prv[r]] = r
                prv[nxt[r]] = r
                nxt[prv[c]] = c
                prv[nxt[c]] = c
                if not was_forced:
                    break
            entry = nxt[top]

    finally:
        mem[0] -= len(cache)

def _segments(ops: Sequence[Operation], min_ops: int
              ) -> Generator[None, None, list[list[Operation]]]:
    """Cut the history (in call order) before an op called strictly after every earlier op
    with a finite return has returned, once the segment has ``min_ops`` ops: no op with a
    finite return spans the cut, so in every linearization the finite ops before it come
    first (see :func:`_segmented`). Yields now and then, so that the clock is looked at:
    runs of 2^16 ops are sorted apart and merged two by two (one sort of 10^6 ops took
    0.3-0.9 s in one piece)."""
    by_call = attrgetter("call_ms")
    runs = []
    for k in range(0, len(ops), 1 << 16):
        runs.append(sorted(ops[k:k + (1 << 16)], key=by_call))
        yield None
    while len(runs) > 1:  # merged two by two (a sort of two sorted runs only merges them)
        merged = []
        for k in range(0, len(runs), 2):
            merged.append(runs[k] + runs[k + 1] if k + 1 < len(runs) else runs[k])
            merged[-1].sort(key=by_call)
            yield None
        runs = merged
    order = runs[0] if runs else []
    segs: list[list[Operation]] = []
    cur: list[Operation] = []
    last_ret = -INF
    for k, op in enumerate(order):
        if len(cur) >= min_ops and last_ret < op.call_ms:
            segs.append(cur)
            cur = []
        cur.append(op)
        if op.return_ms != INF and op.return_ms > last_ret:
            last_ret = op.return_ms
        if k & 0xFFFF == 0xFFFF:
            yield None
    if cur:
        segs.append(cur)
    return segs


def _counts(model: Model, pending: Sequence[Operation]) -> dict[Hashable, int]:
    """Pending ops as a multiset, interchangeable ones counted under their key."""
    counts: dict[Hashable, int] = defaultdict(int)
    for op in pending:
        key = model.interchangeable(op.input, op.output)
        counts[op if key is None else key] += 1
    return counts


def _dominates(model: Model, x: _End, y: _End) -> bool:
    """Does configuration ``x`` reach ``y`` by placing some of its pending ops? Then
    whatever follows ``y`` can follow ``x`` (those ops may be placed first), and ``y``
    need not be searched from. Proven by placing the surplus ops while any applies; when
    that does not end in ``y``'s state the answer is no (safe: ``y`` is kept)."""
    cx, cy = _counts(model, x[1]), _counts(model, y[1])
    if any(k not in cx or cx[k] < c for k, c in cy.items()):
        return False
    surplus = {k: c - cy.get(k, 0) for k, c in cx.items()}
    todo = []
    for op in x[1]:
        key = model.interchangeable(op.input, op.output)
        k = op if key is None else key
        if surplus[k]:
            surplus[k] -= 1
            todo.append(op)
    state = x[0]
    while todo:
        rest = []
        for op in todo:
            ok, new_state = model.step(state, op.input, op.output)
            if ok:
                state = new_state
            else:
                rest.append(op)
        if len(rest) == len(todo):
            return False
        todo = rest
    return bool(state == y[0])


def _segmented(model: Model, ops: Sequence[Operation], prog: Progress, min_ops: int,
               mem: list[int]) -> Generator[None, None, bool]:
    """The search over a history cut by :func:`_segments`, deciding exactly what the
    unsplit search decides.

    Why: at a cut every op with a finite return before it returned strictly before any
    op after it is called, so a linearization of the whole history is a linearization of
    segment 0 that ends once its finite ops are placed (state s, some of its +inf ops not
    placed yet: they may still take effect any time later), followed by one of segment 1
    started from s with those pending ops carried in (called before all of segment 1,
    they come first in its event list), and so on; and any such chain is a linearization
    of the whole. A configuration reachable from another by placing pending ops is
    dominated by it (:func:`_dominates`) and dropped.

    First the cheap way: from each segment's first end configuration into the next (the
    search places carried ops as early as it can), which decides a valid history at the
    cost of one search per segment. Where a segment fails that way, every configuration:
    the set of non-dominated end configurations of segment k from every one of segment
    k-1's, from a configuration known to be reached w segments back up to the failing
    one; w doubles until one passes it (the cheap way goes on from there) or the sets,
    followed from the start, die out: invalid. A wrong early choice is so mended where
    it was made, and an invalid history costs at most about twice the full pass.

    Releases in the slots model are ``[event, +inf)`` and almost never all placed, so
    classic quiescent points (nothing pending) hardly exist; pending +inf ops are carried
    instead of waited for. Segments have at least ``min_ops`` ops, so carried ops are
    re-listed rarely, and the bitsets stay that short instead of growing with the
    history, which made a long history quadratic. What bounds the cost: the longest
    stretch of history without a cut (ops with finite returns overlapping end to end),
    searched in one piece."""
    segs = yield from _segments(ops, min_ops)
    before = [0]
    for seg in segs:
        before.append(before[-1] + len(seg))

    def ends_of(i: int, frontier: list[_End], first: bool
                ) -> Generator[None, None, list[_End]]:
        """Segment i's end configurations from every one of ``frontier``, dominated
        ones dropped (``first``: the first found is enough)."""
        ends: list[_End] = []
        for state, pool in frontier:
            for x in _search(model, [*pool, *segs[i]], state, prog, before[i] - len(pool),
                             mem):
                if x is None:
                    yield None
                elif first:
                    return [x]
                elif not any(_dominates(model, e, x) for e in ends):
                    ends = [e for e in ends if not _dominates(model, x, e)]
                    ends.append(x)
        return ends

    # known[i]: a configuration at the start of segment i that the history so far reaches.
    known: dict[int, _End] = {0: (model.init(), ())}
    i = 0
    while i < len(segs):
        ends = yield from ends_of(i, [known[i]], True)  # the cheap way
        if ends:
            i += 1
            known[i] = ends[0]
            continue
        # Segment i fails from there: follow every configuration from a known one w
        # segments back, w doubling, until one passes segment i (go on from it) or w
        # reaches the start and none does (invalid).
        w = 1
        while True:
            s0 = max(k for k in known if k <= max(0, i - w))
            frontier = [known[s0]]
            for k in range(s0, i + 1):
                frontier = yield from ends_of(k, frontier, k == i)
                if not frontier:
                    break
            if frontier:
                i += 1
                known[i] = frontier[0]
                break
            if s0 == 0:
                return False
            w *= 2
    return True


def _run(model: Model, ops: Sequence[Operation], prog: Progress, segment_ops: int,
         mem: list[int]) -> Generator[None, None, bool]:
    """One partition's check as a generator of ticks; its return value is the verdict."""
    if model.split and len(ops) > segment_ops:
        return (yield from _segmented(model, ops, prog, segment_ops, mem))
    for x in _search(model, ops, model.init(), prog, 0, mem):
        if x is not None:
            return True
        yield None
    return False


def _explain(model: Model, prog: Progress, n: int) -> tuple[str, tuple[Operation, ...]]:
    if prog.stuck is None:
        return f"no linearization of {n} ops", ()
    lines = [f"no linearization: at most {prog.depth} of {n} ops linearize; then "
             f"{_fmt(prog.stuck)} cannot take effect before it returns",
             f"  state there: {model.describe(prog.state)}"]
    lines += [f"  linearized just before: {_fmt(op)}" for op in prog.last]
    lines += [f"  pending, none applies: {_fmt(op)}" for op in prog.tried]
    return "\n".join(lines), (*prog.last, prog.stuck)


def _partition_info(model: Model, idx: int, ops: Sequence[Operation], prog: Progress,
                    outcome: str) -> dict[str, Any]:
    """Porcupine's visualization as data: the longest linearizable prefix and what stops
    it, for results.json."""
    info: dict[str, Any] = {"partition": idx, "outcome": outcome, "ops": len(ops),
                            "longest_prefix": max(prog.depth, 0)}
    if prog.stuck is not None:
        info.update(prefix_tail=[op_dict(op) for op in prog.last],
                    first_unplaceable=op_dict(prog.stuck),
                    state_before=model.describe(prog.state),
                    pending_not_applying=[op_dict(op) for op in prog.tried])
    return info


def check(model: Model, ops: Sequence[Operation], timeout_s: float = 10.0,
          segment_ops: int = SEGMENT_MIN_OPS) -> LinResult:
    """Is the history linearizable under ``model``? valid None: the deadline passed.

    The partitions are searched side by side, a slice of :data:`SLICE` iterations each in
    turn, smallest first (Porcupine runs them in parallel goroutines and cancels the rest
    on the first failure): the first partition that fails decides at once, whatever the
    others cost, and the clock is looked at between slices. ``segment_ops``: the shortest
    segment of a split history (:func:`_segments`; tests compare it split finely with it
    unsplit)."""
    deadline = time.monotonic() + timeout_s
    # The cache holds millions of small tuples: a full cyclic collection walking them took
    # seconds at a time (the deadline was overshot by 20%); nothing here makes cycles.
    gc_was = gc.isenabled()
    gc.disable()
    try:
        return _check(model, ops, timeout_s, segment_ops, deadline)
    finally:
        if gc_was:
            gc.enable()


def _check(model: Model, ops: Sequence[Operation], timeout_s: float, segment_ops: int,
           deadline: float) -> LinResult:
    parts = model.partition(ops)
    if parts is None:
        parts = [list(ops)]
    progs = [Progress() for _ in parts]
    mem = [0]  # cache entries alive, freed when we return: their time counts
    turn = deque((i, _run(model, parts[i], progs[i], segment_ops, mem))
                 for i in sorted(range(len(parts)), key=lambda i: len(parts[i])))
    checked = 0
    while turn:
        if time.monotonic() + mem[0] * FREE_S_PER_ENTRY > deadline:
            break
        idx, gen = turn.popleft()
        try:
            next(gen)
        except StopIteration as stop:
            if stop.value:
                checked += len(parts[idx])
                continue
            why, involved = _explain(model, progs[idx], len(parts[idx]))
            return LinResult(False, idx, why, checked, involved, len(parts),
                             [_partition_info(model, idx, parts[idx], progs[idx],
                                              "invalid")])
        turn.append((idx, gen))
    if turn:
        unknown = sorted(idx for idx, _ in turn)
        return LinResult(None, None, f"timed out after {timeout_s} s in {len(unknown)} of "
                         f"{len(parts)} partitions (first: {unknown[0]})", checked,
                         n_partitions=len(parts),
                         partitions=[_partition_info(model, i, parts[i], progs[i],
                                                     "timeout") for i in unknown[:10]])
    return LinResult(True, None, "", checked, n_partitions=len(parts))


# -- the governor models ---------------------------------------------------------------------
class SlotsModel(Model):
    """Global slot count; state ``(in_use, regime)``. Not partitionable, so split into
    segments (:func:`_segmented`); releases, adopts and unknown-outcome ops of one kind are
    interchangeable (the symbol does not change the effect)."""

    split = True

    def __init__(self, capacity: dict[str, int] | Any, initial_in_use: int = 0,
                 initial_regime: str = "BASE") -> None:
        # capacity: a GovernorConfig (slots_for) or a dict regime -> slots
        self._cap = capacity.get if isinstance(capacity, dict) else capacity.slots_for
        self.initial = (initial_in_use, initial_regime)

    def init(self) -> Hashable:
        return self.initial

    def step(self, state: Any, input: Any, output: Any) -> tuple[bool, Any]:  # noqa: A002
        count, regime = state
        kind = input[0]
        if kind == "acquire":
            free = count < self._cap(regime)
            if output is UNKNOWN:
                return True, (count + 1, regime) if free else state
            return (True, (count + 1, regime)) if free else (False, state)
        if kind == "full":
            return output is UNKNOWN or count >= self._cap(regime), state
        if kind == "release":
            return (True, (count - 1, regime)) if count > 0 else (False, state)
        if kind == "adopt":
            return True, (count + 1, regime)
        if kind == "regime":
            return True, (count, input[1])
        raise ValueError(f"unknown slots op {input!r}")

    def read_only(self, input: Any, output: Any) -> bool:  # noqa: A002
        return bool(input[0] == "full")

    def interchangeable(self, input: Any, output: Any) -> Hashable | None:  # noqa: A002
        if input[0] in ("release", "adopt"):
            return (input[0],)
        if output is UNKNOWN:
            return (input[0], input[1]) if input[0] == "regime" else (input[0], "?")
        return None

    def describe(self, state: Any) -> str:
        return f"{state[0]} slots in use of {self._cap(state[1])} (regime {state[1]})"


class ExitLockModel(Model):
    """Per-symbol exit lock; state ``(position_open, lock_held)``; partitioned by symbol,
    a long partition split into segments; unlocks of one effect are interchangeable."""

    split = True

    def read_only(self, input: Any, output: Any) -> bool:  # noqa: A002
        return bool(input[0] == "busy")

    def interchangeable(self, input: Any, output: Any) -> Hashable | None:  # noqa: A002
        if input[0] == "unlock":
            return ("unlock", input[2] if len(input) > 2 else "")
        return (input[0], "?") if output is UNKNOWN else None

    def init(self) -> Hashable:
        return (False, False)

    def step(self, state: Any, input: Any, output: Any) -> tuple[bool, Any]:  # noqa: A002
        pos, lock = state
        kind = input[0]
        if kind == "lock":
            if pos and not lock:
                return True, (pos, True)
            return output is UNKNOWN, state  # unknown: it may have been a BLOCK
        if kind == "busy":
            return output is UNKNOWN or lock, state
        if kind == "unlock":
            effect = input[2] if len(input) > 2 else ""
            pos = False if effect == "close" else (True if effect == "flip" else pos)
            return True, (pos, False)
        if kind == "opened":
            return True, (True, lock)
        raise ValueError(f"unknown exit-lock op {input!r}")

    def partition(self, ops: Sequence[Operation]) -> list[list[Operation]]:
        by: dict[str, list[Operation]] = defaultdict(list)
        for op in ops:
            by[op.input[1]].append(op)
        return list(by.values())

    def describe(self, state: Any) -> str:
        return (f"position {'open' if state[0] else 'flat'}, exit lock "
                f"{'held' if state[1] else 'free'}")


# -- ops from a run's facts ------------------------------------------------------------------
FULL = "active_slots_waiting_rotation_close"
BUSY = "exit_lock_busy_double_close_prevention"


def _first_decision(ds: list[Decision]) -> Decision | None:
    return next((d for d in ds if d.decision in ("PERMIT", "BLOCK")), None)


def _call_ms(facts: Facts, pid: str, d: Decision) -> int:
    entry = facts.plans.get(pid)
    call = entry.entry_ms if entry else d.entry_ms - 1
    return min(call, d.entry_ms)


def _permitted(facts: Facts, action: str, block_reason: str, block_f: str,
               ops: list[Operation]) -> Iterator[tuple[str, Decision, int]]:
    """The plans of ``action`` by their first decision: a BLOCK for ``block_reason`` goes
    into ``ops`` as a ``block_f`` operation (other blocks say nothing about the model);
    each PERMIT is yielded as ``(plan_id, decision, call_ms)``."""
    for pid, ds in facts.decisions.items():
        d = _first_decision(ds)
        if d is None or d.action != action:
            continue
        call = _call_ms(facts, pid, d)
        if d.decision == "BLOCK":
            if d.reason == block_reason:
                ops.append(Operation(pid, (block_f, d.symbol), call, "BLOCK", d.entry_ms))
            continue
        yield pid, d, call


def slots_ops(facts: Facts) -> tuple[SlotsModel, list[Operation]]:
    cfg = facts.config
    ops: list[Operation] = []
    first_order = facts.first_order()
    permitted_open: set[str] = set()
    first_decision_ms = min((d.entry_ms for ds in facts.decisions.values() for d in ds),
                            default=INF)
    for pid, d, call in _permitted(facts, "OPEN", FULL, "full", ops):
        permitted_open.add(pid)
        ops.append(Operation(pid, ("acquire", d.symbol), call, "PERMIT", d.entry_ms))
        o = first_order.get(pid)
        fails = facts.failed_takes(pid)
        if o is not None:
            if not o.executed:
                ops.append(Operation(pid, ("release", d.symbol), o.wall_ms, "ok"))
        elif fails:
            ops.append(Operation(pid, ("release", d.symbol), min(fails), "ok"))
        else:
            ops.append(Operation(pid, ("release", d.symbol),
                                 d.entry_ms + cfg.capital_reservation_ttl_ms, "ok"))
    held: dict[str, int] = defaultdict(int)
    initial = 0
    for o in facts.orders:
        if not o.executed:
            continue
        if o.action == "OPEN" and o.effect in ("open", "add"):
            held[o.symbol] += 1
            if o.plan_id in permitted_open:
                continue
            if o.plan_id.startswith("initial-") or o.wall_ms < first_decision_ms:
                initial += 1
            else:
                ops.append(Operation(o.plan_id, ("adopt", o.symbol), o.wall_ms, "ok"))
        elif o.effect == "flip":
            held[o.symbol] += 1
            ops.append(Operation(o.plan_id, ("adopt", o.symbol), o.wall_ms, "ok"))
        elif o.effect == "close":
            for _ in range(held.pop(o.symbol, 0)):
                ops.append(Operation(o.plan_id, ("release", o.symbol), o.wall_ms, "ok"))
    for k, (inv, done, regime, typ) in enumerate(facts.regimes):
        if typ == "fail":
            continue
        ops.append(Operation(f"regime-{k}", ("regime", regime), inv,
                             "ok" if typ == "ok" else UNKNOWN, done))
    return SlotsModel(cfg, initial, facts.initial_regime), ops


def exit_lock_ops(facts: Facts) -> tuple[ExitLockModel, list[Operation]]:
    ttl = facts.config.permit_ttl_ms
    first_order = facts.first_order()
    ops: list[Operation] = []
    for o in facts.orders:
        if o.action == "OPEN" and o.executed and o.effect in ("open", "add"):
            ops.append(Operation(o.plan_id, ("opened", o.symbol), o.wall_ms, "ok",
                                 o.wall_ms + 1))
    for pid, d, call in _permitted(facts, "CLOSE", BUSY, "busy", ops):
        ops.append(Operation(pid, ("lock", d.symbol), call, "PERMIT", d.entry_ms))
        o = first_order.get(pid)
        ends = [o.wall_ms] if o is not None else []
        ends += facts.failed_takes(pid)
        ends += [ms for ms, _status in facts.aborts.get(pid, ())]
        end = max(min(ends) if ends else d.entry_ms + ttl, d.entry_ms)
        effect = o.effect if o is not None and o.wall_ms == end else "none"
        ops.append(Operation(pid, ("unlock", d.symbol, effect), end, "ok"))
    return ExitLockModel(), ops


def _result(name: str, res: LinResult, n_ops: int, seconds: float) -> CheckResult:
    stats: dict[str, Any] = {"ops": n_ops, "ops_checked": res.ops_checked,
                             "seconds": round(seconds, 3), "partitions": res.n_partitions}
    if res.partitions:  # the longest linearizable prefix of each failed / timed-out one
        stats["explanations"] = res.partitions
    if res.valid is False:
        first = res.failed_ops[-1] if res.failed_ops else None
        sym = first.input[1] if first is not None and len(first.input) > 1 else None
        wall = int(first.return_ms if first and first.return_ms != INF else
                   first.call_ms if first else 0)
        v = Violation(name, wall, sym, tuple(op.client for op in res.failed_ops),
                      "a linearizable history", "none found",
                      f"{name}: partition {res.partition_failed}"
                      f"{f' (symbol {sym})' if sym else ''}: {res.explanation}",
                      tuple(op_dict(op) for op in res.failed_ops))
        return CheckResult(name, False, [v], stats, res.explanation.splitlines()[0])
    return CheckResult(name, res.valid, [], stats, res.explanation)


def check_model(facts: Facts, timeout_s: float = 10.0) -> dict[str, CheckResult]:
    """Both governor models over a run's facts: ``slots_model`` and ``exit_lock_model``."""
    out: dict[str, CheckResult] = {}
    for name, build in (("slots_model", slots_ops), ("exit_lock_model", exit_lock_ops)):
        t0 = time.perf_counter()
        model, ops = build(facts)
        res = check(model, ops, timeout_s)
        out[name] = _result(name, res, len(ops), time.perf_counter() - t0)
    return out

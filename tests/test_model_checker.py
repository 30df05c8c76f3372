"""The linearizability checker (chaos/checkers/model.py) on hand-written histories and on
real run directories made by short ``chaos run``s in the test session."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from chaos.checkers.model import (
    INF,
    UNKNOWN,
    ExitLockModel,
    Model,
    Operation,
    SlotsModel,
    check,
    check_model,
)

CAP = {"BASE": 2, "CHOP": 1}


def slots(initial: int = 0, regime: str = "BASE") -> SlotsModel:
    return SlotsModel(CAP, initial, regime)


def acq(c: str, t0: float, t1: float, sym: str = "A") -> Operation:
    return Operation(c, ("acquire", sym), t0, "PERMIT", t1)


def full(c: str, t0: float, t1: float) -> Operation:
    return Operation(c, ("full", "X"), t0, "BLOCK", t1)


def rel(c: str, t0: float, sym: str = "A") -> Operation:
    return Operation(c, ("release", sym), t0, "ok")


def test_sequential_valid() -> None:
    ops = [acq("a", 0, 1), acq("b", 2, 3), full("c", 4, 5), rel("a", 6), acq("d", 7, 8)]
    r = check(slots(), ops)
    assert r.valid is True and r.ops_checked == 5


def test_acquire_beyond_capacity_invalid() -> None:
    ops = [acq("a", 0, 1), acq("b", 2, 3), acq("c", 4, 5)]
    r = check(slots(), ops)
    assert r.valid is False
    assert r.partition_failed == 0
    assert "c:" in r.explanation and "2 slots in use of 2" in r.explanation


def test_release_cannot_take_effect_before_its_event() -> None:
    ops = [acq("a", 0, 1), acq("b", 2, 3), acq("c", 4, 5), rel("a", 6)]
    assert check(slots(), ops).valid is False


def test_concurrent_only_one_order_works() -> None:
    # Capacity 2, one slot in use. A full block and an acquire overlap: only
    # "acquire, then full" linearizes (full needs 2 in use, the acquire needs < 2).
    ops = [acq("a", 0, 10), full("f", 1, 9)]
    assert check(slots(initial=1), ops).valid is True
    # Same ops, but the full block returns before the acquire is called: no order works.
    ops = [full("f", 0, 1), acq("a", 2, 3)]
    assert check(slots(initial=1), ops).valid is False


def test_regime_flip_in_flight_and_unknown() -> None:
    # Regime CHOP (1 slot) in force; a flip to BASE overlaps the second acquire.
    ops = [acq("a", 0, 1), Operation("r", ("regime", "BASE"), 2, "ok", 6), acq("b", 3, 5)]
    assert check(slots(regime="CHOP"), ops).valid is True
    # The flip's outcome is unknown: it may have applied, so still valid.
    ops = [acq("a", 0, 1), Operation("r", ("regime", "BASE"), 2, UNKNOWN), acq("b", 3, 5)]
    assert check(slots(regime="CHOP"), ops).valid is True
    # Without any flip: invalid.
    assert check(slots(regime="CHOP"), [acq("a", 0, 1), acq("b", 3, 5)]).valid is False


def test_unknown_acquire_left_out_valid() -> None:
    # The unknown acquire u, if applied, fills the last slot and b would fail: leave it out.
    ops = [acq("a", 0, 1), Operation("u", ("acquire", "U"), 2, UNKNOWN), acq("b", 3, 4)]
    assert check(slots(), ops).valid is True


def test_unknown_acquire_needed_valid() -> None:
    # The full block is only justified if the unknown acquire took effect.
    ops = [acq("a", 0, 1), Operation("u", ("acquire", "U"), 2, UNKNOWN), full("f", 3, 4)]
    assert check(slots(), ops).valid is True


def test_unknown_acquire_invalid_either_way() -> None:
    # f needs u applied (2 in use); b after it needs u not applied: no reading works.
    ops = [acq("a", 0, 1), Operation("u", ("acquire", "U"), 2, UNKNOWN), full("f", 3, 4),
           acq("b", 5, 6)]
    r = check(slots(), ops)
    assert r.valid is False


def lock(c: str, t0: float, t1: float, sym: str = "S") -> Operation:
    return Operation(c, ("lock", sym), t0, "PERMIT", t1)


def unlock(c: str, t0: float, sym: str = "S", effect: str = "none") -> Operation:
    return Operation(c, ("unlock", sym, effect), t0, "ok")


def opened(c: str, t: float, sym: str = "S") -> Operation:
    return Operation(c, ("opened", sym), t, "ok", t + 1)


def test_two_overlapping_locks_invalid() -> None:
    ops = [opened("o", 0), lock("c1", 2, 4), lock("c2", 3, 5), unlock("c1", 10),
           unlock("c2", 11)]
    r = check(ExitLockModel(), ops)
    assert r.valid is False
    assert "exit lock held" in r.explanation


def test_lock_unlock_lock_valid() -> None:
    ops = [opened("o", 0), lock("c1", 2, 3), Operation("b", ("busy", "S"), 4, "BLOCK", 5),
           unlock("c1", 6), lock("c2", 7, 8)]
    assert check(ExitLockModel(), ops).valid is True


def test_close_then_lock_on_flat_invalid() -> None:
    ops = [opened("o", 0), lock("c1", 2, 3), unlock("c1", 4, effect="close"),
           lock("c2", 7, 8)]
    assert check(ExitLockModel(), ops).valid is False


def test_busy_without_lock_invalid() -> None:
    ops = [opened("o", 0), Operation("b", ("busy", "S"), 4, "BLOCK", 5)]
    assert check(ExitLockModel(), ops).valid is False


def test_partition_per_symbol() -> None:
    ops = []
    for sym in ("A", "B"):
        ops += [opened(f"o{sym}", 0, sym), lock(f"c1{sym}", 2, 3, sym),
                unlock(f"c1{sym}", 4, sym), lock(f"c2{sym}", 5, 6, sym)]
    m = ExitLockModel()
    parts = m.partition(ops)
    assert parts is not None and len(parts) == 2
    assert check(m, ops).valid is True
    # Breaking only B names B's partition.
    ops.append(lock("c3B", 7, 8, "B"))
    r = check(m, ops)
    assert r.valid is False and r.partition_failed == 1
    assert all(op.input[1] == "B" for op in r.failed_ops)


class Counter(Model):
    """A counter with increments and reads; for a history that explodes the search."""

    def init(self) -> int:
        return 0

    def step(self, state, input, output):  # noqa: A002
        if input[0] == "inc":
            return True, state + input[1]
        return state == output, state


def test_timeout_gives_unknown() -> None:
    # 40 concurrent increments of distinct powers of two, then a read of an impossible sum:
    # every subset is a distinct state, so the search cannot finish in time.
    n = 40
    ops = [Operation(f"i{k}", ("inc", 1 << k), 0, "ok", 100) for k in range(n)]
    ops.append(Operation("r", ("read",), 0, -1, 100))
    r = check(Counter(), ops, timeout_s=0.2)
    assert r.valid is None
    assert "timed out" in r.explanation


def test_empty_history_valid() -> None:
    assert check(slots(), []).valid is True


# -- agreement with the invariant checkers on real runs -----------------------------------------
# Short real ``chaos run``s made in this session (they once came from a development machine's
# /tmp and were skipped everywhere else): the reference on a plain storm and on duplicate
# closes must never come out invalid; legacy on open-storm breaks slots within 0.4 s.
REAL_RUNS = {
    "ref-open-storm": ("open-storm", "reference", "3"),
    "ref-duplicate-close": ("duplicate-close", "reference", "3"),
    "legacy-open-storm": ("open-storm", "legacy", "2"),
}
REF_RUNS = [name for name in REAL_RUNS if name.startswith("ref-")]


@pytest.fixture(scope="module")
def real_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Run the scenarios side by side (each a few seconds) and return their run directories."""
    root = tmp_path_factory.mktemp("model-runs")
    procs: dict[str, subprocess.Popen[str]] = {}
    for name, (scenario, governor, duration) in REAL_RUNS.items():
        procs[name] = subprocess.Popen(
            [sys.executable, "-m", "chaos", "run", "--scenario", scenario, "--governor",
             governor, "--duration", duration, "--out", str(root / name), "--no-report",
             "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        outs = {name: p.communicate(timeout=240)[0] for name, p in procs.items()}
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
    for name, p in procs.items():  # 0 valid, 1 invalid: anything else is a harness failure
        assert p.returncode in (0, 1), f"{name}: exit {p.returncode}\n{outs[name]}"
        assert (root / name / "history").is_dir(), outs[name]
    return {name: root / name for name in REAL_RUNS}


@pytest.mark.parametrize("name", REF_RUNS)
def test_reference_runs_never_invalid(real_runs: dict[str, Path], name: str) -> None:
    from chaos.checkers.facts import gather

    results = check_model(gather(real_runs[name]), timeout_s=20)
    for model, r in results.items():
        assert r.valid is not False, f"{model}: {r.violations[0].message}"


def test_legacy_open_storm_slots_invalid(real_runs: dict[str, Path]) -> None:
    from chaos.checkers.facts import gather
    from chaos.checkers.invariants import check_slots

    facts = gather(real_runs["legacy-open-storm"])
    assert check_slots(facts).valid is False
    r = check_model(facts, timeout_s=20)["slots_model"]
    assert r.valid is False
    assert r.violations and "slots in use" in r.violations[0].message


def test_explanations_reach_the_analysis_frames_and_the_report(
        real_runs: dict[str, Path], tmp_path: Path) -> None:
    """The failing partition's longest prefix and the op that cannot be placed, from
    results.json to ``RunFrames.model_explanations`` and the report's model section."""
    import shutil

    from chaos.analysis import load_run
    from chaos.report import write_report

    run = tmp_path / "run"
    shutil.copytree(real_runs["legacy-open-storm"], run)
    write_report(run)  # judges (models included) and writes results.json
    df = load_run(run).model_explanations
    row = df[df["model"] == "slots_model"].iloc[0]
    assert row.outcome == "invalid" and 0 < row.longest_prefix < row.ops
    assert row.first_unplaceable and "slots in use" in row.state_before
    assert "cannot be placed" in (run / "report.md").read_text()
    assert row.first_unplaceable in (run / "report.html").read_text().replace("&gt;", ">")


def test_unknown_lock_may_have_been_a_block() -> None:
    # An unknown-outcome CLOSE decision overlapping a held lock: either it blocked or it
    # never happened; valid. A known PERMIT there is invalid.
    base = [opened("o", 0), lock("c1", 2, 3), unlock("c1", 20)]
    assert check(ExitLockModel(), [*base, Operation("c2", ("lock", "S"), 4, UNKNOWN)]).valid
    assert check(ExitLockModel(), [*base, lock("c2", 4, 5)]).valid is False


def test_check_model_on_synthetic_run(tmp_path: Path) -> None:
    import importlib.util

    from chaos.checkers.facts import gather

    path = Path(__file__).resolve().parents[1] / "loadtests" / "bench_checkers.py"
    spec = importlib.util.spec_from_file_location("bench_checkers", path)
    assert spec and spec.loader
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.make_run(tmp_path / "run", 2000)
    results = check_model(gather(tmp_path / "run"), timeout_s=20)
    assert {k: r.valid for k, r in results.items()} == {"slots_model": True,
                                                        "exit_lock_model": True}
    assert results["slots_model"].stats["ops"] > 0


# -- the generated regression suite (chaos/checkers/histories.py) --------------------------------
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from chaos.checkers import histories  # noqa: E402

SUITE = {h.name: h for h in histories.suite()}


@pytest.mark.parametrize("name", sorted(SUITE))
def test_generated_history_verdict(name: str) -> None:
    # Each is decided, with the verdict it has by construction, within 5 s (unknown fails).
    h = SUITE[name]
    r = check(h.model, h.ops, timeout_s=5)
    assert r.valid is h.valid, r.explanation


def test_cheap_failing_partition_decides_whatever_the_others_cost() -> None:
    # Nine hard valid partitions (each seconds of search) come first in key order; the
    # tenth, four ops and an impossible read, fails at once: invalid within 1 s.
    h = histories.kv(valid=False, cheap_bad_key=True, width=1.5, gets=0.35)
    r = check(h.model, h.ops, timeout_s=1.0)
    assert r.valid is False
    assert r.partition_failed == 9 and r.n_partitions == 10
    info = r.partitions[0]
    assert info["outcome"] == "invalid" and info["first_unplaceable"]["client"] == "bad"
    assert info["longest_prefix"] >= 3 and info["state_before"] in ("'a'", "'ab'")


def test_explanation_longest_prefix_and_state() -> None:
    ops = [acq("a", 0, 1), acq("b", 2, 3), full("f", 4, 5), acq("c", 6, 7)]
    r = check(slots(), ops)
    assert r.valid is False
    (info,) = r.partitions
    assert info["longest_prefix"] == 3 and info["ops"] == 4
    assert info["first_unplaceable"]["client"] == "c"
    assert info["state_before"] == "2 slots in use of 2 (regime BASE)"
    assert [o["client"] for o in info["prefix_tail"]] == ["a", "b", "f"]
    res = check_model_result(r, len(ops))
    assert res.stats["explanations"] == r.partitions and res.stats["partitions"] == 1
    assert res.note.startswith("no linearization: at most 3 of 4 ops")


def check_model_result(r, n):  # the CheckResult results.json gets
    from chaos.checkers.model import _result

    return _result("slots_model", r, n, 0.0)


def test_timeout_explains_each_unfinished_partition() -> None:
    n = 40
    ops = [Operation(f"i{k}", ("inc", 1 << k), 0, "ok", 100) for k in range(n)]
    ops.append(Operation("r", ("read",), 0, -1, 100))
    r = check(Counter(), ops, timeout_s=0.2)
    assert r.valid is None
    (info,) = r.partitions
    assert info["outcome"] == "timeout" and info["first_unplaceable"]["client"] == "r"


class _Unsplit(SlotsModel):
    split = False

    def interchangeable(self, input, output):  # noqa: A002
        return None


class _UnsplitLock(ExitLockModel):
    split = False

    def interchangeable(self, input, output):  # noqa: A002
        return None


def _op(draw, kinds, k: int, t: int) -> Operation:
    kind = draw(st.sampled_from(kinds))
    sym = draw(st.sampled_from("AB"))
    width = draw(st.integers(0, 3))
    unknown = draw(st.booleans()) and draw(st.booleans())
    inf = kind in ("release", "adopt", "unlock")
    inp: tuple = (kind, sym)
    if kind == "regime":
        inp = (kind, draw(st.sampled_from(["BASE", "CHOP"])))
    if kind == "unlock":
        inp = (kind, "S", draw(st.sampled_from(["close", "flip", "none"])))
    elif kind in ("lock", "busy", "opened"):
        inp = (kind, "S")
    out = {"acquire": "PERMIT", "full": "BLOCK", "lock": "PERMIT", "busy": "BLOCK"}.get(kind,
                                                                                       "ok")
    return Operation(f"p{k}", inp, t, UNKNOWN if unknown and not inf else out,
                     INF if inf else t + width)


@st.composite
def _history(draw, kinds: tuple[str, ...]) -> list[Operation]:
    n = draw(st.integers(1, 11))
    t, ops = 0, []
    for k in range(n):
        t += draw(st.integers(0, 3))
        ops.append(_op(draw, kinds, k, t))
    return ops


@settings(max_examples=300, deadline=None)
@given(_history(("acquire", "full", "release", "adopt", "regime")), st.integers(0, 2))
def test_slots_split_decides_as_unsplit(ops: list[Operation], initial: int) -> None:
    # Segments as short as 2 ops, carried pending ops, interchangeable releases: the same
    # verdict as the plain search over the whole history.
    split = check(slots(initial), ops, segment_ops=2).valid
    plain = check(_Unsplit(CAP, initial, "BASE"), ops).valid
    assert split is plain


@settings(max_examples=300, deadline=None)
@given(_history(("opened", "lock", "busy", "unlock")))
def test_exit_lock_split_decides_as_unsplit(ops: list[Operation]) -> None:
    assert check(ExitLockModel(), ops, segment_ops=2).valid is \
        check(_UnsplitLock(), ops).valid


def _old_check():
    """The search before issue 15 (kept in loadtests/bench_model.py as the baseline)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "loadtests" / "bench_model.py"
    spec = importlib.util.spec_from_file_location("bench_model", path)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.old_check


OLD_CHECK = _old_check()


@settings(max_examples=300, deadline=None)
@given(_history(("acquire", "full", "release", "adopt", "regime")), st.integers(0, 2))
def test_slots_decides_as_the_old_search(ops: list[Operation], initial: int) -> None:
    # Read-only ops placed as soon as they apply, interchangeable pending ops in call order,
    # segments: the verdict of the plain WGL search this replaced.
    assert check(slots(initial), ops, segment_ops=2).valid is \
        OLD_CHECK(slots(initial), ops).valid


@settings(max_examples=300, deadline=None)
@given(_history(("opened", "lock", "busy", "unlock")))
def test_exit_lock_decides_as_the_old_search(ops: list[Operation]) -> None:
    assert check(ExitLockModel(), ops, segment_ops=2).valid is \
        OLD_CHECK(ExitLockModel(), ops).valid


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 10_000), st.booleans())
def test_register_decides_as_the_old_search(seed: int, valid: bool) -> None:
    h = histories.register(seed=seed, clients=3, per_client=4, valid=valid)
    assert check(h.model, h.ops).valid is OLD_CHECK(h.model, h.ops).valid is h.valid


def test_segments_of_a_long_shuffled_history() -> None:
    # Over 2^16 ops: sorted in runs and merged two by two; each cut has no finite op
    # spanning it, and every op is in exactly one segment, in call order.
    import random

    from chaos.checkers.model import _segments

    ops = list(histories.slots(n=150_000).ops)
    random.Random(3).shuffle(ops)
    gen = _segments(ops, 200)
    try:
        while True:
            next(gen)
    except StopIteration as stop:
        segs = stop.value
    flat = [op for seg in segs for op in seg]
    assert sorted(map(id, flat)) == sorted(map(id, ops))
    assert all(a.call_ms <= b.call_ms for a, b in zip(flat, flat[1:], strict=False))
    last = -INF
    for seg in segs:
        assert last < seg[0].call_ms
        last = max([last, *(op.return_ms for op in seg if op.return_ms != INF)])

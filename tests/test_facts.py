"""The gather pass: the same facts however the history is split, read or damaged."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import msgspec
import pytest

from chaos.checkers import check_run
from chaos.checkers import facts as facts_mod
from chaos.checkers.facts import Facts, HistoryError, gather
from chaos.history import F, Op, OpType, history_files, write_history

T0 = 1_800_000_000_000


def _history(run_dir: Path, n_plans: int, seed: int = 1, files: int = 3) -> None:
    """Plans from several producers, decided, taken, executed and reported, with the
    operations spread over ``files`` files the way a run spreads them over processes."""
    rng = random.Random(seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "run.json").write_text(json.dumps({"status": "complete", "governor_config": {}}))
    per_file: list[list[Op]] = [[] for _ in range(files)]
    t = 0
    for i in range(n_plans):
        t += rng.randint(1, 3)
        pid, sym = f"p{i}", f"S{rng.randint(0, 9)}"
        plan = {"plan_id": pid, "symbol": sym, "action": rng.choice(["OPEN", "CLOSE"]),
                "notional": str(rng.randint(1, 99)), "intent_created_at_ms": str(T0 + t)}
        prod = per_file[i % files]
        prod.append(Op(OpType.INVOKE, F.SUBMIT, f"prod{i % files}", (T0 + t) * 10**6,
                       T0 + t, pid, sym, {"plan": plan}))
        done = rng.choice([OpType.OK, OpType.OK, OpType.INFO, OpType.FAIL])
        prod.append(Op(done, F.SUBMIT, f"prod{i % files}", (T0 + t) * 10**6 + 1, T0 + t, pid,
                       sym, {"entry_id": f"{T0 + t}-0"}))
        rec = per_file[(i + 1) % files]
        rec.append(Op(OpType.OK, F.PLAN, "recorder", (T0 + t) * 10**6 + 2, T0 + t, pid, sym,
                      {**plan, "source": "x", "entry_ms": T0 + t}))
        for k in range(rng.choice([0, 1, 1, 1, 2])):  # some plans decided twice
            rec.append(Op(OpType.OK, F.DECISION, "recorder", (T0 + t) * 10**6 + 3 + k,
                          T0 + t + k, pid, sym,
                          {"plan_id": pid, "symbol": sym, "action": plan["action"],
                           "decision": rng.choice(["PERMIT", "BLOCK"]), "reason": "",
                           "governor": "g", "entry_ms": T0 + t + 1 + k,
                           "entry_id": f"{T0 + t + 1 + k}-0", "fence": ""}))
        app = per_file[(i + 2) % files]
        app.append(Op(rng.choice([OpType.OK, OpType.FAIL]), F.TAKE, "apply",
                      (T0 + t) * 10**6 + 6, T0 + t + 2, pid, sym, {"permit": plan}))
        app.append(Op(OpType.OK, F.ORDER, "apply", (T0 + t) * 10**6 + 7, T0 + t + 3, pid,
                      sym, {"fill": {"effect": "open"}}))
        rec.append(Op(OpType.OK, F.RESULT, "recorder", (T0 + t) * 10**6 + 8, T0 + t + 4, pid,
                      sym, {"plan_id": pid, "status": "executed", "entry_ms": T0 + t + 4}))
    per_file[0].insert(0, Op(OpType.OK, F.OPERATOR, "operator", T0 * 10**6, T0, "regime",
                             None, {"regime": "BASE", "initial": True}))
    per_file[-1].append(Op(OpType.INVOKE, F.FAULT, "nemesis", (T0 + 5) * 10**6, T0 + 5, "f1",
                          None, {"phase": "start", "kind": "kill"}))
    per_file[-1].append(Op(OpType.OK, F.FAULT, "nemesis", (T0 + t) * 10**6, T0 + t, "f1",
                          None, {"phase": "stop", "kind": "kill"}))
    for k, ops in enumerate(per_file):
        write_history(run_dir, ops, name=f"part{k}")


def _fingerprint(f: Facts) -> dict[str, Any]:
    enc = msgspec.json.encode
    return {
        "ops": f.ops, "first": f.first_ms, "last": f.last_ms,
        "submits": enc(dict(sorted(f.submits.items()))),
        "plans": enc(dict(sorted(f.plans.items()))),
        "decisions": enc(dict(sorted(f.decisions.items()))),
        "take_fails": enc(dict(sorted(f.take_fails.items()))),
        "aborts": enc(dict(sorted(f.aborts.items()))),
        "faults": [(w.kind, w.start_ms, w.stop_ms) for w in f.faults],
        "regime": f.initial_regime,
    }


def test_same_facts_however_the_history_is_split(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _history(run, 3000)
    one = _fingerprint(gather(run, workers=1))
    assert one["ops"] > 3000 * 5
    for workers in (2, 3, 5):
        assert _fingerprint(gather(run, workers=workers)) == one, workers
    files = history_files(run)
    # Both ways of running workers, whichever gather picks in this process.
    for how in (facts_mod._scan_forked, facts_mod._scan_spawned):
        f = Facts(run_dir=run, config=gather(run).config, capital=0, allocation_pct=0,
                  initial_regime="BASE")
        ordered = facts_mod._merge(f, how(facts_mod._plan_workers(files, 3)))
        assert len(ordered) == 3  # the regime and the fault's start and stop, in time order
        assert [op.wall_ms for _t, _p, op in ordered] == sorted(op.wall_ms for _t, _p, op
                                                                in ordered)
        fp = _fingerprint(f)  # the ordered operations are replayed by gather, not _merge
        assert {k: v for k, v in fp.items() if k != "faults"} == \
            {k: v for k, v in one.items() if k != "faults"}, how.__name__


def test_parts_are_cut_at_line_ends_and_cover_every_byte(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _history(run, 500, files=2)
    files = history_files(run)
    size = sum(p.stat().st_size for p in files)
    for workers in (2, 4, 7):
        groups = facts_mod._plan_workers(files, workers)
        assert len(groups) <= workers
        covered = 0
        for g in groups:
            for path, start, end in g:
                data = Path(path).read_bytes()
                end = len(data) if end is None else end
                assert start == 0 or data[start - 1:start] == b"\n"
                assert data[end - 1:end] == b"\n"
                covered += end - start
        assert covered == size


def test_a_torn_last_line_is_left_out(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _history(run, 200)
    before = _fingerprint(gather(run))
    with open(history_files(run)[0], "ab") as fh:
        fh.write(b'{"type":"ok","f":"decision","process":"recorder","time_ns":1,"wal')
    assert _fingerprint(gather(run)) == before
    assert _fingerprint(gather(run, workers=2)) == before


def test_a_damaged_line_is_named_by_file_and_line(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _history(run, 400, files=1)
    path = history_files(run)[0]
    lines = path.read_bytes().split(b"\n")
    bad = len(lines) * 3 // 4  # in the second part when split in two
    lines[bad] = b'{"type":"ok","f":"plan" this is not json'
    path.write_bytes(b"\n".join(lines))
    for workers in (1, 2):
        with pytest.raises(HistoryError, match=rf"{path.name}:{bad + 1}: not a history"):
            gather(run, workers=workers)


def test_lines_with_unexpected_types_are_read_field_by_field(tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / "history").mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"status": "complete"}))
    lines = [
        # fence null, entry_ms a string: the decision stands, its time from the stream id
        {"type": "ok", "f": "decision", "process": "r", "time_ns": 1, "wall_ms": T0 + 1,
         "key": "a", "value": {"plan_id": "a", "symbol": "X", "action": "OPEN",
                               "decision": "PERMIT", "fence": None, "entry_ms": "late"}},
        # a plan that is not an object, a numeric key
        {"type": "invoke", "f": "submit", "process": "p", "time_ns": 2, "wall_ms": T0 + 2,
         "key": 7, "value": {"plan": "not a plan", "malformed": "plan"}},
        {"type": "ok", "f": "submit", "process": "p", "time_ns": 3, "wall_ms": T0 + 3,
         "key": 7},
        # an operation no checker reads
        {"type": "ok", "f": "something-new", "process": "x", "time_ns": 4, "wall_ms": T0 + 4},
    ]
    (run / "history" / "h.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    f = gather(run)
    assert f.ops == 4
    (d,) = f.decisions["a"]
    assert (d.decision, d.fence, d.entry_ms) == ("PERMIT", "", T0 + 1)
    assert f.submits[7].status == "ok" and f.submits[7].plan_id is None
    assert f.submits[7].malformed == "plan"


def test_values_outside_the_known_ones_are_kept_as_they_are(tmp_path: Path) -> None:
    # action, decision, status and type are read as Literals (shared strings) in the fast
    # path; a value outside them sends its block down the lenient path, which keeps it
    # (an action outside OPEN/CLOSE: in ``bad_decisions``).
    run = tmp_path / "run"
    (run / "history").mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"status": "complete"}))
    lines = [
        {"type": "ok", "f": "decision", "process": "r", "time_ns": 1, "wall_ms": T0 + 1,
         "key": "a", "value": {"plan_id": "a", "symbol": "X", "action": "BUY",
                               "decision": "PERMIT", "entry_ms": T0 + 1}},
        {"type": "ok", "f": "decision", "process": "r", "time_ns": 2, "wall_ms": T0 + 2,
         "key": "b", "value": {"plan_id": "b", "symbol": "X", "action": "OPEN",
                               "decision": "MAYBE", "entry_ms": T0 + 2}},
        {"type": "ok", "f": "result", "process": "r", "time_ns": 3, "wall_ms": T0 + 3,
         "key": "a", "value": {"status": "lost", "entry_ms": T0 + 3}},
        {"type": "ok", "f": "result", "process": "r", "time_ns": 4, "wall_ms": T0 + 4,
         "key": "c", "value": {"status": "executed", "entry_ms": T0 + 4}},
        {"type": "timeout", "f": "take", "process": "a", "time_ns": 5, "wall_ms": T0 + 5,
         "key": "a"},
        {"type": "fail", "f": "take", "process": "a", "time_ns": 6, "wall_ms": T0 + 6,
         "key": "b"},
    ]
    (run / "history" / "h.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    f = gather(run)
    assert f.ops == 6
    # An action outside the protocol still answers its plan; the checkers see it as ""
    # and the entry as written is kept for the protocol checker.
    assert [(d.action, d.decision) for d in f.decisions["a"]] == [("", "PERMIT")]
    assert [(b.plan_id, b.action) for b in f.bad_decisions] == [("a", "BUY")]
    assert "b" not in f.decisions  # neither PERMIT nor BLOCK: not a decision
    assert f.aborts == {"a": [(T0 + 3, "lost")]}  # executed results are not kept
    assert f.take_fails == {"b": [T0 + 6]}


def test_a_line_without_type_or_f_is_an_error(tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / "history").mkdir(parents=True)
    (run / "history" / "h.jsonl").write_text('{"type":"ok","f":"phase","wall_ms":1}\n[1,2]\n')
    with pytest.raises(HistoryError, match=r"h.jsonl:2: not a history operation"):
        gather(run)


def test_check_run_gives_the_same_verdict_split_or_not(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    run = tmp_path / "run"
    _history(run, 1500)
    # Without the witness search: it stops at a time budget (a safety net), so on a loaded
    # machine two searches of the same violations may keep different witnesses. What is
    # compared here is reading the history split or not (the search has its own tests).
    one = check_run(run, write=False, models=False, minimize=False).to_dict()
    monkeypatch.setattr(facts_mod, "PARALLEL_BYTES", 1)  # every history counts as long
    two = check_run(run, write=False, models=False, minimize=False).to_dict()
    for d in (one, two):
        d["stats"].pop("check_seconds")
    assert one == two
    assert one["invariants"]["one_decision"]["valid"] is False  # the doubled decisions

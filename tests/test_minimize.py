"""Minimal witnesses (chaos.checkers.minimize): the fewest operations that still show each
violation, re-checked alone by the real checkers.

A legacy run made here (a few seconds on the embedded Redis: slots, double opens, double
closes) and imports of hand-written production streams (a double close; a valid book).
Every witness is written out as a run directory of its own and judged by ``check_run``,
the command-line path, not by the minimiser's own oracle.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
from govtools import small_scenario
from test_import import Book, chaos, imported, results_of, valid_history

from chaos import scenario as scn
from chaos.checkers import check_run, gather
from chaos.checkers.minimize import (
    TIERS,
    MinimizeOptions,
    ddmin,
    minimize,
    write_witness_run,
)
from chaos.redis_servers import EmbeddedRedis
from chaos.runner import RunOptions, run

# The default bounds but time budgets no loaded CI machine reaches: the work bound stops
# each search, so the witnesses are the same on any machine and at any load.
UNHURRIED = MinimizeOptions(violation_budget_s=120.0, budget_s=600.0)

# Two producers of opens, duplicate closes and regime flips on the legacy design: it opens
# past its slots, opens twice and closes twice within seconds.
LEGACY = small_scenario("minimize", 4, """
[[workload]]
kind = "duplicate_close"
processes = 1
period_ms = 150

[[workload]]
kind = "regime_flip"
processes = 1
period_s = 1.0
""")


@pytest.fixture(scope="module")
def legacy_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("minimize") / "run"
    res = run(RunOptions(scenario=scn.parse(LEGACY, "minimize.toml"), governor="legacy",
                         out=out, progress=False, probe_max_wait_s=30))
    assert res.status == "complete", res.error
    return out


def _key(v: dict[str, Any], tier: str) -> tuple[Any, ...]:
    if tier == TIERS[0]:
        return (v["invariant"], v["wall_ms"], v["symbol"], tuple(v["plan_ids"]))
    if tier == TIERS[1]:
        return (v["invariant"], v["symbol"], tuple(v["plan_ids"]))
    return (v["invariant"],)


def _shown(run_dir: Path, refs: list[str], out: Path, v: dict[str, Any], tier: str) -> bool:
    """Whether the run directory holding only ``refs`` (and the context) shows ``v``."""
    write_witness_run(run_dir, refs, out)
    res = check_run(out, models=False, minimize=False).to_dict()
    return any(_key(w, tier) == _key(v, tier) for w in res["violations"])


def test_each_witness_alone_shows_its_violation_and_is_one_minimal(
        legacy_run: Path, tmp_path: Path) -> None:
    res = check_run(legacy_run, models=False, minimize=UNHURRIED).to_dict()
    assert res["valid"] is False
    witnessed = [v for v in res["violations"] if "minimal_witness" in v]
    assert {v["invariant"] for v in witnessed} >= {"slots", "single_close"}, \
        "the legacy design breaks slots and single_close within seconds"
    summary = res["stats"]["minimal_witnesses"]
    for name, s in summary["per_invariant"].items():
        n = res["invariants"][name]["violations"]
        assert s["violations"] == n and s["minimised"] == min(n, 5)
        assert s["left"] == n - s["minimised"]
    for i, v in enumerate(witnessed):
        w = v["minimal_witness"]
        assert w["reproduced"] and w["one_minimal"] and w["finished"], (v["message"], w)
        assert w["match"] == "same violation" and 0 < w["size"] == len(w["ops"])
        assert w["size"] < w["candidates"] or w["size"] <= 2
        refs = [op["ref"] for op in w["ops"]]
        assert [op["ms"] for op in w["ops"]] == sorted(op["ms"] for op in w["ops"])
        assert _shown(legacy_run, refs, tmp_path / f"w{i}", v, w["match"]), \
            f"the witness of {v['message']} alone does not show it"
        for j in range(len(refs)):
            assert not _shown(legacy_run, refs[:j] + refs[j + 1:], tmp_path / f"w{i}-{j}",
                              v, w["match"]), f"{refs[j]} is not needed for {v['message']}"


def test_minimising_twice_gives_the_same_witnesses(legacy_run: Path) -> None:
    facts = gather(legacy_run)
    verdict = check_run(legacy_run, write=False, models=False, minimize=False)
    vs = verdict.violations

    # The time budgets are a safety net; a loaded machine may reach them in one search and
    # not in the other. The bound that decides is the work one (the same on any machine).
    options = dataclasses.replace(UNHURRIED, per_invariant=3)
    first, s1 = minimize(facts, vs, options)
    second, s2 = minimize(facts, vs, options)
    assert first and first == second
    assert s1["per_invariant"] == s2["per_invariant"]


def test_an_imported_double_close_is_witnessed_by_the_open_and_both_closes(
        redis_server: EmbeddedRedis, redis_client: Any, prefix: str, tmp_path: Path) -> None:
    book = Book(redis_client, prefix).setup()
    book.trade(0, "o1", "AUSDT", "OPEN")
    book.trade(500, "o2", "BUSDT", "OPEN")
    book.trade(1_000, "c1", "AUSDT", "CLOSE")
    book.trade(1_500, "c0", "BUSDT", "CLOSE")
    book.trade(2_000, "c2", "AUSDT", "CLOSE")  # the same position, closed again
    out = tmp_path / "imp"
    p = imported(redis_server.url, prefix, out)
    assert p.returncode == 1, p.stdout + p.stderr
    vs = [v for v in results_of(out)["violations"] if v["invariant"] == "single_close"]
    assert len(vs) == 1 and vs[0]["plan_ids"] == ["c1", "c2"]
    w = vs[0]["minimal_witness"]
    # The ledger of an import is derived from the executed results: the double close needs
    # the result that opened the position and both closes; nothing of BUSDT, no plan entry
    # and no decision.
    assert [(op["f"], op["plan_id"], op["outcome"]) for op in w["ops"]] == [
        ("result", "o1", "executed"), ("result", "c1", "executed"),
        ("result", "c2", "executed")]
    assert w["one_minimal"] and w["match"] == "same violation"
    assert [op["t"] for op in w["ops"]] == sorted(op["t"] for op in w["ops"])
    refs = [op["ref"] for op in w["ops"]]
    assert _shown(out, refs, tmp_path / "w", vs[0], "same violation")
    for j in range(len(refs)):
        assert not _shown(out, refs[:j] + refs[j + 1:], tmp_path / f"w-{j}", vs[0],
                          "same violation")


def test_a_valid_run_gets_no_witness(redis_server: EmbeddedRedis, redis_client: Any,
                                     prefix: str, tmp_path: Path) -> None:
    valid_history(Book(redis_client, prefix).setup())
    out = tmp_path / "imp"
    p = imported(redis_server.url, prefix, out)
    assert p.returncode == 0, p.stdout + p.stderr
    res = json.loads((out / "results.json").read_text())
    assert res["violations"] == [] and "minimal_witnesses" not in res["stats"]


def test_ddmin_finds_a_known_minimum_and_stops_at_its_deadline() -> None:
    import time

    need = {3, 17, 40}
    tests: list[int] = []

    def failing(xs: list[int]) -> bool:
        tests.append(len(xs))
        return need <= set(xs)

    got, done = ddmin(64, failing, time.perf_counter() + 10)
    assert (got, done) == (sorted(need), True)
    groups = [list(range(i, i + 8)) for i in range(0, 64, 8)]
    got, done = ddmin(64, failing, time.perf_counter() + 10, groups)
    assert (got, done) == (sorted(need), True)
    got, done = ddmin(64, failing, time.perf_counter() - 1)
    assert not done and need <= set(got), "cut short: the smallest failing set so far"


def test_the_report_the_frame_and_chaos_check_show_the_witnesses(legacy_run: Path,
                                                                  tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from chaos.analysis import load_run
    from chaos.report import write_report

    p = chaos("check", str(legacy_run), "--witness-cap", "1", "--witness-budget-s", "3")
    assert p.returncode == 1, p.stdout + p.stderr
    assert "minimal witnesses:" in p.stdout
    res = json.loads((legacy_run / "results.json").read_text())
    assert all(s["minimised"] == 1 for s in res["stats"]["minimal_witnesses"][
        "per_invariant"].values())
    witnessed = [v for v in res["violations"] if "minimal_witness" in v]
    frame = load_run(legacy_run).minimal_witnesses
    assert sorted(frame["n"].unique()) == list(range(1, len(witnessed) + 1))
    for n, v in enumerate(witnessed, 1):
        rows = frame[frame["n"] == n]
        assert list(rows["ref"]) == [op["ref"] for op in v["minimal_witness"]["ops"]]
        assert set(rows["invariant"]) == {v["invariant"]} and rows["t"].is_monotonic_increasing
    html = write_report(legacy_run).html.read_text()
    section = html[html.index("<h2>Minimal witnesses</h2>"):]
    for v in witnessed:
        assert all(op["plan_id"] in section for op in v["minimal_witness"]["ops"])
    p = chaos("check", str(legacy_run), "--no-minimize")
    assert p.returncode == 1 and "minimal witnesses" not in p.stdout
    assert "minimal_witness" not in (legacy_run / "results.json").read_text()
    assert chaos("check", str(legacy_run), "--witness-cap", "0").returncode == 254

"""``chaos.analysis``: a run directory as frames, and the plots the report and notebooks share.

Two real runs made here on the embedded Redis (reference, and the seed variant with
violations), each a few seconds; hand-written directories for the bad-input cases.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("pandas")

from govtools import small_scenario  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from chaos import scenario as scn  # noqa: E402
from chaos.analysis import COLUMNS, MissingData, RunFrames, load_run, plots  # noqa: E402
from chaos.checkers import check_run, judge  # noqa: E402
from chaos.history import F, Op, OpType, write_history  # noqa: E402
from chaos.report import PLOTS, write_report  # noqa: E402
from chaos.rundir import RunDirError  # noqa: E402
from chaos.runner import RunOptions, run  # noqa: E402

# Stale intents (the seed variant only logs them: each one it permits is a fresh_intent
# violation) while duplicate closes keep freeing slots for them, regime flips (the seed's
# slot counter ignores them) and a governor kill: violations, faults, regimes, exit locks.
# No open storm: with every slot taken, no stale OPEN would ever be permitted.
STORM = 'kind = "open_storm"\nprocesses = 2\nrate = 200\n'
SCENARIO = small_scenario("analysis", 4, """
[[workload]]
kind = "duplicate_close"
processes = 1
period_ms = 150

[[workload]]
kind = "regime_flip"
processes = 1
period_s = 1.0

[[fault]]
kind = "kill_governor"
at = 1.0
""")
assert STORM in SCENARIO, "tests/govtools.py's small scenario changed: update SCENARIO"
SCENARIO = SCENARIO.replace(STORM, 'kind = "stale"\nprocesses = 1\nrate = 40\n'
                            'stale_fraction = 0.5\n')

# The contract (ANALYSIS_API.md) as written: a frame may gain columns, never lose these.
CONTRACT = {
    "plans": "plan_id producer symbol action emitter sent_ms t",
    "decisions": "plan_id decision reason instance action symbol decided_ms t latency_ms",
    "results": "plan_id status ms t",
    "orders": "plan_id symbol action notional open_count_after ms t",
    "faults": "kind start_ms stop_ms start_s stop_s detail",
    "governor_events": "ms t",
    "positions": "t open slots max_positions",
    "slot_leases": "plan_id symbol instance start_s end_s end ttl_expiry_s",
    "exit_locks": "plan_id symbol instance start_s end_s end ttl_expiry_s fence "
                  "expired_in_flight",
    "capital": "t open_notional permitted_notional max_total_notional",
    "latency": "t latency_ms decision reason action",
    "violations": "invariant t wall_ms message explanation plan_ids",
}
PLOT_FUNCTIONS = ("positions", "decisions_by_reason", "capital", "capital_symbols",
                  "exit_locks", "slot_leases", "latency", "block_reasons_over_time")


def _run(tmp: pytest.TempPathFactory, governor: str) -> Path:
    out = tmp.mktemp(f"analysis-{governor}") / "run"
    res = run(RunOptions(scenario=scn.parse(SCENARIO, "analysis.toml"), governor=governor,
                         out=out, progress=False, probe_max_wait_s=30))
    assert res.status == "complete", res.error
    check_run(out, models=False)  # results.json, as ``chaos run`` writes it (bar models)
    return out


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _run(tmp_path_factory, "reference")


@pytest.fixture(scope="session")
def seed_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _run(tmp_path_factory, "seed")


@pytest.fixture(scope="session", params=["reference", "seed"])
def run_dir(request: pytest.FixtureRequest) -> Path:
    return request.getfixturevalue(f"{request.param}_run")


def test_frames_have_the_contract_columns(run_dir: Path) -> None:
    r = load_run(run_dir)
    assert r.kind == "run" and r.meta["scenario"] == "small-analysis" and r.t0_ms > 0
    for name, cols in CONTRACT.items():
        df = getattr(r, name)
        assert set(cols.split()) <= set(df.columns), name
        assert set(COLUMNS[name]) <= set(df.columns), name
        assert df is getattr(r, name), f"{name} is built once and cached"
    for name in ("plans", "decisions", "orders", "faults", "positions", "slot_leases",
                 "exit_locks", "capital", "latency", "governor_events", "results"):
        assert len(getattr(r, name)), f"{name} is empty on a real run"


def test_counts_agree_with_results_json(run_dir: Path) -> None:
    r = load_run(run_dir)
    res = json.loads((run_dir / "results.json").read_text())
    cov = res["coverage"]
    assert r.coverage == cov
    d = r.decisions
    producers = d[~d["probe"].astype(bool)]
    assert producers["plan_id"].nunique() == cov["plans_decided"]
    permits = producers[producers["decision"] == "PERMIT"]["plan_id"].nunique()
    assert permits == cov["permits"]
    assert len(r.orders) == res["stats"]["orders"]
    assert len(r.faults) == len(res["stats"]["faults"]) >= 1
    assert r.plans["on_stream"].sum() == len(r.facts.plans)
    assert len(r.latency) == len(d)
    per_inv = r.violations["invariant"].value_counts().to_dict()
    for name, inv in res["invariants"].items():
        assert per_inv.get(name, 0) == inv["violations"], name
    assert r.verdict_word == {True: "VALID", False: "INVALID", "unknown": "UNKNOWN"}[
        res["valid"]]


def test_the_seed_variant_run_has_violations_and_the_reference_none(
        reference_run: Path, seed_run: Path) -> None:
    assert load_run(reference_run).violations.empty
    v = load_run(seed_run).violations
    assert (v["invariant"] == "fresh_intent").any(), "the seed variant passes stale intents"
    assert v["t"].is_monotonic_increasing and v["explanation"].str.len().gt(0).all()


def test_stored_verdict_is_the_verdict_judged_again(seed_run: Path) -> None:
    r = load_run(seed_run)
    again = judge(r.facts, models=False)
    assert r.verdict.valid == again.valid
    assert {n: len(x.violations) for n, x in r.verdict.results.items()} == \
        {n: len(x.violations) for n, x in again.results.items()}


def test_positions_and_intervals_are_consistent(run_dir: Path) -> None:
    r = load_run(run_dir)
    pos = r.positions
    assert (pos["open"] >= 0).all() and pos["open"].iloc[0] == 0
    assert pos["open"].iloc[1:].tolist() == r.orders["open_count_after"].tolist()
    assert (pos["slots"] >= 0).all() and (pos["slots"] <= pos["max_positions"]).all()
    for name in ("slot_leases", "exit_locks"):
        df = r.__getattribute__(name)
        assert (df["start_s"] <= df["end_s"]).all(), name
        assert set(df["end"]) <= {"executed", "expired", "aborted", "open at end"}, name
    # Exit locks are exactly the spans the single_close checker judges.
    spans = {(d.plan_id, d.entry_ms, end) for d, end, _ in r.facts.close_permit_spans()}
    locks = r.exit_locks
    assert set(zip(locks["plan_id"], locks["start_ms"], locks["end_ms"], strict=True)) == spans
    assert (locks["expired_in_flight"] == (
        locks["start_ms"] + r.facts.config.exit_lock_ttl_ms < locks["end_ms"])).all()
    c = r.capital
    assert (c["open_notional"] >= 0).all() and (c["permitted_notional"] >= 0).all()
    last = c.groupby("symbol").tail(1)
    assert c["open_notional"].iloc[-1] == pytest.approx(last["symbol_open_notional"].sum())


def _drawn(fig: Figure) -> bool:
    """Whether a figure shows data: some artist with points, and no "no data" note."""
    notes = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert not [n for n in notes if n.startswith("no data")], notes
    return any(len(ax.lines) + len(ax.collections) + len(ax.patches) for ax in fig.axes)


@pytest.mark.parametrize("name", PLOT_FUNCTIONS)
def test_every_plot_draws_data(seed_run: Path, name: str) -> None:
    r = load_run(seed_run)
    fig = getattr(plots, name)(r)
    assert isinstance(fig, Figure) and _drawn(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=60)
    assert buf.getvalue().startswith(b"\x89PNG") and len(buf.getvalue()) > 5_000


def test_report_figures_are_the_analysis_figures(seed_run: Path, tmp_path: Path) -> None:
    """report.html's PNGs are the plot functions' output on load_run's frames, byte for
    byte: a notebook and the report cannot disagree."""
    paths = write_report(seed_run, check_run(seed_run, write=False, models=False))
    r = load_run(seed_run)
    assert len(paths.plots) == len(PLOTS)
    for (name, _title, _caption, fn), png in zip(PLOTS, paths.plots, strict=True):
        assert png.name == f"{name}.png"
        buf = io.BytesIO()
        getattr(plots, fn)(r).savefig(buf, format="png", dpi=100, metadata={"Software": None})
        assert buf.getvalue() == png.read_bytes(), name


def test_from_facts_does_not_read_the_run_again(seed_run: Path) -> None:
    r = load_run(seed_run)
    again = RunFrames.from_facts(r.facts, r.verdict)
    assert again.facts is r.facts and again.verdict is r.verdict
    assert again.positions.equals(r.positions)


def test_missing_data_is_one_clear_line(tmp_path: Path) -> None:
    cases = {tmp_path / "nope": "no such directory", tmp_path / "empty": "no history/ and no "
             "run.json", tmp_path / "meta": "has a run.json but no history/*.jsonl"}
    (tmp_path / "empty").mkdir()
    (tmp_path / "meta").mkdir()
    (tmp_path / "meta" / "run.json").write_text("{}")
    for d, words in cases.items():
        with pytest.raises(MissingData) as e:
            load_run(d)
        assert words in str(e.value) and str(d) in str(e.value) and "\n" not in str(e.value)
        assert isinstance(e.value, RunDirError)
    (tmp_path / "meta" / "run.json").write_text("[1, 2")
    write_history(tmp_path / "meta", [Op(OpType.INVOKE, F.PHASE, "runner", 1, 1, "workload")])
    with pytest.raises(RunDirError, match="run.json: not valid JSON"):
        load_run(tmp_path / "meta")


def test_require_names_what_a_small_run_lacks(tmp_path: Path) -> None:
    t = 1_795_000_000_000
    plan = {"plan_id": "p-1", "symbol": "S1", "action": "OPEN", "side": "LONG",
            "notional": "10", "intent_created_at_ms": str(t)}
    (tmp_path / "run.json").write_text(json.dumps({"scenario": "tiny", "status": "complete"}))
    write_history(tmp_path, [
        Op(OpType.INVOKE, F.SUBMIT, "p", 2, t + 5, "p-1", "S1", {"plan": plan}),
        Op(OpType.OK, F.SUBMIT, "p", 3, t + 7, "p-1", "S1", {"entry_id": f"{t + 7}-0"})])
    r = load_run(tmp_path)
    assert len(r.plans) == 1 and r.plans["producer"].iloc[0] == "harness"
    r.require("plans")
    with pytest.raises(MissingData) as e:
        r.require("plans", "orders", "exit_locks")
    msg = str(e.value)
    assert "orders (the ledger" in msg and "exit_locks (no CLOSE permit)" in msg
    assert "plans" not in msg.split("needed:")[1]
    for name in PLOT_FUNCTIONS:  # every plot still draws, saying what it lacks
        fig = getattr(plots, name)(r)
        assert isinstance(fig, Figure)
        fig.savefig(io.BytesIO(), format="png", dpi=40)


def test_aggregation_keeps_peaks() -> None:
    rng = np.random.default_rng(7)
    x = np.sort(rng.random(200_000) * 600)
    y = rng.integers(0, 30, len(x)).astype(float)
    y[123_456] = 99
    px, py = plots.peaks(x, y)
    assert len(px) <= plots.MAX_POINTS * 2 and py.max() == 99 and py.min() == y.min()
    assert np.all(np.diff(px) >= 0) and px[-1] == x[-1]

"""``chaos.report``: report.md, a self-contained report.html, plots and junit.xml of a run."""

from __future__ import annotations

import json
import re
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

from govtools import small_scenario  # noqa: E402

from chaos import scenario as scn  # noqa: E402
from chaos.checkers import INVARIANTS, check_run  # noqa: E402
from chaos.history import F, Op, OpType, write_history  # noqa: E402
from chaos.report import ReportPaths, write_junit, write_report  # noqa: E402
from chaos.runner import RunOptions, run  # noqa: E402

# A small legacy run with a governor kill and regime flips: violations, faults and regimes.
# 5 s, not 3: workload processes are spawned, and on a busy machine their start eats the
# first seconds of the workload phase.
SMALL = small_scenario("report", 5, """
[[workload]]
kind = "regime_flip"
processes = 1
period_s = 1.0

[[fault]]
kind = "kill_governor"
at = 1.0
""")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def legacy_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("report") / "run"
    res = run(RunOptions(scenario=scn.parse(SMALL, "small-report.toml"), governor="legacy",
                         out=out, progress=False, probe_max_wait_s=30))
    assert res.status == "complete", res.error
    plans = sum(json.loads(p.read_text())["plans"] for p in (out / "workloads").glob("*.json"))
    assert plans > 0, "the producers sent no plans (did their processes start?)"
    return out


@pytest.fixture(scope="module")
def report(legacy_run: Path) -> ReportPaths:
    return write_report(legacy_run)


def test_report_files_are_written_into_the_run_directory(legacy_run: Path,
                                                         report: ReportPaths) -> None:
    assert report.md == legacy_run / "report.md" and report.md.is_file()
    assert report.html == legacy_run / "report.html" and report.html.is_file()
    assert report.junit == legacy_run / "junit.xml" and report.junit.is_file()
    names = {p.name for p in report.plots}
    assert {"open_positions.png", "capital_total.png", "capital_symbols.png", "exit_locks.png",
            "decision_latency.png"} <= names
    for p in report.plots:
        assert p.parent == legacy_run / "plots"
        assert p.read_bytes().startswith(PNG_MAGIC) and p.stat().st_size > 5_000


def test_html_is_self_contained_and_embeds_the_plots(report: ReportPaths) -> None:
    text = report.html.read_text(encoding="utf-8")
    assert not re.search(r"https?://", text), "no external references"
    assert not re.search(r"""(src|href)\s*=\s*["']?(?!data:)[^"'\s>]""", text), \
        "every src/href is a data: URI"
    assert "<link" not in text and "<script" not in text
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    assert len(images) == len(report.plots)
    import base64

    assert all(base64.b64decode(i).startswith(PNG_MAGIC) for i in images)


def test_verdict_table_lists_every_invariant(report: ReportPaths) -> None:
    md = report.md.read_text(encoding="utf-8")
    html = report.html.read_text(encoding="utf-8")
    table = md.split("## Verdict", 1)[1].split("\n## ", 1)[0]
    for name in INVARIANTS:
        assert re.search(rf"^\| {name} \| (valid|VIOLATED|unknown) \| \d+ \|", table, re.M), name
        assert f"<td>{name}</td>" in html
    assert "| slots | VIOLATED |" in table
    header = md.split("## Verdict", 1)[0]
    for field in ("scenario", "governor", "seed", "duration", "Redis", "run status", "verdict"):
        assert f"| {field} |" in header
    assert "small-report" in header and "legacy" in header and "INVALID" in header


def test_violations_are_explained_with_their_events(legacy_run: Path,
                                                    report: ReportPaths) -> None:
    v = check_run(legacy_run, write=False)
    assert v.valid is False
    md = report.md.read_text(encoding="utf-8")
    section = md.split("## Violations", 1)[1]
    first = v.results["slots"].violations[0]
    assert first.plan_ids[0] in section
    for label in ("- time: t=", "- symbol:", "- plans:", "- expected:", "- observed:",
                  "- faults active:"):
        assert label in section
    assert "| what |" in section, "events as a table"
    # At most 20 per invariant, and how many more.
    for name, r in v.results.items():
        n = len(r.violations)
        if n > 20:
            assert f"### {name}: {n} violations" in section
            assert f"{n - 20} more in results.json" in section
            block = section.split(f"### {name}:", 1)[1].split("\n### ", 1)[0]
            assert block.count("\n**") == 20
    html = report.html.read_text(encoding="utf-8")
    assert 'class="viol"' in html and first.plan_ids[0] in html
    # The report refers to results.json for the rest: it is written when the report judged.
    assert json.loads((legacy_run / "results.json").read_text())["valid"] is False


def test_junit_has_one_testcase_per_invariant(legacy_run: Path, report: ReportPaths) -> None:
    v = check_run(legacy_run, write=False)
    root = ET.parse(report.junit).getroot()
    cases = root.findall(".//testcase")
    assert [c.get("name") for c in cases] == list(INVARIANTS)
    for c in cases:
        r = v.results[c.get("name")]
        failure = c.find("failure")
        skipped = c.find("skipped")
        if r.valid is False:
            assert failure is not None and str(len(r.violations)) in failure.get("message")
            assert r.violations[0].plan_ids[0] in (failure.text or "")
        elif r.valid is None:
            assert skipped is not None and failure is None
        else:
            assert failure is None and skipped is None
    suite = root.find("testsuite")
    assert suite is not None and suite.get("tests") == str(len(INVARIANTS))
    assert int(suite.get("failures")) == sum(r.valid is False for r in v.results.values())


def test_write_junit_alone(legacy_run: Path, tmp_path: Path) -> None:
    v = check_run(legacy_run, write=False)
    path = write_junit(v, tmp_path / "j.xml")
    assert ET.parse(path).getroot().find("testsuite").get("name") == "chaos.small-report"


def _tiny_run(d: Path) -> Path:
    (d / "run.json").write_text(json.dumps({"scenario": "tiny", "governor": "seed", "seed": 3,
                                            "duration_s": 1, "status": "interrupted"}))
    t = 1_795_000_000_000
    plan = {"plan_id": "p-1", "symbol": "S1", "action": "OPEN", "side": "LONG",
            "notional": "10", "intent_created_at_ms": str(t)}
    write_history(d, [
        Op(OpType.INVOKE, F.PHASE, "runner", 1, t, "workload"),
        Op(OpType.INVOKE, F.SUBMIT, "p", 2, t + 5, "p-1", "S1", {"plan": plan}),
        Op(OpType.OK, F.SUBMIT, "p", 3, t + 7, "p-1", "S1", {"entry_id": f"{t + 7}-0"}),
        Op(OpType.INVOKE, F.FAULT, "nemesis", 4, t + 10, "kill-1", None,
           {"kind": "kill_governor", "phase": "start"}),
    ])
    return d


def test_report_of_a_short_run_does_not_crash(tmp_path: Path) -> None:
    d = _tiny_run(tmp_path)
    paths = write_report(d)
    assert len(paths.plots) == 5
    md = paths.md.read_text(encoding="utf-8")
    assert "tiny" in md and "no data" not in md  # "no data" is inside the plots
    suite = ET.parse(paths.junit).getroot().find("testsuite")
    assert suite is not None and suite.get("tests") == str(len(INVARIANTS))
    html = paths.html.read_text(encoding="utf-8")
    assert "data:image/png;base64," in html


def test_report_of_an_empty_directory_does_not_crash(tmp_path: Path) -> None:
    paths = write_report(tmp_path)
    assert paths.md.is_file() and paths.html.is_file() and paths.junit.is_file()
    assert len(paths.plots) == 5


def test_report_takes_seconds_not_minutes(legacy_run: Path) -> None:
    t = time.perf_counter()
    write_report(legacy_run)
    assert time.perf_counter() - t < 30


# -- plan ids as they are, one time frame, violations with their causes ------------------------
def _liveness_run(tmp_path: Path) -> Path:
    """A hand-written run whose liveness probe (an id with epoch-ms digits) was blocked."""
    from test_checkers import T0, Story

    s = Story(tmp_path, slots_BASE=2)
    s.op(50, OpType.INVOKE, F.PHASE, "workload", process="runner")
    s.submit(100, "o1", "AAUSDT")
    s.decide(105, "o1", "AAUSDT")
    s.execute(120, "o1", "AAUSDT", issued=105)
    s.decide(90_003, f"probe-open-{T0 + 89_000}-0", "PRBUSDT", decision="BLOCK",
             reason="active_slots_waiting_rotation_close")
    s.probe(f"probe-open-{T0 + 89_000}-0", "PRBUSDT", "open", "BLOCK",
            "active_slots_waiting_rotation_close")
    s.check()
    return s.dir


def test_plan_ids_are_never_rewritten(tmp_path: Path) -> None:
    from chaos.report import _humanize

    t0 = 1_796_228_172_846
    text = ("liveness probe open probe-open-1796228189697-0 on X, issued at 1796228189697. "
            "(issued 1796228172846), entry 1796228189697-0, pos-S1-1796228189697")
    assert _humanize(text, t0) == (
        "liveness probe open probe-open-1796228189697-0 on X, issued at t=+16.851 s. "
        "(issued t=+0.000 s), entry 1796228189697-0, pos-S1-1796228189697")
    run_dir = _liveness_run(tmp_path)
    paths = write_report(run_dir)
    md = paths.md.read_text(encoding="utf-8")
    pid = "probe-open-1800000089000-0"
    assert f"liveness probe open {pid} on PRBUSDT was not permitted" in md
    assert "probe-open-t=" not in md and "probe-open-t=" not in paths.html.read_text()
    junit = (run_dir / "junit.xml").read_text()
    assert pid in junit and "probe-open-t=" not in junit


def test_one_time_frame_throughout_a_report(tmp_path: Path) -> None:
    """Seconds since the workload start everywhere; the absolute time once, in the header."""
    paths = write_report(_liveness_run(tmp_path))
    md = paths.md.read_text(encoding="utf-8")
    body = md.split("_Times are seconds since", 1)[0]  # the footer says when it was generated
    absolute = re.findall(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC", body)
    assert len(absolute) == 1, absolute
    assert "| time 0 | workload start, 2027-01-15 08:00:00 UTC" in md
    assert not re.search(r"(?<![\w.:-])1\d{12}(?![\w:-])", body), "an epoch-ms time left"
    assert "- time: t=+" in md and "| harness started | t=" in md


def test_liveness_violation_in_the_report_says_what_the_exchange_held(tmp_path: Path) -> None:
    md = write_report(_liveness_run(tmp_path)).md.read_text(encoding="utf-8")
    assert ("1 open positions and 0 outstanding OPEN permits on the exchange against 2 slots "
            "(BASE), yet the governor answered active_slots_waiting_rotation_close: 1 slot "
            "leaked") in md
    assert "| exchange at probe |" in md and "| open position | o1 | AAUSDT |" in md


def test_real_slot_violations_list_every_position_open_then(legacy_run: Path,
                                                            report: ReportPaths) -> None:
    v = check_run(legacy_run, write=False, models=False)
    for x in v.results["slots"].violations:
        held = [e for e in x.events if e["what"] == "open position"]
        order = x.events[-1]
        assert order["what"] == "order" and order["plan_id"] == x.plan_ids[0]
        delta = {"open": 1, "flip": 1, "close": -1}.get(order["effect"], 0)
        assert len(held) + delta == order["open_count_after"], x.message  # the ledger's count
        assert len({e["symbol"] for e in held}) == len(held)
    md = report.md.read_text(encoding="utf-8")
    assert "| open position |" in md and "| regime at permit |" in md

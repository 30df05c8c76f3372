"""The notebooks, executed for real: papermill, a real kernel of this interpreter, on run
directories made in this session (a reference run, a seed-variant run with violations, an
import of a hand-written production record, a Locust load test with its CSV).

Each run directory is made once per session and shared by the xdist workers (a file lock
in the session's base temp dir: the first worker to need one makes it, the others wait).
Checked: every notebook executes without a cell error and draws figures (PNG outputs),
``chaos notebook`` writes the executed notebook and a self-contained HTML without code,
bad input is one line and exit 254, Ctrl-C leaves no kernel, and each .py/.ipynb pair is
in sync.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import nbformat
import psutil
import pytest
from govtools import small_scenario
from test_import import FULL, Book, chaos

from chaos import notebook
from chaos.analysis import MissingData
from chaos.redis_servers import EmbeddedRedis

pytestmark = pytest.mark.timeout(240)

ROOT = Path(__file__).resolve().parent.parent
LOCUSTFILE = ROOT / "loadtests" / "locustfile.py"
EXIT_BAD_ARGS, EXIT_UNKNOWN = 254, 2

# Two governors under an open storm, same-symbol bursts and duplicate closes, one governor
# paused for a second, 10 slots: the reference holds; the seed variant permits the second
# OPEN of a burst while the first is still on its way to the exchange (opens take 30 ms
# there), breaking one_position_per_symbol, and leaks slots (liveness): INVALID in 5 of 5
# seeds tried.
SCENARIO = small_scenario("notebooks", 4, """
[[workload]]
kind = "same_symbol"
processes = 1
rate = 100
hot = 2
burst = 5

[[workload]]
kind = "duplicate_close"
processes = 1
period_ms = 100

[[fault]]
kind = "pause_governor"
at = 1.0
duration = 1.0
""").replace("open_latency_ms = 5", "open_latency_ms = 30").replace(
    "max_total_notional = 100000", "max_total_notional = 100000\nslots_BASE = 10")


def _shared(factory: pytest.TempPathFactory, name: str, make: Callable[[Path], None]) -> Path:
    """``name``'s directory, made by ``make`` once for the whole session (all workers)."""
    base = factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    out = root / f"nb-{name}"
    with open(root / f"nb-{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / ".made").exists():  # first, or another worker's attempt failed
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir()
            make(out / "run")
            (out / ".made").touch()
    return out / "run"


def _chaos_run(out: Path, governor: str) -> subprocess.CompletedProcess[str]:
    scenario = out.parent / "scenario.toml"
    scenario.write_text(SCENARIO)
    return chaos("run", "--scenario", str(scenario), "--governor", governor, "--out", str(out),
                 "--no-report", "--quiet", "--probe-max-wait", "10", timeout=180)


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    def make(out: Path) -> None:
        p = _chaos_run(out, "reference")
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]

    return _shared(tmp_path_factory, "reference", make)


@pytest.fixture(scope="session")
def seed_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    def make(out: Path) -> None:
        p = _chaos_run(out, "seed")
        assert p.returncode == 1, "the seed variant held this time (no violation): " + (
            p.stdout[-3000:] + p.stderr[-3000:])

    return _shared(tmp_path_factory, "seed", make)


def _import(out: Path, trades: Callable[[Book], None]) -> subprocess.CompletedProcess[str]:
    with EmbeddedRedis(name="nb-import") as srv:
        book = Book(srv.client(), "incident").setup()
        trades(book)
        return chaos("import", "--redis-url", srv.url, "--prefix", "incident", "--out",
                     str(out), "--no-report")


@pytest.fixture(scope="session")
def import_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An incident: two slots, a blocked OPEN, then one position closed twice."""
    def trades(b: Book) -> None:
        b.trade(0, "o1", "AUSDT", "OPEN")
        b.trade(1_000, "o2", "BUSDT", "OPEN")
        b.blocked(2_000, "o3", "CUSDT", "OPEN", FULL)
        b.trade(3_000, "c1", "AUSDT", "CLOSE")
        b.trade(4_000, "o4", "CUSDT", "OPEN")
        b.trade(5_000, "c2", "BUSDT", "CLOSE")
        b.trade(5_500, "c3", "BUSDT", "CLOSE")  # the same position again: a double close
        b.mirror("CUSDT")

    def make(out: Path) -> None:
        p = _import(out, trades)
        assert p.returncode == 1, p.stdout[-3000:] + p.stderr[-3000:]

    return _shared(tmp_path_factory, "import", make)


@pytest.fixture(scope="session")
def opens_only(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An import with no CLOSE at all: nothing for the locks notebook."""
    def make(out: Path) -> None:
        p = _import(out, lambda b: (b.trade(0, "o1", "AUSDT", "OPEN"),
                                    b.trade(1_000, "o2", "BUSDT", "OPEN")))
        assert p.returncode in (0, 1), p.stdout[-3000:] + p.stderr[-3000:]

    return _shared(tmp_path_factory, "opens-only", make)


@pytest.fixture(scope="session")
def loadtest_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4 s headless Locust run with its CSV written inside the run directory."""
    def make(out: Path) -> None:
        exe = Path(sys.executable).with_name("locust")
        p = subprocess.run(
            [str(exe), "-f", str(LOCUSTFILE), "--headless", "-u", "4", "-r", "4", "-t", "4s",
             "--rate", "200", "--run-dir", str(out), "--csv", str(out / "locust"),
             "--only-summary"], cwd=out.parent, capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]

    return _shared(tmp_path_factory, "loadtest", make)


def _figures(ipynb: Path) -> int:
    """PNG outputs of an executed notebook; fails on any error output."""
    nb = nbformat.read(ipynb, as_version=4)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    errors = [f"{o.ename}: {o.evalue}" for o in outputs if o.output_type == "error"]
    assert not errors, errors
    return sum("image/png" in o.get("data", {}) for o in outputs)


@pytest.mark.parametrize(("name", "fixture"), [
    ("02_slots_and_capital", "seed_run"), ("03_locks_and_ttls", "seed_run"),
    ("01_chaos_run_overview", "reference_run"), ("05_load_test", "loadtest_run"),
    ("06_post_incident", "import_run")])
def test_notebook_executes_and_draws(name: str, fixture: str,
                                     request: pytest.FixtureRequest) -> None:
    run_dir: Path = request.getfixturevalue(fixture)
    done = notebook.execute(name, run_dir, progress=False)
    assert done.ipynb == run_dir / "notebooks" / f"{name}.ipynb"
    assert _figures(done.ipynb) >= 1
    if name == "05_load_test":  # Locust's own view came from the CSV in the run directory
        table = _output(done.ipynb, "loadtest.aggregated(")
        assert "rate" in table and "Empty DataFrame" not in table, table


def _output(ipynb: Path, code: str) -> str:
    """The text of the (first) output of the cell whose source contains ``code``."""
    cell = next(c for c in nbformat.read(ipynb, as_version=4).cells if code in c.source)
    return str(cell.outputs[0]["data"]["text/plain"])


def test_compare_notebook_lines_up_reference_and_seed(reference_run: Path, seed_run: Path,
                                                      tmp_path: Path) -> None:
    done = notebook.execute("04", tmp_path, {"run_dirs": [reference_run, seed_run]},
                            progress=False)
    assert _figures(done.ipynb) == 2
    table = _output(done.ipynb, "compare_runs(")
    assert "reference" in table and "seed" in table and "INVALID" in table, table


def test_chaos_notebook_writes_html_without_code(seed_run: Path) -> None:
    """The command end to end on the seed run: progress on stderr, the executed notebook
    with the violations in it, and a self-contained HTML export without the code."""
    p = subprocess.run([sys.executable, "-m", "chaos", "notebook", "01", str(seed_run),
                        "--html"], capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stdout + p.stderr[-3000:]
    out = seed_run / "notebooks"
    assert f"written {out / '01_chaos_run_overview.ipynb'}" in p.stdout
    assert "Executing" in p.stderr  # papermill's progress bar
    assert _figures(out / "01_chaos_run_overview.ipynb") >= 3
    html = (out / "01_chaos_run_overview.html").read_text(encoding="utf-8")
    assert "INVALID" in html and "violation(s)" in html
    assert re.search(r"<strong>one_position_per_symbol</strong> at t=[+-]\d", html), \
        "the violations, explained"
    assert "open_run(" not in html and "plots.positions" not in html  # no code cells
    assert not re.search(r"""<(script|link|img)[^>]+(src|href)=["']?https?:""", html)
    images = re.findall(r'<img[^>]+src="data:image/png;base64,', html)
    assert len(images) >= 3


@pytest.mark.parametrize("case", ["not a run", "no CLOSE permit", "missing CSV"])
def test_missing_data_is_one_line_and_exit_254(case: str, tmp_path: Path,
                                               opens_only: Path) -> None:
    args = {"not a run": ["01", str(tmp_path)],
            "no CLOSE permit": ["03", str(opens_only)],
            "missing CSV": ["05", str(opens_only), "-p", "locust_csv_prefix",
                            str(tmp_path / "nope")]}[case]
    p = subprocess.run([sys.executable, "-m", "chaos", "notebook", *args],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == EXIT_BAD_ARGS, p.stdout + p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    said = {"not a run": "is not a run directory", "no CLOSE permit": "exit_locks (no CLOSE "
            "permit)", "missing CSV": "no Locust CSV at"}[case]
    assert lines[0].startswith("chaos notebook: ") and said in lines[0], lines[0]
    assert not (tmp_path / "notebooks").exists()  # refused before anything was written


def test_missing_data_raised_in_a_cell_comes_back_as_one_message(opens_only: Path) -> None:
    """Without the check up front the notebook's own first cell finds it out: papermill's
    cell error becomes the same MissingData, not a traceback."""
    with pytest.raises(MissingData, match=r"lacks what is needed: exit_locks") as exc:
        notebook.execute("03", opens_only, progress=False, check_first=False)
    assert "Traceback" not in str(exc.value) and "\n" not in str(exc.value)


@pytest.mark.parametrize(("name", "said"), [("09", "unknown notebook '09'"),
                                            ("0", "ambiguous notebook '0'")])
def test_unknown_notebook_lists_the_valid_ones(name: str, said: str, tmp_path: Path) -> None:
    p = subprocess.run([sys.executable, "-m", "chaos", "notebook", name, str(tmp_path)],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == EXIT_BAD_ARGS, p.stdout + p.stderr
    assert said in p.stderr and all(n in p.stderr for n in notebook.NOTEBOOKS)
    assert len(p.stderr.strip().splitlines()) == 1


def test_unknown_parameter_is_refused(tmp_path: Path) -> None:
    p = subprocess.run([sys.executable, "-m", "chaos", "notebook", "01", str(tmp_path), "-p",
                        "run_dirs", "[]"], capture_output=True, text=True, timeout=60)
    assert p.returncode == EXIT_BAD_ARGS and "has no parameter 'run_dirs'" in p.stderr


def _kernels(pid: int) -> list[psutil.Process]:
    out = []
    for child in psutil.Process(pid).children(recursive=True):
        try:
            if notebook.MARKER_ENV in child.environ():
                out.append(child)
        except psutil.Error:
            pass
    return out


def test_ctrl_c_stops_the_kernel(reference_run: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "chaos", "notebook", "06",
                             str(reference_run)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (kernels := _kernels(proc.pid)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert kernels, "no kernel started"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == EXIT_UNKNOWN, err[-2000:]
    assert "interrupted" in err
    gone, alive = psutil.wait_procs(kernels, timeout=5)
    assert not alive, f"kernel left running: {[p.pid for p in alive]}"


@pytest.mark.parametrize("name", sorted(notebook.NOTEBOOKS))
def test_py_and_ipynb_are_in_sync_and_the_ipynb_has_no_outputs(name: str) -> None:
    import jupytext
    from jupytext.compare import compare_notebooks

    d = notebook.notebooks_dir()
    py, ipynb = d / f"{name}.py", d / f"{name}.ipynb"
    compare_notebooks(jupytext.read(ipynb), jupytext.read(py), fmt="py:percent")
    raw = json.loads(ipynb.read_text())
    assert all(not c.get("outputs") and c.get("execution_count") is None
               for c in raw["cells"] if c["cell_type"] == "code"), "outputs committed"
    tagged = [c for c in raw["cells"] if "parameters" in c["metadata"].get("tags", ())]
    assert len(tagged) == 1 and "run_dir = " in "".join(tagged[0]["source"])
    assert set(re.findall(r"^(\w+) = ", "".join(tagged[0]["source"]), re.M)) == {
        "run_dir", *notebook.NOTEBOOKS[name].params}


def test_a_wheel_ships_the_notebooks(tmp_path: Path) -> None:
    """``pip install`` users get them: a wheel holds chaos/notebooks/ (package data through
    the chaos/notebooks link), and that is where chaos.notebook looks first."""
    import zipfile

    src = tmp_path / "src"  # a copy: the build writes build/ and *.egg-info beside it
    shutil.copytree(ROOT, src, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv", "reports", "build", "*.egg-info", "__pycache__", ".*_cache"))
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                        "--no-build-isolation", "-w", str(tmp_path / "dist"), str(src)],
                       capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in notebook.NOTEBOOKS:
        assert {f"chaos/notebooks/{name}.ipynb", f"chaos/notebooks/{name}.py"} <= names
    assert "chaos/notebooks/jupytext.toml" in names
    assert notebook.notebooks_dir() == Path(notebook.__file__).parent / "notebooks"


# -- the library the notebooks call (chaos.analysis.story / compare / loadtest) ------------
def test_story_tables_agree_with_the_frames_and_the_verdict(seed_run: Path,
                                                            import_run: Path) -> None:
    from chaos.analysis import load_run, story

    run = load_run(seed_run)
    results = json.loads((seed_run / "results.json").read_text())
    inv = story.invariants(run)
    assert inv["violations"].sum() == len(results["violations"]) == len(run.violations)
    assert (inv.loc["one_position_per_symbol", "result"] == "VIOLATED"
            and inv.loc["one_position_per_symbol", "violations"] > 0)
    assert f"**{len(run.violations)} violation(s)**" in story.violations(run)
    ev = story.violation_events(run, 0)
    assert not ev.empty and "what" in ev and not any(c.endswith("_ms") for c in ev)
    for e in story.over_limit(run).itertuples():  # each episode: above the slots in force
        assert e.peak_open > e.slots and e.to_s >= e.from_s
    for o in story.lock_overlaps(run).itertuples():  # each pair: one symbol, both held
        assert o.overlap_to_s > o.overlap_from_s and o.first != o.second
    assert story.ends(run.slot_leases)["permits"].sum() == len(run.slot_leases)
    assert story.lock_ends(run)["permits"].sum() == len(run.exit_locks)

    # The incident: c2 then c3 close BUSDT (fences 2 and 3 on its CLOSE permits: increasing),
    # c3 on a flat symbol is the one violation, on the timeline at its order's time.
    imp = load_run(import_run)
    fences = story.fence_checks(imp)
    assert fences.loc["BUSDT"].tolist() == [2, 2, 0]
    tl = story.timeline(imp)
    (row,) = tl[tl["what"] == "VIOLATION single_close"].itertuples()
    order = imp.orders[imp.orders["plan_id"] == "c3"]
    assert row.t == order["t"].iloc[0] and "c3" in row.detail
    assert "import" in story.header(imp) and "caveat" in story.header(imp)
    assert story.lock_overlaps(imp).empty and story.expired_in_flight(imp).empty


def test_compare_runs_and_locust_stats(reference_run: Path, seed_run: Path,
                                       loadtest_run: Path, tmp_path: Path) -> None:
    import csv

    from chaos.analysis import compare_runs, load_run, locust_stats

    df = compare_runs([reference_run.parent, seed_run.parent])  # found one level below
    by_gov = {(r.governor, r.scenario): r for r in df.itertuples()}
    ref = by_gov[("reference", "small-notebooks")]
    seed = by_gov[("seed", "small-notebooks")]
    assert ref.verdict == "VALID" and ref.violations == 0
    results = json.loads((seed_run / "results.json").read_text())
    assert seed.verdict == "INVALID" and seed.violations == len(results["violations"])
    assert seed.one_position_per_symbol == sum(
        v["invariant"] == "one_position_per_symbol" for v in results["violations"])
    assert 0 < ref.p50_ms <= ref.p99_ms
    with pytest.raises(MissingData, match="no run directory"):
        compare_runs([seed_run / "history"])
    damaged = tmp_path / "damaged" / "run"  # beside good runs: named and left out
    (damaged / "history").mkdir(parents=True)
    (damaged / "history" / "part0.jsonl").write_text('{"type": "invoke", "f"\n')
    df = compare_runs([reference_run.parent, damaged.parent])
    assert list(df["governor"]) == ["reference"]
    assert [d for d, _ in df.attrs["skipped"]] == [str(damaged.resolve())]
    with pytest.raises(MissingData, match="none of the 1 run directories"):
        compare_runs([damaged])

    stats = locust_stats(load_run(loadtest_run))
    rows = list(csv.DictReader((loadtest_run / "locust_stats_history.csv").open()))
    assert len(stats) == len(rows) > 0
    agg = stats[stats["name"] == "Aggregated"]
    assert agg["requests"].iloc[-1] == int(rows[-1]["Total Request Count"]) > 300
    assert agg["rate"].max() > 100  # ~200 plans/s for 4 s
    with pytest.raises(MissingData, match="no Locust CSV at"):
        locust_stats(loadtest_run, loadtest_run / "nope")

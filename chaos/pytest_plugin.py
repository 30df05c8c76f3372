"""pytest plugin: the conformance cases and the chaos scenarios as test items.

Registered through the ``pytest11`` entry point (``chaos_governor``), so installing the
project makes it available everywhere; it does nothing unless a governor is given::

    pytest -p no:locust --chaos-governor-cmd "./bin/my-governor" --chaos-quick -n auto \\
        --junitxml reports/chaos.xml

Without ``--chaos-governor-cmd`` / ``--chaos-governor`` it only registers its options:
no import of the harness, no item, no hook that does work (the project's own test runs
and collection stay as they were).

Items (node ids, also what ``-k`` matches):

* ``chaos::conformance::<case>``: each case of :mod:`chaos.conformance`; NOT PRESENT
  is a skip, FAIL a failure with expected / observed and the governor's log;
* ``chaos::scenario::<name>[seed<N>]``: each pass/fail scenario of ``chaos suite``
  (x ``--chaos-seeds``), judged by the same checkers; INVALID or unknown is a failure
  naming the violations, the run directory and its report;
* ``chaos::<dir>::<name>[seed<N>]``: the TOML scenarios of ``--chaos-scenarios DIR``.

Under pytest-xdist each worker has its own Redis servers: a conformance session per
worker process, and every scenario run starts its own (:mod:`chaos.redis_servers` picks
free ports and retries when another worker takes one first).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from chaos import conformance as cf
    from chaos import scenario as scn

_VARIANTS = ("reference", "seed", "legacy")
_session: Any = None  # this process's conformance Session (one embedded Redis)
_start_error: str | None = None  # the governor never started here: every case says so


def pytest_addoption(parser: pytest.Parser) -> None:
    g = parser.getgroup("chaos", "chaos governor audit (see docs/your-governor.md)")
    g.addoption("--chaos-governor-cmd", metavar="CMD", default=None,
                help="test this governor command (REDIS_URL, GOVERNOR_PREFIX and "
                     "GOVERNOR_CONSUMER in its environment); enables the chaos items")
    g.addoption("--chaos-governor", metavar="NAME", default=None, choices=_VARIANTS,
                help="test a governor shipped with the project (reference, seed, legacy)")
    g.addoption("--chaos-quick", action="store_true", default=False,
                help="short scenarios, as `chaos suite --quick`")
    g.addoption("--chaos-seeds", type=int, default=1, metavar="N",
                help="seeds per scenario (default 1)")
    g.addoption("--chaos-scenarios", action="append", default=[], metavar="DIR",
                help="also collect the *.toml scenario files of DIR (repeatable)")
    g.addoption("--chaos-out", default="reports/chaos-pytest", metavar="DIR",
                help="run directories and governor logs (default reports/chaos-pytest)")
    g.addoption("--chaos-no-report", action="store_true", default=False,
                help="no report.html for failing scenarios (the run directory is kept)")


def _enabled(config: pytest.Config) -> bool:
    return bool(config.getoption("chaos_governor_cmd") or config.getoption("chaos_governor"))


def pytest_configure(config: pytest.Config) -> None:
    if not _enabled(config):
        return
    cmd, name = config.getoption("chaos_governor_cmd"), config.getoption("chaos_governor")
    if cmd is not None and name is not None:
        raise pytest.UsageError("give --chaos-governor-cmd or --chaos-governor, not both")
    if cmd is not None and not cmd.strip():
        raise pytest.UsageError("--chaos-governor-cmd: must not be empty")
    if not 1 <= config.getoption("chaos_seeds") <= 1000:
        raise pytest.UsageError("--chaos-seeds: must be within 1..1000")
    for d in config.getoption("chaos_scenarios"):
        if not Path(d).is_dir():
            raise pytest.UsageError(f"--chaos-scenarios {d}: not a directory")
    config.addinivalue_line("markers", "chaos: a chaos conformance case or scenario run")


@pytest.hookimpl(tryfirst=True)  # before -k / -m deselect: our items are filtered too
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config,
                                  items: list[pytest.Item]) -> None:
    if not _enabled(config):
        return
    items.extend(_items(session))


def pytest_sessionfinish(session: pytest.Session) -> None:
    global _session
    if _session is not None:
        s, _session = _session, None
        s.__exit__(None, None, None)


# --------------------------------------------------------------------------- collection


def _items(session: pytest.Session) -> list[pytest.Item]:
    from chaos import conformance as cf
    from chaos import scenario as scn
    from chaos.suite import scenario_runs, suite_scenarios

    config = session.config
    quick, seeds = config.getoption("chaos_quick"), config.getoption("chaos_seeds")
    out: list[pytest.Item] = []
    for case in cf.CASES:
        out.append(ConformanceItem.from_parent(
            session, name=case.name, nodeid=f"chaos::conformance::{case.name}", case=case))
    groups: list[tuple[str, list[scn.Scenario]]] = [("scenario", suite_scenarios())]
    for d in config.getoption("chaos_scenarios"):
        found = []
        for path in sorted(Path(d).glob("*.toml")):
            try:
                found.append(scn.load(path))
            except scn.ScenarioError as exc:
                raise pytest.UsageError(f"--chaos-scenarios: {exc}") from None
        groups.append((Path(d).resolve().name or "scenarios", found))
    for group, scenarios in groups:
        for s in scenario_runs(scenarios=scenarios, quick=quick, seeds=seeds):
            name = f"{s.name}[seed{s.seed}]"
            out.append(ScenarioItem.from_parent(
                session, name=name, nodeid=f"chaos::{group}::{name}", scenario=s,
                group=group))
    return out


class ChaosFailure(Exception):
    """A failing chaos item: its message is what pytest shows, a few lines, no traceback."""


class _ChaosItem(pytest.Item):
    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException],
                     style: Any = None) -> str:
        if isinstance(excinfo.value, ChaosFailure):
            return str(excinfo.value)
        return str(super().repr_failure(excinfo, style=style))

    def reportinfo(self) -> tuple[Path, int | None, str]:
        return self.path, None, self.nodeid

    def _governor(self) -> tuple[str, str | None]:
        c = self.config
        return (c.getoption("chaos_governor") or "reference", c.getoption("chaos_governor_cmd"))

    def _out(self) -> Path:
        return Path(self.config.getoption("chaos_out")).resolve()


class ConformanceItem(_ChaosItem):
    def __init__(self, *, case: cf.Case, **kw: Any) -> None:
        super().__init__(**kw)
        self.case = case
        self.add_marker("chaos")
        self.extra_keyword_matches.update({"chaos", "conformance"})

    def runtest(self) -> None:
        from chaos import conformance as cf

        global _start_error
        try:
            result = _conformance_session(self).run_case(self.case)
        except cf.ConformanceStartError as exc:
            _start_error = f"the governor does not start: {exc}"
            raise ChaosFailure(_start_error) from None
        if result.status == cf.FAIL:
            raise ChaosFailure(f"{self.case.name}: {self.case.title}\n"
                               f"  expected: {result.expected}\n"
                               f"  observed: {result.observed}\n"
                               f"  governor log: {result.log}")
        if result.status == cf.NOT_PRESENT:
            pytest.skip(f"not present: {result.observed}")


def _conformance_session(item: _ChaosItem) -> cf.Session:
    """This process's session, started at its first case; a governor that never starts is
    said once and then by every later case, without waiting for it again."""
    global _session, _start_error
    from chaos import conformance as cf
    from chaos.runner import governor_spec

    if _start_error is not None:
        raise ChaosFailure(_start_error)
    if _session is None:
        worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
        logs = item._out() / "conformance" / f"{worker}-{os.getpid()}"
        s = cf.Session(governor_spec(*item._governor()), logs)
        s.__enter__()
        _session = s
    return _session  # type: ignore[no-any-return]


class ScenarioItem(_ChaosItem):
    def __init__(self, *, scenario: scn.Scenario, group: str, **kw: Any) -> None:
        super().__init__(**kw)
        self.scenario = scenario
        self.add_marker("chaos")
        self.extra_keyword_matches.update({"chaos", group})

    def runtest(self) -> None:
        from chaos.runner import HarnessError, default_run_dir
        from chaos.suite import QUICK_DURATION_S, ScenarioOutcome, run_scenario

        s = self.scenario
        governor, cmd = self._governor()
        run_dir = default_run_dir(f"{s.name}-seed{s.seed}", root=self._out())
        oc = ScenarioOutcome(s.name, s.seed, run_dir, None)
        quick = self.config.getoption("chaos_quick") or s.duration_s <= QUICK_DURATION_S
        try:
            verdict = run_scenario(s, run_dir, oc, governor=governor, governor_cmd=cmd,
                                   quick=quick)
        except HarnessError as exc:
            raise ChaosFailure(f"{s.name} seed {s.seed}: the harness could not run it: "
                               f"{exc}\n  run directory: {run_dir}") from None
        if oc.valid is True:
            return
        report = ""
        if not self.config.getoption("chaos_no_report"):
            from chaos.report import write_report

            report = f"\n  report: {write_report(oc.run_dir, verdict).html}"
        if oc.valid is False:
            counts = ", ".join(f"{k} {v}" for k, v in oc.violations.items())
            lines = [f"{s.name} seed {s.seed}: INVALID ({counts})"]
            lines += [f"  - {m}" for m in oc.messages]
        else:
            lines = [f"{s.name} seed {s.seed}: unknown, not a pass: "
                     + ("; ".join(oc.unknown_because) or "see the run directory")]
        raise ChaosFailure("\n".join(lines) + f"\n  run directory: {oc.run_dir}{report}")

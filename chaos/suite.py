"""The pass/fail suite: every non-exposure scenario, checked, summarised.

Writes into the suite directory one run directory per scenario (and seed),
``summary.json`` (``{"valid": ..., "scenarios": [{"name", "valid",
"violations": {invariant: count}}]}``), ``summary.md`` and ``junit.xml``.
``--quick`` shortens every scenario so the whole suite fits in a few minutes
on a 2-core machine.
"""

from __future__ import annotations

import json
import logging
import os
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chaos import scenario as scn
from chaos.checkers import INVARIANTS, Verdict, check_run
from chaos.runner import HarnessError, RunOptions, run

log = logging.getLogger(__name__)

QUICK_DURATION_S = 6.0


@dataclass
class ScenarioOutcome:
    name: str
    seed: int
    run_dir: Path
    valid: bool | None
    violations: dict[str, int] = field(default_factory=dict)
    first_violation_s: float | None = None
    seconds: float = 0.0
    error: str | None = None
    messages: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "seed": self.seed,
                "valid": "unknown" if self.valid is None else self.valid,
                "violations": self.violations, "time_to_first_violation_s":
                self.first_violation_s, "seconds": round(self.seconds, 1),
                "run_dir": str(self.run_dir), "error": self.error}


def suite_scenarios(names: list[str] | None = None) -> list[scn.Scenario]:
    out = []
    for name in names or scn.builtin_names():
        s = scn.load(name)
        if not s.exposure or names:
            out.append(s)
    return out


def run_suite(out_dir: Path, *, governor: str = "reference", governor_cmd: str | None = None,
              quick: bool = False, seeds: int = 1, first_seed: int | None = None,
              names: list[str] | None = None,
              progress: bool = True, redis_kind: str | None = None,
              redis_url: str | None = None) -> tuple[bool | None, list[ScenarioOutcome]]:
    out_dir.mkdir(parents=True, exist_ok=True)
    outcomes: list[ScenarioOutcome] = []
    for sc in suite_scenarios(names):
        for k in range(seeds):
            base = sc.seed if first_seed is None else first_seed
            s = sc.with_overrides(seed=base + k,
                                  duration_s=min(sc.duration_s, QUICK_DURATION_S) if quick
                                  else None)
            run_dir = out_dir / (s.name if seeds == 1 and first_seed is None
                                 else f"{s.name}-seed{s.seed}")
            t0 = time.monotonic()
            oc = ScenarioOutcome(s.name, s.seed, run_dir, None)
            try:
                res = run(RunOptions(scenario=s, governor=governor, governor_cmd=governor_cmd,
                                     out=run_dir, progress=False, redis_kind=redis_kind,
                                     redis_url=redis_url,
                                     probe_max_wait_s=30.0 if quick else 120.0))
                v: Verdict = check_run(res.run_dir)
                oc.valid = v.valid if res.status == "complete" else None
                for name, r in v.results.items():
                    if r.violations:
                        oc.violations[name] = len(r.violations)
                first = v.to_dict()["time_to_first_violation_s"]
                if first is not None:
                    oc.first_violation_s = round(first, 2)
                oc.messages = [x.message for x in v.violations[:3]]
                if oc.valid is not True:  # reports where there is something to look at
                    from chaos.report import write_report

                    write_report(res.run_dir, v)
            except HarnessError as exc:
                oc.error = str(exc)
                raise
            except Exception as exc:  # noqa: BLE001 - one broken scenario must not stop the suite
                log.exception("scenario %s failed in the harness", s.name)
                oc.error = f"{type(exc).__name__}: {exc}"
            oc.seconds = time.monotonic() - t0
            outcomes.append(oc)
            if progress:
                print(_row(oc), flush=True)
    values = [o.valid for o in outcomes]
    valid: bool | None = False if False in values else (None if None in values else True)
    write_summary(out_dir, valid, outcomes, governor_cmd or governor)
    return valid, outcomes


HEADER = f"{'scenario':<22} {'seed':>4} {'verdict':<8} {'first':>6}  violations"


def _row(o: ScenarioOutcome) -> str:
    word = {True: "valid", False: "INVALID", None: "unknown"}[o.valid]
    if o.error:
        word = "ERROR"
    first = f"{o.first_violation_s:.1f}s" if o.first_violation_s is not None else "-"
    viol = ", ".join(f"{k} {v}" for k, v in o.violations.items()) or (o.error or "")
    return f"{o.name:<22} {o.seed:>4} {word:<8} {first:>6}  {viol}"


def write_summary(out_dir: Path, valid: bool | None, outcomes: list[ScenarioOutcome],
                  governor: str) -> None:
    data = {"valid": "unknown" if valid is None else valid, "governor": governor,
            "scenarios": [o.to_dict() for o in outcomes]}
    _atomic(out_dir / "summary.json", json.dumps(data, indent=2))
    lines = [f"# Chaos suite: {governor}", "",
             f"Verdict: **{ {True: 'valid', False: 'INVALID', None: 'unknown'}[valid] }**", "",
             "| scenario | seed | verdict | time to first violation | violations by invariant |",
             "|---|---|---|---|---|"]
    for o in outcomes:
        word = "ERROR" if o.error else {True: "valid", False: "INVALID", None: "unknown"}[o.valid]
        first = f"{o.first_violation_s:.1f} s" if o.first_violation_s is not None else ""
        viol = ", ".join(f"{k}: {v}" for k, v in o.violations.items()) or (o.error or "")
        lines.append(f"| {o.name} | {o.seed} | {word} | {first} | {viol} |")
    _atomic(out_dir / "summary.md", "\n".join(lines) + "\n")
    write_junit(out_dir / "junit.xml", outcomes)


def write_junit(path: Path, outcomes: list[ScenarioOutcome]) -> None:
    """One test suite per scenario run, one test case per invariant."""
    root = ET.Element("testsuites", name="chaos")
    for o in outcomes:
        ts = ET.SubElement(root, "testsuite", name=f"{o.name}[seed={o.seed}]",
                           tests=str(len(INVARIANTS)), time=f"{o.seconds:.1f}")
        for inv in INVARIANTS:
            tc = ET.SubElement(ts, "testcase", classname=o.name, name=inv)
            if o.error:
                ET.SubElement(tc, "error", message=o.error)
            elif inv in o.violations:
                ET.SubElement(tc, "failure", message=f"{o.violations[inv]} violations of {inv}")
    ET.ElementTree(root).write(path, encoding="utf-8", xml_declaration=True)


def _atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)

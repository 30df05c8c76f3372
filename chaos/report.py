"""A run's report for people: ``report.md``, a self-contained ``report.html``, plots, JUnit.

``write_report(run_dir)`` reads the run once (:func:`chaos.checkers.gather`),
judges it unless a verdict is given, and writes into the run directory:

    report.md       header, verdict table, violations explained, plots (linked)
    report.html     the same, one file: inline CSS, plots as base64 PNG data URIs
    plots/*.png     the plots, one PNG each
    junit.xml       one testcase per invariant, for CI

Every plot's x axis is seconds since the workload started (the ``workload``
phase invoke; the first operation when there is none), and every plot shades
the fault windows and names them. The plots aggregate: a run with tens of
thousands of events still draws in a few seconds and stays readable.

The plots are :mod:`chaos.analysis.plots` drawn from :class:`chaos.analysis.RunFrames`
built on the facts and verdict the report already has (the run is read once): the same
functions and frames the notebooks use, so a notebook figure and report.html agree.

matplotlib is needed for the plots only (the ``chaos`` extra installs it);
without it the report is written with a note instead of plots.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import json
import logging
import math
import re
import time
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chaos.analysis.frames import RunFrames, fault_note
from chaos.analysis.frames import humanize as _humanize
from chaos.checkers import INVARIANTS, Verdict, Violation, check_run, gather

log = logging.getLogger(__name__)

__all__ = ["ReportPaths", "write_junit", "write_report"]

MAX_VIOLATIONS_SHOWN = 20  # per invariant, in the report; results.json has them all
MAX_EVENTS_SHOWN = 30  # per violation (a slot violation lists every position open then)
PLOTS_DIR = "plots"

_VALID_WORD = {True: "valid", False: "VIOLATED", None: "unknown"}
_VERDICT_WORD = {True: "VALID", False: "INVALID", None: "UNKNOWN"}
_TIME_KEYS = ("entry_ms", "wall_ms", "issued_at_ms")
_EVENT_HEADERS = {"entry_ms": "decided / sent (s)", "issued_at_ms": "permit issued (s)",
                  "wall_ms": "at (s)", "open_count_after": "open after",
                  "open_positions": "open positions", "outstanding_permits": "outstanding permits"}
_EVENT_COLUMNS = ("what", "seq", "plan_id", "symbol", "action", "decision", "reason", "effect",
                  "governor", "position_id", "open_count_after", "notional", "fence", "regime",
                  "slots", "open_positions", "outstanding_permits", "entry_ms", "issued_at_ms",
                  "wall_ms")


@dataclass(frozen=True)
class ReportPaths:
    md: Path
    html: Path
    junit: Path
    plots: list[Path] = field(default_factory=list)


@dataclass
class _Plot:
    name: str
    title: str
    caption: str
    path: Path | None = None
    png: bytes | None = None
    error: str | None = None


# -- entry points ---------------------------------------------------------------------------
def write_report(run_dir: str | Path, verdict: Verdict | None = None) -> ReportPaths:
    """Write report.md, report.html, plots/*.png and junit.xml into ``run_dir``."""
    run_dir = Path(run_dir)
    t_start = time.perf_counter()
    if verdict is None:
        verdict = check_run(run_dir)  # writes results.json, which the report refers to
    facts = verdict.facts if verdict.facts is not None else gather(run_dir)
    ctx = RunFrames.from_facts(facts, verdict)
    plots = _make_plots(ctx, run_dir / PLOTS_DIR)
    md_path = run_dir / "report.md"
    html_path = run_dir / "report.html"
    _atomic_write(md_path, _render_markdown(ctx, plots))
    _atomic_write(html_path, _render_html(ctx, plots))
    junit_path = write_junit(verdict, run_dir / "junit.xml")
    log.info("report for %s written in %.2f s", run_dir, time.perf_counter() - t_start)
    return ReportPaths(md_path, html_path, junit_path,
                       [p.path for p in plots if p.path is not None])


def write_junit(verdict: Verdict, path: str | Path) -> Path:
    """A JUnit XML file: one testcase per invariant (failure: violated; skipped: unknown)."""
    path = Path(path)
    meta = _read_meta(Path(verdict.run_dir))
    scenario = str(meta.get("scenario") or Path(verdict.run_dir).name)
    governor = str(meta.get("governor") or "governor")
    names = list(INVARIANTS) + [n for n in verdict.results if n not in INVARIANTS]
    failures = sum(1 for n in names if n in verdict.results
                   and verdict.results[n].valid is False)
    skipped = sum(1 for n in names if n not in verdict.results
                  or verdict.results[n].valid is None)
    check_s = float(verdict.stats.get("check_seconds") or 0)
    suites = ET.Element("testsuites", name="chaos", tests=str(len(names)),
                        failures=str(failures), errors="0", skipped=str(skipped))
    suite = ET.SubElement(suites, "testsuite", name=f"chaos.{scenario}", tests=str(len(names)),
                          failures=str(failures), errors="0", skipped=str(skipped),
                          time=f"{check_s:.3f}")
    props = ET.SubElement(suite, "properties")
    for k, v in (("scenario", scenario), ("governor", governor),
                 ("seed", meta.get("seed")), ("run_dir", str(verdict.run_dir)),
                 ("run_status", meta.get("status")),
                 ("verdict", _VERDICT_WORD[verdict.valid])):
        ET.SubElement(props, "property", name=k, value="" if v is None else str(v))
    t0 = verdict.stats.get("workload_start_ms") or verdict.stats.get("first_ms")
    for name in names:
        case = ET.SubElement(suite, "testcase", classname=f"chaos.{_safe(scenario)}."
                             f"{_safe(governor)}",
                             name=name, time="0")
        r = verdict.results.get(name)
        if r is None:
            ET.SubElement(case, "skipped", message="not checked")
        elif r.valid is False:
            n = len(r.violations)
            lines = [f"{_rel(v.wall_ms, t0)} {_humanize(v.message, t0)}"
                     for v in r.violations[:10]]
            if n > 10:
                lines.append(f"... {n - 10} more in results.json")
            first = _humanize(r.violations[0].message, t0) if r.violations else ""
            fail = ET.SubElement(case, "failure", type=name,
                                 message=f"{n} violation{'s' if n != 1 else ''}: {first}"[:500])
            fail.text = "\n".join(lines)
        elif r.valid is None:
            ET.SubElement(case, "skipped", message=r.note or "unknown: the history cannot decide")
        if r is not None and r.stats:
            ET.SubElement(case, "system-out").text = json.dumps(r.stats, default=str)
    ET.indent(suites)
    data = ET.tostring(suites, encoding="utf-8", xml_declaration=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
    return path


# -- plots ----------------------------------------------------------------------------------
# (name, title, caption, function of chaos.analysis.plots): the figures are the analysis
# layer's, drawn from the same frames a notebook uses (which has more of them: slot leases,
# decisions by reason, BLOCK reasons over time).
PLOTS: tuple[tuple[str, str, str, str], ...] = (
    ("open_positions", "Open positions against the slot limit",
     "Open positions on the exchange after every order (ledger open_count_after), the "
     "desired slots of the regime in force (step line; the strip below shows the "
     "regime), max_positions, and the ledger-visible violations.", "positions"),
    ("capital_total", "Capital: open and permitted-not-executed notional",
     "Total open notional (replayed from the ledger) and notional of OPEN permits not yet "
     "executed, stacked, against max_total_notional; per-bucket peaks are kept when "
     "aggregated.", "capital"),
    ("capital_symbols", "Capital per symbol",
     "The same, per symbol, for the symbols with capital violations and then the most "
     "active ones, against capital x allocation_pct.", "capital_symbols"),
    ("exit_locks", "CLOSE permits per symbol (exit-lock holders)",
     "One bar per CLOSE permit, from its decision to its end (order executed, permit "
     "missing, result not executed, or permit expiry: the single_close rule), colored by "
     "governor; overlapping permits are stacked in lanes, each overlap (the single_close "
     "violation) is marked by a red strip under its row, and ticks mark decision + "
     "exit_lock_ttl_ms, when a TTL-based exit lock would have expired.", "exit_locks"),
    ("decision_latency", "Decision latency and throughput",
     "Plan stream entry to decision entry (both Redis ms), p50 and p99 per 1-second "
     "bucket, and decisions per second.", "latency"),
)


def _make_plots(ctx: RunFrames, out_dir: Path) -> list[_Plot]:
    plots = [_Plot(name, title, caption) for name, title, caption, _ in PLOTS]
    try:
        from chaos.analysis import plots as draw
    except ImportError:
        for p in plots:
            p.error = "matplotlib is not installed (pip install 'governor-audit[chaos]')"
        return plots
    out_dir.mkdir(parents=True, exist_ok=True)
    for plot, (*_, fn) in zip(plots, PLOTS, strict=True):
        try:
            fig = getattr(draw, fn)(ctx)
            buf = io.BytesIO()
            fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
            plot.png = buf.getvalue()
            plot.path = out_dir / f"{plot.name}.png"
            plot.path.write_bytes(plot.png)
        except Exception as exc:  # noqa: BLE001 - one bad plot must not lose the report
            log.exception("plot %s failed", plot.name)
            plot.error = f"plot failed: {type(exc).__name__}: {exc}"
    return plots


# -- text -----------------------------------------------------------------------------------
def _read_meta(run_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((run_dir / "run.json").read_text())
    except (OSError, ValueError):
        return {}


def _rel(ms: Any, t0: Any) -> str:
    if not isinstance(ms, (int, float)) or not t0:
        return "?"
    return f"t={(ms - t0) / 1000:+.3f} s"


def _iso(ms: Any) -> str:
    if not isinstance(ms, (int, float)) or ms <= 0:
        return "?"
    return _dt.datetime.fromtimestamp(ms / 1000, _dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _header_rows(ctx: RunFrames) -> list[tuple[str, str]]:
    m = ctx.meta
    if m.get("kind") == "import":
        return _import_header_rows(ctx)
    f = ctx.facts
    v = ctx.verdict
    ph = f.phases
    dur = []
    if m.get("duration_s") is not None:
        dur.append(f"{m['duration_s']} s configured")
    w = ph.get("workload", {})
    if w.get("invoke") and w.get("ok"):
        dur.append(f"workload {(w['ok'] - w['invoke']) / 1000:.1f} s")
    if m.get("started_wall_ms") and m.get("ended_wall_ms"):
        dur.append(f"run {(m['ended_wall_ms'] - m['started_wall_ms']) / 1000:.1f} s")
    redis = m.get("redis") or {}
    probe = m.get("probe") or {}
    rows = [
        ("scenario", f"{m.get('scenario', '?')}"
                     + (f" — {m['scenario_spec']['description']}"
                        if (m.get("scenario_spec") or {}).get("description") else "")),
        ("governor", f"{m.get('governor', '?')}" + (f" ({m['governors']} instances)"
                                                      if m.get("governors") else "")),
        ("seed", str(m.get("seed", "?"))),
        ("duration", ", ".join(dur) or "?"),
        ("Redis", " ".join(str(x) for x in (redis.get("version") or "?", redis.get("kind") or "",
                                             redis.get("topology") or "") if x)),
        ("run status", str(m.get("status", "?"))),
        ("verdict", _VERDICT_WORD[v.valid]),
        ("time 0", f"{ctx.t0_source}, {_iso(ctx.t0_ms)}: every time in this report is "
                   f"seconds since then"),
        ("harness started", _rel(m.get("started_wall_ms") or f.first_ms, ctx.t0_ms)),
        ("history", f"{f.ops} operations, {len(f.orders)} ledger orders, "
                    f"{sum(len(x) for x in f.decisions.values())} decisions, "
                    f"{len(f.plans)} plans"),
        ("faults", fault_note(ctx).removeprefix("faults: ")),
        ("regime flips", str(len(f.regimes))),
    ]
    if probe:
        ok_c = sum(x == "PERMIT" for x in (probe.get("closes") or {}).values())
        ok_o = sum(x == "PERMIT" for x in (probe.get("opens") or {}).values())
        rows.append(("liveness probe", f"{ok_c}/{len(probe.get('closes') or {})} closes, "
                                       f"{ok_o}/{len(probe.get('opens') or {})} opens permitted"))
    lead = (ctx.t0_ms - f.first_ms) / 1000 if f.first_ms else 0.0
    if lead > 5:
        rows.append(("note", f"the history starts {lead:.1f} s before the workload start "
                             f"(operations of an earlier attempt in this directory?)"))
    if f.stream_resets:
        rows.append(("stream resets", f"{f.stream_resets} (Redis lost data)"))
    rows.append(("run directory", str(f.run_dir)))
    return rows


def _import_header_rows(ctx: RunFrames) -> list[tuple[str, str]]:
    """The header of an imported history: where it came from, its window, its caveats."""
    m, f = ctx.meta, ctx.facts
    w = m.get("window") or {}
    span = (f"{_rel(w.get('first_entry_ms'), ctx.t0_ms)} to "
            f"{_rel(w.get('last_entry_ms'), ctx.t0_ms)}" if w.get("first_entry_ms") else "?")
    ledger = m.get("ledger") or {}
    rows = [
        ("source", f"{(m.get('redis') or {}).get('url') or m.get('source', '?')}, prefix "
                   f"{m.get('prefix', '?')} (imported, read-only)"),
        ("window", f"{span} (--since {w.get('since') or '-'}, --until {w.get('until') or '-'})"),
        ("verdict", _VERDICT_WORD[ctx.verdict.valid]),
        ("history", f"{f.ops} operations, {len(f.plans)} plans, "
                    f"{sum(len(x) for x in f.decisions.values())} decisions, {len(f.orders)} "
                    f"orders derived from {ledger.get('derived_from', 'apply.result')}"),
        ("regime", str((m.get("regime") or {}).get("value") or "BASE") + " (as read at import "
                   "time; its history is unknown)"),
        ("time 0", f"{ctx.t0_source}, {_iso(ctx.t0_ms)}: every time in this report is "
                   f"seconds since then"),
    ]
    diff = m.get("mirror_vs_replay") or {}
    if any(diff.values()):
        rows.append(("mirror vs replay", ", ".join(f"{k}: {v}" for k, v in diff.items() if v)))
    rows += [("caveat", c) for c in m.get("caveats") or ()]
    rows.append(("run directory", str(f.run_dir)))
    return rows


def _verdict_rows(ctx: RunFrames) -> list[tuple[str, str, int, str]]:
    rows = []
    res = ctx.verdict.results
    for name in list(INVARIANTS) + [n for n in res if n not in INVARIANTS]:
        r = res.get(name)
        if r is None:
            rows.append((name, "unknown", 0, "not checked"))
            continue
        note = r.note
        if r.violations:
            vs = ctx.violations_by_inv[name]
            note = f"first at {_rel(vs[0].wall_ms, ctx.t0_ms)}; {_faults_breakdown(vs)}"
        elif r.stats and not note:
            note = ", ".join(f"{k} {v}" for k, v in r.stats.items())
        rows.append((name, _VALID_WORD[r.valid], len(r.violations), note))
    return rows


def _model_rows(ctx: RunFrames) -> list[tuple[str, str, int, str]]:
    """The sequential-model checks, when the verdict carries them (a second opinion)."""
    models = getattr(ctx.verdict, "models", None) or {}
    rows = []
    for name, r in models.items():
        note = r.note or (f"first at {_rel(r.violations[0].wall_ms, ctx.t0_ms)}"
                          if r.violations else "")
        rows.append((name, _VALID_WORD.get(r.valid, str(r.valid)), len(r.violations),
                     _humanize(note, ctx.t0_ms)))
    return rows


def _model_explanation_rows(ctx: RunFrames) -> list[tuple[str, ...]]:
    """Each model partition that failed or ran out of time: how far it linearized and
    what could not be placed next (Porcupine's visualization, as a table)."""
    df = ctx.model_explanations
    return [(r.model, str(r.partition), r.outcome, f"{r.longest_prefix} of {r.ops}",
             r.first_unplaceable or "-", "" if math.isnan(r.t) else f"{r.t:.3f}",
             r.state_before or "-") for r in df.head(MAX_VIOLATIONS_SHOWN).itertuples()]


_MODEL_EXPLANATION_HEADER = ("model", "partition", "outcome", "linearized", "cannot be placed",
                             "called (s)", "state before it")


def _coverage_rows(ctx: RunFrames) -> list[tuple[str, str]]:
    """What the run exercised (results.json ``coverage``), and why it is not enough when
    it is not: a VALID verdict needs both the invariants and this."""
    c = getattr(ctx.verdict, "coverage", None) or {}
    if not c:
        return []
    def of(x: Any, y: Any) -> str:
        return f"{x} of {y}" if y is not None else str(x)
    rows = [("plans sent", of(c.get("plans_sent"), c.get("plans_expected") and
                              f"~{c['plans_expected']} asked")),
            ("plans decided", str(c.get("plans_decided"))),
            ("permits executed", of(c.get("permits_executed"), c.get("permits"))),
            ("faults applied", of(c.get("faults_applied"), c.get("faults_scheduled")
                                  and f"{c['faults_scheduled']} scheduled"))]
    rows += [("NOT EXERCISED", why) for why in c.get("not_exercised") or ()]
    return rows


def _faults_breakdown(vs: Sequence[Violation]) -> str:
    c = Counter(", ".join(v.faults) if v.faults else "none" for v in vs)
    return "faults active: " + "; ".join(f"{k} ({n})" for k, n in c.most_common(4)) + (
        "; ..." if len(c) > 4 else "")


def _fault_rows(ctx: RunFrames, limit: int = 30) -> list[tuple[str, ...]]:
    rows = []
    for w in ctx.facts.faults[:limit]:
        stop = ctx.s(w.stop_ms) if w.stop_ms is not None else None
        rows.append((w.kind, w.target or "", f"{ctx.s(w.start_ms):+.3f}",
                     f"{stop:+.3f}" if stop is not None else "never stopped",
                     f"{(w.stop_ms - w.start_ms) / 1000:.3f}" if w.stop_ms is not None else "",
                     "yes" if w.ok else "no (failed to start)"))
    return rows


def _event_table(v: Violation, t0: int) -> tuple[list[str], list[list[str]]]:
    evs = list(v.events[:MAX_EVENTS_SHOWN])
    keys = {k for e in evs for k in e}
    cols = [c for c in _EVENT_COLUMNS if c in keys] + sorted(keys - set(_EVENT_COLUMNS))
    rows = []
    for e in evs:
        row = []
        for c in cols:
            x = e.get(c)
            if x is None or x == "":
                row.append("")
            elif c in _TIME_KEYS and isinstance(x, (int, float)) and x > 1e11:
                row.append(f"{(x - t0) / 1000:+.3f}")
            else:
                row.append(str(x))
        rows.append(row)
    filled = [i for i in range(len(cols)) if any(r[i] for r in rows)]  # drop empty columns
    header = [_EVENT_HEADERS.get(cols[i], cols[i]) for i in filled]
    return header, [[r[i] for i in filled] for r in rows]


def _violation_fields(v: Violation, t0: int) -> list[tuple[str, str]]:
    return [("time", _rel(v.wall_ms, t0)),
            ("symbol", v.symbol or "—"),
            ("plans", ", ".join(v.plan_ids) or "—"),
            ("expected", v.expected),
            ("observed", v.observed),
            ("faults active", ", ".join(v.faults) if v.faults else "none")]


def _plan_sources(ctx: RunFrames, v: Violation) -> str:
    src = []
    for pid in v.plan_ids:
        e = ctx.facts.plans.get(pid)
        s = e.source if e else None
        if s:
            src.append(f"{pid}: {s}")
    return ", ".join(src)


_WITNESS_HEADER = ("t (s)", "operation", "plan", "symbol", "action", "outcome", "detail")
_WITNESS_INTRO = ("For each violation (at most {cap} per invariant, the first in time order), "
                  "the fewest operations that still show it when its checker is run again on "
                  "them alone (ddmin over the history; docs/harness.md, \"Minimal "
                  "witnesses\"). Always kept beside them, not listed: {context}.")


def _witness_section(ctx: RunFrames) -> tuple[str, list[tuple[str, list[list[str]]]]]:
    """The intro and, per minimised violation, a title and its operations as rows."""
    summary = (ctx.verdict.stats or {}).get("minimal_witnesses")
    if not summary or not summary.get("per_invariant"):
        return "", []
    intro = _WITNESS_INTRO.format(cap=summary.get("per_invariant_cap", "?"),
                                  context=", ".join(summary.get("context") or ()) or "none")
    left = {n: s["left"] for n, s in summary["per_invariant"].items() if s.get("left")}
    if left:
        intro += " Not searched: " + ", ".join(f"{n} {k}" for n, k in left.items()) + "."
    if summary.get("stopped"):
        intro += f" Stopped: {summary['stopped']}."
    out = []
    for n, (v, w) in enumerate(ctx.witnesses, 1):
        msg = _humanize(v.message, ctx.t0_ms)
        if not w.get("reproduced"):
            out.append((f"{n}. [{v.invariant}] {msg}: {w.get('note', 'not shown again')}",
                        []))
            continue
        how = (f"{w['size']} of {w.get('candidates')} candidate operations ({w.get('searched')}"
               f"), {w.get('match')}, "
               + ("1-minimal (dropping any one makes it disappear)" if w.get("one_minimal")
                  else f"not shown 1-minimal{': ' + w['note'] if w.get('note') else ''}"))
        rows = [[f"{ctx.s(op['ms']):+.3f}", f"{op['f']} {op['type']}", op.get("plan_id") or "",
                 op.get("symbol") or "", op.get("action") or "", op.get("outcome") or "",
                 op.get("detail") or ""] for op in w["ops"]]
        out.append((f"{n}. [{v.invariant}] {msg}: {how}", rows))
    return intro, out


# markdown
def _md_cell(x: Any) -> str:
    return str(x).replace("|", "\\|").replace("\n", " ")


def _md_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    out = ["| " + " | ".join(_md_cell(h) for h in header) + " |",
           "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(_md_cell(c) for c in r) + " |" for r in rows]
    return out


def _governor_findings(ctx: RunFrames) -> list[dict[str, Any]]:
    """Instances that kept dying (from the history, so a stored run shows them too)."""
    from chaos.governor_findings import governor_findings

    return governor_findings(ctx.facts.governor_events)


_FINDINGS_INTRO = ("Instances that exited without being asked to (or were never seen reading "
                   "the plan stream). A restarted instance keeps "
                   "its consumer name and is handed its pending entries again: the entry "
                   "with the highest delivery count is the likely poison pill (fields shown "
                   "as stored; bytes that are not UTF-8 as \\xNN).")


def _governor_findings_md(ctx: RunFrames) -> list[str]:
    from chaos.governor_findings import describe

    found = _governor_findings(ctx)
    if not found:
        return []
    return ["## Governor findings", "", _FINDINGS_INTRO, ""] + [
        f"- {_md_cell(describe(f))}" for f in found] + [""]


def _governor_findings_html(ctx: RunFrames) -> list[str]:
    from chaos.governor_findings import describe

    found = _governor_findings(ctx)
    if not found:
        return []
    return ["<h2>Governor findings</h2>", f"<p>{_h(_FINDINGS_INTRO)}</p>",
            "<ul>" + "".join(f"<li><code>{_h(describe(f))}</code></li>" for f in found)
            + "</ul>"]


def _render_markdown(ctx: RunFrames, plots: list[_Plot]) -> str:
    m = ctx.meta
    L = [f"# Chaos run report: {m.get('scenario', ctx.facts.run_dir.name)} / "
         f"{m.get('governor', '?')} — {_VERDICT_WORD[ctx.verdict.valid]}", ""]
    L += _md_table(("", ""), _header_rows(ctx)) + [""]
    L += ["## Verdict", ""]
    L += _md_table(("invariant", "result", "violations", "note"), _verdict_rows(ctx)) + [""]
    if _model_rows(ctx):
        agree = getattr(ctx.verdict, "agreement", None)
        L += [f"Model checks (second opinion; agree with the invariant checkers: "
              f"{'unknown' if agree is None else 'yes' if agree else 'NO'}):", ""]
        L += _md_table(("model", "result", "violations", "note"), _model_rows(ctx)) + [""]
        if _model_explanation_rows(ctx):
            L += _md_table(_MODEL_EXPLANATION_HEADER, _model_explanation_rows(ctx)) + [""]
    if _coverage_rows(ctx):
        L += ["## Coverage", ""] + _md_table(("", ""), _coverage_rows(ctx)) + [""]
    L += _governor_findings_md(ctx)
    if ctx.facts.faults:
        L += ["## Faults", ""]
        L += _md_table(("kind", "target", "start (s)", "stop (s)", "length (s)", "started"),
                       _fault_rows(ctx))
        if len(ctx.facts.faults) > 30:
            L.append(f"\n... and {len(ctx.facts.faults) - 30} more fault windows")
        L.append("")
    L += ["## Plots", ""]
    for p in plots:
        L += [f"### {p.title}", "", p.caption, ""]
        if p.path is not None:
            L += [f"![{p.title}]({PLOTS_DIR}/{p.path.name})", ""]
        else:
            L += [f"_{p.error}_", ""]
    L += ["## Violations", ""]
    any_v = False
    for name, vs in ctx.violations_by_inv.items():
        if not vs:
            continue
        any_v = True
        L += [f"### {name}: {len(vs)} violation{'s' if len(vs) != 1 else ''}", ""]
        if len(vs) > MAX_VIOLATIONS_SHOWN:
            L += [f"The first {MAX_VIOLATIONS_SHOWN} in time order; "
                  f"{len(vs) - MAX_VIOLATIONS_SHOWN} more in results.json. "
                  f"{_faults_breakdown(vs)}.", ""]
        for i, v in enumerate(vs[:MAX_VIOLATIONS_SHOWN], 1):
            L += [f"**{i}. {_humanize(v.message, ctx.t0_ms)}**", ""]
            fields = _violation_fields(v, ctx.t0_ms)
            srcs = _plan_sources(ctx, v)
            if srcs:
                fields.insert(3, ("plan sources", srcs))
            L += [f"- {k}: {_md_cell(x)}" for k, x in fields] + [""]
            if v.events:
                header, rows = _event_table(v, ctx.t0_ms)
                L += _md_table(header, rows)
                if len(v.events) > MAX_EVENTS_SHOWN:
                    L.append(f"\n... {len(v.events) - MAX_EVENTS_SHOWN} more events")
                L.append("")
    if not any_v:
        L += ["No violations.", ""]
    intro, witnesses = _witness_section(ctx)
    if witnesses:
        L += ["## Minimal witnesses", "", intro, ""]
        for title, rows in witnesses:
            L += [f"### {_md_cell(title)}", ""]
            if rows:
                L += _md_table(_WITNESS_HEADER, rows)
            L.append("")
    L += [f"_Times are seconds since the {ctx.t0_source}. Generated by chaos.report at "
          f"{_iso(time.time() * 1000)}._", ""]
    return "\n".join(L)


# html
_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px auto;
max-width:1250px;padding:0 16px;color:#222;line-height:1.4}
h1{font-size:22px;margin-bottom:8px}h2{font-size:18px;margin-top:28px;
border-bottom:1px solid #ddd;padding-bottom:4px}h3{font-size:15px;margin:18px 0 6px}
table{border-collapse:collapse;margin:6px 0 12px;font-size:13px}
th,td{border:1px solid #d0d0d0;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f3f3f3}table.kv th{width:140px}
td.valid{color:#1b7f3b;font-weight:600}td.VIOLATED{color:#c00000;font-weight:700}
td.unknown{color:#a66f00;font-weight:600}
.badge{display:inline-block;padding:2px 10px;border-radius:4px;color:#fff;font-weight:700}
.VALID{background:#1b7f3b}.INVALID{background:#c00000}.UNKNOWN{background:#a66f00}
figure{margin:10px 0 26px}figure img{max-width:100%;border:1px solid #e3e3e3}
figcaption{font-size:13px;color:#555;margin-top:4px}
.viol{border-left:3px solid #c00000;padding:4px 10px;margin:10px 0;background:#fffafa}
.viol ul{margin:4px 0;padding-left:18px;font-size:13px}.viol table{font-size:12px}
.msg{font-weight:600}.more{color:#555;font-style:italic}code{font-size:12px}
details>summary{cursor:pointer;font-weight:600;font-size:15px;margin:12px 0 4px}
"""


def _h(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _html_table(header: Sequence[str] | None, rows: Iterable[Sequence[Any]],
                cls: str = "", cell_class: Callable[[int, Any], str] | None = None) -> str:
    out = [f'<table class="{cls}">' if cls else "<table>"]
    if header:
        out.append("<tr>" + "".join(f"<th>{_h(c)}</th>" for c in header) + "</tr>")
    for r in rows:
        cells = []
        for i, c in enumerate(r):
            k = cell_class(i, c) if cell_class else ""
            cells.append(f'<td class="{k}">{_h(c)}</td>' if k else f"<td>{_h(c)}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def _render_html(ctx: RunFrames, plots: list[_Plot]) -> str:
    m = ctx.meta
    word = _VERDICT_WORD[ctx.verdict.valid]
    title = f"{m.get('scenario', ctx.facts.run_dir.name)} / {m.get('governor', '?')}"
    B = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
         f"<title>Chaos report: {_h(title)} — {word}</title>", f"<style>{_CSS}</style>",
         "</head><body>",
         f'<h1>Chaos run report: {_h(title)} <span class="badge {word}">{word}</span></h1>']
    kv = "<table class=\"kv\">" + "".join(
        f"<tr><th>{_h(k)}</th><td>{_h(v)}</td></tr>" for k, v in _header_rows(ctx)) + "</table>"
    B.append(kv)
    B.append("<h2>Verdict</h2>")
    B.append(_html_table(("invariant", "result", "violations", "note"), _verdict_rows(ctx),
                         cell_class=lambda i, c: str(c) if i == 1 else ""))
    if _model_rows(ctx):
        agree = getattr(ctx.verdict, "agreement", None)
        B.append(f"<p>Model checks (second opinion; agree with the invariant checkers: "
                 f"{'unknown' if agree is None else 'yes' if agree else 'NO'}):</p>")
        B.append(_html_table(("model", "result", "violations", "note"), _model_rows(ctx),
                             cell_class=lambda i, c: str(c) if i == 1 else ""))
        if _model_explanation_rows(ctx):
            B.append(_html_table(_MODEL_EXPLANATION_HEADER, _model_explanation_rows(ctx)))
    if _coverage_rows(ctx):
        B += ["<h2>Coverage</h2>", _html_table(None, _coverage_rows(ctx))]
    B += _governor_findings_html(ctx)
    if ctx.facts.faults:
        B.append("<h2>Faults</h2>")
        B.append(_html_table(("kind", "target", "start (s)", "stop (s)", "length (s)",
                              "started"), _fault_rows(ctx)))
        if len(ctx.facts.faults) > 30:
            B.append(f'<p class="more">... and {len(ctx.facts.faults) - 30} more fault '
                     f"windows</p>")
    B.append("<h2>Plots</h2>")
    for p in plots:
        B.append(f"<figure><h3>{_h(p.title)}</h3>")
        if p.png is not None:
            data = base64.b64encode(p.png).decode("ascii")
            B.append(f'<img alt="{_h(p.title)}" src="data:image/png;base64,{data}">')
        else:
            B.append(f'<p class="more">{_h(p.error)}</p>')
        B.append(f"<figcaption>{_h(p.caption)}</figcaption></figure>")
    B.append("<h2>Violations</h2>")
    any_v = False
    for name, vs in ctx.violations_by_inv.items():
        if not vs:
            continue
        any_v = True
        B.append(f"<details open><summary>{_h(name)}: {len(vs)} "
                 f"violation{'s' if len(vs) != 1 else ''}</summary>")
        if len(vs) > MAX_VIOLATIONS_SHOWN:
            B.append(f'<p class="more">The first {MAX_VIOLATIONS_SHOWN} in time order; '
                     f"{len(vs) - MAX_VIOLATIONS_SHOWN} more in results.json. "
                     f"{_h(_faults_breakdown(vs))}.</p>")
        for i, v in enumerate(vs[:MAX_VIOLATIONS_SHOWN], 1):
            fields = _violation_fields(v, ctx.t0_ms)
            srcs = _plan_sources(ctx, v)
            if srcs:
                fields.insert(3, ("plan sources", srcs))
            B.append('<div class="viol">')
            B.append(f'<div class="msg">{i}. {_h(_humanize(v.message, ctx.t0_ms))}</div><ul>'
                     + "".join(f"<li>{_h(k)}: {_h(x)}</li>" for k, x in fields) + "</ul>")
            if v.events:
                header, rows = _event_table(v, ctx.t0_ms)
                B.append(_html_table(header, rows))
                if len(v.events) > MAX_EVENTS_SHOWN:
                    B.append(f'<p class="more">... {len(v.events) - MAX_EVENTS_SHOWN} more '
                             f"events</p>")
            B.append("</div>")
        B.append("</details>")
    if not any_v:
        B.append("<p>No violations.</p>")
    intro, witnesses = _witness_section(ctx)
    if witnesses:
        B += ["<h2>Minimal witnesses</h2>", f"<p>{_h(intro)}</p>"]
        for title, rows in witnesses:
            B.append(f'<div class="viol"><div class="msg">{_h(title)}</div>')
            if rows:
                B.append(_html_table(_WITNESS_HEADER, rows))
            B.append("</div>")
    B.append(f'<p class="more">Times are seconds since the {_h(ctx.t0_source)}. Generated by '
             f"chaos.report at {_h(_iso(time.time() * 1000))}.</p>")
    B.append("</body></html>")
    return "\n".join(B) + "\n"


def _safe(name: str) -> str:
    """A JUnit class name part: CI tools split on dots and choke on spaces."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", name).strip("_") or "x"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)

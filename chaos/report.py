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
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chaos.checkers import INVARIANTS, Facts, Verdict, Violation, check_run, gather

log = logging.getLogger(__name__)

__all__ = ["ReportPaths", "write_junit", "write_report"]

MAX_VIOLATIONS_SHOWN = 20  # per invariant, in the report; results.json has them all
MAX_EVENTS_SHOWN = 30  # per violation (a slot violation lists every position open then)
MAX_GANTT_ROWS = 25
MAX_SYMBOL_PANELS = 6
MAX_POINTS = 3000  # per drawn series, after aggregation
PLOTS_DIR = "plots"

_VALID_WORD = {True: "valid", False: "VIOLATED", None: "unknown"}
_VERDICT_WORD = {True: "VALID", False: "INVALID", None: "UNKNOWN"}
_FAULT_COLORS = ("#c77dff", "#f28482", "#80ced7", "#e9c46a", "#95d5b2", "#b08968",
                 "#ffafcc", "#a3a380", "#9d8189", "#8d99ae")  # shading: pale at alpha 0.35
_GOV_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2",
               "#17becf", "#bcbd22", "#7f7f7f", "#d62728")
_REGIME_COLORS = {"BASE": "#cfd8e3", "TREND_STRONG": "#b7e4c7", "CHOP": "#ffd6a5"}
_SHORT_REGIME = {"BASE": "BASE", "TREND_STRONG": "TREND", "CHOP": "CHOP"}
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
    ctx = _Ctx(facts, verdict)
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


# -- context --------------------------------------------------------------------------------
class _Ctx:
    """What every section and plot needs: the facts, the verdict and the time axis."""

    def __init__(self, facts: Facts, verdict: Verdict) -> None:
        self.facts = facts
        self.verdict = verdict
        self.meta = facts.meta
        ph = facts.phases
        self.t0: int = (ph.get("workload", {}).get("invoke") or facts.first_ms
                        or (facts.orders[0].wall_ms if facts.orders else 0))
        self.t0_source = "workload start" if ph.get("workload", {}).get("invoke") else (
            "first operation")
        lo = [x for x in (facts.first_ms, self.t0) if x]
        hi = [x for x in (facts.last_ms, self.t0) if x]
        if facts.orders:
            lo.append(facts.orders[0].wall_ms)
            hi.append(facts.orders[-1].wall_ms)
        x0 = (min(lo) - self.t0) / 1000 if lo else 0.0
        x1 = (max(hi) - self.t0) / 1000 if hi else 1.0
        if x1 - x0 < 1.0:
            x1 = x0 + 1.0
        pad = (x1 - x0) * 0.01
        self.xlim = (x0 - pad, x1 + pad)
        kinds = sorted({w.kind for w in facts.faults})
        self.fault_color = {k: _FAULT_COLORS[i % len(_FAULT_COLORS)] for i, k in enumerate(kinds)}
        self.violations_by_inv: dict[str, list[Violation]] = {
            n: sorted(r.violations, key=lambda v: v.wall_ms) for n, r in verdict.results.items()}

    def s(self, ms: float) -> float:
        return (ms - self.t0) / 1000.0

    def phase_marks(self) -> list[tuple[float, str]]:
        ph = self.facts.phases
        out: list[tuple[float, str]] = []
        span = self.xlim[1] - self.xlim[0]
        for key, typ, label in (("workload", "ok", "workload end"), ("probe", "invoke", "probe")):
            ms = ph.get(key, {}).get(typ)
            if not ms:
                continue
            if out and self.s(ms) - out[-1][0] < span * 0.06:  # too close to label apart
                out[-1] = (out[-1][0], f"{out[-1][1]}, {label}")
            else:
                out.append((self.s(ms), label))
        return out


# -- plots ----------------------------------------------------------------------------------
def _make_plots(ctx: _Ctx, out_dir: Path) -> list[_Plot]:
    specs: list[tuple[str, str, str, Callable[[_Ctx], Any]]] = [
        ("open_positions", "Open positions against the slot limit",
         "Open positions on the exchange after every order (ledger open_count_after), the "
         "desired slots of the regime in force (step line; the strip below shows the "
         "regime), max_positions, and the ledger-visible violations.", _plot_positions),
        ("capital_total", "Capital: open and permitted-not-executed notional",
         "Total open notional (replayed from the ledger) and notional of OPEN permits not yet "
         "executed, stacked, against max_total_notional; per-bucket peaks are kept when "
         "aggregated.", _plot_capital_total),
        ("capital_symbols", "Capital per symbol",
         "The same, per symbol, for the symbols with capital violations and then the most "
         "active ones, against capital x allocation_pct.", _plot_capital_symbols),
        ("exit_locks", "CLOSE permits per symbol (exit-lock holders)",
         "One bar per CLOSE permit, from its decision to its end (order executed, permit "
         "missing, result not executed, or permit expiry: the single_close rule), colored by "
         "governor; overlapping permits are stacked in lanes, each overlap (the single_close "
         "violation) is marked by a red strip under its row, and ticks mark decision + "
         "exit_lock_ttl_ms, when a TTL-based exit lock would have expired.", _plot_exit_locks),
        ("decision_latency", "Decision latency and throughput",
         "Plan stream entry to decision entry (both Redis ms), p50 and p99 per 1-second "
         "bucket, and decisions per second.", _plot_latency),
    ]
    plots = [_Plot(name, title, caption) for name, title, caption, _ in specs]
    try:
        from matplotlib.figure import Figure  # noqa: F401 - availability check
    except ImportError:
        for p in plots:
            p.error = "matplotlib is not installed (pip install 'governor-audit[chaos]')"
        return plots
    out_dir.mkdir(parents=True, exist_ok=True)
    for plot, (_n, _t, _c, fn) in zip(plots, specs, strict=True):
        try:
            fig = fn(ctx)
            buf = io.BytesIO()
            fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
            plot.png = buf.getvalue()
            plot.path = out_dir / f"{plot.name}.png"
            plot.path.write_bytes(plot.png)
        except Exception as exc:  # noqa: BLE001 - one bad plot must not lose the report
            log.exception("plot %s failed", plot.name)
            plot.error = f"plot failed: {type(exc).__name__}: {exc}"
    return plots


def _figure(height: float, nrows: int = 1, ncols: int = 1, **kw: Any) -> tuple[Any, Any]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, height), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, **kw)
    return fig, axes


def _no_data(ax: Any, text: str, keep_y: bool = False) -> None:
    ax.text(0.5, 0.5, f"no data: {text}", transform=ax.transAxes, ha="center", va="center",
            fontsize=12, color="#555555",
            bbox={"facecolor": "white", "alpha": 0.85, "lw": 0})
    if not keep_y:
        ax.set_yticks([])


def _decorate(ax: Any, ctx: _Ctx, names: bool = True, phases: bool = True,
              phase_names: bool = True) -> list[Any]:
    """Shade the fault windows (named above the axes when they fit) and mark run phases.

    Returns legend handles for the fault kinds.
    """
    from matplotlib.patches import Patch

    x0, x1 = ctx.xlim
    span = x1 - x0
    min_w = span * 0.003  # a 50 ms kill on a 60 s axis still shows
    handles = []
    seen: set[str] = set()
    last_label = -math.inf
    for w in ctx.facts.faults:
        a = ctx.s(w.start_ms)
        b = ctx.s(w.stop_ms) if w.stop_ms is not None else x1
        color = ctx.fault_color.get(w.kind, "#cccccc")
        ax.axvspan(a, max(b, a + min_w), color=color, alpha=0.35 if w.ok else 0.15, lw=0,
                   zorder=0)
        # A solid band along the top edge: visible even where data covers the shading.
        ax.axvspan(a, max(b, a + min_w), ymin=0.975, ymax=1.0, color=color, lw=0, zorder=6,
                   alpha=0.95 if w.ok else 0.4)
        if w.kind not in seen:
            seen.add(w.kind)
            handles.append(Patch(color=color, alpha=0.5, label=f"fault: {w.kind}"))
        if names and a - last_label > span * 0.07:
            label = w.kind + ("" if w.ok else " (failed)")
            ax.text(a, 1.0, " " + label, transform=ax.get_xaxis_transform(), rotation=0,
                    ha="left", va="bottom", fontsize=7, color="#444444", clip_on=False)
            last_label = a
    if phases:
        for x, label in ctx.phase_marks():
            ax.axvline(x, color="#888888", lw=0.8, ls=":", zorder=1)
            if phase_names:
                ax.text(x, 0.015, " " + label, transform=ax.get_xaxis_transform(), fontsize=7,
                        color="#555555", ha="left", va="bottom", zorder=6,
                        bbox={"facecolor": "white", "alpha": 0.75, "lw": 0, "pad": 1})
    ax.set_xlim(*ctx.xlim)
    ax.grid(True, axis="both", color="#e5e5e5", lw=0.6)
    ax.set_axisbelow(True)
    return handles


def _title(ax: Any, ctx: _Ctx, main: str, detail: str) -> None:
    """Two lines: what the plot shows; then numbers and the faults. Clear of fault names."""
    sub = "; ".join(x for x in (detail, _fault_note(ctx)) if x)
    ax.set_title(f"{main}\n{sub}", fontsize=10, pad=14, loc="center")


def _legend(ax: Any, handles: list[Any] | None, **kw: Any) -> None:
    """Legends go right of the axes: they never hide data or fault windows."""
    args = {"handles": handles} if handles is not None else {}
    ax.legend(**args, loc="upper left", bbox_to_anchor=(1.005, 1.0), fontsize=8,
              borderaxespad=0, **kw)


def _fault_note(ctx: _Ctx) -> str:
    if not ctx.facts.faults:
        return "no faults"
    c = Counter(w.kind for w in ctx.facts.faults)
    return "faults: " + ", ".join(f"{k} x{n}" for k, n in sorted(c.items()))


def _xlabel(ctx: _Ctx) -> str:
    return f"seconds since {ctx.t0_source}"


def _peaks(xs: Sequence[float], ys: Sequence[float], n: int = MAX_POINTS) -> tuple[Any, Any]:
    """Downsample a step series to about n points, keeping each bucket's min and max."""
    import numpy as np

    x = np.asarray(xs, dtype=float)
    y = np.asarray(ys, dtype=float)
    if len(x) <= n:
        return x, y
    edges = np.linspace(x[0], x[-1], n // 2 + 1)
    idx = np.clip(np.searchsorted(edges, x, side="right") - 1, 0, len(edges) - 2)
    keep = set()
    starts = np.flatnonzero(np.r_[True, idx[1:] != idx[:-1]])
    ends = np.r_[starts[1:], len(x)]
    for s, e in zip(starts, ends, strict=True):
        seg = y[s:e]
        keep.update((s + int(seg.argmin()), s + int(seg.argmax()), e - 1))
    order = np.array(sorted(keep))
    return x[order], y[order]


def _peak_rows(xs: Sequence[float], total: Sequence[float], n: int = MAX_POINTS) -> Any:
    """Indices of a series downsampled to about n points, keeping each bucket's peak total."""
    import numpy as np

    x = np.asarray(xs, dtype=float)
    t = np.asarray(total, dtype=float)
    if len(x) <= n:
        return np.arange(len(x))
    edges = np.linspace(x[0], x[-1], n // 2 + 1)
    idx = np.clip(np.searchsorted(edges, x, side="right") - 1, 0, len(edges) - 2)
    starts = np.flatnonzero(np.r_[True, idx[1:] != idx[:-1]])
    ends = np.r_[starts[1:], len(x)]
    keep = set()
    for s, e in zip(starts, ends, strict=True):
        keep.update((s + int(t[s:e].argmax()), e - 1))
    return np.array(sorted(keep))


# 1. open positions ---------------------------------------------------------------------
def _regime_segments(ctx: _Ctx) -> list[tuple[float, float, set[str]]]:
    f = ctx.facts
    x0, x1 = ctx.xlim
    start_ms = ctx.t0 + x0 * 1000
    points = {start_ms}
    for inv, done, _r, _t in f.regimes:
        points.add(inv)
        if done < 2**61:
            points.add(done)
    pts = sorted(p for p in points if p >= start_ms)
    segs: list[tuple[float, float, set[str]]] = []
    for i, p in enumerate(pts):
        end = pts[i + 1] if i + 1 < len(pts) else ctx.t0 + x1 * 1000
        regimes = f.regime_at(int(p))
        if segs and segs[-1][2] == regimes:
            segs[-1] = (segs[-1][0], ctx.s(end), regimes)
        else:
            segs.append((ctx.s(p), ctx.s(end), regimes))
    return segs


def _plot_positions(ctx: _Ctx) -> Any:
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    f = ctx.facts
    cfg = f.config
    fig, axes = _figure(5.2, 2, 1, sharex=True, gridspec_kw={"height_ratios": [12, 1]})
    ax, strip = axes[0][0], axes[1][0]
    handles = _decorate(ax, ctx)
    segs = _regime_segments(ctx)
    if not f.orders:
        _no_data(ax, "no orders in the ledger", keep_y=True)
    else:
        xs = [ctx.s(f.orders[0].wall_ms)] + [ctx.s(o.wall_ms) for o in f.orders]
        ys = [0] + [o.open_count_after for o in f.orders]
        px, py = _peaks(xs, ys)
        handles.append(ax.step(px, py, where="post", color="#1f4e79", lw=1.3,
                               label="open positions (ledger)")[0])
    # Slot limit of the regime in force: the highest when a flip is in flight.
    sx: list[float] = []
    sy: list[float] = []
    for a, b, regimes in segs:
        limit = max(cfg.slots_for(r) for r in regimes)
        sx += [a, b]
        sy += [limit, limit]
    if sx:
        handles.append(ax.plot(sx, sy, color="#e07b00", lw=1.6, drawstyle="default",
                               label="slot limit of the regime in force")[0])
    handles.append(ax.axhline(cfg.max_positions, color="#c00000", ls="--", lw=1.2,
                              label=f"max_positions = {cfg.max_positions}"))
    if f.regimes and len(f.regimes) <= 80:
        for inv, _done, _r, _t in f.regimes:
            ax.axvline(ctx.s(inv), color="#e07b00", lw=0.6, ls=(0, (2, 3)), alpha=0.7)
        handles.append(Line2D([], [], color="#e07b00", lw=0.6, ls=(0, (2, 3)),
                              label=f"regime flip ({len(f.regimes)})"))
    markers = {"slots": ("x", "#d00000", "slots violation"),
               "one_position_per_symbol": ("v", "#7b2cbf", "double open"),
               "single_close": ("D", "#8c510a", "close on a flat symbol (flip)")}
    for inv, (marker, color, label) in markers.items():
        pts = []
        for v in ctx.violations_by_inv.get(inv, ()):
            # The violating order is the last order among a violation's events (the others
            # are the orders that explain it: the close that made the symbol flat...).
            orders = [e for e in v.events if e.get("what") == "order"
                      and e.get("open_count_after") is not None]
            if inv == "single_close":
                if v.observed != "CLOSE on a flat symbol":
                    continue
                orders = [e for e in orders if e.get("effect") == "flip"
                          and e.get("plan_id") == v.plan_ids[-1]]
            o = orders[-1] if orders else None
            if o is None:
                continue
            pts.append((ctx.s(int(o.get("wall_ms") or v.wall_ms)), int(o["open_count_after"])))
        if pts:
            handles.append(ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker=marker,
                                      s=22 if marker != "D" else 12, color=color, zorder=5,
                                      lw=1.0, label=f"{label} ({len(pts)})"))
    peak_open = max([o.open_count_after for o in f.orders] + [0])
    peak = max(peak_open, cfg.max_positions)
    ax.set_ylim(0, peak * 1.1 + 1)
    if f.orders:
        from matplotlib.ticker import MaxNLocator

        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("open positions")
    _title(ax, ctx, "Open positions vs the slot limit of the regime in force",
           f"peak {peak_open} open; slots {cfg.slots_BASE}/{cfg.slots_TREND_STRONG}/"
           f"{cfg.slots_CHOP} (BASE/TREND_STRONG/CHOP), max_positions {cfg.max_positions}")
    # Regime strip: one colour per regime, named where the segment is wide enough.
    span = ctx.xlim[1] - ctx.xlim[0]
    seen: dict[str, str] = {}
    for a, b, regimes in segs:
        name = "/".join(sorted(regimes))
        short = "/".join(_SHORT_REGIME.get(r, r) for r in sorted(regimes))
        color = _REGIME_COLORS.get(name, "#dddddd") if len(regimes) == 1 else "#bbbbbb"
        limit = max(cfg.slots_for(r) for r in regimes)
        seen.setdefault(f"{name}: {limit} slots" if len(regimes) == 1
                        else "flip in flight: either regime", color)
        strip.axvspan(a, b, color=color, lw=0)
        w = (b - a) / span
        label = f"{name} ({limit})" if w > 0.1 else (f"{short} {limit}" if w > 0.05
                                                     else str(limit))
        if w > 0.012:
            strip.text((a + b) / 2, 0.5, label, ha="center", va="center", fontsize=7,
                       transform=strip.get_xaxis_transform(), clip_on=True)
    if f.regimes:
        handles += [Patch(color=c, label=f"regime {n}") for n, c in seen.items()]
    _legend(ax, handles)
    strip.set_yticks([])
    strip.set_ylabel("regime", rotation=0, ha="right", va="center", fontsize=8)
    strip.set_xlim(*ctx.xlim)
    strip.set_xlabel(_xlabel(ctx))
    return fig


# 2. capital -----------------------------------------------------------------------------
def _capital_replay(ctx: _Ctx, symbols: Iterable[str]) -> tuple[
        list[tuple[float, float, float]], dict[str, list[tuple[float, float, float]]]]:
    """Replay OPEN permits and orders as check_capital does.

    Returns the total series [(s, open, pending)] and the same per requested symbol.
    """
    f = ctx.facts
    cfg = f.config
    wanted = set(symbols)
    opens_exec = {o.plan_id: o for o in f.orders if o.action == "OPEN" and o.executed}
    events: list[tuple[int, int, str, Any]] = []
    for pid, ds in f.decisions.items():
        d = next((x for x in ds if x.decision == "PERMIT" and x.action == "OPEN"), None)
        if d is None:
            continue
        notional = f.notional(pid)
        if notional is None:
            continue
        o = opens_exec.get(pid)
        fails = f.failed_takes(pid)
        end = o.wall_ms if o else (min(fails) if fails else d.entry_ms + cfg.permit_ttl_ms)
        events.append((d.entry_ms, 0, "permit", (pid, d.symbol, notional)))
        events.append((max(end, d.entry_ms), 1, "settle", pid))
    for o in f.orders:
        events.append((o.wall_ms, 2, "order", o))
    events.sort(key=lambda e: (e[0], e[1]))
    pending: dict[str, tuple[str, float]] = {}
    open_n: dict[str, float] = defaultdict(float)
    pend_sym: dict[str, float] = defaultdict(float)
    open_total = 0.0
    pend_total = 0.0
    total: list[tuple[float, float, float]] = []
    per: dict[str, list[tuple[float, float, float]]] = {s: [] for s in wanted}
    for ms, _k, kind, x in events:
        sym = None
        if kind == "permit":
            pid, sym, notional = x
            if pid in pending:
                continue
            pending[pid] = (sym, notional)
            pend_total += notional
            pend_sym[sym] += notional
        elif kind == "settle":
            if x not in pending:
                continue
            sym, n = pending.pop(x)
            pend_total -= n
            pend_sym[sym] -= n
        else:
            o = x
            sym = o.symbol
            if o.plan_id in pending:
                s2, n = pending.pop(o.plan_id)
                pend_total -= n
                pend_sym[s2] -= n
            if o.executed:
                before = open_n[o.symbol]
                if o.action == "OPEN":
                    open_n[o.symbol] += o.notional
                elif o.effect == "close":
                    open_n[o.symbol] = 0.0
                elif o.effect == "flip":
                    open_n[o.symbol] = o.notional
                open_total += open_n[o.symbol] - before
        t = ctx.s(ms)
        total.append((t, max(open_total, 0.0), max(pend_total, 0.0)))
        if sym in per:
            per[sym].append((t, open_n[sym], max(pend_sym[sym], 0.0)))
    return total, per


def _stacked(ax: Any, series: list[tuple[float, float, float]], ctx: _Ctx,
             labels: bool = True) -> tuple[list[Any], float]:
    import numpy as np

    if not series:
        return [], 0.0
    start = ctx.xlim[0]
    arr = np.array([(start, 0.0, 0.0)] + series + [(ctx.xlim[1], series[-1][1],
                                                     series[-1][2])])
    keep = _peak_rows(arr[:, 0], arr[:, 1] + arr[:, 2])
    arr = arr[keep]
    x, o, p = arr[:, 0], arr[:, 1], arr[:, 2]
    h1 = ax.fill_between(x, 0, o, step="post", color="#4c78a8", alpha=0.75, lw=0,
                         label="open notional" if labels else None)
    h2 = ax.fill_between(x, o, o + p, step="post", color="#e07b00", alpha=0.85, lw=0,
                         label="permitted, not yet executed" if labels else None)
    return [h1, h2], float((o + p).max()) if len(o) else 0.0


def _bound_line(ax: Any, value: float, peak: float, label: str, color: str = "#c00000") -> Any:
    """Draw a limit as a line if it is on the data's scale; else only a legend entry saying
    it is off scale (a limit 50x above the data would flatten the data to nothing)."""
    from matplotlib.lines import Line2D

    if value <= 0:
        return None
    if peak > 0 and value > peak * 3:
        return Line2D([], [], color=color, ls="--", lw=1.2, label=f"{label} (off scale)")
    return ax.axhline(value, color=color, ls="--", lw=1.2, label=label)


def _capital_kind(v: Violation) -> str:
    if "per trade" in v.expected:
        return "trade"
    if "allocation" in v.expected:
        return "symbol"
    return "total"


def _float(s: str) -> float | None:
    try:
        return float(str(s).split()[0].replace(",", ""))
    except (ValueError, IndexError):
        return None


def _plot_capital_total(ctx: _Ctx) -> Any:
    f = ctx.facts
    cfg = f.config
    fig, axes = _figure(4.6)
    ax = axes[0][0]
    handles = _decorate(ax, ctx)
    total, _ = _capital_replay(ctx, ())
    hs, peak = _stacked(ax, total, ctx)
    if not total:
        _no_data(ax, "no OPEN permits or orders")
    handles = hs + handles
    cap = _bound_line(ax, cfg.max_total_notional, peak,
                      f"max_total_notional = {cfg.max_total_notional:,.0f}")
    if cap is not None:
        handles.append(cap)
    vs = [v for v in ctx.violations_by_inv.get("capital", ()) if _capital_kind(v) == "total"]
    pts = [(ctx.s(v.wall_ms), _float(v.observed)) for v in vs]
    pts = [(x, y) for x, y in pts if y is not None]
    if pts:
        handles.append(ax.scatter(*zip(*pts, strict=True), marker="x", color="#d00000", s=22,
                                  zorder=5, label=f"total cap violation ({len(pts)})"))
    trade = [v for v in ctx.violations_by_inv.get("capital", ()) if _capital_kind(v) == "trade"]
    if trade:
        handles.append(ax.scatter([ctx.s(v.wall_ms) for v in trade], [0] * len(trade),
                                  marker="^", color="#d00000", s=30, zorder=5, clip_on=False,
                                  label=f"per-trade cap violation ({len(trade)})"))
    ax.set_ylim(bottom=0)
    ax.set_ylabel("notional (USD)")
    ax.set_xlabel(_xlabel(ctx))
    _title(ax, ctx, "Open + permitted-not-executed notional, all symbols",
           f"peak {peak:,.0f} USD; max_total_notional {cfg.max_total_notional:,.0f}")
    if handles:
        _legend(ax, handles)
    return fig


def _plot_capital_symbols(ctx: _Ctx) -> Any:
    f = ctx.facts
    cfg = f.config
    cap_vs = [v for v in ctx.violations_by_inv.get("capital", ()) if v.symbol]
    by_sym_v = Counter(v.symbol for v in cap_vs)
    activity: Counter[str] = Counter(o.symbol for o in f.orders)
    for ds in f.decisions.values():
        d = ds[0]
        if d.decision == "PERMIT":
            activity[d.symbol] += 1
    ranked = sorted(set(activity) | set(by_sym_v),
                    key=lambda s: (-by_sym_v.get(s, 0), -activity.get(s, 0), s))
    chosen = ranked[:MAX_SYMBOL_PANELS]
    if not chosen:
        fig, axes = _figure(3.2)
        ax = axes[0][0]
        _decorate(ax, ctx)
        _no_data(ax, "no OPEN permits or orders")
        ax.set_xlabel(_xlabel(ctx))
        _title(ax, ctx, "Open + permitted-not-executed notional per symbol", "")
        return fig
    ncols = 2 if len(chosen) > 1 else 1
    nrows = math.ceil(len(chosen) / ncols)
    fig, axes = _figure(2.3 * nrows + 0.9, nrows, ncols, sharex=True)
    _, per = _capital_replay(ctx, chosen)
    enforce = cfg.enforce_allocation != 0 or cfg.mode == "production"
    alloc_cap = f.capital * f.allocation_pct if enforce else 0.0
    handles: list[Any] = []
    for i, sym in enumerate(chosen):
        ax = axes[i // ncols][i % ncols]
        fh = _decorate(ax, ctx, names=False, phases=False)
        hs, peak = _stacked(ax, per.get(sym, []), ctx, labels=(i == 0))
        line = _bound_line(ax, alloc_cap, peak, f"capital x allocation_pct = {alloc_cap:,.0f}")
        pts = [(ctx.s(v.wall_ms), _float(v.observed)) for v in cap_vs
               if v.symbol == sym and _capital_kind(v) == "symbol"]
        pts = [(x, y) for x, y in pts if y is not None]
        if pts:
            sc = ax.scatter(*zip(*pts, strict=True), marker="x", color="#d00000", s=22, zorder=5,
                            label="allocation violation")
            if not any(h.get_label() == "allocation violation" for h in handles):
                handles.append(sc)
        if i == 0:
            handles = hs + handles
        for h in ([line] if line is not None else []) + fh:
            if h.get_label() not in {x.get_label() for x in handles}:
                handles.append(h)
        ax.set_ylim(bottom=0)
        n = by_sym_v.get(sym, 0)
        ax.set_title(f"{sym}" + (f"  ({n} capital violations)" if n else
                                 f"  ({activity.get(sym, 0)} permits + orders)"),
                     fontsize=9)
        ax.tick_params(labelsize=8)
        if i % ncols == 0:
            ax.set_ylabel("USD", fontsize=8)
    for j in range(len(chosen), nrows * ncols):
        axes[j // ncols][j % ncols].set_visible(False)
    for c in range(ncols):
        axes[nrows - 1][c].set_xlabel(_xlabel(ctx), fontsize=8)
    if len(chosen) % ncols and nrows > 1:
        axes[nrows - 2][ncols - 1].xaxis.set_tick_params(labelbottom=True)
    total_syms = len(ranked)
    why = "with capital violations first, then most active" if by_sym_v else "most active"
    fig.suptitle(f"Open + permitted-not-executed notional per symbol\n{len(chosen)} of "
                 f"{total_syms} symbols shown ({why}); {_fault_note(ctx)}", fontsize=10)
    if handles:
        fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 5),
                   fontsize=8)
    return fig


# 3. exit locks ---------------------------------------------------------------------------
@dataclass
class _Span:
    symbol: str
    start: int
    end: int
    governor: str
    lapsed: bool
    plan_id: str


def _close_spans(f: Facts) -> list[_Span]:
    """CLOSE permits from decision to end: the rule of check_single_close."""
    return [_Span(d.symbol, d.entry_ms, end, d.governor or "?", lapsed, d.plan_id)
            for d, end, lapsed in f.close_permit_spans()]


def _plot_exit_locks(ctx: _Ctx) -> Any:
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    f = ctx.facts
    spans = _close_spans(f)
    by_sym: dict[str, list[_Span]] = defaultdict(list)
    for sp in spans:
        by_sym[sp.symbol].append(sp)
    viol = Counter(v.symbol for v in ctx.violations_by_inv.get("single_close", ()) if v.symbol)
    ranked = sorted(by_sym, key=lambda s: (-viol.get(s, 0), -len(by_sym[s]), s))
    rows = ranked[:MAX_GANTT_ROWS]
    fig, axes = _figure(max(3.2, 0.32 * len(rows) + 2.0))
    ax = axes[0][0]
    handles = _decorate(ax, ctx)
    if not rows:
        _no_data(ax, "no CLOSE permits in this run")
        ax.set_xlabel(_xlabel(ctx))
        _title(ax, ctx, "CLOSE permits per symbol (exit-lock holders)", "")
        if handles:
            _legend(ax, handles)
        return fig
    govs = sorted({sp.governor for sym in rows for sp in by_sym[sym]})
    gcolor = {g: _GOV_COLORS[i % len(_GOV_COLORS)] for i, g in enumerate(govs)}
    bars: dict[bool, dict[str, list[Any]]] = {
        lapsed: {"y": [], "left": [], "width": [], "h": [], "color": []}
        for lapsed in (False, True)}
    over_y, over_l, over_w = [], [], []
    ticks_x, ticks_y = [], []
    min_w = (ctx.xlim[1] - ctx.xlim[0]) * 0.002
    lock_ttl = f.config.exit_lock_ttl_ms
    labels = []
    n_over = 0
    # Row band: permits in [row - 0.42, row + 0.2], overlaps as a red strip below them.
    band_lo, band_h = -0.42, 0.62
    for row, sym in enumerate(rows):
        sps = sorted(by_sym[sym], key=lambda s: s.start)
        lane_end: list[int] = []
        lanes = []
        for sp in sps:  # greedy interval colouring: overlapping permits go to new lanes
            for i, e in enumerate(lane_end):
                if sp.start >= e:
                    lane_end[i] = sp.end
                    lanes.append(i)
                    break
            else:
                lane_end.append(sp.end)
                lanes.append(len(lane_end) - 1)
        n_lanes = min(len(lane_end), 3)
        h = band_h / n_lanes
        for sp, lane in zip(sps, lanes, strict=True):
            b = bars[sp.lapsed]
            b["y"].append(row + band_lo + h * (lane % n_lanes) + h / 2)
            b["left"].append(ctx.s(sp.start))
            b["width"].append(max((sp.end - sp.start) / 1000, min_w))
            b["h"].append(h * 0.9)
            b["color"].append(gcolor[sp.governor])
            ticks_x.append(ctx.s(sp.start + lock_ttl))
            ticks_y.append(row + band_lo + band_h / 2)
        sym_over = 0
        for a, b2 in zip(sps, sps[1:], strict=False):  # the checker's pairs
            if b2.start < a.end:
                sym_over += 1
                over_y.append(row + 0.32)
                over_l.append(ctx.s(b2.start))
                over_w.append(max((min(a.end, b2.end) - b2.start) / 1000, min_w))
        n_over += sym_over
        conc = _max_concurrent(sps)
        labels.append(f"{sym} ({len(sps)}" + (f", {conc} at once)" if conc > 1 else ")"))
    for lapsed, b in bars.items():
        if b["y"]:
            _rects(ax, b["left"], b["width"], b["y"], b["h"], b["color"],
                   alpha=0.45 if lapsed else 0.85, hatch="////" if lapsed else None,
                   edgecolor="#333333" if lapsed else "none", lw=0.3, zorder=3)
    if over_y:
        _rects(ax, over_l, over_w, over_y, [0.2] * len(over_y), "#e00000", alpha=0.9,
               lw=0, zorder=4)
    ax.scatter(ticks_x, ticks_y, marker="|", s=40, color="#555555", alpha=0.6, lw=0.8,
               zorder=5)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels(labels, fontsize=8 if len(rows) <= 15 else 7)
    ax.set_ylim(len(rows) - 0.5, -0.75)  # headroom for the fault bands along the top
    ax.set_xlabel(_xlabel(ctx))
    legend = [Patch(color=gcolor[g], label=f"permit by {g}") for g in govs]
    if bars[True]["y"]:
        legend.append(Patch(facecolor="#bbbbbb", hatch="////", edgecolor="#333333",
                            label="never executed: held until permit TTL"))
    if over_y:
        legend.append(Patch(color="#e00000", label=f"overlapping CLOSE permits ({n_over})"))
    legend.append(Line2D([], [], marker="|", ls="", color="#555555", markersize=7,
                         label=f"exit-lock TTL expiry (+{lock_ttl} ms)"))
    ax.legend(handles=legend + handles, loc="upper left", bbox_to_anchor=(1.005, 1.0),
              fontsize=8, borderaxespad=0, title_fontsize=8, alignment="left",
              title="rows: symbol (CLOSE permits,\nmost outstanding at once);\n"
                    "overlapping permits are\ndrawn in up to 3 lanes")
    order = ("most single_close violations, then most CLOSE permits" if viol
             else "most CLOSE permits")
    shown = (f"{len(rows)} of {len(by_sym)} symbols shown ({order})" if len(by_sym) > len(rows)
             else f"all {len(rows)} symbols")
    _title(ax, ctx, "CLOSE permits per symbol (exit-lock holders)",
           f"{len(spans)} permits; {shown}")
    return fig


def _rects(ax: Any, left: Sequence[float], width: Sequence[float], yc: Sequence[float],
           h: Sequence[float], color: Any, **kw: Any) -> None:
    """Many rectangles as one collection (barh makes one artist per bar: slow)."""
    import numpy as np
    from matplotlib.collections import PolyCollection

    x0 = np.asarray(left, dtype=float)
    x1 = x0 + np.asarray(width, dtype=float)
    y = np.asarray(yc, dtype=float)
    hh = np.asarray(h, dtype=float) / 2
    verts = np.stack([np.stack([x0, y - hh], 1), np.stack([x0, y + hh], 1),
                      np.stack([x1, y + hh], 1), np.stack([x1, y - hh], 1)], 1)
    kw.setdefault("edgecolor", "none")
    ax.add_collection(PolyCollection(verts, facecolors=color, **kw))


def _max_concurrent(spans: Sequence[_Span]) -> int:
    events = sorted([(s.start, 1) for s in spans] + [(s.end, -1) for s in spans],
                    key=lambda e: (e[0], e[1]))
    cur = best = 0
    for _t, d in events:
        cur += d
        best = max(best, cur)
    return best


# 4. latency ------------------------------------------------------------------------------
def _plot_latency(ctx: _Ctx) -> Any:
    import numpy as np

    f = ctx.facts
    fig, axes = _figure(5.4, 2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 2]})
    ax, tp = axes[0][0], axes[1][0]
    handles = _decorate(ax, ctx)
    _decorate(tp, ctx, names=False, phase_names=False)
    lat_t: list[float] = []
    lat_v: list[float] = []
    dec_t: list[float] = []
    dec_permit: list[bool] = []
    overall = ""
    width = 1
    for pid, ds in f.decisions.items():
        for d in ds:
            dec_t.append(ctx.s(d.entry_ms))
            dec_permit.append(d.decision == "PERMIT")
        entry = f.plans.get(pid)
        if entry and ds:
            lat_t.append(ctx.s(ds[0].entry_ms))
            lat_v.append(ds[0].entry_ms - entry.entry_ms)
    if not dec_t:
        _no_data(ax, "no decisions recorded")
        _no_data(tp, "no decisions recorded")
    else:
        t = np.asarray(dec_t)
        # 1 s buckets; wider on a very long run, so the plot keeps at most ~3600 of them.
        width = max(1, math.ceil((t.max() - t.min()) / 3600))
        b = np.floor(t / width).astype(int)
        lo, hi = int(b.min()), int(b.max())
        edges = np.arange(lo, hi + 2) * width
        permits = np.asarray(dec_permit)
        n_p, _ = np.histogram(t[permits], bins=edges)
        n_b, _ = np.histogram(t[~permits], bins=edges)
        tp.bar(edges[:-1], n_p / width, width=width, align="edge", color="#2a9d8f",
               label="PERMIT", zorder=3)
        tp.bar(edges[:-1], n_b / width, width=width, align="edge", bottom=n_p / width,
               color="#adb5bd", label="BLOCK", zorder=3)
        _legend(tp, None)
        if lat_v:
            lt = np.asarray(lat_t)
            lv = np.maximum(np.asarray(lat_v, dtype=float), 0.0)
            lb = np.floor(lt / width).astype(int)
            order = np.argsort(lb, kind="stable")
            lb, lv = lb[order], lv[order]
            keys, starts = np.unique(lb, return_index=True)
            groups = np.split(lv, starts[1:])
            xs = (np.arange(lo, hi + 1) + 0.5) * width
            p50 = np.full(len(xs), np.nan)
            p99 = np.full(len(xs), np.nan)
            mx = np.full(len(xs), np.nan)
            for k, g in zip(keys, groups, strict=True):
                p50[k - lo] = np.percentile(g, 50)
                p99[k - lo] = np.percentile(g, 99)
                mx[k - lo] = g.max()
            floor = 0.5
            handles = [
                ax.plot(xs, np.maximum(p99, floor), color="#d62728", marker=".", ms=4, lw=1.3,
                        label="p99")[0],
                ax.plot(xs, np.maximum(p50, floor), color="#1f77b4", marker=".", ms=4, lw=1.3,
                        label="p50")[0],
                ax.scatter(xs, np.maximum(mx, floor), marker="_", color="#d62728", alpha=0.5,
                           s=30, label="max"),
            ] + handles
            top = np.nanmax(mx) if np.isfinite(mx).any() else 1.0
            if top / max(np.nanmedian(p50) if np.isfinite(p50).any() else 1.0, floor) > 30:
                ax.set_yscale("log")
                ax.set_ylim(bottom=floor)
            else:
                ax.set_ylim(bottom=0, top=top * 1.15 + 1)
            overall = (f"overall p50 {np.percentile(lv, 50):.0f} ms, p99 "
                       f"{np.percentile(lv, 99):.0f} ms, max {lv.max():.0f} ms")
        else:
            _no_data(ax, "no plan entries matched to decisions")
    ax.set_ylabel("plan -> decision (ms)")
    tp.set_ylabel("decisions / s")
    tp.set_xlabel(_xlabel(ctx))
    _title(ax, ctx, f"Decision latency (plan entry -> decision entry) per {width} s bucket",
           f"{len(dec_t)} decisions, {len(lat_v)} plans timed" + (f"; {overall}" if overall
                                                                   else ""))
    if handles:
        _legend(ax, handles)
    return fig


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


def _header_rows(ctx: _Ctx) -> list[tuple[str, str]]:
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
        ("time 0", f"{ctx.t0_source}, {_iso(ctx.t0)}: every time in this report is "
                   f"seconds since then"),
        ("harness started", _rel(m.get("started_wall_ms") or f.first_ms, ctx.t0)),
        ("history", f"{f.ops} operations, {len(f.orders)} ledger orders, "
                    f"{sum(len(x) for x in f.decisions.values())} decisions, "
                    f"{len(f.plans)} plans"),
        ("faults", _fault_note(ctx).removeprefix("faults: ")),
        ("regime flips", str(len(f.regimes))),
    ]
    if probe:
        ok_c = sum(x == "PERMIT" for x in (probe.get("closes") or {}).values())
        ok_o = sum(x == "PERMIT" for x in (probe.get("opens") or {}).values())
        rows.append(("liveness probe", f"{ok_c}/{len(probe.get('closes') or {})} closes, "
                                       f"{ok_o}/{len(probe.get('opens') or {})} opens permitted"))
    lead = (ctx.t0 - f.first_ms) / 1000 if f.first_ms else 0.0
    if lead > 5:
        rows.append(("note", f"the history starts {lead:.1f} s before the workload start "
                             f"(operations of an earlier attempt in this directory?)"))
    if f.stream_resets:
        rows.append(("stream resets", f"{f.stream_resets} (Redis lost data)"))
    rows.append(("run directory", str(f.run_dir)))
    return rows


def _import_header_rows(ctx: _Ctx) -> list[tuple[str, str]]:
    """The header of an imported history: where it came from, its window, its caveats."""
    m, f = ctx.meta, ctx.facts
    w = m.get("window") or {}
    span = (f"{_rel(w.get('first_entry_ms'), ctx.t0)} to {_rel(w.get('last_entry_ms'), ctx.t0)}"
            if w.get("first_entry_ms") else "?")
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
        ("time 0", f"{ctx.t0_source}, {_iso(ctx.t0)}: every time in this report is "
                   f"seconds since then"),
    ]
    diff = m.get("mirror_vs_replay") or {}
    if any(diff.values()):
        rows.append(("mirror vs replay", ", ".join(f"{k}: {v}" for k, v in diff.items() if v)))
    rows += [("caveat", c) for c in m.get("caveats") or ()]
    rows.append(("run directory", str(f.run_dir)))
    return rows


def _verdict_rows(ctx: _Ctx) -> list[tuple[str, str, int, str]]:
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
            note = f"first at {_rel(vs[0].wall_ms, ctx.t0)}; {_faults_breakdown(vs)}"
        elif r.stats and not note:
            note = ", ".join(f"{k} {v}" for k, v in r.stats.items())
        rows.append((name, _VALID_WORD[r.valid], len(r.violations), note))
    return rows


def _model_rows(ctx: _Ctx) -> list[tuple[str, str, int, str]]:
    """The sequential-model checks, when the verdict carries them (a second opinion)."""
    models = getattr(ctx.verdict, "models", None) or {}
    rows = []
    for name, r in models.items():
        note = r.note or (f"first at {_rel(r.violations[0].wall_ms, ctx.t0)}"
                          if r.violations else "")
        rows.append((name, _VALID_WORD.get(r.valid, str(r.valid)), len(r.violations),
                     _humanize(note, ctx.t0)))
    return rows


def _coverage_rows(ctx: _Ctx) -> list[tuple[str, str]]:
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


def _fault_rows(ctx: _Ctx, limit: int = 30) -> list[tuple[str, ...]]:
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


_EPOCH_MS = re.compile(r"1\d{12}")
# A word as plan ids, position ids and stream ids are spelled (docs/protocol.md): a time is
# rewritten only when it is such a word on its own, never a part of one
# (``probe-open-1796228189697-0`` stays as it is).
_ID_WORD = re.compile(r"[A-Za-z0-9_.:-]+")


def _humanize(text: str, t0: int) -> str:
    """Epoch milliseconds standing alone in a checker's message, as seconds since time 0."""
    if not t0:
        return text

    def sub(m: re.Match[str]) -> str:
        word = m.group(0)
        core = word.rstrip(".:")  # the end of a sentence or a clause
        if not _EPOCH_MS.fullmatch(core):
            return word
        ms = int(core)
        if abs(ms - t0) >= 7 * 86_400_000:
            return word
        return f"t={(ms - t0) / 1000:+.3f} s{word[len(core):]}"

    return _ID_WORD.sub(sub, text)


def _violation_fields(v: Violation, t0: int) -> list[tuple[str, str]]:
    return [("time", _rel(v.wall_ms, t0)),
            ("symbol", v.symbol or "—"),
            ("plans", ", ".join(v.plan_ids) or "—"),
            ("expected", v.expected),
            ("observed", v.observed),
            ("faults active", ", ".join(v.faults) if v.faults else "none")]


def _plan_sources(ctx: _Ctx, v: Violation) -> str:
    src = []
    for pid in v.plan_ids:
        e = ctx.facts.plans.get(pid)
        s = e.source if e else None
        if s:
            src.append(f"{pid}: {s}")
    return ", ".join(src)


# markdown
def _md_cell(x: Any) -> str:
    return str(x).replace("|", "\\|").replace("\n", " ")


def _md_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    out = ["| " + " | ".join(_md_cell(h) for h in header) + " |",
           "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(_md_cell(c) for c in r) + " |" for r in rows]
    return out


def _governor_findings(ctx: _Ctx) -> list[dict[str, Any]]:
    """Instances that kept dying (from the history, so a stored run shows them too)."""
    from chaos.governor_findings import governor_findings

    return governor_findings(ctx.facts.governor_events)


_FINDINGS_INTRO = ("Instances that exited without being asked to (or were never seen reading "
                   "the plan stream). A restarted instance keeps "
                   "its consumer name and is handed its pending entries again: the entry "
                   "with the highest delivery count is the likely poison pill (fields shown "
                   "as stored; bytes that are not UTF-8 as \\xNN).")


def _governor_findings_md(ctx: _Ctx) -> list[str]:
    from chaos.governor_findings import describe

    found = _governor_findings(ctx)
    if not found:
        return []
    return ["## Governor findings", "", _FINDINGS_INTRO, ""] + [
        f"- {_md_cell(describe(f))}" for f in found] + [""]


def _governor_findings_html(ctx: _Ctx) -> list[str]:
    from chaos.governor_findings import describe

    found = _governor_findings(ctx)
    if not found:
        return []
    return ["<h2>Governor findings</h2>", f"<p>{_h(_FINDINGS_INTRO)}</p>",
            "<ul>" + "".join(f"<li><code>{_h(describe(f))}</code></li>" for f in found)
            + "</ul>"]


def _render_markdown(ctx: _Ctx, plots: list[_Plot]) -> str:
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
            L += [f"**{i}. {_humanize(v.message, ctx.t0)}**", ""]
            fields = _violation_fields(v, ctx.t0)
            srcs = _plan_sources(ctx, v)
            if srcs:
                fields.insert(3, ("plan sources", srcs))
            L += [f"- {k}: {_md_cell(x)}" for k, x in fields] + [""]
            if v.events:
                header, rows = _event_table(v, ctx.t0)
                L += _md_table(header, rows)
                if len(v.events) > MAX_EVENTS_SHOWN:
                    L.append(f"\n... {len(v.events) - MAX_EVENTS_SHOWN} more events")
                L.append("")
    if not any_v:
        L += ["No violations.", ""]
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


def _render_html(ctx: _Ctx, plots: list[_Plot]) -> str:
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
            fields = _violation_fields(v, ctx.t0)
            srcs = _plan_sources(ctx, v)
            if srcs:
                fields.insert(3, ("plan sources", srcs))
            B.append('<div class="viol">')
            B.append(f'<div class="msg">{i}. {_h(_humanize(v.message, ctx.t0))}</div><ul>'
                     + "".join(f"<li>{_h(k)}: {_h(x)}</li>" for k, x in fields) + "</ul>")
            if v.events:
                header, rows = _event_table(v, ctx.t0)
                B.append(_html_table(header, rows))
                if len(v.events) > MAX_EVENTS_SHOWN:
                    B.append(f'<p class="more">... {len(v.events) - MAX_EVENTS_SHOWN} more '
                             f"events</p>")
            B.append("</div>")
        B.append("</details>")
    if not any_v:
        B.append("<p>No violations.</p>")
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

"""The plots of a run, drawn from its frames (:class:`chaos.analysis.RunFrames`).

Every function takes a RunFrames and returns a matplotlib ``Figure`` (no pyplot: no
global state, no display needed); ``chaos.report`` saves the same figures as PNG, a
notebook shows them inline. The x axis is always seconds since the run's time 0, every
time axis shades the fault windows and names them (:func:`shade_faults`), and series are
aggregated to about ``MAX_POINTS`` points (each bucket's peaks kept), so a run of a
million operations draws in seconds and no plot has a marker per operation.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from chaos.analysis.frames import RunFrames, fault_note
from chaos.checkers import Violation

__all__ = ["MAX_POINTS", "block_reasons_over_time", "capital", "capital_symbols",
           "decisions_by_reason", "exit_locks", "fault_note", "latency", "positions",
           "shade_faults", "slot_leases"]

MAX_GANTT_ROWS = 25
MAX_SYMBOL_PANELS = 6
MAX_POINTS = 3000  # per drawn series, after aggregation
MAX_REASONS = 8  # BLOCK reasons drawn apart; the rest as "other"

FAULT_COLORS = ("#c77dff", "#f28482", "#80ced7", "#e9c46a", "#95d5b2", "#b08968",
                "#ffafcc", "#a3a380", "#9d8189", "#8d99ae")  # shading: pale at alpha 0.35
GOV_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2",
              "#17becf", "#bcbd22", "#7f7f7f", "#d62728")
REGIME_COLORS = {"BASE": "#cfd8e3", "TREND_STRONG": "#b7e4c7", "CHOP": "#ffd6a5"}
SHORT_REGIME = {"BASE": "BASE", "TREND_STRONG": "TREND", "CHOP": "CHOP"}
REASON_COLORS = ("#adb5bd", "#e76f51", "#f4a261", "#e9c46a", "#8ab17d", "#6d597a",
                 "#b56576", "#457b9d", "#a8dadc")


# -- shared decoration --------------------------------------------------------------------
def figure(height: float, nrows: int = 1, ncols: int = 1, **kw: Any) -> tuple[Figure, Any]:
    fig = Figure(figsize=(12, height), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, **kw)
    return fig, axes


def no_data(ax: Any, text: str, keep_y: bool = False) -> None:
    ax.text(0.5, 0.5, f"no data: {text}", transform=ax.transAxes, ha="center", va="center",
            fontsize=12, color="#555555", bbox={"facecolor": "white", "alpha": 0.85, "lw": 0})
    if not keep_y:
        ax.set_yticks([])


def fault_colors(run: RunFrames) -> dict[str, str]:
    kinds = sorted({w.kind for w in run.facts.faults})
    return {k: FAULT_COLORS[i % len(FAULT_COLORS)] for i, k in enumerate(kinds)}


def shade_faults(ax: Any, run: RunFrames, names: bool = True, phases: bool = True,
                 phase_names: bool = True) -> list[Any]:
    """Shade the fault windows (named above the axes when they fit) and mark run phases;
    sets the x range to the run's. Returns legend handles for the fault kinds."""
    from matplotlib.patches import Patch

    x0, x1 = run.xlim
    span = x1 - x0
    min_w = span * 0.003  # a 50 ms kill on a 60 s axis still shows
    colors = fault_colors(run)
    handles = []
    seen: set[str] = set()
    last_label = -math.inf
    for w in run.facts.faults:
        a = run.s(w.start_ms)
        b = run.s(w.stop_ms) if w.stop_ms is not None else x1
        color = colors.get(w.kind, "#cccccc")
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
        for x, label in run.phase_marks():
            ax.axvline(x, color="#888888", lw=0.8, ls=":", zorder=1)
            if phase_names:
                ax.text(x, 0.015, " " + label, transform=ax.get_xaxis_transform(), fontsize=7,
                        color="#555555", ha="left", va="bottom", zorder=6,
                        bbox={"facecolor": "white", "alpha": 0.75, "lw": 0, "pad": 1})
    ax.set_xlim(*run.xlim)
    ax.grid(True, axis="both", color="#e5e5e5", lw=0.6)
    ax.set_axisbelow(True)
    return handles


def title(ax: Any, run: RunFrames, main: str, detail: str) -> None:
    """Two lines: what the plot shows; then numbers and the faults. Clear of fault names."""
    sub = "; ".join(x for x in (detail, fault_note(run)) if x)
    ax.set_title(f"{main}\n{sub}", fontsize=10, pad=14, loc="center")


def legend(ax: Any, handles: list[Any] | None, **kw: Any) -> None:
    """Legends go right of the axes: they never hide data or fault windows."""
    args = {"handles": handles} if handles is not None else {}
    ax.legend(**args, loc="upper left", bbox_to_anchor=(1.005, 1.0), fontsize=8,
              borderaxespad=0, **kw)


def _buckets(x: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Start and end (exclusive) of the runs of points falling in each of n/2 buckets."""
    edges = np.linspace(x[0], x[-1], n // 2 + 1)
    idx = np.clip(np.searchsorted(edges, x, side="right") - 1, 0, len(edges) - 2)
    starts = np.flatnonzero(np.r_[True, idx[1:] != idx[:-1]])
    return starts, np.r_[starts[1:], len(x)]


def peaks(xs: Any, ys: Any, n: int = MAX_POINTS) -> tuple[np.ndarray, np.ndarray]:
    """Downsample a step series to about n points, keeping each bucket's min, max and
    last point (vectorised: a million points in milliseconds)."""
    x = np.asarray(xs, dtype=float)
    y = np.asarray(ys, dtype=float)
    if len(x) <= n:
        return x, y
    starts, ends = _buckets(x, n)
    keep = np.unique(np.concatenate((_arg_reduce(y, starts, ends, np.minimum),
                                     _arg_reduce(y, starts, ends, np.maximum), ends - 1)))
    return x[keep], y[keep]


def peak_rows(xs: Any, total: Any, n: int = MAX_POINTS) -> np.ndarray:
    """Indices of a series downsampled to about n points, keeping each bucket's peak total
    and its last point."""
    x = np.asarray(xs, dtype=float)
    t = np.asarray(total, dtype=float)
    if len(x) <= n:
        return np.arange(len(x))
    starts, ends = _buckets(x, n)
    return np.unique(np.concatenate((_arg_reduce(t, starts, ends, np.maximum), ends - 1)))


def _arg_reduce(y: np.ndarray, starts: np.ndarray, ends: np.ndarray, op: Any) -> np.ndarray:
    """The index of each segment's first extreme (op: np.maximum or np.minimum)."""
    best = op.reduceat(y, starts)
    seg = np.repeat(np.arange(len(starts)), ends - starts)
    hit = np.flatnonzero(y == best[seg])
    first = np.unique(seg[hit], return_index=True)[1]
    return hit[first]


def rects(ax: Any, left: Any, width: Any, yc: Any, h: Any, color: Any, **kw: Any) -> None:
    """Many rectangles as one collection (barh makes one artist per bar: slow)."""
    from matplotlib.collections import PolyCollection

    x0 = np.asarray(left, dtype=float)
    x1 = x0 + np.asarray(width, dtype=float)
    y = np.asarray(yc, dtype=float)
    hh = np.broadcast_to(np.asarray(h, dtype=float), y.shape) / 2
    verts = np.stack([np.stack([x0, y - hh], 1), np.stack([x0, y + hh], 1),
                      np.stack([x1, y + hh], 1), np.stack([x1, y - hh], 1)], 1)
    kw.setdefault("edgecolor", "none")
    ax.add_collection(PolyCollection(verts, facecolors=color, **kw))


def stack(ax: Any, edges: np.ndarray, n: np.ndarray, bottom: Any, **kw: Any) -> Any:
    """Bars of one layer of a stacked histogram as one filled step artist (``ax.bar``
    makes an artist per bar: thousands of them on a long run)."""
    base = np.broadcast_to(np.asarray(bottom, dtype=float), n.shape)
    return ax.stairs(base + n, edges, baseline=base, fill=True, lw=0, zorder=3, **kw)


def _bucket_width(t: np.ndarray) -> int:
    """1 s buckets; wider on a very long run, so a plot keeps at most ~3600 of them."""
    return max(1, math.ceil((t.max() - t.min()) / 3600)) if len(t) else 1


# -- open positions -----------------------------------------------------------------------
def _violation_points(run: RunFrames, inv: str) -> list[tuple[float, int]]:
    """Where a ledger-visible violation shows on the positions plot: its violating order
    (the last order among its events; the others explain it)."""
    pts = []
    for v in run.violations_by_inv.get(inv, ()):
        orders = [e for e in v.events if e.get("what") == "order"
                  and e.get("open_count_after") is not None]
        if inv == "single_close":
            if v.observed != "CLOSE on a flat symbol":
                continue
            orders = [e for e in orders if e.get("effect") == "flip"
                      and e.get("plan_id") == v.plan_ids[-1]]
        if orders:
            o = orders[-1]
            pts.append((run.s(int(o.get("wall_ms") or v.wall_ms)), int(o["open_count_after"])))
    return pts


def positions(run: RunFrames) -> Figure:
    """Open positions (ledger) vs the slot limit of the regime in force, max_positions,
    regime flips and a regime strip, the ledger-visible violations marked."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch
    from matplotlib.ticker import MaxNLocator

    cfg = run.facts.config
    regimes = run.facts.regimes
    fig, axes = figure(5.2, 2, 1, sharex=True, gridspec_kw={"height_ratios": [12, 1]})
    ax, strip = axes[0][0], axes[1][0]
    handles = shade_faults(ax, run)
    segs = run.regimes
    pos = run.positions
    if pos.empty:
        no_data(ax, "no orders in the ledger", keep_y=True)
    else:
        px, py = peaks(pos["t"], pos["open"])
        handles.append(ax.step(px, py, where="post", color="#1f4e79", lw=1.3,
                               label="open positions (ledger)")[0])
    if not segs.empty:  # the slot limit in force: the highest while a flip is in flight
        sx = segs[["start_s", "end_s"]].to_numpy(dtype=float).ravel()
        sy = np.repeat(segs["slots"].to_numpy(), 2)
        handles.append(ax.plot(sx, sy, color="#e07b00", lw=1.6,
                               label="slot limit of the regime in force")[0])
    handles.append(ax.axhline(cfg.max_positions, color="#c00000", ls="--", lw=1.2,
                              label=f"max_positions = {cfg.max_positions}"))
    if regimes and len(regimes) <= 80:
        for inv, _done, _r, _t in regimes:
            ax.axvline(run.s(inv), color="#e07b00", lw=0.6, ls=(0, (2, 3)), alpha=0.7)
        handles.append(Line2D([], [], color="#e07b00", lw=0.6, ls=(0, (2, 3)),
                              label=f"regime flip ({len(regimes)})"))
    markers = {"slots": ("x", "#d00000", "slots violation"),
               "one_position_per_symbol": ("v", "#7b2cbf", "double open"),
               "single_close": ("D", "#8c510a", "close on a flat symbol (flip)")}
    for inv, (marker, color, label) in markers.items():
        pts = _violation_points(run, inv)
        if pts:
            # large enough to find among thousands of steps: a violation is the story
            handles.append(ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker=marker,
                                      s=90 if marker == "x" else 60, color=color, zorder=5,
                                      lw=2.0 if marker == "x" else 0.8,
                                      edgecolors=None if marker == "x" else "white",
                                      label=f"{label} ({len(pts)})"))
    peak_open = int(pos["open"].max()) if not pos.empty else 0
    ax.set_ylim(0, max(peak_open, cfg.max_positions) * 1.1 + 1)
    if not pos.empty:
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("open positions")
    title(ax, run, "Open positions vs the slot limit of the regime in force",
          f"peak {peak_open} open; slots {cfg.slots_BASE}/{cfg.slots_TREND_STRONG}/"
          f"{cfg.slots_CHOP} (BASE/TREND_STRONG/CHOP), max_positions {cfg.max_positions}")
    # Regime strip: one colour per regime, named where the segment is wide enough.
    span = run.xlim[1] - run.xlim[0]
    seen: dict[str, str] = {}
    for a, b, name, limit in segs.itertuples(index=False):
        names = name.split("/")
        short = "/".join(SHORT_REGIME.get(r, r) for r in names)
        color = REGIME_COLORS.get(name, "#dddddd") if len(names) == 1 else "#bbbbbb"
        if len(names) == 1 or b - a > span * 0.002:  # a flip of a few ms does not show
            seen.setdefault(f"{name}: {limit} slots" if len(names) == 1
                            else "flip in flight: either regime", color)
        strip.axvspan(a, b, color=color, lw=0)
        w = (b - a) / span
        label = f"{name} ({limit})" if w > 0.1 else (f"{short} {limit}" if w > 0.05
                                                     else str(limit))
        if w > 0.012:
            strip.text((a + b) / 2, 0.5, label, ha="center", va="center", fontsize=7,
                       transform=strip.get_xaxis_transform(), clip_on=True)
    if regimes:
        handles += [Patch(color=c, label=f"regime {n}") for n, c in seen.items()]
    legend(ax, handles)
    strip.set_yticks([])
    strip.set_ylabel("regime", rotation=0, ha="right", va="center", fontsize=8)
    strip.set_xlim(*run.xlim)
    strip.set_xlabel(run.xlabel)
    return fig


# -- capital ------------------------------------------------------------------------------
def _stacked(ax: Any, run: RunFrames, t: Any, opened: Any, pending: Any,
             labels: bool = True) -> tuple[list[Any], float]:
    t, opened, pending = (np.asarray(a, dtype=float) for a in (t, opened, pending))
    if not len(t):
        return [], 0.0
    x = np.r_[run.xlim[0], t, run.xlim[1]]
    o = np.r_[0.0, opened, opened[-1]]
    p = np.r_[0.0, pending, pending[-1]]
    keep = peak_rows(x, o + p)
    x, o, p = x[keep], o[keep], p[keep]
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


def capital(run: RunFrames) -> Figure:
    """Open + permitted-not-executed notional, all symbols, against max_total_notional,
    with the capital violations marked."""
    cfg = run.facts.config
    fig, axes = figure(4.6)
    ax = axes[0][0]
    handles = shade_faults(ax, run)
    c = run.capital
    hs, peak = _stacked(ax, run, c["t"], c["open_notional"], c["permitted_notional"])
    if c.empty:
        no_data(ax, "no OPEN permits or orders")
    handles = hs + handles
    cap = _bound_line(ax, cfg.max_total_notional, peak,
                      f"max_total_notional = {cfg.max_total_notional:,.0f}")
    if cap is not None:
        handles.append(cap)
    cap_vs = run.violations_by_inv.get("capital", ())
    pts = [(run.s(v.wall_ms), _float(v.observed)) for v in cap_vs if _capital_kind(v) == "total"]
    pts = [(x, y) for x, y in pts if y is not None]
    if pts:
        handles.append(ax.scatter(*zip(*pts, strict=True), marker="x", color="#d00000", s=22,
                                  zorder=5, label=f"total cap violation ({len(pts)})"))
    trade = [v for v in cap_vs if _capital_kind(v) == "trade"]
    if trade:
        handles.append(ax.scatter([run.s(v.wall_ms) for v in trade], [0] * len(trade),
                                  marker="^", color="#d00000", s=30, zorder=5, clip_on=False,
                                  label=f"per-trade cap violation ({len(trade)})"))
    ax.set_ylim(bottom=0)
    ax.set_ylabel("notional (USD)")
    ax.set_xlabel(run.xlabel)
    title(ax, run, "Open + permitted-not-executed notional, all symbols",
          f"peak {peak:,.0f} USD; max_total_notional {cfg.max_total_notional:,.0f}")
    if handles:
        legend(ax, handles)
    return fig


def capital_symbols(run: RunFrames) -> Figure:
    """The same per symbol (those with capital violations first, then the most active)
    against capital x allocation_pct."""
    f = run.facts
    cfg = f.config
    cap_vs = [v for v in run.violations_by_inv.get("capital", ()) if v.symbol]
    by_sym_v = Counter(v.symbol for v in cap_vs)
    activity: Counter[str] = Counter()
    if not run.orders.empty:
        activity.update(run.orders["symbol"].value_counts().to_dict())
    d = run.decisions
    if not d.empty:
        first = d[d["first"].astype(bool) & (d["decision"] == "PERMIT")]
        activity.update(first["symbol"].value_counts().to_dict())
    ranked = sorted(set(activity) | set(by_sym_v),
                    key=lambda s: (-by_sym_v.get(s, 0), -activity.get(s, 0), s))
    chosen = ranked[:MAX_SYMBOL_PANELS]
    if not chosen:
        fig, axes = figure(3.2)
        ax = axes[0][0]
        shade_faults(ax, run)
        no_data(ax, "no OPEN permits or orders")
        ax.set_xlabel(run.xlabel)
        title(ax, run, "Open + permitted-not-executed notional per symbol", "")
        return fig
    ncols = 2 if len(chosen) > 1 else 1
    nrows = math.ceil(len(chosen) / ncols)
    fig, axes = figure(2.3 * nrows + 0.9, nrows, ncols, sharex=True)
    c = run.capital
    per = {s: g for s, g in c[c["symbol"].isin(chosen)].groupby("symbol", sort=False)}
    enforce = cfg.enforce_allocation != 0 or cfg.mode == "production"
    alloc_cap = f.capital * f.allocation_pct if enforce else 0.0
    handles: list[Any] = []
    for i, sym in enumerate(chosen):
        ax = axes[i // ncols][i % ncols]
        fh = shade_faults(ax, run, names=False, phases=False)
        g = per.get(sym)
        hs, peak = (_stacked(ax, run, g["t"], g["symbol_open_notional"],
                             g["symbol_permitted_notional"], labels=(i == 0))
                    if g is not None else ([], 0.0))
        line = _bound_line(ax, alloc_cap, peak, f"capital x allocation_pct = {alloc_cap:,.0f}")
        pts = [(run.s(v.wall_ms), _float(v.observed)) for v in cap_vs
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
                                 f"  ({activity.get(sym, 0)} permits + orders)"), fontsize=9)
        ax.tick_params(labelsize=8)
        if i % ncols == 0:
            ax.set_ylabel("USD", fontsize=8)
    for j in range(len(chosen), nrows * ncols):
        axes[j // ncols][j % ncols].set_visible(False)
    for col in range(ncols):
        axes[nrows - 1][col].set_xlabel(run.xlabel, fontsize=8)
    if len(chosen) % ncols and nrows > 1:
        axes[nrows - 2][ncols - 1].xaxis.set_tick_params(labelbottom=True)
    why = "with capital violations first, then most active" if by_sym_v else "most active"
    fig.suptitle(f"Open + permitted-not-executed notional per symbol\n{len(chosen)} of "
                 f"{len(ranked)} symbols shown ({why}); {fault_note(run)}", fontsize=10)
    if handles:
        fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 5),
                   fontsize=8)
    return fig


# -- exit locks ---------------------------------------------------------------------------
def lanes(start: np.ndarray, end: np.ndarray) -> tuple[np.ndarray, int]:
    """Greedy interval colouring of spans sorted by start: overlapping spans go to new
    lanes. Returns each span's lane and the number of lanes."""
    lane_end: list[float] = []
    out = np.empty(len(start), dtype=int)
    for k, (a, b) in enumerate(zip(start.tolist(), end.tolist(), strict=True)):
        for i, e in enumerate(lane_end):
            if a >= e:
                lane_end[i] = b
                out[k] = i
                break
        else:
            lane_end.append(b)
            out[k] = len(lane_end) - 1
    return out, len(lane_end)


def _max_concurrent(start: np.ndarray, end: np.ndarray) -> int:
    c = RunFrames.concurrent(pd.DataFrame({"start_s": start, "end_s": end}))
    return int(c["n"].max()) if len(c) else 0


def exit_locks(run: RunFrames) -> Figure:
    """One bar per CLOSE permit per symbol (exit-lock holders), overlapping permits in
    lanes with each overlap (a single_close violation) marked by a red strip, and ticks at
    decision + exit_lock_ttl_ms."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    locks = run.exit_locks
    viol = Counter(v.symbol for v in run.violations_by_inv.get("single_close", ()) if v.symbol)
    counts = locks["symbol"].value_counts().to_dict() if not locks.empty else {}
    ranked = sorted(counts, key=lambda s: (-viol.get(s, 0), -counts[s], s))
    rows = ranked[:MAX_GANTT_ROWS]
    fig, axes = figure(max(3.2, 0.32 * len(rows) + 2.0))
    ax = axes[0][0]
    handles = shade_faults(ax, run)
    if not rows:
        no_data(ax, "no CLOSE permits in this run")
        ax.set_xlabel(run.xlabel)
        title(ax, run, "CLOSE permits per symbol (exit-lock holders)", "")
        if handles:
            legend(ax, handles)
        return fig
    shown = locks[locks["symbol"].isin(rows)]
    govs = sorted(shown["instance"].astype(str).unique())
    gcolor = {g: GOV_COLORS[i % len(GOV_COLORS)] for i, g in enumerate(govs)}
    bars: dict[bool, list[pd.DataFrame]] = {False: [], True: []}
    overs: list[pd.DataFrame] = []
    ticks: list[pd.DataFrame] = []
    min_w = (run.xlim[1] - run.xlim[0]) * 0.002
    lock_ttl = run.facts.config.exit_lock_ttl_ms
    labels = []
    n_over = 0
    # Row band: permits in [row - 0.42, row + 0.2], overlaps as a red strip below them.
    band_lo, band_h = -0.42, 0.62
    groups = dict(tuple(shown.groupby("symbol", sort=False)))
    for row, sym in enumerate(rows):
        g = groups[sym].sort_values("start_ms", kind="stable")
        st, en = g["start_ms"].to_numpy(), g["end_ms"].to_numpy()
        lane, n_lanes = lanes(st, en)
        n_lanes = min(n_lanes, 3)
        h = band_h / n_lanes
        b = pd.DataFrame({"y": row + band_lo + h * (lane % n_lanes) + h / 2,
                          "left": g["start_s"].to_numpy(),
                          "width": np.maximum((en - st) / 1000, min_w), "h": h * 0.9,
                          "color": g["instance"].astype(str).map(gcolor).to_numpy()})
        lapsed = g["lapsed"].to_numpy(dtype=bool)
        bars[False].append(b[~lapsed])
        bars[True].append(b[lapsed])
        ticks.append(pd.DataFrame({"x": g["ttl_expiry_s"].to_numpy(),
                                   "y": row + band_lo + band_h / 2}))
        over = st[1:] < en[:-1]  # the checker's pairs: each permit against the one before
        if over.any():
            a_end, b_st, b_end = en[:-1][over], st[1:][over], en[1:][over]
            overs.append(pd.DataFrame({"y": row + 0.32, "left": run.s(b_st),
                                       "width": np.maximum((np.minimum(a_end, b_end) - b_st)
                                                           / 1000, min_w)}))
            n_over += int(over.sum())
        conc = _max_concurrent(st, en)
        labels.append(f"{sym} ({len(g)}" + (f", {conc} at once)" if conc > 1 else ")"))
    for lapsed_, parts in bars.items():
        b = pd.concat(parts)
        if len(b):
            rects(ax, b["left"], b["width"], b["y"], b["h"], b["color"].to_list(),
                  alpha=0.45 if lapsed_ else 0.85, hatch="////" if lapsed_ else None,
                  edgecolor="#333333" if lapsed_ else "none", lw=0.3, zorder=3)
    if overs:
        o = pd.concat(overs)
        rects(ax, o["left"], o["width"], o["y"], 0.2, "#e00000", alpha=0.9, lw=0, zorder=4)
    tk = pd.concat(ticks)
    ax.scatter(tk["x"], tk["y"], marker="|", s=40, color="#555555", alpha=0.6, lw=0.8,
               zorder=5)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels(labels, fontsize=8 if len(rows) <= 15 else 7)
    ax.set_ylim(len(rows) - 0.5, -0.75)  # headroom for the fault bands along the top
    ax.set_xlabel(run.xlabel)
    leg = [Patch(color=gcolor[g], label=f"permit by {g}") for g in govs]
    if any(len(p) for p in bars[True]):
        leg.append(Patch(facecolor="#bbbbbb", hatch="////", edgecolor="#333333",
                         label="never executed: held until permit TTL"))
    if overs:
        leg.append(Patch(color="#e00000", label=f"overlapping CLOSE permits ({n_over})"))
    leg.append(Line2D([], [], marker="|", ls="", color="#555555", markersize=7,
                      label=f"exit-lock TTL expiry (+{lock_ttl} ms)"))
    ax.legend(handles=leg + handles, loc="upper left", bbox_to_anchor=(1.005, 1.0),
              fontsize=8, borderaxespad=0, title_fontsize=8, alignment="left",
              title="rows: symbol (CLOSE permits,\nmost outstanding at once);\n"
                    "overlapping permits are\ndrawn in up to 3 lanes")
    order = ("most single_close violations, then most CLOSE permits" if viol
             else "most CLOSE permits")
    what = (f"{len(rows)} of {len(counts)} symbols shown ({order})" if len(counts) > len(rows)
            else f"all {len(rows)} symbols")
    title(ax, run, "CLOSE permits per symbol (exit-lock holders)",
          f"{len(locks)} permits; {what}")
    return fig


# -- decisions ----------------------------------------------------------------------------
def _per_bucket(t: np.ndarray, width: int, lo: int, hi: int) -> np.ndarray:
    """How many of ``t`` fall in each bucket [lo*width, (hi+1)*width), per second."""
    edges = np.arange(lo, hi + 2) * width
    return np.histogram(t, bins=edges)[0] / width


def _bucket_range(t: np.ndarray, width: int) -> tuple[int, int]:
    b = np.floor(t / width)
    return int(b.min()), int(b.max())


def latency(run: RunFrames) -> Figure:
    """Decision latency (plan stream entry -> decision entry) p50 / p99 / max per bucket,
    and decisions per second (PERMIT and BLOCK)."""
    d = run.decisions
    fig, axes = figure(5.4, 2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 2]})
    ax, tp = axes[0][0], axes[1][0]
    handles = shade_faults(ax, run)
    shade_faults(tp, run, names=False, phase_names=False)
    overall = ""
    width = 1
    n_timed = 0
    if d.empty:
        no_data(ax, "no decisions recorded")
        no_data(tp, "no decisions recorded")
    else:
        t = d["t"].to_numpy(dtype=float)
        width = _bucket_width(t)
        lo, hi = _bucket_range(t, width)
        edges = np.arange(lo, hi + 2) * width
        permits = (d["decision"] == "PERMIT").to_numpy()
        n_p = _per_bucket(t[permits], width, lo, hi)
        n_b = _per_bucket(t[~permits], width, lo, hi)
        stack(tp, edges, n_p, 0.0, color="#2a9d8f", label="PERMIT")
        stack(tp, edges, n_b, n_p, color="#adb5bd", label="BLOCK")
        legend(tp, None)
        timed = d[d["first"].astype(bool) & d["latency_ms"].notna()]
        n_timed = len(timed)
        if n_timed:
            lv = np.maximum(timed["latency_ms"].to_numpy(dtype=float), 0.0)
            lb = np.floor(timed["t"].to_numpy(dtype=float) / width).astype(int) - lo
            g = pd.Series(lv).groupby(lb)
            xs = (np.arange(lo, hi + 1) + 0.5) * width
            p50, p99, mx = (np.full(len(xs), np.nan) for _ in range(3))
            keys = g.size().index.to_numpy()
            p50[keys] = g.quantile(0.5).to_numpy()
            p99[keys] = g.quantile(0.99).to_numpy()
            mx[keys] = g.max().to_numpy()
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
            no_data(ax, "no plan entries matched to decisions")
    ax.set_ylabel("plan -> decision (ms)")
    tp.set_ylabel("decisions / s")
    tp.set_xlabel(run.xlabel)
    title(ax, run, f"Decision latency (plan entry -> decision entry) per {width} s bucket",
          f"{len(d)} decisions, {n_timed} plans timed" + (f"; {overall}" if overall else ""))
    if handles:
        legend(ax, handles)
    return fig


def _reason_labels(d: pd.DataFrame) -> pd.Series:
    """"PERMIT", or "BLOCK: <reason>" for each decision."""
    reason = d["reason"].astype(str).where(d["reason"].astype(str) != "", "(no reason)")
    return ("BLOCK: " + reason).where(d["decision"] != "PERMIT", "PERMIT")


def decisions_by_reason(run: RunFrames) -> Figure:
    """How many decisions were PERMIT, and BLOCK for each reason (a bar each)."""
    d = run.decisions
    counts = _reason_labels(d).value_counts() if not d.empty else pd.Series(dtype=int)
    fig, axes = figure(max(2.6, 0.34 * len(counts) + 1.6))
    ax = axes[0][0]
    if counts.empty:
        no_data(ax, "no decisions recorded")
        title(ax, run, "Decisions by outcome and BLOCK reason", "")
        return fig
    counts = counts.sort_values(kind="stable")
    colors = ["#2a9d8f" if k == "PERMIT" else REASON_COLORS[i % len(REASON_COLORS)]
              for i, k in enumerate(counts.index)]
    y = np.arange(len(counts))
    ax.barh(y, counts.to_numpy(), color=colors, zorder=3)
    total = int(counts.sum())
    for yi, n in zip(y, counts.to_numpy(), strict=True):
        ax.text(n, yi, f" {n} ({n / total:.0%})", va="center", fontsize=8)
    ax.set_yticks(y)
    ax.set_yticklabels(counts.index, fontsize=8)
    ax.set_xlim(0, counts.max() * 1.18)
    ax.set_xlabel("decisions")
    ax.grid(True, axis="x", color="#e5e5e5", lw=0.6)
    ax.set_axisbelow(True)
    n_p = int(counts.get("PERMIT", 0))
    title(ax, run, "Decisions by outcome and BLOCK reason",
          f"{total} decisions: {n_p} PERMIT, {total - n_p} BLOCK")
    return fig


def block_reasons_over_time(run: RunFrames) -> Figure:
    """BLOCK decisions per second, stacked by reason (the most frequent apart, the rest as
    "other"), with the PERMIT rate as a line."""
    d = run.decisions
    fig, axes = figure(4.6)
    ax = axes[0][0]
    handles = shade_faults(ax, run)
    width = 1
    blocks = d[d["decision"] == "BLOCK"] if not d.empty else d
    if d.empty:
        no_data(ax, "no decisions recorded")
    else:
        t = d["t"].to_numpy(dtype=float)
        width = _bucket_width(t)
        lo, hi = _bucket_range(t, width)
        edges = np.arange(lo, hi + 2) * width
        reasons = _reason_labels(blocks).str.removeprefix("BLOCK: ")
        top = reasons.value_counts().index[:MAX_REASONS].tolist()
        reasons = reasons.where(reasons.isin(top), "other")
        bottom = np.zeros(len(edges) - 1)
        bt = blocks["t"].to_numpy(dtype=float)
        for i, r in enumerate(top + (["other"] if (reasons == "other").any() else [])):
            n = _per_bucket(bt[(reasons == r).to_numpy()], width, lo, hi)
            handles.insert(i, stack(ax, edges, n, bottom, label=f"BLOCK: {r}",
                                    color=REASON_COLORS[i % len(REASON_COLORS)]))
            bottom = bottom + n
        permit_rate = _per_bucket(t[(d["decision"] == "PERMIT").to_numpy()], width, lo, hi)
        handles.insert(0, ax.step(edges[:-1], permit_rate, where="post", color="#2a9d8f",
                                  lw=1.2, zorder=4, label="PERMIT")[0])
        if blocks.empty:
            no_data(ax, "no BLOCK decisions", keep_y=True)
    ax.set_ylabel("decisions / s")
    ax.set_xlabel(run.xlabel)
    ax.set_ylim(bottom=0)
    title(ax, run, f"BLOCK decisions by reason per {width} s bucket",
          f"{len(blocks)} BLOCK of {len(d)} decisions")
    if handles:
        legend(ax, handles)
    return fig


# -- slot leases --------------------------------------------------------------------------
_END_COLORS = {"executed": "#2a9d8f", "expired": "#e76f51", "aborted": "#6d597a",
               "open at end": "#adb5bd"}


def slot_leases(run: RunFrames) -> Figure:
    """OPEN permits outstanding at once (slot leases) against the slot limit in force and
    the open positions; below, how the leases ended (executed, expired, aborted) per
    bucket."""
    cfg = run.facts.config
    leases = run.slot_leases
    fig, axes = figure(5.6, 2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1.3]})
    ax, ends = axes[0][0], axes[1][0]
    handles = shade_faults(ax, run)
    shade_faults(ends, run, names=False, phase_names=False)
    peak = 0
    if leases.empty:
        no_data(ax, "no OPEN permits in this run", keep_y=True)
        no_data(ends, "no OPEN permits")
    else:
        conc = RunFrames.concurrent(leases)
        peak = int(conc["n"].max())
        x, y = peaks(np.r_[run.xlim[0], conc["t"]], np.r_[0, conc["n"]])
        handles.append(ax.step(x, y, where="post", color="#e07b00", lw=1.3,
                               label="OPEN permits outstanding (slot leases)")[0])
        et = leases["end_s"].to_numpy(dtype=float)
        width = _bucket_width(et)
        lo, hi = _bucket_range(et, width)
        edges = np.arange(lo, hi + 2) * width
        bottom = np.zeros(len(edges) - 1)
        for kind, color in _END_COLORS.items():
            sel = (leases["end"] == kind).to_numpy()
            if sel.any():
                n = np.histogram(et[sel], bins=edges)[0]
                stack(ends, edges, n, bottom, color=color, label=f"{kind} ({int(sel.sum())})")
                bottom = bottom + n
        legend(ends, None)
    pos = run.positions
    if not pos.empty:
        px, py = peaks(pos["t"], pos["open"])
        handles.append(ax.step(px, py, where="post", color="#1f4e79", lw=1.0, alpha=0.8,
                               label="open positions (ledger)")[0])
    segs = run.regimes
    if not segs.empty:
        handles.append(ax.plot(segs[["start_s", "end_s"]].to_numpy(dtype=float).ravel(),
                               np.repeat(segs["slots"].to_numpy(), 2), color="#c00000",
                               lw=1.4, label="slot limit of the regime in force")[0])
    pts = _violation_points(run, "slots")
    if pts:
        handles.append(ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker="x", s=22,
                                  color="#d00000", zorder=5, label=f"slots violation "
                                                                    f"({len(pts)})"))
    top = max([peak, cfg.max_positions] + ([int(pos["open"].max())] if not pos.empty else []))
    ax.set_ylim(0, top * 1.1 + 1)
    ax.set_ylabel("leases / positions")
    ends.set_ylabel("lease ends")
    ends.set_xlabel(run.xlabel)
    kinds = leases["end"].value_counts().to_dict() if not leases.empty else {}
    title(ax, run, "OPEN permits outstanding (slot leases) vs the slot limit",
          f"{len(leases)} OPEN permits, peak {peak} outstanding at once; ends: "
          + (", ".join(f"{k} {n}" for k, n in kinds.items()) or "none"))
    legend(ax, handles)
    return fig

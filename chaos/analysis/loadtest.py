"""Locust's own figures of a load test, on the run's time axis (the load-test notebook).

``locust --csv PREFIX`` writes ``PREFIX_stats_history.csv``: one row a second (the
``Aggregated`` line, and with ``--csv-full-history`` one per request name) with the
current requests/s and Locust's rolling percentiles. The run directory does not record
the prefix, so it is given, or found inside the run directory (``--csv RUN_DIR/locust``).
Locust's percentiles are whole milliseconds (its CSV writer rounds them); the run's own
decision latency (:attr:`RunFrames.latency`, and latency.json's HDR figures) is the one to
trust, this is the load generator's view beside it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from chaos.analysis.frames import MissingData, RunFrames

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["aggregated", "locust_stats", "plot_locust", "stats_history_path"]

SUFFIX = "_stats_history.csv"
# Locust's column -> ours (the percentiles keep their names as p50, p99, ...)
_RENAME = {"Timestamp": "ts", "User Count": "users", "Type": "type", "Name": "name",
           "Requests/s": "rps", "Failures/s": "fps", "Total Request Count": "requests",
           "Total Failure Count": "failures",
           "Total Average Response Time": "avg_ms", "Total Max Response Time": "max_ms"}
COLUMNS = ("t", "ms", "users", "type", "name", "rate", "rps", "fps", "p50", "p90", "p99", "p99.9",
           "requests", "failures", "avg_ms", "max_ms")


def stats_history_path(run_dir: str | Path, csv_prefix: str | Path | None = None) -> Path | None:
    """``PREFIX_stats_history.csv`` for an explicit prefix (MissingData if absent), else
    the one ``*_stats_history.csv`` inside ``run_dir`` (None if there is none)."""
    if csv_prefix:
        p = Path(f"{csv_prefix}{SUFFIX}")
        if not p.is_file():
            raise MissingData(f"no Locust CSV at {p} (locust_csv_prefix {str(csv_prefix)!r}: "
                              f"the --csv prefix given to locust)")
        return p
    found = sorted(Path(run_dir).glob(f"*{SUFFIX}"))
    if len(found) > 1:
        raise MissingData(f"{run_dir} holds several Locust CSVs "
                          f"({', '.join(p.name for p in found)}): give locust_csv_prefix")
    return found[0] if found else None


def locust_stats(run: RunFrames | str | Path,
                 csv_prefix: str | Path | None = None) -> pd.DataFrame:
    """Locust's stats history as a frame (``t`` in seconds since the run's time 0 when a
    RunFrames is given, else since the first row); empty with :data:`COLUMNS` when no
    CSV is found."""
    run_dir = run.run_dir if isinstance(run, RunFrames) else Path(run)
    path = stats_history_path(run_dir, csv_prefix)
    if path is None:
        return pd.DataFrame({c: pd.Series(dtype=float) for c in COLUMNS})
    raw = pd.read_csv(path, na_values=["N/A"])
    df = raw.rename(columns=_RENAME).rename(columns=lambda c: f"p{c[:-1]}" if c.endswith(
        "%") else c)
    df["ms"] = df["ts"].astype(np.int64) * 1000
    t0 = run.t0_ms if isinstance(run, RunFrames) else (int(df["ms"].min()) if len(df) else 0)
    df["t"] = (df["ms"] - t0) / 1000.0
    # Requests/s from the running count: Locust's own "Requests/s" is a trailing window
    # that reads 0 for the first seconds of a short run.
    by = df.groupby("name", sort=False)
    df["rate"] = (by["requests"].diff() / by["t"].diff()).fillna(0.0)
    for c in COLUMNS:
        if c not in df:
            df[c] = np.nan
    return df[[*COLUMNS, *(c for c in df.columns if c not in COLUMNS and c != "ts")]]


def aggregated(stats: pd.DataFrame) -> pd.DataFrame:
    """The ``Aggregated`` rows: time, users, requests/s, Locust's p50/p99, the counts."""
    return stats[stats["name"] == "Aggregated"][["t", "users", "rate", "p50", "p99", "requests",
                                                 "failures"]].reset_index(drop=True)


def plot_locust(stats: pd.DataFrame, run: RunFrames | None = None) -> Figure:
    """Locust's aggregated throughput and its rolling p50/p99 over time (fault windows
    shaded when a run is given)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 5.5), layout="constrained")
    ax_rate, ax_lat = fig.subplots(2, 1, sharex=True)
    agg = stats[stats["name"] == "Aggregated"] if len(stats) else stats
    if agg.empty:
        for ax in (ax_rate, ax_lat):
            ax.text(0.5, 0.5, "no data: no Locust stats history (run locust with --csv)",
                    transform=ax.transAxes, ha="center", va="center", color="#555555")
        return fig
    ax_rate.plot(agg["t"], agg["rate"], color="#1f77b4", drawstyle="steps-pre",
                 label="requests/s (from the count)")
    ax_rate.plot(agg["t"], agg["rps"], color="#1f77b4", ls=":", label="Locust's Requests/s")
    ax_rate.plot(agg["t"], agg["fps"], color="#d62728", label="failures/s")
    ax_rate.set_ylabel("per second")
    ax_rate.set_title("Locust: throughput (Aggregated)", loc="left")
    ax_rate.legend(loc="upper right")
    for col, color in (("p50", "#2ca02c"), ("p99", "#ff7f0e")):
        ax_lat.plot(agg["t"], agg[col], color=color, label=f"{col} (rolling, whole ms)")
    ax_lat.set_ylabel("ms")
    ax_lat.set_title("Locust: response time percentiles (Aggregated)", loc="left")
    ax_lat.legend(loc="upper right")
    if run is not None:
        from chaos.analysis.plots import shade_faults

        for ax in (ax_rate, ax_lat):
            shade_faults(ax, run)
        ax_lat.set_xlabel(run.xlabel)
    else:
        ax_lat.set_xlabel("seconds since the first row")
    return fig

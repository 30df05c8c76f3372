"""Several runs side by side: one row per run directory (the comparison notebook's table).

A directory given may be a run directory itself, or one holding runs (a ``chaos suite``
output, ``reports/runs/<scenario>/``, a folder of suites): runs are found up to three
levels below it, so ``reports/suites/`` compares every suite stored there.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from chaos.analysis.frames import MissingData, RunFrames, load_run
from chaos.checkers import INVARIANTS
from chaos.history import HISTORY_DIR
from chaos.rundir import RunDirError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["compare_runs", "find_runs", "plot_latency", "plot_violations", "run_row"]

_DEPTH = 3  # a suite of suites: reports/suites/<time>/<scenario>/


def _is_run(d: Path) -> bool:
    return (d / HISTORY_DIR).is_dir() or (d / "run.json").is_file()


def find_runs(dirs: str | Path | Iterable[str | Path]) -> list[Path]:
    """The run directories in or under ``dirs`` (each once, in order; ``latest`` links
    and a run's own subdirectories are not descended into)."""
    items = [dirs] if isinstance(dirs, str | Path) else list(dirs)
    found: dict[Path, None] = {}

    def walk(d: Path, depth: int) -> None:
        if _is_run(d):
            found.setdefault(d.resolve(), None)
            return
        if depth == 0:
            return
        for sub in sorted(p for p in d.iterdir() if p.is_dir() and not p.is_symlink()):
            walk(sub, depth - 1)

    for item in items:
        d = Path(item)
        if not d.is_dir():
            raise MissingData(f"{d}: no such directory")
        walk(d, _DEPTH)
    return list(found)


def run_row(run: RunFrames) -> dict[str, object]:
    """One run's line: who, what, the verdict, violations per invariant, latency."""
    m = run.meta
    lat = run.latency["latency_ms"].astype(float)
    by_inv = run.violations_by_inv
    first = run.violations["t"].min() if not run.violations.empty else float("nan")
    return {
        "run": run.run_dir.name if run.run_dir.name != "latest" else str(run.run_dir),
        "kind": run.kind, "governor": m.get("governor"), "scenario": m.get("scenario"),
        "seed": m.get("seed"), "verdict": run.verdict_word,
        "violations": sum(len(v) for v in by_inv.values()),
        **{inv: len(by_inv.get(inv, ())) for inv in INVARIANTS},
        "first_violation_s": first, "plans": len(run.plans), "decisions": len(run.decisions),
        "p50_ms": lat.quantile(0.5) if len(lat) else float("nan"),
        "p99_ms": lat.quantile(0.99) if len(lat) else float("nan"),
        "run_dir": str(run.run_dir),
    }


def compare_runs(dirs: str | Path | Iterable[str | Path]) -> pd.DataFrame:
    """One row per run found in ``dirs`` (see :func:`find_runs`), sorted by scenario, seed
    and governor so the same scenario and seed line up across governors. A run that
    cannot be read (damaged, still running) is left out and named, with why, in
    ``df.attrs["skipped"]`` (a list of ``(run_dir, reason)``): one bad directory in a
    folder of suites must not hide the others. Raises MissingData when no run is found
    or none can be read."""
    runs = find_runs(dirs)
    shown = [str(dirs)] if isinstance(dirs, str | Path) else [str(d) for d in dirs]
    if not runs:
        raise MissingData(f"no run directory (history/ or run.json) in or under "
                          f"{', '.join(shown)}")
    rows: list[dict[str, object]] = []
    skipped: list[tuple[str, str]] = []
    for d in runs:
        try:
            rows.append(run_row(load_run(d)))
        except RunDirError as exc:
            skipped.append((str(d), str(exc)))
    if not rows:
        raise MissingData(f"none of the {len(runs)} run directories under "
                          f"{', '.join(shown)} can be read; first: {skipped[0][1]}")
    df = pd.DataFrame(rows)
    df = df.sort_values(["scenario", "seed", "governor"], key=lambda s: s.astype(str),
                        kind="stable").reset_index(drop=True)
    df.attrs["skipped"] = skipped
    return df


def _label(row: pd.Series) -> str:
    seed = "" if pd.isna(row["seed"]) else f" s{int(row['seed'])}"
    return f"{row['scenario']}{seed}\n{row['governor']}"


def plot_violations(df: pd.DataFrame) -> Figure:
    """Violations per invariant, one stacked bar per run (the verdict above each)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4.5), layout="constrained")
    ax = fig.subplots()
    x = np.arange(len(df))
    bottom = np.zeros(len(df))
    for i, inv in enumerate(INVARIANTS):
        counts = df[inv].to_numpy(dtype=float)
        if counts.any():
            ax.bar(x, counts, bottom=bottom, label=inv, color=_INV_COLORS[i % len(_INV_COLORS)])
            bottom += counts
    top = max(float(bottom.max()) if len(bottom) else 0.0, 1.0)
    for xi, word, b in zip(x, df["verdict"], bottom, strict=True):
        ax.text(xi, b + top * 0.02, word, ha="center", va="bottom", fontsize=8,
                color=_VERDICT_COLORS.get(word, "#555555"))
    ax.set_ylim(0, top * 1.15)
    ax.set_xticks(x, [_label(r) for _, r in df.iterrows()], fontsize=8)
    ax.set_ylabel("violations")
    ax.set_title("violations per invariant, by run", loc="left")
    if bottom.any():
        ax.legend(loc="upper left", fontsize=8, ncols=2)
    return fig


def plot_latency(df: pd.DataFrame) -> Figure:
    """Decision latency p50 and p99 per run (plan on the stream -> decision entry)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4), layout="constrained")
    ax = fig.subplots()
    x = np.arange(len(df))
    ax.bar(x - 0.2, df["p50_ms"].astype(float), width=0.4, label="p50", color="#2ca02c")
    ax.bar(x + 0.2, df["p99_ms"].astype(float), width=0.4, label="p99", color="#ff7f0e")
    ax.set_xticks(x, [_label(r) for _, r in df.iterrows()], fontsize=8)
    ax.set_yscale("symlog", linthresh=1.0)
    ax.set_ylabel("ms")
    ax.set_title("decision latency per run", loc="left")
    ax.legend(loc="upper left")
    return fig


_INV_COLORS = ("#e63946", "#f4a261", "#2a9d8f", "#264653", "#e9c46a", "#8d99ae", "#6d597a",
               "#b56576", "#457b9d")
_VERDICT_COLORS = {"VALID": "#2a9d8f", "INVALID": "#c00000", "UNKNOWN": "#8d6e00"}

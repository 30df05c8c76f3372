"""The tables and words of the notebooks, from a run's frames (no plotting, no I/O).

The notebooks stay short cells that call these and :mod:`chaos.analysis.plots`; every
table here is a pandas DataFrame (rendered as HTML in Jupyter and in the HTML export) and
every text is Markdown. Times are seconds since the run's time 0, as on the plots.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import numpy as np
import pandas as pd

from chaos.analysis.frames import RunFrames

__all__ = ["ends", "expired", "expired_in_flight", "fence_checks", "header", "invariants",
           "lock_ends", "lock_holders", "lock_overlaps", "over_limit", "timeline",
           "violation_events", "violations"]

_WORD = {True: "ok", False: "VIOLATED", None: "unknown"}
_TIME_KEYS = ("wall_ms", "entry_ms", "issued_at_ms", "decided_at_ms", "ms", "start_ms",
              "stop_ms", "sent_ms", "executed_at_ms")


def _iso(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, tz=dt.UTC).isoformat(timespec="milliseconds")


def header(run: RunFrames) -> str:
    """Markdown: what the run is (kind, governor, scenario, seed, time 0) and its verdict,
    with why the run does or does not count as exercised."""
    m = run.meta
    rows = [("run directory", f"`{run.run_dir}`"), ("kind", run.kind),
            ("governor", m.get("governor") or "?"),
            ("scenario", m.get("scenario") or "?"), ("seed", m.get("seed", "—")),
            ("time 0", f"{run.t0_source}, {_iso(run.t0_ms)}" if run.t0_ms else "—"),
            ("operations", f"{run.facts.ops:,}"), ("status", m.get("status", "?")),
            ("verdict", f"**{run.verdict_word}**")]
    if run.kind == "import":
        rows[3:3] = [("prefix", m.get("prefix", "?")),
                     ("source", ", ".join(f"{k}: {v}" for k, v in (m.get("source") or {})
                                          .items()))]
    if run.kind == "loadtest":
        lt = m.get("loadtest") or {}
        rows.insert(4, ("load", f"{lt.get('rate')} plans/s, {lt.get('users')} users, "
                                f"{lt.get('run_time')} s, mix {lt.get('mix')}"))
    cov = run.coverage
    if cov:
        why = "; ".join(cov.get("not_exercised") or ()) or "yes"
        rows.append(("exercised", why if cov.get("exercised") is not False else f"no: {why}"))
    lines = ["| | |", "|---|---|", *(f"| {k} | {_cell(v)} |" for k, v in rows)]
    for c in m.get("caveats") or ():
        lines.append(f"\n> caveat: {c}")
    return "\n".join(lines)


def _cell(x: Any) -> str:
    return str(x).replace("|", "\\|").replace("\n", " ")


def invariants(run: RunFrames) -> pd.DataFrame:
    """One row per checker: its result, violations, first violation time, note."""
    rows = []
    for name, r in run.verdict.results.items():
        first = min((v.wall_ms for v in r.violations), default=None)
        rows.append({"invariant": name, "result": _WORD[r.valid],
                     "violations": len(r.violations),
                     "first_s": run.s(first) if first else np.nan, "note": r.note})
    return pd.DataFrame(rows).set_index("invariant")


def violations(run: RunFrames, limit: int = 20) -> str:
    """Markdown: the first ``limit`` violations, each explained in words (what happened,
    what the invariant wanted, the faults active); :func:`violation_events` lists the
    events of one."""
    v = run.violations
    if v.empty:
        return f"No violations: the verdict is **{run.verdict_word}**."
    out = [f"**{len(v)} violation(s)** "
           f"({', '.join(f'{k}: {n}' for k, n in v['invariant'].value_counts().items())})."]
    for i, row in enumerate(v.head(limit).itertuples()):
        out.append(f"{i}. **{row.invariant}** at t={row.t:+.3f} s: {row.explanation}")
    if len(v) > limit:
        out.append(f"\n... {len(v) - limit} more (``run.violations``).")
    return "\n".join(out)


def violation_events(run: RunFrames, index: int = 0) -> pd.DataFrame:
    """The events that make violation ``index`` (in time order, as in :func:`violations`)
    one: decisions, orders, results, with their times in seconds since time 0."""
    vs = sorted((v for r in run.verdict.results.values() for v in r.violations),
                key=lambda v: v.wall_ms)
    if not vs:
        return pd.DataFrame()
    df = pd.DataFrame(list(vs[index].events))
    for c in _TIME_KEYS:
        if c in df:
            num = pd.to_numeric(df[c], errors="coerce")
            df[c.removesuffix("_ms") + "_s"] = run.s(num)
            df = df.drop(columns=c)
    return df.replace("", np.nan).dropna(axis=1, how="all")


def timeline(run: RunFrames) -> pd.DataFrame:
    """One table of what happened when: fault windows, governor process events and
    violations, in time order (the incident's timeline)."""
    parts = []
    f = run.faults
    if not f.empty:
        parts.append(pd.DataFrame({"t": f["start_s"], "what": "fault " + f["kind"].astype(str),
                                   "detail": f["detail"].astype(str)
                                   + " (until t=" + f["stop_s"].round(3).astype(str) + ")"}))
    g = run.governor_events
    if not g.empty and "type" in g:
        who = g["consumer"].astype(str) if "consumer" in g else ""
        parts.append(pd.DataFrame({"t": g["t"], "what": "governor " + g["type"].astype(str),
                                   "detail": who}))
    v = run.violations
    if not v.empty:
        parts.append(pd.DataFrame({"t": v["t"], "what": "VIOLATION " + v["invariant"],
                                   "detail": v["message"]}))
    d = run.decisions
    if not d.empty:
        first, last = d["t"].min(), d["t"].max()
        parts.append(pd.DataFrame({"t": [first, last], "what": ["first decision",
                                                                 "last decision"],
                                   "detail": [f"{len(d):,} decisions in all", ""]}))
    if not parts:
        return pd.DataFrame(columns=["t", "what", "detail"])
    return pd.concat(parts, ignore_index=True).sort_values("t", kind="stable").reset_index(
        drop=True)


def ends(intervals: pd.DataFrame) -> pd.DataFrame:
    """How permits ended (executed / expired / aborted / open at end), counted."""
    if intervals.empty:
        return pd.DataFrame({"permits": pd.Series(dtype=int)})
    return intervals["end"].value_counts().rename("permits").to_frame()


def expired(intervals: pd.DataFrame) -> pd.DataFrame:
    """Permits that ended by their TTL (no order, no failed take, no abort before it): the
    slot or lock came back by expiry, not by a release."""
    if intervals.empty:
        return intervals
    return intervals[intervals["end"] == "expired"].reset_index(drop=True)


def over_limit(run: RunFrames) -> pd.DataFrame:
    """Episodes when the exchange held more open positions than the slots in force: from,
    to, peak open, slots (each a drift of the semaphore from the ledger)."""
    p = run.positions
    if p.empty:
        return pd.DataFrame(columns=["from_s", "to_s", "peak_open", "slots"])
    over = (p["open"] > p["slots"]).to_numpy()
    starts = np.flatnonzero(over & ~np.concatenate(([False], over[:-1])))
    rows = []
    for s in starts:
        e = s
        while e + 1 < len(p) and over[e + 1]:
            e += 1
        to = p["t"].iloc[e + 1] if e + 1 < len(p) else p["t"].iloc[e]
        seg = p.iloc[s:e + 1]
        rows.append({"from_s": p["t"].iloc[s], "to_s": to, "peak_open": int(seg["open"].max()),
                     "slots": int(seg["slots"].max())})
    return pd.DataFrame(rows, columns=["from_s", "to_s", "peak_open", "slots"])


def lock_holders(run: RunFrames) -> pd.DataFrame:
    """CLOSE permits (exit-lock holders) labelled by lock: ``rotation`` for the closes a
    governor emitted to rotate a slot, ``exit`` for the others; with the plan's emitter."""
    x = run.exit_locks
    if x.empty:
        return x.assign(lock=pd.Series(dtype=object), emitter=pd.Series(dtype=object))
    emitter = x["plan_id"].map(run.plans.drop_duplicates("plan_id").set_index("plan_id")[
        "emitter"]) if not run.plans.empty else pd.Series(None, index=x.index)
    return x.assign(emitter=emitter, lock=np.where(emitter == "rotation", "rotation", "exit"))


def lock_ends(run: RunFrames) -> pd.DataFrame:
    """CLOSE permits counted by lock (exit / rotation) and by how they ended."""
    x = lock_holders(run)
    if x.empty:
        return pd.DataFrame({"permits": pd.Series(dtype=int)})
    return x.groupby(["lock", "end"]).size().rename("permits").to_frame()


def expired_in_flight(run: RunFrames) -> pd.DataFrame:
    """CLOSE permits whose lock TTL expired before their close ended: another close of the
    symbol could take the lock while this one was still on its way to the exchange."""
    x = lock_holders(run)
    cols = ["plan_id", "symbol", "lock", "instance", "start_s", "ttl_expiry_s", "end_s", "end",
            "fence"]
    return x[x["expired_in_flight"].astype(bool)][cols] if not x.empty else x.reindex(
        columns=cols)


def lock_overlaps(run: RunFrames) -> pd.DataFrame:
    """Pairs of CLOSE permits on one symbol held at the same time (two holders of what
    must be one lock), with how they ended and their fences."""
    x = lock_holders(run)
    cols = ["symbol", "first", "second", "overlap_from_s", "overlap_to_s", "first_end",
            "second_end", "first_fence", "second_fence", "first_expired_in_flight"]
    if x.empty:
        return pd.DataFrame(columns=cols)
    rows = []
    for sym, g in x.sort_values("start_s", kind="stable").groupby("symbol", sort=True):
        held: list[Any] = []
        for r in g.itertuples():
            held = [h for h in held if h.end_s > r.start_s]
            rows += [{"symbol": sym, "first": h.plan_id, "second": r.plan_id,
                      "overlap_from_s": r.start_s, "overlap_to_s": min(h.end_s, r.end_s),
                      "first_end": h.end, "second_end": r.end, "first_fence": h.fence,
                      "second_fence": r.fence,
                      "first_expired_in_flight": h.expired_in_flight} for h in held]
            held.append(r)
    return pd.DataFrame(rows, columns=cols)


def fence_checks(run: RunFrames) -> pd.DataFrame:
    """Per symbol: CLOSE permits, how many carried a fencing token, and how many tokens
    did not increase over the previous permit of the symbol (a stale holder could still
    write). A governor without fencing shows none carried."""
    x = run.exit_locks
    if x.empty:
        return pd.DataFrame(columns=["permits", "fenced", "not_increasing"])
    g = x.sort_values("start_s", kind="stable").groupby("symbol", sort=True)["fence"]
    return pd.DataFrame({
        "permits": g.size(), "fenced": g.count(),
        "not_increasing": g.apply(lambda s: int((s.dropna().diff() <= 0).sum()))})


"""A run directory as pandas frames, built lazily from one read of the run.

:func:`load_run` reads a run once (:func:`chaos.checkers.gather`: history, ledger,
run.json; results.json for the verdict when it is current) and returns a
:class:`RunFrames`; each frame is built column-wise with numpy/pandas on first access
and cached. ``chaos.report`` builds one from the facts and verdict it already has
(:meth:`RunFrames.from_facts`), so the report and a notebook draw from the same frames.

Times: ``*_ms`` are epoch milliseconds as recorded; ``t`` and ``*_s`` are seconds since
the run's time 0 (the workload start, else the first operation).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable
from contextlib import suppress
from functools import cached_property
from itertools import chain, repeat
from operator import attrgetter, itemgetter
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from chaos.checkers import CheckResult, Facts, Verdict, Violation, gather, judge
from chaos.checkers.facts import HistoryError, PlanEntry, Submit
from chaos.history import HISTORY_DIR, history_files
from chaos.rundir import RunDirError, _check_meta

__all__ = ["COLUMNS", "MissingData", "RunFrames", "explain", "fault_note", "humanize",
           "load_run"]

# The columns of every frame (the contract with the notebooks: only ever added to).
COLUMNS: dict[str, tuple[str, ...]] = {
    "plans": ("plan_id", "producer", "symbol", "action", "emitter", "sent_ms", "t",
              "notional", "status", "on_stream", "probe"),
    "decisions": ("plan_id", "decision", "reason", "instance", "action", "symbol",
                  "decided_ms", "t", "latency_ms", "fence", "entry_id", "first", "probe"),
    "results": ("plan_id", "status", "ms", "t"),
    "orders": ("plan_id", "symbol", "action", "notional", "open_count_after", "ms", "t",
               "seq", "side", "effect", "fence", "position_id", "issued_at_ms", "executed"),
    "faults": ("kind", "start_ms", "stop_ms", "start_s", "stop_s", "detail", "key", "ok"),
    "governor_events": ("ms", "t"),
    "positions": ("t", "open", "slots", "max_positions", "ms"),
    "regimes": ("start_s", "end_s", "regimes", "slots"),
    "slot_leases": ("plan_id", "symbol", "instance", "start_s", "end_s", "end",
                    "ttl_expiry_s", "start_ms", "end_ms", "lapsed"),
    "exit_locks": ("plan_id", "symbol", "instance", "start_s", "end_s", "end", "ttl_expiry_s",
                   "fence", "expired_in_flight", "start_ms", "end_ms", "lapsed"),
    "capital": ("t", "open_notional", "permitted_notional", "max_total_notional", "ms",
                "symbol", "symbol_open_notional", "symbol_permitted_notional"),
    "latency": ("t", "latency_ms", "decision", "reason", "action", "first"),
    "violations": ("invariant", "t", "wall_ms", "message", "explanation", "plan_ids",
                   "symbol", "expected", "observed", "faults"),
    "model_explanations": ("model", "partition", "outcome", "ops", "longest_prefix",
                           "first_unplaceable", "t", "state_before", "prefix_tail",
                           "pending_not_applying"),
    "minimal_witnesses": ("n", "invariant", "violation", "violation_t", "match",
                          "one_minimal", "size", "t", "f", "type", "plan_id", "symbol",
                          "action", "outcome", "detail", "ref", "ms"),
}

# What an empty frame most likely means, for :meth:`RunFrames.require`.
_WHY_EMPTY = {
    "plans": "no plan reached the plan stream and none was submitted",
    "decisions": "no decision was recorded (did a governor run?)",
    "results": "no apply.result entry was recorded",
    "orders": "the ledger (ledger.sqlite) is missing or has no orders",
    "faults": "no fault windows (the scenario has no faults)",
    "governor_events": "no governor process events (an import or a load test has none)",
    "positions": "the ledger (ledger.sqlite) is missing or has no orders",
    "regimes": "no time axis",
    "slot_leases": "no OPEN permit",
    "exit_locks": "no CLOSE permit",
    "capital": "no OPEN permit and no order",
    "latency": "no decision was recorded",
    "violations": "no violations (the verdict found none)",
    "model_explanations": "no model partition failed or ran out of time (or no model check)",
    "minimal_witnesses": "no violations, or none whose witness could be found again",
}

_VERDICT_WORD = {True: "VALID", False: "INVALID", None: "UNKNOWN"}
_NO_SUBMIT = Submit("", 0)  # a plan the harness did not submit (a governor's rotation plan)
_NO_PLAN = PlanEntry()  # a decision whose plan entry was not seen: entry_ms 0


class MissingData(RunDirError):
    """The run directory lacks what was asked for; the message names what is missing."""


def load_run(run_dir: str | Path) -> RunFrames:
    """A run directory (``chaos run``, a suite's run, ``chaos import``, a load test) as
    frames; raises :class:`MissingData` when it is not a run, RunDirError when damaged."""
    p = Path(run_dir)
    if not p.is_dir():
        raise MissingData(f"{p} is not a run directory (no such directory)")
    files = history_files(p)
    has_meta = (p / "run.json").is_file()
    if not files and not has_meta:
        raise MissingData(f"{p} is not a run directory: no {HISTORY_DIR}/ and no run.json")
    if not files:
        raise MissingData(f"{p} has a run.json but no {HISTORY_DIR}/*.jsonl: nothing was "
                          f"recorded")
    if all(f.stat().st_size == 0 for f in files):
        raise MissingData(f"{p} is not a run: every {HISTORY_DIR}/*.jsonl is empty, nothing "
                          f"was recorded")
    if has_meta:
        _check_meta(p / "run.json")  # a clear one-line error for a damaged run.json
    try:
        facts = gather(p)
    except HistoryError as exc:
        raise RunDirError(str(exc)) from None
    return RunFrames(facts)


def _col(items: list[Any], name: str, pad: int = 0) -> np.ndarray:
    """An attribute of every item as an object array (each value kept as it is), with
    ``pad`` Nones after; pandas turns an all-strings column into its string dtype."""
    vals = map(attrgetter(name), items)
    return np.fromiter(chain(vals, repeat(None, pad)) if pad else vals, dtype=object,
                       count=len(items) + pad)


def _ints(xs: Iterable[Any]) -> np.ndarray:
    return np.fromiter(xs, dtype=np.int64)


def _numeric(values: Any) -> pd.Series:
    """Raw field values (strings, numbers, anything a malformed plan carries) as floats."""
    arr = np.asarray(values, dtype=object)
    with suppress(TypeError, ValueError):
        return pd.Series(arr.astype(float))  # the common case: every one a number
    try:
        return pd.to_numeric(pd.Series(arr), errors="coerce").astype(float)
    except (TypeError, ValueError):
        return pd.Series([_float_or_nan(x) for x in values], dtype=float)


def _float_or_nan(x: Any) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return float("nan")


def _empty(name: str) -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=object) for c in COLUMNS[name]})


class RunFrames:
    """A run's frames (built on first access, cached) with its verdict and time axis."""

    def __init__(self, facts: Facts, verdict: Verdict | None = None) -> None:
        self.facts = facts
        self.run_dir: Path = Path(facts.run_dir)
        self.meta: dict[str, Any] = facts.meta
        self.kind: str = str(self.meta.get("kind") or "run")
        if verdict is not None:
            self.__dict__["verdict"] = verdict
        ph = facts.phases
        start = ph.get("workload", {}).get("invoke")
        self.t0_ms: int = int(start or facts.first_ms
                              or (facts.orders[0].wall_ms if facts.orders else 0))
        self.t0_source = "workload start" if start else "first operation"
        lo = [x for x in (facts.first_ms, self.t0_ms) if x]
        hi = [x for x in (facts.last_ms, self.t0_ms) if x]
        if facts.orders:
            lo.append(facts.orders[0].wall_ms)
            hi.append(facts.orders[-1].wall_ms)
        x0 = (min(lo) - self.t0_ms) / 1000 if lo else 0.0
        x1 = (max(hi) - self.t0_ms) / 1000 if hi else 1.0
        if x1 - x0 < 1.0:
            x1 = x0 + 1.0
        pad = (x1 - x0) * 0.01
        # The x range of every plot: the whole history and the ledger, padded.
        self.xlim: tuple[float, float] = (x0 - pad, x1 + pad)

    @classmethod
    def from_facts(cls, facts: Facts, verdict: Verdict | None = None) -> RunFrames:
        """Frames of facts already gathered (the report's: the run is not read again)."""
        return cls(facts, verdict)

    def __repr__(self) -> str:
        return (f"RunFrames({str(self.run_dir)!r}, kind={self.kind!r}, ops={self.facts.ops}, "
                f"orders={len(self.facts.orders)})")

    # -- time ------------------------------------------------------------------------------
    def s(self, ms: Any) -> Any:
        """Epoch ms (a number or an array) as seconds since time 0."""
        return (ms - self.t0_ms) / 1000.0

    @property
    def xlabel(self) -> str:
        return f"seconds since {self.t0_source}"

    def phase_marks(self) -> list[tuple[float, str]]:
        """Run phases worth a vertical line: (seconds, label); close ones share a label."""
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

    # -- verdict ---------------------------------------------------------------------------
    @cached_property
    def verdict(self) -> Verdict:
        """results.json when it was written for this history, else judged now."""
        stored = _stored_verdict(self.facts)
        return stored if stored is not None else judge(self.facts)

    @property
    def verdict_word(self) -> str:
        return _VERDICT_WORD[self.verdict.valid]

    @cached_property
    def coverage(self) -> dict[str, Any]:
        return dict(self.verdict.coverage or {})

    @cached_property
    def violations_by_inv(self) -> dict[str, list[Violation]]:
        """Each invariant's violations in time order (the Violation objects, with events)."""
        return {n: sorted(r.violations, key=lambda v: v.wall_ms)
                for n, r in self.verdict.results.items()}

    def require(self, *names: str) -> None:
        """Raise :class:`MissingData` naming each of ``names`` that is empty or unknown."""
        missing = []
        for name in names:
            if name not in COLUMNS and name != "coverage":
                missing.append(f"{name} (no such frame; frames: {', '.join(COLUMNS)})")
            elif name == "coverage":
                if not self.coverage:
                    missing.append("coverage (no coverage record)")
            elif getattr(self, name).empty:
                missing.append(f"{name} ({_WHY_EMPTY[name]})")
        if missing:
            raise MissingData(f"{self.run_dir} lacks what is needed: " + "; ".join(missing))

    # -- frames from the history -----------------------------------------------------------
    @cached_property
    def plans(self) -> pd.DataFrame:
        """Every plan: on the plan stream (``on_stream``) or only submitted by the harness.

        ``producer``: "harness" when the harness submitted it, else "governor" (rotation
        plans governors add); ``emitter``: the plan's ``source`` field; ``sent_ms``: its
        plan stream entry time, else the submit's completion time."""
        f = self.facts
        pe, sb = f.plans, f.submits
        if not pe and not sb:
            return _empty("plans")
        only_sb = list(sb.keys() - pe.keys())
        subs = list(map(sb.get, pe, repeat(_NO_SUBMIT))) + list(map(sb.__getitem__, only_sb))
        entries = list(pe.values())
        n_pe, n_sb = len(pe), len(only_sb)
        df = pd.DataFrame({
            "plan_id": np.fromiter(chain(pe, only_sb), dtype=object, count=n_pe + n_sb),
            "sent_ms": np.concatenate((_ints(map(attrgetter("entry_ms"), entries)),
                                       _ints(map(attrgetter("wall_ms"), subs[n_pe:])))),
            "symbol": _col(subs, "symbol"), "action": _col(entries, "action", n_sb),
            "emitter": _col(entries, "source", n_sb),
            "status": pd.Series(_col(subs, "status")).replace("", None),
            "on_stream": np.arange(n_pe + n_sb) < n_pe})
        df["producer"] = np.where(df["status"].notna(), "harness", "governor")
        df["notional"] = _numeric(_col(subs, "notional")).fillna(
            _numeric(_col(entries, "notional", n_sb)))
        for col in ("symbol", "action"):  # else as decided (a rotation plan has no submit)
            miss = df[col].isna()
            if miss.any():
                df.loc[miss, col] = df.loc[miss, "plan_id"].map(self._first_decisions[col])
        df["probe"] = df["plan_id"].isin(list(f.probes))
        df["t"] = self.s(df["sent_ms"])
        return df.sort_values("sent_ms", kind="stable").reset_index(drop=True)[
            list(COLUMNS["plans"])]

    @cached_property
    def _flat_decisions(self) -> list[Any]:
        return [d for ds in self.facts.decisions.values() for d in ds]

    @cached_property
    def decisions(self) -> pd.DataFrame:
        """Every PERMIT / BLOCK, in time order; ``first``: the plan's first decision;
        ``latency_ms``: plan stream entry to this decision entry (both Redis time)."""
        f = self.facts
        ds = self._flat_decisions
        if not ds:
            return _empty("decisions")
        lens = _ints(map(len, f.decisions.values()))
        first = np.zeros(len(ds), dtype=bool)
        first[(np.cumsum(lens) - lens)[lens > 0]] = True  # each plan's list: time order
        df = pd.DataFrame({
            "plan_id": _col(ds, "plan_id"),
            "decision": _col(ds, "decision"), "reason": _col(ds, "reason"),
            "instance": _col(ds, "governor"), "action": _col(ds, "action"),
            "symbol": _col(ds, "symbol"), "decided_ms": _ints(map(attrgetter("entry_ms"), ds)),
            "fence": _col(ds, "fence"), "entry_id": _col(ds, "entry_id"), "first": first})
        entry = _ints(map(attrgetter("entry_ms"), map(f.plans.get, df["plan_id"],
                                                      repeat(_NO_PLAN))))
        df["latency_ms"] = np.where(entry > 0, df["decided_ms"] - entry, np.nan)
        df["probe"] = df["plan_id"].isin(list(f.probes))
        df["t"] = self.s(df["decided_ms"])
        # Stable: a plan's decisions keep their order (entry time, then entry id).
        return df.sort_values("decided_ms", kind="stable").reset_index(drop=True)[
            list(COLUMNS["decisions"])]

    @cached_property
    def _first_decisions(self) -> pd.DataFrame:
        """Each plan's first decision, indexed by plan id."""
        d = self.decisions
        return d[d["first"].astype(bool)].set_index("plan_id")

    @cached_property
    def results(self) -> pd.DataFrame:
        """The apply.result entries: ``executed`` ones and the others (expired, rejected,
        or no value: status None), at the entry's stream time."""
        f = self.facts
        keys, ms = f.executed_keys, f.executed_ms
        ab = [(k, m, st) for k, xs in f.aborts.items() for m, st in xs]
        if not keys and not ab:
            return _empty("results")
        df = pd.DataFrame({
            "plan_id": pd.Series(keys + [x[0] for x in ab], dtype=object),
            "status": ["executed"] * len(keys) + [x[2] for x in ab],
            "ms": np.concatenate((_ints(ms), _ints(x[1] for x in ab)))})
        df["t"] = self.s(df["ms"])
        return df.sort_values("ms", kind="stable").reset_index(drop=True)

    @cached_property
    def orders(self) -> pd.DataFrame:
        """The exchange ledger, in ledger order; ``executed``: not rejected."""
        os_ = self.facts.orders
        if not os_:
            return _empty("orders")
        df = pd.DataFrame({
            "plan_id": _col(os_, "plan_id"),
            "symbol": _col(os_, "symbol"), "action": _col(os_, "action"),
            "notional": np.fromiter(map(attrgetter("notional"), os_), dtype=float),
            "open_count_after": _ints(map(attrgetter("open_count_after"), os_)),
            "ms": _ints(map(attrgetter("wall_ms"), os_)),
            "seq": _ints(map(attrgetter("seq"), os_)), "side": _col(os_, "side"),
            "effect": _col(os_, "effect"), "fence": _col(os_, "fence"),
            "position_id": _col(os_, "position_id"),
            "issued_at_ms": pd.array(list(map(attrgetter("issued_at_ms"), os_)),
                                     dtype="Int64")})
        df["executed"] = ~df["effect"].astype(str).str.startswith("rejected")
        df["t"] = self.s(df["ms"])
        return df[list(COLUMNS["orders"])]

    @cached_property
    def faults(self) -> pd.DataFrame:
        """Fault windows; ``stop_ms`` NaN: never stopped; ``ok`` False: failed to start;
        ``detail``: the fault's target."""
        ws = self.facts.faults
        if not ws:
            return _empty("faults")
        df = pd.DataFrame({"kind": [w.kind for w in ws], "start_ms": [w.start_ms for w in ws],
                           "stop_ms": pd.array([w.stop_ms for w in ws], dtype="Int64"),
                           "detail": [w.target for w in ws], "key": [w.key for w in ws],
                           "ok": [w.ok for w in ws]})
        df["start_s"] = self.s(df["start_ms"])
        df["stop_s"] = self.s(df["stop_ms"].astype(float))
        return df[list(COLUMNS["faults"])]

    @cached_property
    def governor_events(self) -> pd.DataFrame:
        """The governor processes' lifecycle as the supervisor recorded it (start, exit,
        crash, kill, pause...), one row per event with its fields; decisions are in
        :attr:`decisions`."""
        evs = self.facts.governor_events
        if not evs:
            return _empty("governor_events")
        df = pd.DataFrame(evs)
        df["t"] = self.s(df["ms"])
        return df[["ms", "t"] + [c for c in df.columns if c not in ("ms", "t")]]

    # -- derived frames ---------------------------------------------------------------------
    @cached_property
    def regimes(self) -> pd.DataFrame:
        """The regime in force over the plot range, as segments; ``regimes`` "A/B" while a
        flip is in flight (either may hold); ``slots``: the highest desired slots of them."""
        f = self.facts
        cfg = f.config
        x0, x1 = self.xlim
        start_ms = self.t0_ms + x0 * 1000
        points = {start_ms}
        for inv, done, _r, _t in f.regimes:  # a flip is surely done the ms after its reply
            points.add(inv)
            if done < 2**61:
                points.add(done + 1)
        pts = sorted(p for p in points if p >= start_ms)
        rows: list[list[Any]] = []
        for i, p in enumerate(pts):
            end = pts[i + 1] if i + 1 < len(pts) else self.t0_ms + x1 * 1000
            regimes = f.regime_at(int(p))
            name = "/".join(sorted(regimes))
            if rows and rows[-1][2] == name:
                rows[-1][1] = self.s(end)
            else:
                rows.append([self.s(p), self.s(end), name,
                             max(cfg.slots_for(r) for r in regimes)])
        return pd.DataFrame(rows, columns=list(COLUMNS["regimes"]))

    def slots_at(self, ms: Any) -> np.ndarray:
        """The desired slots in force at each of ``ms`` (the highest while a flip is in
        flight), vectorised over the few regime change points."""
        f = self.facts
        cfg = f.config
        pts = sorted({p for inv, done, _r, _t in f.regimes
                      for p in (inv, done + 1) if p < 2**61})
        base = max(cfg.slots_for(r) for r in f.regime_at(-(2**62)))
        vals = np.array([base] + [max(cfg.slots_for(r) for r in f.regime_at(p)) for p in pts])
        idx = np.searchsorted(np.asarray(pts, dtype=float), np.asarray(ms, dtype=float),
                              side="right")
        return vals[idx]

    @cached_property
    def positions(self) -> pd.DataFrame:
        """Open positions on the exchange after every order (ledger ``open_count_after``),
        starting from 0 at the first order, with the slots in force and max_positions."""
        o = self.orders
        if o.empty:
            return _empty("positions")
        ms = np.concatenate(([o["ms"].iloc[0]], o["ms"].to_numpy()))
        df = pd.DataFrame({"ms": ms, "open": np.concatenate(
            ([0], o["open_count_after"].to_numpy()))})
        df["t"] = self.s(df["ms"])
        df["slots"] = self.slots_at(ms)
        df["max_positions"] = self.facts.config.max_positions
        return df[list(COLUMNS["positions"])]

    def _permit_spans(self, action: str) -> pd.DataFrame:
        """The first PERMIT of each plan of ``action``, from decision to end: the rule of
        ``Facts.close_permit_spans`` (first order reaching the exchange, a failed take, a
        result other than executed; else the permit lapsed at permit_ttl_ms)."""
        f = self.facts
        d = self._first_permits
        d = d[d["action"] == action]
        if d.empty:
            return pd.DataFrame()
        o = self.orders
        pid = d["plan_id"]
        if not o.empty:
            fo = o.drop_duplicates("plan_id", keep="first").set_index("plan_id")
            order_ms = pid.map(fo["ms"]).astype(float)
            order_ok = pid.map(fo["executed"]).fillna(False).astype(bool)
        else:
            order_ms = pd.Series(np.nan, index=d.index)
            order_ok = pd.Series(False, index=d.index)
        tf = {k: min(v) for k, v in f.take_fails.items() if v}
        take_ms = pid.map(tf).astype(float) if tf else pd.Series(np.nan, index=d.index)
        ab = {k: min(v, key=itemgetter(0)) for k, v in f.aborts.items() if v}
        abort_ms = (pid.map({k: v[0] for k, v in ab.items()}).astype(float) if ab
                    else pd.Series(np.nan, index=d.index))
        abort_st = (pid.map({k: v[1] for k, v in ab.items()}) if ab
                    else pd.Series(None, index=d.index, dtype=object))
        start = d["decided_ms"].to_numpy(dtype=float)
        ends = np.vstack([order_ms.to_numpy(), take_ms.to_numpy(), abort_ms.to_numpy()])
        lapsed = np.isnan(ends).all(axis=0)
        which = np.where(lapsed, -1, np.argmin(np.where(np.isnan(ends), np.inf, ends), axis=0))
        ttl_end = start + f.config.permit_ttl_ms
        end = np.where(lapsed, ttl_end, np.nanmin(np.where(lapsed, 0, ends), axis=0)
                       if len(start) else start)
        end = np.maximum(end, start)
        last = float(f.last_ms or 0)
        kind = np.select(
            [lapsed & (ttl_end > last), lapsed, which == 0, which == 1,
             abort_st.to_numpy() == "expired"],
            ["open at end", "expired", np.where(order_ok.to_numpy(), "executed", "aborted"),
             "expired", "expired"], "aborted")
        return pd.DataFrame({
            "plan_id": pid.to_numpy(), "symbol": d["symbol"].to_numpy(),
            "instance": d["instance"].to_numpy(), "start_ms": start.astype(np.int64),
            "end_ms": end.astype(np.int64), "end": kind, "lapsed": lapsed,
            "start_s": self.s(start), "end_s": self.s(end), "fence_raw": d["fence"].to_numpy()})

    @cached_property
    def _first_permits(self) -> pd.DataFrame:
        d = self.decisions
        if d.empty:
            return d
        return d[d["decision"] == "PERMIT"].drop_duplicates("plan_id", keep="first")

    @cached_property
    def slot_leases(self) -> pd.DataFrame:
        """OPEN permits as intervals (slot leases): decision to end; ``ttl_expiry_s``:
        decision + permit_ttl_ms."""
        df = self._permit_spans("OPEN")
        if df.empty:
            return _empty("slot_leases")
        df["ttl_expiry_s"] = self.s(df["start_ms"] + self.facts.config.permit_ttl_ms)
        return df[list(COLUMNS["slot_leases"])]

    @cached_property
    def exit_locks(self) -> pd.DataFrame:
        """CLOSE permits as intervals (exit-lock holders), exactly the spans the
        single_close checker judges; ``ttl_expiry_s``: decision + exit_lock_ttl_ms (when a
        TTL-based exit lock expires); ``expired_in_flight``: that came before the end."""
        df = self._permit_spans("CLOSE")
        if df.empty:
            return _empty("exit_locks")
        ttl_ms = df["start_ms"] + self.facts.config.exit_lock_ttl_ms
        df["ttl_expiry_s"] = self.s(ttl_ms)
        df["fence"] = pd.to_numeric(pd.Series(df["fence_raw"], dtype=object),
                                    errors="coerce").astype(float)
        df["expired_in_flight"] = ttl_ms < df["end_ms"]
        return df[list(COLUMNS["exit_locks"])]

    @staticmethod
    def concurrent(intervals: pd.DataFrame) -> pd.DataFrame:
        """How many of ``intervals`` (start_s, end_s) are outstanding over time: t, n."""
        if intervals.empty:
            return pd.DataFrame({"t": pd.Series(dtype=float), "n": pd.Series(dtype=int)})
        t = np.concatenate((intervals["start_s"].to_numpy(), intervals["end_s"].to_numpy()))
        step = np.concatenate((np.ones(len(intervals), int), -np.ones(len(intervals), int)))
        order = np.lexsort((step, t))  # at one instant, ends before starts
        return pd.DataFrame({"t": t[order], "n": np.cumsum(step[order])})

    @cached_property
    def capital(self) -> pd.DataFrame:
        """Open notional (replayed from the ledger) and OPEN permits not yet executed, in
        total and for the symbol each event touched, after every event: the replay of the
        capital checker (a permit's reservation ends at its executed order, else its first
        failed take, else permit_ttl_ms; any order of the plan ends it too)."""
        f = self.facts
        cfg = f.config
        parts = []
        d = self._first_permits
        if not d.empty:
            d = d[d["action"] == "OPEN"]
            notional = d["plan_id"].map(self.plans.set_index("plan_id")["notional"]) \
                if not self.plans.empty else pd.Series(np.nan, index=d.index)
            d = d.assign(n=notional.astype(float)).dropna(subset=["n"])
        if not d.empty:
            o = self.orders
            start = d["decided_ms"].to_numpy(dtype=float)
            pid = d["plan_id"]
            ex_open = o[(o["action"] == "OPEN") & o["executed"]] if not o.empty else o
            last_open = (ex_open.drop_duplicates("plan_id", keep="last")
                         .set_index("plan_id")["ms"] if not ex_open.empty else pd.Series())
            oms = pid.map(last_open).astype(float).to_numpy() if len(last_open) else \
                np.full(len(d), np.nan)
            tf = {k: min(v) for k, v in f.take_fails.items() if v}
            fail = pid.map(tf).astype(float).to_numpy() if tf else np.full(len(d), np.nan)
            end = np.where(~np.isnan(oms), oms,
                           np.where(~np.isnan(fail), fail, start + cfg.permit_ttl_ms))
            end = np.maximum(end, start)
            by_order = ~np.isnan(oms) & (oms >= start)
            if not o.empty:  # any order of the plan at or after its permit settles it
                st = o["plan_id"].map(pd.Series(start, index=pid.to_numpy())).to_numpy()
                after = o[o["ms"].to_numpy() >= st].sort_values("ms", kind="stable")
                m = after.drop_duplicates("plan_id").set_index("plan_id")["ms"]
                any_o = pid.map(m).astype(float).to_numpy() if len(m) else \
                    np.full(len(d), np.nan)
                earlier = ~np.isnan(any_o) & (any_o < end)
                end = np.where(earlier, any_o, end)
                by_order = by_order | earlier | (~np.isnan(any_o) & (any_o == end))
            n = d["n"].to_numpy()
            sym = d["symbol"].to_numpy()
            parts.append(pd.DataFrame({"ms": start, "k": 0, "symbol": sym, "d_open": 0.0,
                                       "d_pend": n}))
            parts.append(pd.DataFrame({"ms": end, "k": np.where(by_order, 2, 1),
                                       "symbol": sym, "d_open": 0.0, "d_pend": -n}))
        o = self.orders
        if not o.empty:
            oo = o.sort_values(["ms", "seq"], kind="stable")
            ex = oo["executed"].to_numpy()
            act_open = ex & (oo["action"] == "OPEN").to_numpy()
            eff = oo["effect"].to_numpy()
            reset = ex & ~act_open & ((eff == "close") | (eff == "flip"))
            nn = oo["notional"].to_numpy()
            contrib = np.where(act_open | (reset & (eff == "flip")), nn, 0.0)
            # integer keys: groupby without hashing strings
            code = pd.factorize(oo["symbol"], use_na_sentinel=False)[0]
            seg = pd.Series(reset).groupby(code).cumsum().to_numpy()
            val = pd.Series(contrib).groupby(code * (int(seg.max()) + 1) + seg).cumsum()
            prev = val.groupby(code).shift(1, fill_value=0.0)
            parts.append(pd.DataFrame({"ms": oo["ms"].to_numpy(dtype=float), "k": 3,
                                       "symbol": oo["symbol"].to_numpy(),
                                       "d_open": (val - prev).to_numpy(), "d_pend": 0.0}))
        if not parts:
            return _empty("capital")
        ev = pd.concat(parts, ignore_index=True)
        ev = ev.iloc[np.lexsort((ev["k"].to_numpy(), ev["ms"].to_numpy()))].reset_index(
            drop=True)
        ev["open_notional"] = ev["d_open"].cumsum().clip(lower=0.0)
        ev["permitted_notional"] = ev["d_pend"].cumsum().clip(lower=0.0)
        by = ev.groupby(pd.factorize(ev["symbol"], use_na_sentinel=False)[0])
        ev["symbol_open_notional"] = by["d_open"].cumsum().clip(lower=0.0)
        ev["symbol_permitted_notional"] = by["d_pend"].cumsum().clip(lower=0.0)
        ev["max_total_notional"] = cfg.max_total_notional
        ev["t"] = self.s(ev["ms"])
        return ev[list(COLUMNS["capital"])]

    @cached_property
    def latency(self) -> pd.DataFrame:
        """One row per decision: plan stream entry to decision entry (NaN when the plan's
        entry was not seen); ``first``: the plan's first decision (the one that answers)."""
        d = self.decisions
        if d.empty:
            return _empty("latency")
        return d[list(COLUMNS["latency"])]

    @cached_property
    def violations(self) -> pd.DataFrame:
        """Every violation the verdict found, in time order, explained in words."""
        vs = sorted((v for r in self.verdict.results.values() for v in r.violations),
                    key=lambda v: v.wall_ms)
        if not vs:
            return _empty("violations")
        t0 = self.t0_ms
        df = pd.DataFrame({
            "invariant": [v.invariant for v in vs], "wall_ms": [v.wall_ms for v in vs],
            "message": [humanize(v.message, t0) for v in vs],
            "explanation": [explain(v, t0) for v in vs],
            "plan_ids": [list(v.plan_ids) for v in vs], "symbol": [v.symbol for v in vs],
            "expected": [v.expected for v in vs], "observed": [v.observed for v in vs],
            "faults": [list(v.faults) for v in vs]})
        df["t"] = self.s(df["wall_ms"])
        return df[list(COLUMNS["violations"])]


    @cached_property
    def model_explanations(self) -> pd.DataFrame:
        """Porcupine's visualization as a table: for each partition of a sequential-model
        check that failed or ran out of time, the longest linearizable prefix (ops), the
        first operation that cannot be placed after it (``t``: its call) and the model
        state before it (results.json ``models.<name>.stats.explanations``)."""
        rows = []
        for name, r in (getattr(self.verdict, "models", None) or {}).items():
            for e in (r.stats or {}).get("explanations") or ():
                stuck = e.get("first_unplaceable") or {}
                rows.append({
                    "model": name, "partition": e.get("partition"),
                    "outcome": e.get("outcome"), "ops": e.get("ops"),
                    "longest_prefix": e.get("longest_prefix"),
                    "first_unplaceable": _op_text(stuck) if stuck else "",
                    "t": (self.s(pd.Series([stuck["call_ms"]])).iloc[0]
                          if stuck.get("call_ms") is not None else float("nan")),
                    "state_before": e.get("state_before", ""),
                    "prefix_tail": [_op_text(o) for o in e.get("prefix_tail") or ()],
                    "pending_not_applying": [_op_text(o)
                                             for o in e.get("pending_not_applying") or ()]})
        if not rows:
            return _empty("model_explanations")
        return pd.DataFrame(rows)[list(COLUMNS["model_explanations"])]


    @cached_property
    def witnesses(self) -> list[tuple[Violation, dict[str, Any]]]:
        """Each minimised violation (time order) with its minimal witness: results.json's,
        else searched now (``chaos.checkers.minimize``, its default bounds)."""
        vs = sorted((v for r in self.verdict.results.values() for v in r.violations),
                    key=lambda v: v.wall_ms)
        if vs and "minimal_witnesses" not in (self.verdict.stats or {}) and not any(
                v.minimal_witness for v in vs):
            from chaos.checkers.minimize import minimize

            found, _summary = minimize(self.facts, vs, t0_ms=self.t0_ms)
            return [(vs[i], w) for i, w in sorted(found.items(), key=lambda x: x[0])]
        return [(v, v.minimal_witness) for v in vs if v.minimal_witness]

    @cached_property
    def minimal_witnesses(self) -> pd.DataFrame:
        """One row per operation of each violation's minimal witness, in time order: ``n``
        numbers the violation (as in the report), ``violation`` says it in words,
        ``violation_t`` when; ``match``, ``one_minimal`` and ``size`` say what the search
        showed (docs/analysis.md, "Minimal witnesses")."""
        rows = []
        for n, (v, w) in enumerate(self.witnesses, 1):
            for op in w.get("ops") or ():
                rows.append({"n": n, "invariant": v.invariant,
                             "violation": humanize(v.message, self.t0_ms),
                             "violation_t": self.s(v.wall_ms), "match": w.get("match"),
                             "one_minimal": w.get("one_minimal"), "size": w.get("size"),
                             "t": self.s(op["ms"]), **{k: op.get(k) for k in (
                                 "f", "type", "plan_id", "symbol", "action", "outcome",
                                 "detail", "ref", "ms")}})
        if not rows:
            return _empty("minimal_witnesses")
        return pd.DataFrame(rows)[list(COLUMNS["minimal_witnesses"])]


def _op_text(op: dict[str, Any]) -> str:
    """A model operation in a few words: ``plan-1: acquire S001USDT -> PERMIT``."""
    inp = op.get("input")
    what = " ".join(map(str, inp)) if isinstance(inp, list | tuple) else str(inp)
    return f"{op.get('client')}: {what} -> {op.get('output')}"


def fault_note(run: RunFrames) -> str:
    """The run's faults in a few words: "faults: kill_governor x2, partition x1"."""
    if not run.facts.faults:
        return "no faults"
    c = Counter(w.kind for w in run.facts.faults)
    return "faults: " + ", ".join(f"{k} x{n}" for k, n in sorted(c.items()))


def explain(v: Violation, t0: int) -> str:
    """A violation in one sentence: what happened, what the invariant wanted, under which
    faults."""
    faults = ", ".join(v.faults) if v.faults else "none"
    return (f"{humanize(v.message, t0)} (expected {v.expected}; observed {v.observed}; "
            f"faults active: {faults})")


_EPOCH_MS = re.compile(r"1\d{12}")
# A word as plan ids, position ids and stream ids are spelled (docs/protocol.md): a time is
# rewritten only when it is such a word on its own, never a part of one
# (``probe-open-1796228189697-0`` stays as it is).
_ID_WORD = re.compile(r"[A-Za-z0-9_.:-]+")


def humanize(text: str, t0: int) -> str:
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


def _stored_verdict(facts: Facts) -> Verdict | None:
    """The verdict in results.json if it was reached on this very history (same operation
    count, orders and last operation), else None."""
    path = Path(facts.run_dir) / "results.json"
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    st = d.get("stats") or {} if isinstance(d, dict) else {}
    if (st.get("ops"), st.get("orders"), st.get("last_ms")) != (
            facts.ops, len(facts.orders), facts.last_ms):
        return None
    try:
        word = {"unknown": None, True: True, False: False}
        by_inv: dict[str, list[Violation]] = {}
        for v in d.get("violations") or ():
            by_inv.setdefault(v["invariant"], []).append(Violation(
                v["invariant"], v["wall_ms"], v.get("symbol"), tuple(v.get("plan_ids") or ()),
                v.get("expected", ""), v.get("observed", ""), v.get("message", ""),
                tuple(v.get("events") or ()), tuple(v.get("faults") or ()),
                v.get("minimal_witness")))

        def results(section: dict[str, Any], vs: dict[str, list[Violation]]) -> dict[
                str, CheckResult]:
            return {n: CheckResult(n, word[r["valid"]], vs.get(n, []), r.get("stats") or {},
                                   r.get("note") or "") for n, r in section.items()}

        return Verdict(Path(facts.run_dir), word[d["valid"]],
                       results(d.get("invariants") or {}, by_inv), stats=st,
                       models=results(d.get("models") or {}, {}), facts=facts,
                       coverage=d.get("coverage") or {})
    except (KeyError, TypeError, ValueError):
        return None  # not a results.json this version wrote: judge the run again

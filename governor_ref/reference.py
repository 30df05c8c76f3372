"""The reference governor's decision logic: every decision is one Lua step.

Python here only marshals arguments; all state reads and writes happen in
the scripts of ``lua/`` (see their headers for the races each one closes).
A batch of plans is one pipeline of EVALSHA calls, one call per plan, so
the governor pays one round trip per batch, not per gate.
"""

from __future__ import annotations

import logging
from typing import Any

from .decisions import Mirror
from .governor import Context, Outcome, PlanEntry, ResultEntry, is_transient
from .protocol import Action, Plan, Reason
from .scripts import Call, ScriptSet

log = logging.getLogger(__name__)


def _s(x: Any) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


def plan_args(prefix: str, consumer: str, entry_id: str, plan: Plan) -> list[str]:
    """ARGV layout read by ``read_plan()`` in lua/lib.lua."""
    return [
        prefix, consumer, entry_id, plan.plan_id, plan.symbol, str(plan.action),
        str(plan.side or ""), plan.notional or "", plan.source, str(plan.intent_created_at_ms),
        "" if plan.snapshot_position_count is None else str(plan.snapshot_position_count),
        plan.snapshot_exposure_pct or "", plan.position_id or "",
    ]


class ReferenceLogic:
    name = "reference"
    thread_safe = True  # every step is one idempotent script

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.scripts = ScriptSet()
        self.keys = ctx.keys
        self.mirror = Mirror(ctx.r, ctx.keys)
        self._cursor = 0  # where the periodic sweep of the mirror goes on from

    def start(self) -> None:
        self.scripts.load(self.ctx.r)
        self.reconcile()

    # -- plans -------------------------------------------------------------------
    def _call_for(self, e: PlanEntry) -> Call | None:
        k, prefix, consumer = self.keys, self.keys.prefix, self.ctx.consumer
        if e.plan is not None:
            name = "decide_open" if e.plan.action is Action.OPEN else "decide_close"
            return self.scripts[name], [k.config], plan_args(prefix, consumer, e.entry_id, e.plan)
        err = e.error
        if err is None or err.plan_id is None:
            return None
        # Bad input with an answerable id: BLOCK invalid_plan (symbol/action as given, if sane).
        args = [prefix, consumer, e.entry_id, err.plan_id, err.symbol, err.action, "", "", "",
                "0", "", "", "",
                str(Reason.INVALID_PLAN)]
        return self.scripts["decide_block"], [k.config], args

    def decide(self, entries: list[PlanEntry]) -> list[Outcome]:
        calls: list[Call] = []
        index: list[int] = []
        outcomes: list[Outcome] = [Outcome(None, "NONE")] * len(entries)
        unanswerable = []
        for i, e in enumerate(entries):
            call = self._call_for(e)
            if call is None:
                unanswerable.append(e.entry_id)
            else:
                calls.append(call)
                index.append(i)
        if unanswerable:
            # No plan id to answer to: acknowledge so it does not come back forever.
            self.ctx.r.xack(self.keys.plans, "governor", *unanswerable)
        results = self.scripts.run_batch(self.ctx.r, calls) if calls else []
        first_error: BaseException | None = None
        for i, res in zip(index, results, strict=True):
            e = entries[i]
            pid = e.plan.plan_id if e.plan else (e.error.plan_id if e.error else None)
            if isinstance(res, BaseException):
                first_error = first_error or res
                log.warning("decision for %s not made: %s", pid, res)
                continue
            decision, reason = _s(res[0]), _s(res[1])
            outcomes[i] = Outcome(pid, decision, reason)
        if first_error is not None and is_transient(first_error):
            raise first_error  # back off; the undecided entries stay pending
        return outcomes

    # -- results ---------------------------------------------------------------------
    def settle(self, entries: list[ResultEntry]) -> None:
        k, script = self.keys, self.scripts["apply_result"]
        calls: list[Call] = []
        for e in entries:
            f = e.fields
            if not f.get("plan_id"):
                self.ctx.r.xack(k.results, "governor-results", e.entry_id)
                continue
            calls.append((script, [k.config], [
                k.prefix, e.entry_id, f["plan_id"], f.get("symbol", ""), f.get("action", ""),
                f.get("status", ""), f.get("position_id", ""), f.get("notional", ""),
                f.get("executed_at_ms", ""),
            ]))
        if not calls:
            return
        results = self.scripts.run_batch(self.ctx.r, calls)
        for (_script, _keys, args), res in zip(calls, results, strict=True):
            if isinstance(res, BaseException):
                if is_transient(res):
                    raise res
                log.error("result %s not applied: %s", args[2], res)
            else:
                self.ctx.metrics.results.labels(self.name, args[5]).inc()

    # -- housekeeping ------------------------------------------------------------------
    def periodic(self) -> None:
        self.reconcile(self.ctx.settings.reconcile_scan_keys)

    def reconcile(self, budget: int | None = None) -> tuple[int, int]:
        """Line the open set up with the position mirror (see lua/reconcile.lua).

        SCAN walks the whole keyspace, not just ``P:position:*``, and the keyspace grows
        with every plan decided (the decision records live for a week): at 500 plans/s,
        two governors walking all of it every second took 3.6% of Redis's CPU after one
        minute, a share that grows with every minute, on a Redis other systems may share.
        So the start-up reconcile walks everything, and each periodic one walks at most
        ``budget`` keys, going on from where the previous one stopped (a full sweep every
        second up to ``budget`` keys, every keys/budget seconds beyond). Dropping needs
        no walk (the script checks every counted symbol every time); adopting a
        position the governor does not count waits for the sweep to reach it, and the
        script re-checks each candidate, so a partial or stale walk is safe."""
        k = self.keys
        found, self._cursor = self.mirror.sweep(0 if budget is None else self._cursor, budget)
        res = self.scripts.run(self.ctx.r, self.scripts["reconcile"], [k.config],
                               [k.prefix, *sorted(found)])
        adopted, dropped = int(res[0]), int(res[1])
        if adopted or dropped:
            log.info("reconcile: adopted %d, dropped %d positions from the mirror",
                     adopted, dropped)
        return adopted, dropped

"""Findings about the governor processes themselves, from the supervisor's ``governor`` ops.

An invariant checker judges what the governors decided; it cannot say *why* a plan was
never decided. When an instance kept dying, the history holds the evidence the supervisor
gathered after each crash (``pending`` events: what the crashed consumer held pending in
group ``governor``, with delivery counts and the fields of the entry delivered most often).
A governor that dies on one input and is restarted under its consumer name is handed that
entry again and again, so the entry with the highest delivery count is the one to name:
the likely poison pill. This module turns those ops into a short, JSON-ready summary for
``results.json`` (``stats.governor_findings``) and the report, computed from the history
alone so that ``chaos check`` / ``chaos report`` on a stored run show the same.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any


def governor_findings(events: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One entry per instance that crashed (exited without being asked to), most crashes
    first: ``consumer``, ``crashes``, ``starts``, ``crash_loop`` (exited again and again right
    after starting), ``gave_up``, ``first_crash_ms`` / ``last_crash_ms``,
    ``last_returncode``, ``served`` (it was seen in the plan group: a crash loop after that
    is a finding, not a start failure), ``pending`` (entries it held at its last crash) and
    ``suspect``: the pending entry with the highest delivery count seen after any of its
    crashes (``id``, ``deliveries``, ``fields`` escaped where not UTF-8, ``non_utf8``, and
    ``tied``: the other entries delivered as often, read in the same batch), or
    None when it held nothing (or Redis could not be asked: ``evidence_error``). Also an
    instance that never crashed but was never seen in group ``governor`` by the end of the
    run (``never_in_group``: it was ready only by staying up; did it read the stream?)."""
    per: dict[str, dict[str, Any]] = {}

    def entry(consumer: str) -> dict[str, Any]:
        return per.setdefault(consumer, {
            "consumer": consumer, "crashes": 0, "starts": 0, "crash_loop": False,
            "gave_up": False, "first_crash_ms": None, "last_crash_ms": None,
            "last_returncode": None, "served": False, "pending": None, "suspect": None,
            "evidence_error": None, "never_in_group": False})

    for ev in sorted(events, key=lambda e: e.get("ms") or 0):
        consumer, kind = ev.get("consumer"), ev.get("type")
        if not consumer:
            continue
        e = entry(str(consumer))
        if kind == "start":
            e["starts"] += 1
        elif kind == "crash":
            e["crashes"] += 1
            e["first_crash_ms"] = e["first_crash_ms"] or ev.get("ms")
            e["last_crash_ms"] = ev.get("ms")
            e["last_returncode"] = ev.get("returncode")
        elif kind == "crash_loop":
            e["crash_loop"] = True
        elif kind == "gave_up":
            e["gave_up"] = True
        elif kind == "ready" and ev.get("how") == "listed":
            e["served"] = True
        elif kind == "membership":
            e["never_in_group"] = not ev.get("listed")
        elif kind == "pending":
            if ev.get("error"):
                e["evidence_error"] = ev["error"]
                continue
            e["pending"] = ev.get("pending")
            if ev.get("pending") or ev.get("listed"):
                e["served"] = True
            top = ev.get("top")
            best = e["suspect"]
            # ">=": the same entry seen again later carries its newer delivery count
            if top and (best is None or int(top.get("deliveries") or 0)
                        >= int(best.get("deliveries") or 0)):
                e["suspect"] = {k: top.get(k) for k in ("id", "deliveries", "fields",
                                                        "non_utf8", "tied", "tied_total")}
    found = [e for e in per.values() if e["crashes"] or e["never_in_group"]]
    return sorted(found, key=lambda e: (-e["crashes"], e["consumer"]))


def _entry(e: Mapping[str, Any]) -> str:
    """``id: field=value, ...`` with the fields that are not UTF-8 named."""
    fields = e.get("fields")
    text = ("(entry deleted)" if fields is None
            else ", ".join(f"{k}={v}" for k, v in fields.items()))
    bad = f" [not UTF-8: {', '.join(e['non_utf8'])}]" if e.get("non_utf8") else ""
    return f"{e.get('id')}: {text}{bad}"


def describe(finding: Mapping[str, Any]) -> str:
    """One line for a terminal or a report: who kept dying, and on which entry."""
    if not finding.get("crashes"):
        return (f"{finding['consumer']} was never seen in consumer group 'governor' (ready "
                f"only by staying up): did it read the plan stream?")
    what = "crash-looped" if finding.get("crash_loop") else "crashed"
    line = (f"{finding['consumer']} {what}: {finding['crashes']} crash(es) in "
            f"{finding['starts']} start(s), last return code {finding.get('last_returncode')}")
    s = finding.get("suspect")
    if s:
        tied = s.get("tied") or []
        total = s.get("tied_total") or 1 + len(tied)
        line += (f"; pending entry {_entry(s)} delivered {s['deliveries']} times"
                 if total == 1 else
                 f"; {total} pending entries delivered {s['deliveries']} times each (read "
                 f"together): " + "; ".join(_entry(t) for t in [s, *tied])
                 + (f"; and {total - 1 - len(tied)} more" if total > 1 + len(tied) else ""))
    elif finding.get("evidence_error"):
        line += f"; its pending entries could not be read ({finding['evidence_error']})"
    else:
        line += "; nothing pending to it"
    return line

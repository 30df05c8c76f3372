"""The liveness probe that ends every run.

Once faults are healed and every TTL in the config has lapsed, a governor
that leaked nothing must (1) permit a CLOSE of each position the exchange
shows open and (2) permit as many OPENs of fresh symbols as the regime's
slots allow. A leaked slot, a stuck exit lock or a lost counter shows up
here as a BLOCK (or no decision at all). Every probe plan is an operation in
the history (``f = probe``), so the liveness checker judges it like any other.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import redis

from chaos.exchange import Exchange
from chaos.history import F, HistoryWriter
from governor_ref.keys import Keys
from governor_ref.protocol import GovernorConfig

log = logging.getLogger(__name__)

PROBE_SYMBOLS = [f"PRB{i:02d}USDT" for i in range(20)]


@dataclass
class ProbeOutcome:
    waited_s: float = 0.0
    closes: dict[str, str] = field(default_factory=dict)  # plan_id -> PERMIT / reason / none
    opens: dict[str, str] = field(default_factory=dict)
    desired_slots: int = 0
    open_before_opens: int = 0

    @property
    def ok(self) -> bool:
        return all(v == "PERMIT" for v in [*self.closes.values(), *self.opens.values()])


def ttl_wait_s(cfg: GovernorConfig) -> float:
    """Long enough for every lease, lock and permit in the config to lapse."""
    return max(cfg.permit_ttl_ms, cfg.exit_lock_ttl_ms, cfg.rotation_lock_ttl_ms,
               cfg.capital_reservation_ttl_ms) / 1000.0 + 0.5


def _decision(r: redis.Redis, keys: Keys, plan_id: str, cursor: list[str],
              seen: dict[str, dict[str, str]], timeout: float) -> dict[str, str] | None:
    deadline = time.monotonic() + timeout
    while plan_id not in seen and time.monotonic() < deadline:
        try:
            resp = r.xread({keys.events: cursor[0]}, count=1000, block=200)
        except (redis.ConnectionError, redis.TimeoutError):
            time.sleep(0.2)
            continue
        for _s, entries in resp or []:
            for eid, f in entries:
                cursor[0] = eid
                if f.get("decision") in ("PERMIT", "BLOCK"):
                    seen.setdefault(f.get("plan_id", ""), f)
    return seen.get(plan_id)


def run_probe(r: redis.Redis, keys: Keys, exchange: Exchange, cfg: GovernorConfig,
              history: HistoryWriter, *, max_wait_s: float = 120.0,
              decision_timeout_s: float = 20.0, execution_timeout_s: float = 20.0,
              wait: bool = True) -> ProbeOutcome:
    """Run the probe; ``r`` is a decode_responses client on the current primary."""
    out = ProbeOutcome()
    if wait:
        out.waited_s = min(ttl_wait_s(cfg), max_wait_s)
        history.invoke(F.PHASE, key="probe_wait", seconds=out.waited_s)
        time.sleep(out.waited_s)
        history.ok(F.PHASE, key="probe_wait", seconds=out.waited_s)
    cursor = [r.xinfo_stream(keys.events)["last-generated-id"] if r.exists(keys.events)
              else "0-0"]
    seen: dict[str, dict[str, str]] = {}
    stamp = int(time.time() * 1000)

    def submit(plan: dict[str, str], kind: str) -> str:
        pid = plan["plan_id"]
        history.invoke(F.PROBE, key=pid, symbol=plan["symbol"], plan=plan, probe=kind)
        r.xadd(keys.plans, plan)
        d = _decision(r, keys, pid, cursor, seen, decision_timeout_s)
        if d is None:
            history.fail(F.PROBE, key=pid, symbol=plan["symbol"], probe=kind, decision=None)
            return "none"
        outcome = "PERMIT" if d["decision"] == "PERMIT" else (d.get("reason") or "BLOCK")
        history.ok(F.PROBE, key=pid, symbol=plan["symbol"], probe=kind,
                   decision=d["decision"], reason=d.get("reason", ""))
        return outcome

    def wait_for(pred, timeout: float) -> bool:  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if pred():
                return True
            time.sleep(0.05)
        return False

    # 1. every open position must be closable
    for n, (sym, pos) in enumerate(sorted(exchange.open_positions().items())):
        pid = f"probe-close-{stamp}-{n}"
        now = str(int(time.time() * 1000))
        res = submit({"plan_id": pid, "symbol": sym, "action": "CLOSE", "source": "probe",
                      "intent_created_at_ms": now, "position_id": pos.position_id}, "close")
        out.closes[pid] = res
        if res == "PERMIT":
            wait_for(lambda s=sym: s not in exchange.open_positions(), execution_timeout_s)
    # 2. then fresh symbols up to the regime's slots
    regime = r.get(keys.regime) or "BASE"
    out.desired_slots = cfg.slots_for(regime)
    out.open_before_opens = exchange.open_count()
    free = max(0, out.desired_slots - out.open_before_opens)
    notional = str(max(1, min(10, int(cfg.max_notional_per_trade))))
    for n in range(free):
        sym = PROBE_SYMBOLS[n % len(PROBE_SYMBOLS)]
        if sym in exchange.open_positions():
            continue
        pid = f"probe-open-{stamp}-{n}"
        res = submit({"plan_id": pid, "symbol": sym, "action": "OPEN", "side": "LONG",
                      "notional": notional, "source": "probe",
                      "intent_created_at_ms": str(int(time.time() * 1000))}, "open")
        out.opens[pid] = res
        if res == "PERMIT":
            wait_for(lambda s=sym: s in exchange.open_positions(), execution_timeout_s)
    log.info("probe: closes %s, opens %s", out.closes, out.opens)
    return out

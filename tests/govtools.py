"""Test helpers: drive a governor by hand through the wire protocol.

The tests play producer and apply layer themselves (one step at a time), so
each gate can be exercised in a known state. Nothing here mocks Redis.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis

from governor_ref.governor import Governor, Settings, group_drained
from governor_ref.keys import GROUP_GOVERNOR, GROUP_GOVERNOR_RESULTS, Keys
from governor_ref.protocol import GovernorConfig
from governor_ref.variants import factory

SYMBOLS = [f"S{i:02d}USDT" for i in range(60)]


def wait_for(pred: Callable[[], Any], timeout: float = 5.0, what: str = "condition") -> Any:
    """Poll ``pred`` until it returns something truthy (returned), or fail the test after
    ``timeout`` seconds naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass
class Running:
    gov: Governor
    thread: threading.Thread

    def stop(self) -> None:
        self.gov.stop.set()
        self.thread.join(timeout=10)
        assert not self.thread.is_alive(), "governor thread did not stop"


@dataclass
class Desk:
    """One governor prefix on a real Redis, with the operator's inputs written."""

    url: str
    prefix: str
    r: redis.Redis
    config: dict[str, Any] = field(default_factory=dict)
    running: list[Running] = field(default_factory=list)

    @property
    def keys(self) -> Keys:
        return Keys(self.prefix)

    def setup(self, regime: str = "BASE", capital: float = 10_000, allocation: float = 0.25,
              symbols: list[str] | None = None) -> Desk:
        k = self.keys
        cfg = GovernorConfig().to_hash()
        cfg.update({n: str(v) for n, v in self.config.items()})
        self.r.hset(k.config, mapping=cfg)
        self.r.set(k.regime, regime)
        self.r.set(k.capital, str(capital))
        self.r.set(k.exposure_pct, "0")
        for s in symbols or SYMBOLS:
            self.r.set(k.allocation(s), json.dumps({"allocation_pct": allocation}))
        with contextlib.suppress(redis.ResponseError):  # BUSYGROUP
            self.r.xgroup_create(k.plans, GROUP_GOVERNOR, id="0", mkstream=True)
        return self

    def set_config(self, **fields: Any) -> None:
        self.r.hset(self.keys.config, mapping={n: str(v) for n, v in fields.items()})

    def start(self, consumer: str = "g1", variant: str = "reference", wait: bool = True,
              **kw: Any) -> Running:
        settings = Settings(redis_url=self.url, prefix=self.prefix, consumer=consumer,
                            variant=variant, block_ms=50, **kw)
        gov = Governor(settings, factory(variant))
        t = threading.Thread(target=gov.run, name=f"gov-{consumer}", daemon=True)
        t.start()
        if wait:
            assert gov.started.wait(10), "governor did not start"
        run = Running(gov, t)
        self.running.append(run)
        return run

    def stop_all(self) -> None:
        for run in self.running:
            run.stop()
        self.running.clear()

    # -- producer ---------------------------------------------------------------
    def plan(self, action: str, symbol: str, plan_id: str | None = None, **fields: Any) -> str:
        pid = plan_id or f"p-{uuid.uuid4().hex[:12]}"
        f: dict[str, str] = {"plan_id": pid, "symbol": symbol, "action": action,
                             "source": fields.pop("source", "intent_bridge"),
                             "intent_created_at_ms": str(fields.pop("created", now_ms()))}
        if action == "OPEN":
            f["side"] = fields.pop("side", "LONG")
            f["notional"] = str(fields.pop("notional", "100"))
        f.update({n: str(v) for n, v in fields.items()})
        self.r.xadd(self.keys.plans, f)
        return pid

    def raw_plan(self, fields: dict[str, Any]) -> None:
        self.r.xadd(self.keys.plans, fields)

    # -- observer ---------------------------------------------------------------
    def events(self) -> list[dict[str, str]]:
        return [f for _i, f in self.r.xrange(self.keys.events)]

    def decisions(self, plan_id: str) -> list[dict[str, str]]:
        return [e for e in self.events() if e.get("plan_id") == plan_id
                and e.get("decision") in ("PERMIT", "BLOCK")]

    def decision(self, plan_id: str, timeout: float = 10.0) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            d = self.decisions(plan_id)
            if d:
                return d[0]
            time.sleep(0.01)
        raise AssertionError(f"no decision for {plan_id} within {timeout}s")

    def decide(self, action: str, symbol: str, **fields: Any) -> dict[str, str]:
        return self.decision(self.plan(action, symbol, **fields))

    def wait_idle(self, timeout: float = 10.0) -> None:
        """Until the plan group has no pending or undelivered entries."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if group_drained(self.r, self.keys.plans, GROUP_GOVERNOR):
                return
            time.sleep(0.02)
        raise AssertionError("governors did not drain the plan stream")

    # -- apply layer by hand ---------------------------------------------------
    def execute(self, plan_id: str, status: str = "executed", position_id: str | None = None,
                write_mirror: bool = True, pnl_pct: float = 0.0) -> dict[str, Any]:
        """Take the permit (GETDEL), mirror the effect, then write the result."""
        k = self.keys
        raw = self.r.getdel(k.permit(plan_id))
        assert raw is not None, f"no permit for {plan_id}"
        permit = json.loads(raw)
        sym = permit["symbol"]
        if position_id is None:
            position_id = f"pos-{plan_id}" if permit["action"] == "OPEN" else (
                self.r.hget(k.position(sym), "position_id") or "")
        if status == "executed" and write_mirror:
            if permit["action"] == "OPEN":
                self.r.hset(k.position(sym), mapping={
                    "position_id": position_id, "symbol": sym, "side": permit["side"],
                    "notional": permit["notional"], "opened_at_ms": str(now_ms()),
                    "pnl_pct": str(pnl_pct)})
            else:
                self.r.delete(k.position(sym))
        self.result(plan_id, sym, permit["action"], status, position_id, permit["notional"],
                    permit.get("fence", ""))
        return permit

    def result(self, plan_id: str, symbol: str, action: str, status: str = "executed",
               position_id: str = "", notional: str = "", fence: str = "") -> None:
        self.r.xadd(self.keys.results, {
            "plan_id": plan_id, "symbol": symbol, "action": action, "status": status,
            "position_id": position_id, "notional": notional, "fence": fence or "",
            "reason": "", "executed_at_ms": str(now_ms())})

    def settled(self, timeout: float = 10.0) -> None:
        """Until the governors have applied every result."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if group_drained(self.r, self.keys.results, GROUP_GOVERNOR_RESULTS):
                return
            time.sleep(0.02)
        raise AssertionError("results not settled")

    def open_position(self, symbol: str, pnl_pct: float = 0.0, **fields: Any) -> str:
        """OPEN through the governor and execute it; returns the position id."""
        d = self.decide("OPEN", symbol, **fields)
        assert d["decision"] == "PERMIT", d
        permit = self.execute(d["plan_id"], pnl_pct=pnl_pct)
        self.settled()
        return f"pos-{permit['plan_id']}"


# A short scenario for end-to-end tests: TTLs shrunk so the liveness probe's wait for
# every TTL to lapse stays short, and a fast exchange. ``extra`` adds [[workload]] and
# [[fault]] tables.
SMALL_SCENARIO = """
name = "small-{name}"
description = "a short test scenario"
duration_s = {duration}
governors = 2

[config]
permit_ttl_ms = 500
exit_lock_ttl_ms = 400
rotation_lock_ttl_ms = 500
capital_reservation_ttl_ms = 2000
max_total_notional = 100000

[apply]
open_latency_ms = 5
open_jitter_ms = 10
close_latency_ms = 5
close_jitter_ms = 10

[[workload]]
kind = "open_storm"
processes = 2
rate = 200
{extra}
"""


def small_scenario(name: str = "t", duration: float = 3, extra: str = "") -> str:
    return SMALL_SCENARIO.format(name=name, duration=duration, extra=extra)

"""``chaos conformance``: does a governor speak the wire protocol, case by case?

Before a chaos suite can say anything useful about a governor, the governor has to speak
``docs/protocol.md`` at all. This module drives one governor command through a fixed,
sequential set of protocol cases on an embedded Redis, with no faults, and says for each
case ``PASS``, ``FAIL`` (with what the protocol expects and what the governor did) or
``NOT PRESENT`` (an optional feature the governor does not offer: rotation plans, its own
block reasons, a check of ``position_id``), in the spirit of h2spec for HTTP/2 servers.

How it is built, and why:

* **One case, one prefix, one governor process.** The protocol hands a governor its prefix
  at start (``GOVERNOR_PREFIX``), so every case gets a fresh prefix, its own inputs and its
  own instance (consumer ``gov-1``), started through :class:`chaos.supervisor.Supervisor`
  exactly as ``chaos run`` starts one. The next case's instance is started while the
  current case runs, and the previous one is stopped in the background: the cases stay
  sequential (each talks to one instance), and the whole run takes seconds.
* **Judged by the protocol only.** Each check cites what the protocol requires (the
  invariants, the field tables, "exactly one decision"). Where the text is open, the
  reading that accepts more governors is taken and said in ``docs/your-governor.md``.
* **Black box, but precise.** The harness plays producer, operator, apply layer and
  exchange by hand (the real :class:`chaos.exchange.Exchange` writes the mirror). "The
  permit key exists before its PERMIT event becomes visible" is observed through keyspace
  notifications on the conformance's own Redis, which arrive in execution order, also for
  commands run inside a Lua script or a MULTI.
* **A governor that never starts is not a FAIL.** As with ``chaos run``, a command that
  cannot be executed, exits at once, or never reads its plan stream is a
  :class:`ConformanceStartError` (exit 255), never a list of failed cases.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import signal
import tempfile
import threading
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import redis

from chaos.apply_layer import result_for_fill
from chaos.exchange import Exchange, Order
from chaos.recorder import _id_tuple
from chaos.redis_servers import EmbeddedRedis
from chaos.supervisor import GovernorSpec, GovernorStartError, Supervisor, describe_returncode
from governor_ref.governor import group_drained
from governor_ref.keys import GROUP_GOVERNOR, GROUP_GOVERNOR_RESULTS, Keys
from governor_ref.protocol import GovernorConfig, Permit

log = logging.getLogger(__name__)

PASS, FAIL, NOT_PRESENT = "PASS", "FAIL", "NOT PRESENT"
CANONICAL_REASONS = frozenset({
    "active_slots_waiting_rotation_close", "capital_allocation_exceeded",
    "notional_cap_exceeded", "total_notional_cap_exceeded",
    "exit_lock_busy_double_close_prevention", "state_drift_position_count",
    "state_drift_exposure", "intent_stale", "duplicate_open", "no_open_position",
    "invalid_plan"})
EVENT_FIELDS = ("plan_id", "symbol", "action", "decision", "reason", "governor",
                "decided_at_ms")
PERMIT_FIELDS = ("plan_id", "symbol", "action", "side", "notional", "fence", "issued_at_ms")
CONSUMER = "gov-1"
SYMBOLS = [f"C{i:02d}USDT" for i in range(1, 13)]
MARKER_SYMBOL = "CMARKUSDT"  # flat in every case: a CLOSE of it is a harmless marker plan
FIRST_DECISION_S = 15.0  # the first decision of a case may wait for the process to start
DECISION_S = 5.0
ACK_S = 2.0
TAKEOVER_S = 10.0  # pending entries of a restarted consumer: decided within this
CLOCK_SLACK_MS = 10_000  # decided_at_ms / issued_at_ms against the harness's clock
# Inputs of every case unless it says otherwise: limits far from the plans' sizes, long
# TTLs (nothing expires during a case), 10,000 USD of capital, 25 % per symbol.
BASE_CONFIG: dict[str, str] = {"permit_ttl_ms": "30000", "max_total_notional": "2000",
                               "max_notional_per_trade": "200"}
CAPITAL = 10_000.0
ALLOCATION = 0.25


class ConformanceStartError(RuntimeError):
    """The governor command never started or never read its plan stream (exit 255)."""


class CaseFailed(Exception):
    """The governor broke what the protocol requires in this case."""

    def __init__(self, expected: str, observed: str) -> None:
        super().__init__(f"expected {expected}; observed {observed}")
        self.expected, self.observed = expected, observed


class NotPresent(Exception):
    """An optional protocol feature the governor does not offer."""

    def __init__(self, expected: str, observed: str) -> None:
        super().__init__(observed)
        self.expected, self.observed = expected, observed


@dataclass
class CaseResult:
    name: str
    title: str
    required: bool
    status: str
    expected: str = ""
    observed: str = ""
    seconds: float = 0.0
    log: str = ""  # the governor instance's log for this case

    @property
    def failed(self) -> bool:
        return self.status == FAIL

    def line(self) -> str:
        """``PASS  name  title`` and, unless it passed, expected / observed below."""
        head = f"{self.status:<11} {self.name:<28} {self.title}"
        if self.status == PASS:
            return head + (f"  ({self.observed})" if self.observed else "")
        return (f"{head}\n{'':12}expected: {self.expected}\n{'':12}observed: {self.observed}"
                + (f"\n{'':12}log: {self.log}" if self.status == FAIL and self.log else ""))


@dataclass(frozen=True)
class Case:
    """One protocol case: its inputs, what to do before the governor starts, its body."""

    name: str
    title: str
    body: Callable[[CaseRun], str | None]
    required: bool = True
    config: dict[str, str] = field(default_factory=dict)
    regime: str = "BASE"
    capital: float = CAPITAL
    allocation: float = ALLOCATION
    create_group: bool = True  # the harness creates the plan stream and group (MKSTREAM)
    before_start: Callable[[CaseRun], None] | None = None


# --------------------------------------------------------------------------- one case


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _num(text: Any) -> Decimal | None:
    try:
        return Decimal(str(text))
    except (InvalidOperation, ValueError):
        return None


def _show(d: dict[str, str] | None) -> str:
    if d is None:
        return "no decision"
    return f"{d.get('decision')} {d.get('reason') or ''}".strip()


class CaseRun:
    """One case being run: its prefix, the governor instance, and the harness's hands
    (producer, operator, apply layer, exchange) and eyes (decisions, acks, notifications)."""

    def __init__(self, case: Case, index: int, server: EmbeddedRedis, spec: GovernorSpec,
                 case_dir: Path, run_id: str) -> None:
        self.case = case
        self.prefix = f"cf{run_id}{index:02d}"
        self.keys = Keys(self.prefix)
        self.dir = case_dir
        self.r = server.client(decode_responses=True, encoding_errors="replace")
        self.cfg = GovernorConfig.from_hash(GovernorConfig().to_hash() | BASE_CONFIG
                                            | case.config)
        self.exchange = Exchange.create(case_dir / "ledger.sqlite", capital=case.capital)
        self.sent: dict[str, str] = {}  # plan id -> entry id of its latest add
        self.described: dict[str, str] = {}  # plan id -> "OPEN C01USDT 100"
        self.own_plans: set[str] = set()  # entry ids the harness added to the plan stream
        self.events: list[tuple[str, dict[str, str]]] = []
        self._cursor = "0-0"
        self.first_wait = True
        # The session lowers it once a whole case went by without any decision: a governor
        # that never answers is not waited for 15 s in every case.
        self.first_timeout = FIRST_DECISION_S
        self.own_reasons: list[str] = []
        self.last_seen = ""  # the last BLOCK checked, for a PASS line that says nothing else
        self._notif: list[tuple[str, str]] = []
        self._seq = 0
        self.pubsub = self.r.pubsub()
        self.pubsub.psubscribe(f"__keyspace@*__:{self.prefix}:*")
        self._await_subscription()
        self._write_inputs()
        if case.before_start is not None:
            case.before_start(self)
        self.sup = Supervisor(spec, server.url, self.prefix, 1, case_dir, restart=False,
                              quick_exit_s=2.0, stop_timeout_s=3.0)

    # -- set-up ------------------------------------------------------------------------
    def _await_subscription(self) -> None:
        """Until the server confirmed the subscription: no notification of the case's
        keys may be missed."""
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            msg = self.pubsub.get_message(timeout=0.1)
            if msg is not None and msg.get("type") == "psubscribe":
                return
        raise RuntimeError("keyspace notifications: no confirmation of PSUBSCRIBE")

    def _write_inputs(self) -> None:
        k, c = self.keys, self.case
        pipe = self.r.pipeline()
        pipe.hset(k.config, mapping=self.cfg.to_hash())
        pipe.set(k.regime, c.regime)
        pipe.set(k.capital, str(c.capital))
        pipe.set(k.exposure_pct, "0")
        for s in [*SYMBOLS, MARKER_SYMBOL]:
            pipe.set(k.allocation(s), json.dumps({"allocation_pct": c.allocation}))
        pipe.execute()
        if c.create_group:
            self.r.xgroup_create(k.plans, GROUP_GOVERNOR, id="0", mkstream=True)

    def start(self) -> None:
        self.sup.start()

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.sup.stop(timeout=3.0)
        with contextlib.suppress(Exception):
            self.pubsub.close()
        with contextlib.suppress(Exception):
            self.r.close()
        with contextlib.suppress(Exception):
            self.exchange.close()

    # -- the governor process ------------------------------------------------------------
    def exited(self) -> str | None:
        """Why the instance is not running (it crashed), or None while it runs."""
        st = self.sup.status()[CONSUMER]
        if st.state in ("running", "paused") or st.crashes == 0:
            return None
        rc = st.last_returncode
        return (f"the governor exited (return code "
                f"{describe_returncode(rc) if rc is not None else '?'})")

    # -- producer ------------------------------------------------------------------------
    def plan(self, action: str, symbol: str, plan_id: str | None = None, *,
             created: int | None = None, **fields: Any) -> str:
        """Add a well-formed plan (OPEN: side LONG, notional 100 unless given)."""
        self._seq += 1
        pid = plan_id or f"cf-{self._seq:03d}-{uuid.uuid4().hex[:6]}"
        f: dict[str, Any] = {"plan_id": pid, "symbol": symbol, "action": action,
                             "source": fields.pop("source", "intent_bridge"),
                             "intent_created_at_ms": str(created or _now_ms())}
        if action == "OPEN":
            f["side"] = fields.pop("side", "LONG")
            f["notional"] = str(fields.pop("notional", "100"))
        f.update({n: str(v) for n, v in fields.items()})
        self.add(f)
        self.described[pid] = f"{action} {symbol}" + (f" {f['notional']}" if action == "OPEN"
                                                       else "")
        return pid

    def add(self, fields: dict[Any, Any]) -> str:
        """XADD raw fields (bytes allowed) to the plan stream; returns the entry id."""
        entry = str(self.r.xadd(self.keys.plans, fields))
        self.own_plans.add(entry)
        pid = fields.get("plan_id")
        if isinstance(pid, str):
            self.sent[pid] = entry
        return entry

    def set_regime(self, regime: str) -> None:
        self.r.set(self.keys.regime, regime)

    # -- decisions -----------------------------------------------------------------------
    def poll(self, block_ms: int = 50) -> None:
        """Read new decision entries (``block_ms`` 0: do not wait; XREAD's 0 is forever)."""
        resp = self.r.xread({self.keys.events: self._cursor}, count=1000,
                            block=block_ms or None)
        for _s, entries in resp or []:
            for eid, f in entries:
                self._cursor = eid
                self.events.append((eid, f))

    def decisions(self, pid: str) -> list[tuple[str, dict[str, str]]]:
        """PERMIT / BLOCK entries for ``pid`` (informational entries are skipped)."""
        return [(i, f) for i, f in self.events
                if f.get("plan_id") == pid and f.get("decision") in ("PERMIT", "BLOCK")]

    def decision(self, pid: str, timeout: float | None = None) -> dict[str, str] | None:
        """The first decision for ``pid`` (waiting for it), or None after the timeout or
        once the governor process is gone."""
        if timeout is None:
            timeout = self.first_timeout if self.first_wait else DECISION_S
        deadline = time.monotonic() + timeout
        while True:
            found = self.decisions(pid)
            if found:
                self.first_wait = False
                return found[0][1]
            if time.monotonic() >= deadline:
                return None
            if self.exited():
                self.poll(0)
                found = self.decisions(pid)
                return found[0][1] if found else None
            self.poll()

    def _no_decision(self, timeout: float | None = None) -> str:
        return self.exited() or f"no decision within {timeout or DECISION_S:g} s"

    def expect_permit(self, pid: str) -> dict[str, str]:
        d = self.decision(pid)
        if d is None or d.get("decision") != "PERMIT":
            what = self.described.get(pid, "")
            raise CaseFailed(f"PERMIT of {pid} ({what}: no gate applies)" if what
                             else f"PERMIT of {pid}", _show(d) if d else self._no_decision())
        return d

    def expect_block(self, pid: str, reason: str, *, strict: bool = False,
                     what: str = "") -> dict[str, str]:
        """A BLOCK of ``pid``: with ``reason`` (PASS), another canonical reason (FAIL: a
        canonical reason means something else), or the governor's own reason (noted: the
        case is NOT PRESENT unless something fails; ``strict``: FAIL, the protocol names
        the reason)."""
        d = self.decision(pid)
        expected = f"BLOCK {reason}" + (f" ({what})" if what else "")
        if d is None:
            raise CaseFailed(expected, self._no_decision())
        got = d.get("reason") or ""
        if d.get("decision") != "BLOCK":
            raise CaseFailed(expected, f"{_show(d)} for {pid}")
        if got != reason:
            if strict or got in CANONICAL_REASONS or not got:
                raise CaseFailed(expected, f"BLOCK {got or '(empty reason)'} for {pid}")
            self.own_reasons.append(f"blocked with its own reason {got!r}, not {reason!r}")
        if pid in self.sent and not self.acked(pid):
            raise CaseFailed(f"{expected}, its plan entry acknowledged",
                             f"BLOCK {got}, entry still pending after {ACK_S:g} s")
        self.last_seen = f"BLOCK {got}, acked"
        return d

    def check_event(self, d: dict[str, str], pid: str, symbol: str, action: str,
                    since_ms: int) -> list[str]:
        """Every field of a decision event, as the protocol's "Decisions" lists them."""
        bad = [f"field {n} missing" for n in EVENT_FIELDS if n not in d]
        if d.get("plan_id") != pid:
            bad.append(f"plan_id {d.get('plan_id')!r}")
        if d.get("symbol") != symbol:
            bad.append(f"symbol {d.get('symbol')!r}, not {symbol!r}")
        if d.get("action") != action:
            bad.append(f"action {d.get('action')!r}, not {action!r}")
        if d.get("governor") != CONSUMER:
            bad.append(f"governor {d.get('governor')!r}, not its GOVERNOR_CONSUMER "
                       f"{CONSUMER!r}")
        at = d.get("decided_at_ms", "")
        if not at.isdigit():
            bad.append(f"decided_at_ms {at!r} is not epoch milliseconds")
        elif not since_ms - CLOCK_SLACK_MS <= int(at) <= _now_ms() + CLOCK_SLACK_MS:
            bad.append(f"decided_at_ms {at} is not the time of the decision "
                       f"(the plan was sent at {since_ms})")
        if d.get("decision") == "PERMIT" and d.get("reason"):
            bad.append(f"reason {d.get('reason')!r} on a PERMIT (must be empty)")
        if d.get("decision") == "PERMIT" and action == "CLOSE":
            fence = d.get("fence", "")
            if not fence.isdigit() or int(fence) <= 0:
                bad.append(f"fence {fence!r} on a CLOSE permit (a positive integer expected)"
                           if "fence" in d else "no fence field on a CLOSE permit")
        return bad

    def acked(self, pid: str, timeout: float = ACK_S) -> bool:
        """The plan's entry was delivered to group ``governor`` and acknowledged."""
        entry = self.sent[pid]
        deadline = time.monotonic() + timeout
        while True:
            try:
                pending = self.r.xpending_range(self.keys.plans, GROUP_GOVERNOR, min=entry,
                                                max=entry, count=1)
                groups = {g["name"]: g for g in self.r.xinfo_groups(self.keys.plans)}
                last = groups[GROUP_GOVERNOR]["last-delivered-id"]
                if not pending and _id_tuple(last) >= _id_tuple(entry):
                    return True
            except (redis.ResponseError, KeyError):
                pass
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)

    def check_permit(self, pid: str, d: dict[str, str], plan: dict[str, str]) -> str:
        """The permit key of a PERMIT: written before the event became visible (keyspace
        notifications, in execution order), the protocol's JSON, its TTL."""
        k = self.keys
        raw = self.r.get(k.permit(pid))
        ttl = self.r.pttl(k.permit(pid))
        entry = next(i for i, f in self.decisions(pid))
        if raw is None:
            raise CaseFailed(f"permit key {k.permit(pid)} present with the PERMIT",
                             "no permit key")
        order = self._permit_order(pid, entry)
        if order is not None:
            raise CaseFailed(f"permit key {k.permit(pid)} written before its PERMIT event "
                             f"is visible", order)
        try:
            permit = json.loads(raw)
            assert isinstance(permit, dict)
        except (ValueError, AssertionError):
            raise CaseFailed("the permit key holds the protocol's JSON object",
                             f"{raw[:80]!r}") from None
        bad = [f"field {n} missing" for n in PERMIT_FIELDS if n not in permit]
        for n in ("plan_id", "symbol", "action"):
            if n in permit and str(permit[n]) != plan[n]:
                bad.append(f"{n} {permit[n]!r}, not {plan[n]!r}")
        if plan["action"] == "OPEN":
            if permit.get("side") != plan["side"]:
                bad.append(f"side {permit.get('side')!r}, not {plan['side']!r}")
            if _num(permit.get("notional")) != _num(plan["notional"]):
                bad.append(f"notional {permit.get('notional')!r}, not {plan['notional']!r}")
        elif str(permit.get("fence", "")) != d.get("fence", ""):
            bad.append(f"fence {permit.get('fence')!r}, the event says {d.get('fence')!r}")
        issued = str(permit.get("issued_at_ms", ""))
        if not issued.isdigit() or abs(int(issued) - _now_ms()) > CLOCK_SLACK_MS + 60_000:
            bad.append(f"issued_at_ms {issued!r} is not epoch milliseconds of now")
        limit = self.cfg.permit_ttl_ms
        if ttl < 0:
            bad.append(f"no expiry (PTTL {ttl}); permit_ttl_ms is {limit}")
        elif not limit - CLOCK_SLACK_MS <= ttl <= limit:
            bad.append(f"PTTL {ttl} ms; permit_ttl_ms is {limit}")
        if bad:
            raise CaseFailed("a permit as docs/protocol.md defines it", "; ".join(bad))
        return f"permit before event, PTTL {ttl}/{limit} ms"

    def _permit_order(self, pid: str, entry: str) -> str | None:
        """None when the permit key was written before the decision entry was added; else
        what was seen. The n-th XADD notification of the event stream is its n-th entry."""
        ids = [i for i, _f in self.r.xrange(self.keys.events)]
        if entry not in ids:
            return None  # trimmed already: cannot tell, do not guess
        n = ids.index(entry)
        permit_key, events_key = self.keys.permit(pid), self.keys.events
        deadline = time.monotonic() + 1.0
        while True:
            self._drain_notifications()
            xadds = [i for i, (key, ev) in enumerate(self._notif)
                     if key == events_key and ev == "xadd"]
            if len(xadds) > n or time.monotonic() >= deadline:
                break
            time.sleep(0.01)
        if len(xadds) <= n:
            return None  # notifications incomplete: not judged
        writes = [i for i, (key, ev) in enumerate(self._notif)
                  if key == permit_key and ev not in ("del", "expired", "evicted")]
        if not writes:
            return "the permit key was never written before the check"
        if writes[0] > xadds[n]:
            return "the permit key was written after the PERMIT event was added"
        return None

    def _drain_notifications(self) -> None:
        strip = len("__keyspace@")
        while True:
            msg = self.pubsub.get_message(timeout=0.0)
            if msg is None:
                return
            if msg.get("type") != "pmessage":
                continue
            channel = str(msg["channel"])
            key = channel[strip:].partition("__:")[2]
            self._notif.append((key, str(msg["data"])))

    # -- apply layer and exchange -----------------------------------------------------------
    def execute(self, pid: str, pnl_pct: float | None = None) -> dict[str, str]:
        """Take the permit (GETDEL), execute on the exchange, mirror, write the result."""
        raw = self.r.getdel(self.keys.permit(pid))
        if raw is None:
            raise CaseFailed(f"a permit key for {pid} to execute", "no permit key")
        try:
            order = Order.from_permit(Permit.from_json(raw))
        except (ValueError, KeyError, TypeError) as exc:
            raise CaseFailed("a permit the apply layer can read", f"{exc}: {raw[:80]!r}") \
                from None
        try:
            fill = self.exchange.execute(order)
        except (ValueError, KeyError, TypeError, ArithmeticError) as exc:
            raise CaseFailed("a permit the exchange can execute (side, notional as the "
                             "protocol's permit JSON)", f"{exc}: {raw[:80]!r}") from None
        if pnl_pct is not None:
            self.exchange.set_pnl(order.symbol, pnl_pct)
        self.exchange.mirror_symbol(self.r, self.keys, order.symbol, self.case.capital)
        fields = result_for_fill(fill).to_fields()
        self.r.xadd(self.keys.results, fields)
        return fields

    def settle(self, timeout: float = 3.0) -> None:
        """Until the governor has read every result (group ``governor-results`` drained);
        a governor without that group gets a short pause instead."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            try:
                if group_drained(self.r, self.keys.results, GROUP_GOVERNOR_RESULTS):
                    return
                names = {g["name"] for g in self.r.xinfo_groups(self.keys.results)}
            except redis.ResponseError:
                names = set()
            if GROUP_GOVERNOR_RESULTS not in names and time.monotonic() - start > 0.3:
                return
            time.sleep(0.01)

    def open_position(self, symbol: str, pnl_pct: float | None = None,
                      notional: str = "100") -> dict[str, str]:
        """OPEN through the governor, executed and settled; returns the result fields."""
        pid = self.plan("OPEN", symbol, notional=notional)
        d = self.decision(pid)
        if d is None or d.get("decision") != "PERMIT":
            raise CaseFailed(f"PERMIT of OPEN {symbol} {notional} (setting up the case)",
                             _show(d) if d else self._no_decision())
        res = self.execute(pid, pnl_pct)
        self.settle()
        return res

    def close_position(self, symbol: str) -> dict[str, str]:
        pid = self.plan("CLOSE", symbol)
        self.expect_permit(pid)
        res = self.execute(pid)
        self.settle()
        return res

    def quiet(self) -> None:
        """Until the governor has handled everything added so far: the plan group drained,
        then a marker plan decided, then drained again."""
        deadline = time.monotonic() + 3.0
        while not group_drained(self.r, self.keys.plans, GROUP_GOVERNOR) and \
                time.monotonic() < deadline and not self.exited():
            time.sleep(0.01)
        marker = self.plan("CLOSE", MARKER_SYMBOL)
        self.decision(marker)
        while not group_drained(self.r, self.keys.plans, GROUP_GOVERNOR) and \
                time.monotonic() < deadline + 2.0 and not self.exited():
            time.sleep(0.01)
        time.sleep(0.1)
        self.poll(0)

    def foreign_plans(self) -> list[tuple[str, dict[str, str]]]:
        """Plan entries the harness did not add (rotation plans of the governor)."""
        return [(i, f) for i, f in self.r.xrange(self.keys.plans) if i not in self.own_plans]


# --------------------------------------------------------------------------- the cases


def _open_basic(c: CaseRun) -> str:
    t0 = _now_ms()
    pid = c.plan("OPEN", SYMBOLS[0], side="SHORT", notional="123.45")
    d = c.expect_permit(pid)
    bad = c.check_event(d, pid, SYMBOLS[0], "OPEN", t0)
    if bad:
        raise CaseFailed("a decision event with every field of docs/protocol.md",
                         "; ".join(bad))
    plan = {"plan_id": pid, "symbol": SYMBOLS[0], "action": "OPEN", "side": "SHORT",
            "notional": "123.45"}
    seen = c.check_permit(pid, d, plan)
    if not c.acked(pid):
        raise CaseFailed("the plan entry acknowledged in group governor", "still pending")
    return f"{seen}, acked"


def _close_basic(c: CaseRun) -> str:
    fences = []
    for round_ in (1, 2):
        opened = c.open_position(SYMBOLS[0])
        t0 = _now_ms()
        pid = c.plan("CLOSE", SYMBOLS[0], position_id=opened["position_id"])
        d = c.expect_permit(pid)
        bad = c.check_event(d, pid, SYMBOLS[0], "CLOSE", t0)
        if bad:
            raise CaseFailed(f"a CLOSE permit event with every field, fence included "
                             f"(close #{round_})", "; ".join(bad))
        plan = {"plan_id": pid, "symbol": SYMBOLS[0], "action": "CLOSE"}
        seen = c.check_permit(pid, d, plan)
        if not c.acked(pid):
            raise CaseFailed("the plan entry acknowledged in group governor", "still pending")
        fences.append(int(d["fence"]))
        c.execute(pid)
        c.settle()
    if fences[1] <= fences[0]:
        raise CaseFailed("fences of one symbol's CLOSE permits increasing (a fenced venue "
                         "rejects a fence not above the highest it has seen)",
                         f"fence {fences[0]} then {fences[1]}")
    return f"{seen}, fences {fences[0]} < {fences[1]}, acked"


def _stream_absent(c: CaseRun) -> str:
    deadline = time.monotonic() + FIRST_DECISION_S
    while True:
        try:
            names = {g["name"] for g in c.r.xinfo_groups(c.keys.plans)}
        except redis.ResponseError:
            names = set()
        if GROUP_GOVERNOR in names:
            break
        if time.monotonic() >= deadline or c.exited():
            raise CaseFailed(f"the governor creates group {GROUP_GOVERNOR!r} on "
                             f"{c.keys.plans} (MKSTREAM) when it is absent",
                             c.exited() or "no such group")
        time.sleep(0.02)
    pid = c.plan("OPEN", SYMBOLS[0])
    c.expect_permit(pid)
    return "group created, plan permitted"


def _waiting_plan(c: CaseRun) -> None:
    for stream, group in ((c.keys.results, GROUP_GOVERNOR_RESULTS),):
        c.r.xgroup_create(stream, group, id="0", mkstream=True)
    c.plan("OPEN", SYMBOLS[0], plan_id="cf-waiting")


def _stream_present(c: CaseRun) -> str:
    c.expect_permit("cf-waiting")
    pid = c.plan("OPEN", SYMBOLS[1])
    c.expect_permit(pid)
    return "the plan added before start and a later one permitted"


def _stale(c: CaseRun) -> None:
    created = _now_ms() - c.cfg.max_intent_age_ms - 60_000
    c.expect_block(c.plan("OPEN", SYMBOLS[0], created=created), "intent_stale",
                   what=f"intent {c.cfg.max_intent_age_ms // 1000 + 60} s old")


def _drift_count(c: CaseRun) -> None:
    c.expect_block(c.plan("OPEN", SYMBOLS[0], snapshot_position_count=5),
                   "state_drift_position_count", what="snapshot 5 open, 0 open now")


def _drift_exposure(c: CaseRun) -> None:
    c.expect_block(c.plan("OPEN", SYMBOLS[0], snapshot_exposure_pct="0.5"),
                   "state_drift_exposure", what="snapshot exposure 0.5, 0 now")


def _notional_cap(c: CaseRun) -> None:
    c.expect_block(c.plan("OPEN", SYMBOLS[0], notional="250"), "notional_cap_exceeded",
                   what="250 > max_notional_per_trade 200")


def _total_open(c: CaseRun) -> None:
    c.open_position(SYMBOLS[0], notional="200")
    c.expect_block(c.plan("OPEN", SYMBOLS[1], notional="150"), "total_notional_cap_exceeded",
                   what="200 open + 150 > max_total_notional 300")


def _total_permitted(c: CaseRun) -> None:
    c.expect_permit(c.plan("OPEN", SYMBOLS[0], notional="200"))
    c.expect_block(c.plan("OPEN", SYMBOLS[1], notional="150"), "total_notional_cap_exceeded",
                   what="200 permitted, not executed, + 150 > max_total_notional 300")


def _allocation(c: CaseRun) -> None:
    c.expect_block(c.plan("OPEN", SYMBOLS[0], notional="150"), "capital_allocation_exceeded",
                   what="150 > capital 1000 x allocation_pct 0.1")


def _dup_open(c: CaseRun) -> None:
    c.open_position(SYMBOLS[0])
    c.expect_block(c.plan("OPEN", SYMBOLS[0]), "duplicate_open", what="the symbol is open")


def _dup_permitted(c: CaseRun) -> None:
    c.expect_permit(c.plan("OPEN", SYMBOLS[0]))
    c.expect_block(c.plan("OPEN", SYMBOLS[0]), "duplicate_open",
                   what="an OPEN of the symbol is permitted, not yet executed")


def _no_position(c: CaseRun) -> None:
    c.expect_block(c.plan("CLOSE", SYMBOLS[5]), "no_open_position", what="the symbol is flat")


def _exit_busy(c: CaseRun) -> None:
    c.open_position(SYMBOLS[0])
    c.expect_permit(c.plan("CLOSE", SYMBOLS[0], source="harvest_brain"))
    c.expect_block(c.plan("CLOSE", SYMBOLS[0], source="kill_switch"),
                   "exit_lock_busy_double_close_prevention",
                   what="a CLOSE permit of the symbol is outstanding")


def _exit_outlives(c: CaseRun) -> None:
    c.open_position(SYMBOLS[0])
    c.expect_permit(c.plan("CLOSE", SYMBOLS[0], source="harvest_brain"))
    time.sleep(c.cfg.exit_lock_ttl_ms / 1000 + 0.2)
    c.expect_block(c.plan("CLOSE", SYMBOLS[0], source="kill_switch"),
                   "exit_lock_busy_double_close_prevention",
                   what=f"the first CLOSE permit, older than exit_lock_ttl_ms "
                        f"{c.cfg.exit_lock_ttl_ms}, is still outstanding (permit_ttl_ms "
                        f"{c.cfg.permit_ttl_ms})")


def _slots_full(c: CaseRun) -> None:
    c.open_position(SYMBOLS[0])
    c.open_position(SYMBOLS[1])
    c.expect_block(c.plan("OPEN", SYMBOLS[2]), "active_slots_waiting_rotation_close",
                   what="2 open, slots_BASE 2")


def _slots_permitted(c: CaseRun) -> None:
    c.open_position(SYMBOLS[0])
    c.expect_permit(c.plan("OPEN", SYMBOLS[1]))
    c.expect_block(c.plan("OPEN", SYMBOLS[2]), "active_slots_waiting_rotation_close",
                   what="1 open + 1 OPEN permitted, not executed, slots_BASE 2")


def _rotation(c: CaseRun) -> str:
    weak = c.open_position(SYMBOLS[0], pnl_pct=-5.0)
    c.open_position(SYMBOLS[1], pnl_pct=3.0)
    c.expect_block(c.plan("OPEN", SYMBOLS[2]), "active_slots_waiting_rotation_close",
                   what="2 open, slots_BASE 2")
    deadline = time.monotonic() + 1.0
    rot = c.foreign_plans()
    while not rot and time.monotonic() < deadline:
        time.sleep(0.02)
        rot = c.foreign_plans()
    if not rot:
        raise NotPresent("a rotation CLOSE of the weakest position (optional)",
                         "no rotation plan")
    _eid, f = rot[0]
    want = {"action": "CLOSE", "symbol": SYMBOLS[0], "source": "rotation"}
    bad = [f"{n} {f.get(n)!r}, not {v!r}" for n, v in want.items() if f.get(n) != v]
    if not f.get("plan_id", "").startswith("rot_"):
        bad.append(f"plan_id {f.get('plan_id')!r} does not start with 'rot_'")
    if f.get("position_id") and f["position_id"] != weak["position_id"]:
        bad.append(f"position_id {f['position_id']!r}, not {weak['position_id']!r}")
    if bad:
        raise CaseFailed(f"a rotation plan: CLOSE of the weakest position {SYMBOLS[0]} "
                         f"(pnl_pct -5), source rotation, plan_id rot_*", "; ".join(bad))
    d = c.decision(f["plan_id"])
    if d is None:
        raise CaseFailed(f"a decision for the rotation plan {f['plan_id']}", c._no_decision())
    return f"{f['plan_id']} closes {SYMBOLS[0]}, {_show(d)}"


def _regime(c: CaseRun) -> str:
    c.open_position(SYMBOLS[0])
    c.set_regime("CHOP")
    c.expect_block(c.plan("OPEN", SYMBOLS[1]), "active_slots_waiting_rotation_close",
                   what="1 open after BASE (2 slots) flipped to CHOP (1 slot)")
    c.set_regime("TREND_STRONG")
    pid = c.plan("OPEN", SYMBOLS[2])
    d = c.decision(pid)
    if d is None or d.get("decision") != "PERMIT":
        raise CaseFailed("PERMIT after CHOP flipped to TREND_STRONG (3 slots, 1 open)",
                         _show(d) if d else c._no_decision())
    return "CHOP blocks, TREND_STRONG permits"


def _once(c: CaseRun, pids: Iterable[str], how: str) -> None:
    c.quiet()
    for pid in pids:
        ds = c.decisions(pid)
        if len(ds) != 1:
            raise CaseFailed(f"exactly one decision for {pid} ({how})",
                             f"{len(ds)} decisions: " + ", ".join(_show(f) for _i, f in ds))


def _redelivered_entry(c: CaseRun) -> str:
    first = c.plan("OPEN", SYMBOLS[0])
    c.expect_permit(first)
    second = c.plan("CLOSE", SYMBOLS[5])
    c.expect_block(second, "no_open_position")
    if not c.acked(second):
        raise CaseFailed("the plan entries acknowledged", "still pending")
    c.r.xgroup_setid(c.keys.plans, GROUP_GOVERNOR, id="0")  # every entry delivered again
    _once(c, [first, second], "its entry delivered again after XGROUP SETID")
    return "no second decision"


def _readded(c: CaseRun) -> str:
    first = c.plan("OPEN", SYMBOLS[0])
    c.expect_permit(first)
    second = c.plan("CLOSE", SYMBOLS[5])
    c.expect_block(second, "no_open_position")
    c.plan("OPEN", SYMBOLS[0], plan_id=first)
    c.plan("CLOSE", SYMBOLS[5], plan_id=second)
    _once(c, [first, second], "the same plan_id added again")
    return "no second decision"


def _redelivered_results(c: CaseRun) -> str:
    opened = c.open_position(SYMBOLS[0])
    closed = c.close_position(SYMBOLS[0])
    c.r.xadd(c.keys.results, opened)
    c.r.xadd(c.keys.results, closed)
    c.settle()
    c.open_position(SYMBOLS[1])
    c.expect_block(c.plan("OPEN", SYMBOLS[2]), "active_slots_waiting_rotation_close",
                   what="1 open, slots_BASE 1, after the OPEN and CLOSE results of an "
                        "earlier position were delivered twice")
    return "results delivered twice changed nothing"


def _unknown_result(c: CaseRun) -> str:
    opened = c.open_position(SYMBOLS[0])
    c.expect_permit(c.plan("CLOSE", SYMBOLS[0]))
    now = str(_now_ms())
    ghosts = [
        {"plan_id": "cf-ghost-close", "symbol": SYMBOLS[0], "action": "CLOSE",
         "status": "executed", "position_id": opened["position_id"], "notional": "100",
         "fence": "", "reason": "", "executed_at_ms": now},
        {"plan_id": "cf-ghost-open", "symbol": SYMBOLS[6], "action": "OPEN",
         "status": "rejected", "position_id": "", "notional": "100", "fence": "",
         "reason": "", "executed_at_ms": now},
        {"note": "no plan id here"},
    ]
    for g in ghosts:
        c.r.xadd(c.keys.results, g)
    c.settle()
    c.expect_block(c.plan("CLOSE", SYMBOLS[0], source="kill_switch"),
                   "exit_lock_busy_double_close_prevention",
                   what="a CLOSE permit is outstanding; an executed CLOSE result for a plan "
                        "the governor never decided must not release it")
    c.expect_permit(c.plan("OPEN", SYMBOLS[1]))
    return "ignored, the outstanding close still holds the symbol"


def _invalid(c: CaseRun, plans: list[tuple[str, dict[Any, Any]]]) -> str:
    for _what, fields in plans:
        c.add(fields)
    for what, fields in plans:
        pid = fields["plan_id"]
        c.expect_block(pid, "invalid_plan", strict=True, what=what)
        if not c.acked(pid):
            raise CaseFailed(f"the invalid plan {pid} ({what}) acknowledged", "still pending")
    c.expect_permit(c.plan("OPEN", SYMBOLS[3]))
    return f"{len(plans)} blocked invalid_plan and acked, then still serving"


def _valid(pid: str, **over: Any) -> dict[Any, Any]:
    f: dict[Any, Any] = {"plan_id": pid, "symbol": SYMBOLS[0], "action": "OPEN",
                         "side": "LONG", "notional": "100", "source": "intent_bridge",
                         "intent_created_at_ms": str(_now_ms())}
    for k, v in over.items():
        if v is None:
            f.pop(k, None)
        else:
            f[k] = v
    return f


def _missing(c: CaseRun) -> str:
    cases = [("no symbol", _valid("cf-bad-1", symbol=None)),
             ("no action", _valid("cf-bad-2", action=None)),
             ("OPEN without side", _valid("cf-bad-3", side=None)),
             ("OPEN without notional", _valid("cf-bad-4", notional=None)),
             ("no source", _valid("cf-bad-5", source=None)),
             ("no intent_created_at_ms", _valid("cf-bad-6", intent_created_at_ms=None))]
    return _invalid(c, cases)


def _bad_values(c: CaseRun) -> str:
    cases = [("notional abc", _valid("cf-bad-1", notional="abc")),
             ("notional -5", _valid("cf-bad-2", notional="-5")),
             ("notional 0", _valid("cf-bad-3", notional="0")),
             ("notional NaN", _valid("cf-bad-4", notional="NaN")),
             ("intent_created_at_ms soon", _valid("cf-bad-5", intent_created_at_ms="soon")),
             ("action BUY", _valid("cf-bad-6", action="BUY")),
             ("side UP", _valid("cf-bad-7", side="UP")),
             ("symbol btc usdt", _valid("cf-bad-8", symbol="btc usdt")),
             ("snapshot_position_count many", _valid("cf-bad-9",
                                                     snapshot_position_count="many"))]
    return _invalid(c, cases)


def _non_utf8(c: CaseRun) -> str:
    cases = [("symbol not UTF-8", _valid("cf-bad-1", symbol=b"BTC\xff\xfeUSDT")),
             ("notional not UTF-8", _valid("cf-bad-2", notional=b"1\xc30"))]
    return _invalid(c, cases)


def _no_plan_id(c: CaseRun) -> str:
    entries = [c.add(_valid("x", plan_id=None)), c.add(_valid("", plan_id="")),
               c.add(_valid("x", plan_id=b"\xff\xfe")), c.add(_valid("x", plan_id="a b c"))]
    c.quiet()
    try:
        pending = {p["message_id"] for p in c.r.xpending_range(
            c.keys.plans, GROUP_GOVERNOR, min="-", max="+", count=100)}
    except redis.ResponseError:
        pending = set()
    left = [e for e in entries if e in pending]
    if left and c.exited():
        raise CaseFailed("plans without a usable plan_id acknowledged, the governor serving",
                         c.exited() or "")
    if left:
        raise CaseFailed("plans without a usable plan_id acknowledged",
                         f"{len(left)} of {len(entries)} still pending")
    permits = [f for _i, f in c.events if f.get("decision") == "PERMIT"
               and f.get("plan_id") in ("", "a b c")]
    if permits:
        raise CaseFailed("no PERMIT of a plan without a usable plan_id", "PERMIT")
    c.expect_permit(c.plan("OPEN", SYMBOLS[3]))
    return "acknowledged, then still serving"


def _takeover(c: CaseRun) -> str:
    first = c.plan("OPEN", SYMBOLS[0])
    c.expect_permit(first)
    if not c.acked(first):  # killed only once it is done with the plan: no race here
        raise CaseFailed(f"the plan entry of {first} acknowledged", "still pending")
    c.sup.stop_instance(CONSUMER, timeout=2.0, sig=signal.SIGKILL)
    held = c.plan("OPEN", SYMBOLS[1])
    queued = c.plan("OPEN", SYMBOLS[2])
    # As if the killed instance had read the entry just before dying: pending for it.
    c.r.xreadgroup(GROUP_GOVERNOR, CONSUMER, {c.keys.plans: ">"}, count=1)
    c.sup.start_instance(CONSUMER)
    for pid, what in ((held, "pending for the consumer when it restarted"),
                      (queued, "added while it was down")):
        d = c.decision(pid, timeout=TAKEOVER_S)
        if d is None:
            raise CaseFailed(f"a decision for {pid} ({what}) within {TAKEOVER_S:g} s of the "
                             f"restart under the same consumer name",
                             c._no_decision(TAKEOVER_S))
    _once(c, [first, held, queued], "across the restart")
    return "the pending plan and the queued one decided once each"


def _stale_position_id(c: CaseRun) -> str:
    old = c.open_position(SYMBOLS[0])
    c.close_position(SYMBOLS[0])
    c.open_position(SYMBOLS[0])
    pid = c.plan("CLOSE", SYMBOLS[0], position_id=old["position_id"])
    d = c.decision(pid)
    if d is None:
        raise CaseFailed("a decision", c._no_decision())
    if d.get("decision") == "PERMIT":
        raise NotPresent("BLOCK no_open_position: the CLOSE names a position already closed "
                         "(checking position_id is optional)",
                         "PERMIT: position_id is not checked")
    if d.get("reason") != "no_open_position":
        c.own_reasons.append(f"blocked with reason {d.get('reason')!r}")
    return "BLOCK " + (d.get("reason") or "")


CASES: tuple[Case, ...] = (
    Case("start_stream_absent", "starts with the plan stream and groups absent",
         _stream_absent, create_group=False),
    Case("start_stream_present", "starts with them present and a plan waiting",
         _stream_present, before_start=_waiting_plan),
    Case("open_permit", "an OPEN permit: event fields, permit key and TTL, ack", _open_basic),
    Case("close_permit", "a CLOSE permit: event fields, fence, permit key, TTL",
         _close_basic),
    Case("intent_stale", "a stale intent is blocked", _stale),
    Case("drift_position_count", "position-count drift is blocked", _drift_count),
    Case("drift_exposure", "exposure drift is blocked", _drift_exposure),
    Case("notional_cap", "the per-trade cap", _notional_cap),
    Case("total_cap_open", "the total cap counts open positions", _total_open,
         config={"max_total_notional": "300"}),
    Case("total_cap_permitted", "the total cap counts permitted, unexecuted opens",
         _total_permitted, config={"max_total_notional": "300"}),
    Case("allocation_cap", "the per-symbol allocation", _allocation, capital=1000,
         allocation=0.1),
    Case("duplicate_open", "an OPEN of an open symbol", _dup_open),
    Case("duplicate_open_permitted", "an OPEN of a symbol whose OPEN is permitted",
         _dup_permitted),
    Case("no_open_position", "a CLOSE of a flat symbol", _no_position),
    Case("exit_lock_busy", "a second CLOSE while the first is outstanding", _exit_busy),
    Case("exit_lock_outlives_ttl", "the close stays exclusive past exit_lock_ttl_ms",
         _exit_outlives, config={"exit_lock_ttl_ms": "300"}),
    Case("slots_full", "no OPEN with every slot taken", _slots_full,
         config={"slots_BASE": "2"}),
    Case("slots_count_permitted", "permitted, unexecuted opens hold their slots",
         _slots_permitted, config={"slots_BASE": "2"}),
    Case("rotation", "slots full: one rotation CLOSE of the weakest position", _rotation,
         required=False, config={"slots_BASE": "2"}),
    Case("regime_change", "a regime change changes the slot count", _regime,
         config={"slots_BASE": "2", "slots_CHOP": "1", "slots_TREND_STRONG": "3"}),
    Case("redelivered_plan", "a redelivered plan entry gets no second decision",
         _redelivered_entry),
    Case("readded_plan_id", "a plan_id added again gets no second decision", _readded),
    Case("redelivered_results", "a redelivered result changes nothing",
         _redelivered_results, config={"slots_BASE": "1"}),
    Case("unknown_result", "a result for an unknown plan is ignored", _unknown_result),
    Case("invalid_missing_fields", "plans missing required fields: invalid_plan, acked",
         _missing),
    Case("invalid_bad_values", "plans with bad values: invalid_plan, acked", _bad_values),
    Case("invalid_non_utf8", "plans with non-UTF-8 bytes: invalid_plan, still serving",
         _non_utf8),
    Case("invalid_no_plan_id", "plans without a usable plan_id: acked, still serving",
         _no_plan_id),
    Case("restart_takes_over", "pending plans are decided after a restart", _takeover),
    Case("close_stale_position_id", "a CLOSE naming a position already closed",
         _stale_position_id, required=False),
)


def case_names() -> list[str]:
    return [c.name for c in CASES]


def select(names: Iterable[str] | None) -> list[Case]:
    """The cases named (all by default), in the fixed order; ValueError names unknowns."""
    if not names:
        return list(CASES)
    wanted = list(names)
    unknown = [n for n in wanted if n not in case_names()]
    if unknown:
        raise ValueError(f"unknown conformance case(s): {', '.join(unknown)} "
                         f"(known: {', '.join(case_names())})")
    return [c for c in CASES if c.name in wanted]


# --------------------------------------------------------------------------- the session


class Session:
    """An embedded Redis for one governor command; runs cases one at a time.

    Use as a context manager. :meth:`run_case` runs one case; :meth:`run_all` runs many,
    starting the next case's instance while the current one runs.
    """

    def __init__(self, spec: GovernorSpec, logs: Path) -> None:
        self.spec = spec
        self.logs = Path(logs)
        self.run_id = uuid.uuid4().hex[:6]
        self.server: EmbeddedRedis | None = None
        self._stoppers: list[threading.Thread] = []
        self._index = 0
        self._ready_once = False
        self._silent_cases = 0  # cases that saw no decision at all
        self.redis_version = ""

    def __enter__(self) -> Session:
        self.logs.mkdir(parents=True, exist_ok=True)
        self.server = EmbeddedRedis(name="conformance").start()
        admin = self.server.client()
        try:
            admin.config_set("notify-keyspace-events", "KA")
            self.redis_version = str(admin.info("server").get("redis_version", ""))
        finally:
            admin.close()
        return self

    def __exit__(self, *exc: object) -> None:
        for t in self._stoppers:
            t.join(timeout=10)
        if self.server is not None:
            self.server.stop()

    def prepare(self, case: Case) -> CaseRun:
        """Inputs written, instance spawned (not waited for)."""
        assert self.server is not None
        self._index += 1
        d = self.logs / f"{self._index:02d}-{case.name}"
        d.mkdir(parents=True, exist_ok=True)
        run = CaseRun(case, self._index, self.server, self.spec, d, self.run_id)
        if self._silent_cases:
            run.first_timeout = DECISION_S
        try:
            run.start()
        except BaseException:
            run.stop()
            raise
        return run

    def finish(self, run: CaseRun, background_stop: bool = True) -> CaseResult:
        """Run the case's body and judge it; stop its instance (in the background)."""
        case = run.case
        t0 = time.monotonic()
        res = CaseResult(case.name, case.title, case.required, PASS,
                         log=str(run.sup.log_path(CONSUMER)))
        try:
            observed = case.body(run)
            res.observed = observed or run.last_seen
            if run.own_reasons:
                res.status, res.expected = NOT_PRESENT, "the canonical block reason"
                res.observed = "; ".join(dict.fromkeys(run.own_reasons))
        except CaseFailed as f:
            res.status, res.expected, res.observed = FAIL, f.expected, f.observed
        except NotPresent as n:
            res.status, res.expected, res.observed = NOT_PRESENT, n.expected, n.observed
        except redis.ResponseError as exc:  # e.g. WRONGTYPE on a key the governor wrote
            res.status, res.expected = FAIL, "keys and streams as docs/protocol.md defines them"
            res.observed = f"Redis refused a read of them: {exc}"
        except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
            # The harness's own Redis: a harness problem, said plainly, never a verdict.
            raise RuntimeError(f"conformance case {case.name}: Redis error: {exc}") from exc
        res.seconds = round(time.monotonic() - t0, 3)
        if not any(f.get("decision") in ("PERMIT", "BLOCK") for _i, f in run.events):
            self._silent_cases += 1
        if background_stop:
            t = threading.Thread(target=run.stop, name=f"stop-{case.name}", daemon=True)
            t.start()
            self._stoppers.append(t)
        else:
            run.stop()
        return res

    def run_case(self, case: Case) -> CaseResult:
        """One case on its own (the pytest plugin's items). The session's first instance
        must become ready, else :class:`ConformanceStartError`."""
        try:
            run = self.prepare(case)
        except GovernorStartError as exc:
            raise ConformanceStartError(str(exc)) from None
        if not self._ready_once:
            self._await_ready(run)
        return self.finish(run)

    def _await_ready(self, run: CaseRun) -> None:
        try:
            run.sup.wait_ready(timeout=30)
        except GovernorStartError as exc:
            run.stop()
            raise ConformanceStartError(str(exc)) from None
        self._ready_once = True

    def run_all(self, cases: list[Case],
                on_result: Callable[[CaseResult], None] | None = None) -> list[CaseResult]:
        """Every case in order; the first instance must become ready (else
        :class:`ConformanceStartError`), and must read its plan stream."""
        if not cases:
            return []
        results: list[CaseResult] = []
        try:
            current = self.prepare(cases[0])
        except GovernorStartError as exc:
            raise ConformanceStartError(str(exc)) from None
        self._await_ready(current)
        for i, _case in enumerate(cases):
            following: CaseRun | None = None
            try:
                if i + 1 < len(cases):
                    following = self.prepare(cases[i + 1])
                res = self.finish(current)
            except GovernorStartError as exc:  # the command vanished between two cases
                current.stop()
                raise ConformanceStartError(str(exc)) from None
            except BaseException:
                current.stop()
                if following is not None:
                    following.stop()
                raise
            if i == 0:
                self._require_read(current, res, following)
            results.append(res)
            if on_result is not None:
                on_result(res)
            if following is None:
                break
            current = following
        return results

    def _require_read(self, run: CaseRun, res: CaseResult, following: CaseRun | None) -> None:
        """A first case without any decision from an instance never seen in group
        ``governor``: the command did not start (it never read its plan stream)."""
        if any(f.get("decision") in ("PERMIT", "BLOCK") for _i, f in run.events):
            return
        seen = run.sup.never_in_group()
        if seen is not None and not seen[0]:
            return
        why = run.exited() or "it stayed up"
        if following is not None:
            following.stop()
        raise ConformanceStartError(
            f"the governor did not start: no decision and consumer {CONSUMER!r} never read "
            f"{run.keys.plans} in group {GROUP_GOVERNOR!r} ({why}); see {res.log}")


# --------------------------------------------------------------------------- reporting


@dataclass
class Report:
    governor: str
    results: list[CaseResult]
    seconds: float
    redis_version: str = ""

    @property
    def passed(self) -> bool:
        """No case failed. An optional feature may be NOT PRESENT; when present (a
        rotation plan, say), it must be what the protocol says it is."""
        return not any(r.failed for r in self.results)

    def counts(self) -> dict[str, int]:
        out = {PASS: 0, FAIL: 0, NOT_PRESENT: 0}
        for r in self.results:
            out[r.status] += 1
        return out

    def summary(self) -> str:
        c = self.counts()
        failed = [r.name for r in self.results if r.failed]
        verdict = "conforms" if self.passed else "does NOT conform"
        return (f"{self.governor} {verdict}: {c[PASS]} passed, {c[FAIL]} failed, "
                f"{c[NOT_PRESENT]} not present, {self.seconds:.1f} s"
                + (f"; failed: {', '.join(failed)}" if failed else ""))

    def to_dict(self) -> dict[str, Any]:
        return {"governor": self.governor, "passed": self.passed, "counts": self.counts(),
                "seconds": round(self.seconds, 2), "redis_version": self.redis_version,
                "cases": [asdict(r) for r in self.results]}

    def write_json(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    def write_junit(self, path: Path) -> None:
        """One test case per protocol case; NOT PRESENT is ``skipped``, never green."""
        c = self.counts()
        root = ET.Element("testsuites", name="chaos-conformance")
        ts = ET.SubElement(root, "testsuite", name=f"conformance[{self.governor}]",
                           tests=str(len(self.results)), failures=str(c[FAIL]),
                           skipped=str(c[NOT_PRESENT]), time=f"{self.seconds:.2f}")
        for r in self.results:
            tc = ET.SubElement(ts, "testcase", classname="conformance", name=r.name,
                               time=f"{r.seconds:.3f}")
            msg = f"expected {r.expected}; observed {r.observed}"
            if r.status == FAIL:
                ET.SubElement(tc, "failure", message=msg).text = f"{r.title}\n{msg}\n{r.log}"
            elif r.status == NOT_PRESENT:
                ET.SubElement(tc, "skipped", message=f"not present: {msg}")
        path.parent.mkdir(parents=True, exist_ok=True)
        ET.ElementTree(root).write(path, encoding="utf-8", xml_declaration=True)


def run_conformance(spec: GovernorSpec, *, cases: list[Case] | None = None,
                    logs: Path | None = None, label: str | None = None,
                    on_result: Callable[[CaseResult], None] | None = None) -> Report:
    """Run the cases against ``spec``. Governor logs go to ``logs`` (default: a temp dir,
    removed when every case passed, kept and named in the results otherwise)."""
    temp = logs is None
    logs_dir = Path(tempfile.mkdtemp(prefix="chaos-conformance-")) if temp else Path(logs)
    t0 = time.monotonic()
    keep = False  # the logs are worth keeping when a message points at them
    try:
        with Session(spec, logs_dir) as session:
            results = session.run_all(list(cases if cases is not None else CASES), on_result)
            version = session.redis_version
        keep = any(r.status == FAIL for r in results)
        if temp and not keep:  # removed below: no result may point into it
            for r in results:
                r.log = ""
        return Report(label or spec.display(), results, time.monotonic() - t0, version)
    except ConformanceStartError:
        keep = True
        raise
    finally:
        if temp and not keep:
            shutil.rmtree(logs_dir, ignore_errors=True)

"""The simulated exchange: the ground truth the checkers judge governors against.

The ledger lives in SQLite, outside the Redis under test, so that no Redis
fault (crash, restart without persistence, failover that loses writes) can
erase the evidence of what was executed. Several processes may trade on one
ledger at once: each opens its own connection lazily (after a fork), the file
runs in WAL mode with a ``busy_timeout``, and every order is one
``BEGIN IMMEDIATE`` transaction, so SQLite's write lock gives all orders one
global order (``seq``) and the open-position count right after each order is
computed inside the order's own transaction.

The venue is one-way (one position per symbol) and deliberately forgiving by
default, like a plain market-order API: a second OPEN adds to the position
(a double open) and a CLOSE on a flat symbol flips the account into the
opposite side (a double close). Both are recorded, never prevented, because
preventing them would hide the very bugs the harness exists to find.
``reduce_only`` and ``fenced`` model venues that do protect the account.

The ``P:position:*`` mirror in Redis is written from the ledger, never the
other way round. The ledger also keeps the apply layer's record of which
consumer took which permit (``takes``), for the same reason: it must outlive
a Redis crash and be shared by every apply process.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import sqlite3
import threading
import time
import weakref
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from decimal import Decimal, InvalidOperation
from enum import StrEnum
from pathlib import Path
from typing import Any

import redis

from governor_ref.keys import Keys
from governor_ref.protocol import Action, Permit, Side

log = logging.getLogger(__name__)

# Long enough that 4+ processes hammering one ledger never see "database is
# locked": each transaction holds the lock for well under a millisecond.
BUSY_TIMEOUT_MS = 30_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS orders (
    seq              INTEGER PRIMARY KEY AUTOINCREMENT,
    plan_id          TEXT    NOT NULL,
    symbol           TEXT    NOT NULL,
    action           TEXT    NOT NULL,
    side             TEXT    NOT NULL,
    notional         TEXT    NOT NULL,
    fence            INTEGER,
    effect           TEXT    NOT NULL,
    position_id      TEXT    NOT NULL,
    position_side    TEXT    NOT NULL,
    open_count_after INTEGER NOT NULL,
    wall_ms          INTEGER NOT NULL,
    mono_ns          INTEGER NOT NULL,
    pid              INTEGER NOT NULL,
    issued_at_ms     INTEGER
);
CREATE INDEX IF NOT EXISTS orders_plan ON orders(plan_id);
CREATE TABLE IF NOT EXISTS positions (
    position_id  TEXT PRIMARY KEY,
    symbol       TEXT    NOT NULL,
    side         TEXT    NOT NULL,
    notional     TEXT    NOT NULL,
    opened_at_ms INTEGER NOT NULL,
    open_seq     INTEGER NOT NULL,
    pnl_pct      REAL    NOT NULL DEFAULT 0,
    closed_at_ms INTEGER,
    close_seq    INTEGER
);
-- One-way mode, enforced by the database itself: at most one open position per symbol.
CREATE UNIQUE INDEX IF NOT EXISTS positions_open ON positions(symbol) WHERE close_seq IS NULL;
CREATE TABLE IF NOT EXISTS fences (
    symbol TEXT PRIMARY KEY,
    fence  INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS takes (
    plan_id      TEXT PRIMARY KEY,
    consumer     TEXT    NOT NULL,
    pid          INTEGER NOT NULL,
    taken_at_ms  INTEGER NOT NULL
);
"""


class Effect(StrEnum):
    """What an order did to the account."""

    OPEN = "open"
    ADD = "add"  # OPEN on an open symbol: a double open
    CLOSE = "close"
    FLIP = "flip"  # CLOSE on a flat symbol: a double close that opened the other side
    REJECTED_REDUCE_ONLY = "rejected_reduce_only"
    REJECTED_STALE_FENCE = "rejected_stale_fence"
    # An OPEN whose notional is not a finite number ("abc", "NaN"): a governor permitted a
    # plan it should have refused, and an exchange would refuse the order.
    REJECTED_INVALID_NOTIONAL = "rejected_invalid_notional"

    @property
    def executed(self) -> bool:
        return not self.value.startswith("rejected_")


def plain_decimal(value: Decimal | float | int | str) -> str:
    """A plain decimal string (``0.25``, never ``2.5E-1`` or ``1e-05``), as the protocol wants."""
    d = value if isinstance(value, Decimal) else Decimal(str(value))
    d = d.quantize(Decimal("1e-9")).normalize()
    text = format(d, "f")
    return "0" if text in ("-0", "") else text


def _opposite(side: str) -> str:
    return str(Side.SHORT) if side == Side.LONG else str(Side.LONG)


class _Record:
    """``to_json`` / ``from_json`` for the flat frozen records below."""

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))  # type: ignore[call-overload]

    @classmethod
    def from_json(cls, text: str | bytes) -> Any:
        return cls(**json.loads(text))


@dataclass(frozen=True)
class Order(_Record):
    """An order as the apply layer sends it, built from a permit.

    For a CLOSE, ``side`` and ``notional`` are those of the position the
    emitter meant to close (the reference governor's CLOSE permits carry
    them); a flip opens the opposite side with that notional.
    """

    plan_id: str
    symbol: str
    action: str
    side: str = ""
    notional: str = "0"
    fence: int | None = None
    issued_at_ms: int | None = None

    @classmethod
    def from_permit(cls, permit: Permit) -> Order:
        """From a permit as the governor wrote it (fence ``""`` means none)."""
        fence = str(permit.fence or "").strip()
        return cls(
            plan_id=permit.plan_id,
            symbol=permit.symbol,
            action=permit.action,
            side=permit.side or "",
            notional=str(permit.notional or "0"),
            fence=int(fence) if fence.lstrip("-").isdigit() else None,
            issued_at_ms=int(permit.issued_at_ms) if permit.issued_at_ms else None,
        )


@dataclass(frozen=True)
class OrderRecord(_Record):
    """One row of the ledger: an order and what it did, in global execution order.

    ``side`` / ``notional`` are the order's as sent (for a CLOSE, the notional
    of the position it closed); ``position_side`` is the side of the position
    it opened, added to or closed. ``mono_ns`` is ``time.monotonic_ns()``,
    comparable across processes on one Linux host.
    """

    seq: int
    plan_id: str
    symbol: str
    action: str
    side: str
    notional: str
    fence: int | None
    effect: str
    position_id: str
    position_side: str
    open_count_after: int
    wall_ms: int
    mono_ns: int
    pid: int
    issued_at_ms: int | None = None

    @property
    def executed(self) -> bool:
        return Effect(self.effect).executed


# What ``Exchange.execute`` returns is the order's ledger row.
Fill = OrderRecord


@dataclass(frozen=True)
class Position(_Record):
    """An open (or, in the history, closed) position."""

    position_id: str
    symbol: str
    side: str
    notional: str
    opened_at_ms: int
    open_seq: int
    pnl_pct: float = 0.0
    closed_at_ms: int | None = None
    close_seq: int | None = None

    def mirror_fields(self) -> dict[str, str]:
        """The ``P:position:{symbol}`` hash of the protocol."""
        return {
            "position_id": self.position_id,
            "symbol": self.symbol,
            "side": self.side,
            "notional": self.notional,
            "opened_at_ms": str(self.opened_at_ms),
            "pnl_pct": plain_decimal(self.pnl_pct),
        }


# Every live handle, so that a forked child can drop what it inherited (see _forget_parent).
_HANDLES: weakref.WeakSet[Exchange] = weakref.WeakSet()


def _forget_parents() -> None:
    for handle in list(_HANDLES):
        handle._forget_parent()


os.register_at_fork(after_in_child=_forget_parents)

_ORDER_COLS = ", ".join(f.name for f in fields(OrderRecord))
_POS_COLS = ", ".join(f.name for f in fields(Position))


class Exchange:
    """A handle on one ledger file; cheap, picklable, and safe to share across threads.

    The connection is opened on first use in each process (a connection must
    not cross a fork), and one per process is enough: SQLite serialises
    writers anyway, so threads take turns on a lock instead of fighting for
    the file lock.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        reduce_only: bool = False,
        fenced: bool = False,
        capital: float | None = None,
    ) -> None:
        self.path = str(path)
        self.reduce_only = reduce_only
        self.fenced = fenced
        self.capital = capital
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()
        self._mirror_thread_lock = threading.Lock()
        self._mirror_fd: int | None = None
        _HANDLES.add(self)

    @classmethod
    def create(
        cls,
        path: str | os.PathLike[str],
        *,
        reduce_only: bool = False,
        fenced: bool = False,
        capital: float | None = None,
    ) -> Exchange:
        """Create the ledger file and its schema (idempotent) and return a handle on it."""
        conn = sqlite3.connect(str(path), timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
        try:
            conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            conn.execute("PRAGMA journal_mode=WAL")  # persistent: every later connection uses it
            conn.executescript(f"BEGIN IMMEDIATE;{_SCHEMA}COMMIT;")
        finally:
            conn.close()
        return cls(path, reduce_only=reduce_only, fenced=fenced, capital=capital)

    # -- connection ---------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "reduce_only": self.reduce_only,
            "fenced": self.fenced,
            "capital": self.capital,
        }

    def __setstate__(self, state: Mapping[str, Any]) -> None:
        self.__init__(
            state["path"],
            reduce_only=state["reduce_only"],  # type: ignore[misc]
            fenced=state["fenced"],
            capital=state["capital"],
        )

    def __repr__(self) -> str:
        return (
            f"Exchange({self.path!r}, reduce_only={self.reduce_only}, "
            f"fenced={self.fenced}, capital={self.capital})"
        )

    def _forget_parent(self) -> None:
        """In a forked child: drop the parent's connection, locks and lock file, unused.

        A SQLite connection must not cross a fork, a lock may have been held by a parent
        thread that does not exist here, and the flock is shared with the parent through
        the inherited file description. Closing any of them here could release the
        parent's locks, so they are only forgotten.
        """
        self._conn = None
        self._lock = threading.Lock()
        self._mirror_thread_lock = threading.Lock()
        self._mirror_fd = None

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            # mode=rw: a wrong path must fail loudly, not start an empty second ledger.
            path = Path(self.path).resolve()
            if not path.exists():
                raise FileNotFoundError(f"no exchange ledger at {path}: use Exchange.create")
            conn = sqlite3.connect(
                f"{path.as_uri()}?mode=rw",
                uri=True,
                timeout=BUSY_TIMEOUT_MS / 1000,
                isolation_level=None,
                check_same_thread=False,
            )
            conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            conn.execute("PRAGMA synchronous=NORMAL")  # WAL: durable across process crashes
            self._conn = conn
        return self._conn

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One ``BEGIN IMMEDIATE`` transaction: takes the write lock up front, so no upgrade
        deadlock and no "read, then someone else writes, then we write" interleaving."""
        with self._lock:
            conn = self._connection()
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            yield self._connection()

    def close(self) -> None:
        """Close this process's connection (the handle reopens on next use)."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
            if self._mirror_fd is not None:
                os.close(self._mirror_fd)
                self._mirror_fd = None

    # -- trading --------------------------------------------------------------------
    def execute(self, order: Order) -> Fill:
        """Execute one order atomically and return its ledger row."""
        action = Action(order.action)
        with self._tx() as conn:
            wall_ms, mono_ns = time.time_ns() // 1_000_000, time.monotonic_ns()
            pos = self._open_position(conn, order.symbol)
            effect, notional, side = self._decide(conn, order, action, pos)
            seq = self._insert_order(conn, order, effect, notional, wall_ms, mono_ns)
            position_id, position_side = "", ""
            if effect is Effect.OPEN or effect is Effect.FLIP:
                position_id, position_side = f"pos-{order.symbol}-{seq}", side
                conn.execute(
                    "INSERT INTO positions (position_id, symbol, side, notional, opened_at_ms, "
                    "open_seq) VALUES (?, ?, ?, ?, ?, ?)",
                    (position_id, order.symbol, side, notional, wall_ms, seq),
                )
            elif effect is Effect.ADD:
                assert pos is not None
                position_id, position_side = pos.position_id, pos.side
                conn.execute(
                    "UPDATE positions SET notional = ? WHERE position_id = ?",
                    (plain_decimal(Decimal(pos.notional) + Decimal(notional)), pos.position_id),
                )
            elif effect is Effect.CLOSE:
                assert pos is not None
                position_id, position_side = pos.position_id, pos.side
                conn.execute(
                    "UPDATE positions SET closed_at_ms = ?, close_seq = ? WHERE position_id = ?",
                    (wall_ms, seq, pos.position_id),
                )
            if effect.executed and self.fenced and order.fence is not None:
                conn.execute(
                    "INSERT INTO fences (symbol, fence) VALUES (?, ?) ON CONFLICT(symbol)"
                    " DO UPDATE SET fence = excluded.fence",
                    (order.symbol, order.fence),
                )
            count = self._count_open(conn)
            conn.execute(
                "UPDATE orders SET position_id = ?, position_side = ?, "
                "open_count_after = ? WHERE seq = ?",
                (position_id, position_side, count, seq),
            )
            row = conn.execute(f"SELECT {_ORDER_COLS} FROM orders WHERE seq = ?", (seq,)).fetchone()
        fill = OrderRecord(*row)
        if effect in (Effect.ADD, Effect.FLIP):
            log.info(  # the ledger records every one; a design under audit makes thousands
                "exchange: %s on %s by %s (%s)", effect, order.symbol, order.plan_id, position_id
            )
        return fill

    def _decide(
        self, conn: sqlite3.Connection, order: Order, action: Action, pos: Position | None
    ) -> tuple[Effect, str, str]:
        """(effect, traded notional, side of the position it leaves or acts on)."""
        try:
            notional = plain_decimal(order.notional or "0")
            finite = Decimal(notional).is_finite()
        except (InvalidOperation, ValueError):
            finite = False
        if not finite:
            if action is Action.OPEN:
                return Effect.REJECTED_INVALID_NOTIONAL, "0", order.side
            notional = "0"  # a close takes the position's notional, a flip the last one's
        if self.fenced and order.fence is not None:
            row = conn.execute(
                "SELECT fence FROM fences WHERE symbol = ?", (order.symbol,)
            ).fetchone()
            if row is not None and order.fence <= row[0]:
                return Effect.REJECTED_STALE_FENCE, notional, order.side
        if action is Action.OPEN:
            if pos is None:
                return Effect.OPEN, notional, order.side
            return Effect.ADD, notional, pos.side
        if pos is not None:
            return Effect.CLOSE, pos.notional, pos.side
        if self.reduce_only:
            return Effect.REJECTED_REDUCE_ONLY, notional, order.side
        # A flip: the closing trade (sell for a LONG) lands on a flat account. When the order
        # does not say what it meant to close, assume the symbol's last position.
        side, flip_notional = order.side, notional
        if not side or Decimal(flip_notional) <= 0:
            last = conn.execute(
                "SELECT side, notional FROM positions WHERE symbol = ? "
                "ORDER BY open_seq DESC LIMIT 1",
                (order.symbol,),
            ).fetchone()
            side = side or (last[0] if last else str(Side.LONG))
            if Decimal(flip_notional) <= 0 and last:
                flip_notional = last[1]
        return Effect.FLIP, flip_notional, _opposite(side)

    @staticmethod
    def _insert_order(
        conn: sqlite3.Connection,
        order: Order,
        effect: Effect,
        notional: str,
        wall_ms: int,
        mono_ns: int,
    ) -> int:
        cur = conn.execute(
            "INSERT INTO orders (plan_id, symbol, action, side, notional, fence, effect, "
            "position_id, position_side, open_count_after, wall_ms, mono_ns, pid, issued_at_ms) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, '', '', -1, ?, ?, ?, ?)",
            (
                order.plan_id,
                order.symbol,
                str(order.action),
                order.side,
                notional,
                order.fence,
                str(effect),
                wall_ms,
                mono_ns,
                os.getpid(),
                order.issued_at_ms,
            ),
        )
        assert cur.lastrowid is not None
        return cur.lastrowid

    @staticmethod
    def _open_position(conn: sqlite3.Connection, symbol: str) -> Position | None:
        row = conn.execute(
            f"SELECT {_POS_COLS} FROM positions WHERE symbol = ? AND close_seq IS NULL", (symbol,)
        ).fetchone()
        return Position(*row) if row else None

    @staticmethod
    def _count_open(conn: sqlite3.Connection) -> int:
        return int(
            conn.execute("SELECT COUNT(*) FROM positions WHERE close_seq IS NULL").fetchone()[0]
        )

    def close_all(self, plan_id: str = "close_all") -> list[Fill]:
        """Close every open position, as recorded CLOSE orders (so replaying the ledger
        still gives the right open count), in one transaction."""
        fills = []
        with self._tx() as conn:
            rows = conn.execute(
                f"SELECT {_POS_COLS} FROM positions WHERE close_seq IS NULL ORDER BY symbol"
            ).fetchall()
            open_now = len(rows)
            for row in rows:
                pos = Position(*row)
                wall_ms, mono_ns = time.time_ns() // 1_000_000, time.monotonic_ns()
                order = Order(plan_id, pos.symbol, str(Action.CLOSE), pos.side, pos.notional)
                seq = self._insert_order(conn, order, Effect.CLOSE, pos.notional, wall_ms, mono_ns)
                open_now -= 1
                conn.execute(
                    "UPDATE positions SET closed_at_ms = ?, close_seq = ? WHERE position_id = ?",
                    (wall_ms, seq, pos.position_id),
                )
                conn.execute(
                    "UPDATE orders SET position_id = ?, position_side = ?, "
                    "open_count_after = ? WHERE seq = ?",
                    (pos.position_id, pos.side, open_now, seq),
                )
                fills.append(
                    OrderRecord(
                        *conn.execute(
                            f"SELECT {_ORDER_COLS} FROM orders WHERE seq = ?", (seq,)
                        ).fetchone()
                    )
                )
        return fills

    def set_pnl(self, symbol: str, pnl_pct: float) -> bool:
        """Mark the open position on ``symbol`` (rotation closes the lowest); False when flat."""
        with self._tx() as conn:
            cur = conn.execute(
                "UPDATE positions SET pnl_pct = ? WHERE symbol = ? AND close_seq IS NULL",
                (float(pnl_pct), symbol),
            )
            return cur.rowcount > 0

    def take(self, plan_id: str, consumer: str) -> str | None:
        """Record that ``consumer`` takes the permit of ``plan_id``; return the consumer that
        took it first when it is not this call (None when this call is the first).

        The apply layer calls this before GETDEL so that a duplicated decision entry, or one
        reclaimed from a slow apply consumer, is recognised as already handled instead of
        being reported ``expired`` while its order is still on the way.
        """
        with self._tx() as conn:
            cur = conn.execute(
                "INSERT OR IGNORE INTO takes (plan_id, consumer, pid, taken_at_ms)"
                " VALUES (?, ?, ?, ?)",
                (plan_id, consumer, os.getpid(), time.time_ns() // 1_000_000),
            )
            if cur.rowcount == 1:
                return None
            row = conn.execute(
                "SELECT consumer FROM takes WHERE plan_id = ?", (plan_id,)
            ).fetchone()
            return str(row[0])

    # -- queries --------------------------------------------------------------------
    def open_positions(self) -> dict[str, Position]:
        with self._read() as conn:
            rows = conn.execute(
                f"SELECT {_POS_COLS} FROM positions WHERE close_seq IS NULL"
            ).fetchall()
        return {p.symbol: p for p in (Position(*r) for r in rows)}

    def position(self, symbol: str) -> Position | None:
        with self._read() as conn:
            return self._open_position(conn, symbol)

    def positions(self) -> list[Position]:
        """Every position ever opened, open or closed, in opening order."""
        with self._read() as conn:
            rows = conn.execute(f"SELECT {_POS_COLS} FROM positions ORDER BY open_seq").fetchall()
        return [Position(*r) for r in rows]

    def orders(self) -> list[OrderRecord]:
        with self._read() as conn:
            rows = conn.execute(f"SELECT {_ORDER_COLS} FROM orders ORDER BY seq").fetchall()
        return [OrderRecord(*r) for r in rows]

    def orders_for(self, plan_id: str) -> list[OrderRecord]:
        with self._read() as conn:
            rows = conn.execute(
                f"SELECT {_ORDER_COLS} FROM orders WHERE plan_id = ? ORDER BY seq", (plan_id,)
            ).fetchall()
        return [OrderRecord(*r) for r in rows]

    def open_count(self) -> int:
        with self._read() as conn:
            return self._count_open(conn)

    def max_open_count(self) -> int:
        with self._read() as conn:
            return int(
                conn.execute("SELECT COALESCE(MAX(open_count_after), 0) FROM orders").fetchone()[0]
            )

    def _by_effect(self, effect: Effect) -> list[OrderRecord]:
        with self._read() as conn:
            rows = conn.execute(
                f"SELECT {_ORDER_COLS} FROM orders WHERE effect = ? ORDER BY seq", (str(effect),)
            ).fetchall()
        return [OrderRecord(*r) for r in rows]

    def double_opens(self) -> list[OrderRecord]:
        return self._by_effect(Effect.ADD)

    def double_closes(self) -> list[OrderRecord]:
        return self._by_effect(Effect.FLIP)

    # -- the Redis mirror -----------------------------------------------------------------
    @contextmanager
    def _mirror_lock(self) -> Iterator[None]:
        """Serialise mirror writes across threads and processes of this host.

        Each write reads the ledger and then writes Redis; without the lock a full sync
        that read the ledger before an order could overwrite that order's fresher
        per-symbol write, and the mirror would show a closed position as open until the
        next sync (a governor reconciling from the mirror would then act on a lie).
        """
        with self._mirror_thread_lock:
            if self._mirror_fd is None:
                self._mirror_fd = os.open(self.path + ".mirror.lock", os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(self._mirror_fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self._mirror_fd, fcntl.LOCK_UN)

    def _capital(self, r: redis.Redis, keys: Keys, capital: float | None) -> Decimal | None:
        if capital is None:
            capital = self.capital
        if capital is None:
            raw = r.get(keys.capital)
            if raw is None:
                return None
            return Decimal(raw.decode() if isinstance(raw, bytes) else str(raw))
        return Decimal(str(capital))

    def _exposure(self, positions: Mapping[str, Position], capital: Decimal | None) -> str | None:
        if capital is None or capital <= 0:
            return None
        total = sum((Decimal(p.notional) for p in positions.values()), Decimal(0))
        return plain_decimal(total / capital)

    def mirror(self, r: redis.Redis, keys: Keys, capital: float | None = None,
               strays: Iterable[str] | None = None) -> int:
        """Rewrite the whole ``P:position:*`` mirror and ``P:portfolio:exposure_pct`` from
        the ledger, in one MULTI; returns the number of open positions written.

        ``capital`` defaults to the handle's, then to ``P:portfolio:capital``; with none,
        exposure is left alone. Mirror keys of symbols the ledger shows flat are deleted,
        and so are strays the ledger never knew: every ``P:position:*`` key a SCAN finds
        (it walks the whole keyspace), or, when ``strays`` is given, those keys only (the
        caller's bounded share of a sweep; an open symbol's key among them is kept).
        """
        with self._mirror_lock():
            cap = self._capital(r, keys, capital)
            with self._read() as conn:
                rows = conn.execute(
                    f"SELECT {_POS_COLS} FROM positions WHERE close_seq IS NULL"
                ).fetchall()
                known = [s for (s,) in conn.execute("SELECT DISTINCT symbol FROM positions")]
            open_ = {p.symbol: p for p in (Position(*row) for row in rows)}
            stale = {keys.position(s) for s in known if s not in open_}
            found = r.scan_iter(match=keys.position_pattern, count=500) \
                if strays is None else strays
            stale.update(k.decode() if isinstance(k, bytes) else str(k) for k in found)
            stale -= {keys.position(s) for s in open_}
            pipe = r.pipeline(transaction=True)
            if stale:
                pipe.delete(*sorted(stale))
            for sym, pos in open_.items():
                key = keys.position(sym)
                pipe.delete(key)
                pipe.hset(key, mapping=pos.mirror_fields())
            exposure = self._exposure(open_, cap)
            if exposure is not None:
                pipe.set(keys.exposure_pct, exposure)
            pipe.execute()
        return len(open_)

    def mirror_symbol(
        self, r: redis.Redis, keys: Keys, symbol: str, capital: float | None = None
    ) -> Position | None:
        """Write the mirror of one symbol (after an order on it) and the exposure; returns
        the open position written, or None when the symbol is flat (its key deleted)."""
        with self._mirror_lock():
            cap = self._capital(r, keys, capital)
            open_ = self.open_positions()
            pos = open_.get(symbol)
            pipe = r.pipeline(transaction=True)
            key = keys.position(symbol)
            pipe.delete(key)
            if pos is not None:
                pipe.hset(key, mapping=pos.mirror_fields())
            exposure = self._exposure(open_, cap)
            if exposure is not None:
                pipe.set(keys.exposure_pct, exposure)
            pipe.execute()
        return pos

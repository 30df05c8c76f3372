"""Pre-flight check of a stored run directory, before any checker judges it.

The checkers read ``run.json``, ``history/*.jsonl`` and ``ledger.sqlite`` and take what
is missing as "nothing happened": a run whose ledger was lost then looks like a governor
that decided plans nobody executed, and comes out INVALID with dozens of violations. A
verdict must only ever come from a whole run, so ``chaos check`` and ``chaos report`` (and
anything else that judges stored runs) call :func:`validate` first:

- :class:`NotARun` (exit 254): the directory does not exist, has no history, or every
  history file is empty -- the argument does not name a run at all.
- :class:`RunDirError` (exit 255): a run whose files are damaged -- ``run.json`` missing,
  unreadable or not a JSON object with a usable ``governor_config``; ``ledger.sqlite``
  missing or not an SQLite database with an ``orders`` table; a history file that cannot
  be read or has a line that is not an operation (other than a torn last line, which a
  writer killed mid-line leaves and the checkers skip). The message names the file (and
  the line).
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import msgspec

from chaos.history import HISTORY_DIR, history_files
from governor_ref.protocol import GovernorConfig

__all__ = ["NotARun", "RunDirError", "validate"]

# The ledger columns every checker reads (chaos/checkers/facts.py, load_ledger).
LEDGER_COLUMNS = frozenset({"seq", "plan_id", "symbol", "action", "side", "notional", "fence",
                            "effect", "position_id", "open_count_after", "issued_at_ms"})


class RunDirError(RuntimeError):
    """A run directory too damaged to judge (exit 255); the message names the file."""


class NotARun(RunDirError):
    """The path does not hold a run at all (exit 254): a bad argument, not a damaged run."""


class _OpShape(msgspec.Struct):
    """What every history line must have; the rest is the checkers' business."""

    type: str
    f: str


def validate(run_dir: Path) -> None:
    """Raise :class:`NotARun` or :class:`RunDirError` unless ``run_dir`` can be judged."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise NotARun(f"{run_dir} is not a run directory (no such directory)")
    files = history_files(run_dir)
    if not files:
        raise NotARun(f"{run_dir} is not a run directory (no {HISTORY_DIR}/*.jsonl)")
    sizes = {}
    for p in files:
        try:
            sizes[p] = p.stat().st_size if p.is_file() else -1
        except OSError as exc:
            raise RunDirError(f"{p}: cannot read: {exc.strerror or exc}") from None
        if sizes[p] < 0:
            raise RunDirError(f"{p}: not a file")
    if all(n == 0 for n in sizes.values()):
        raise NotARun(f"{run_dir} is not a run (every {HISTORY_DIR}/*.jsonl is empty: nothing "
                      f"was recorded)")
    _check_meta(run_dir / "run.json")
    _check_ledger(run_dir / "ledger.sqlite")
    for p in files:
        _check_history(p)


def _check_meta(path: Path) -> None:
    if not path.exists():
        raise RunDirError(f"{path}: missing (every run writes it first)")
    try:
        meta = json.loads(path.read_bytes())
    except OSError as exc:
        raise RunDirError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise RunDirError(f"{path}: not valid JSON: {exc}") from None
    if not isinstance(meta, dict):
        raise RunDirError(f"{path}: not a JSON object")
    cfg = meta.get("governor_config")
    if cfg is not None:
        if not isinstance(cfg, dict):
            raise RunDirError(f"{path}: governor_config is not an object")
        try:
            GovernorConfig.from_hash(cfg)
        except ValueError as exc:
            raise RunDirError(f"{path}: governor_config: {exc}") from None


def _check_ledger(path: Path) -> None:
    if not path.exists():
        raise RunDirError(f"{path}: missing (the exchange's ledger: what executed)")
    if not path.is_file():
        raise RunDirError(f"{path}: not a file")
    try:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        raise RunDirError(f"{path}: cannot open: {exc}") from None
    try:
        cols = {r[1] for r in con.execute("PRAGMA table_info(orders)")}
        con.execute("SELECT count(*) FROM orders").fetchone()
    except sqlite3.Error as exc:
        raise RunDirError(f"{path}: not a readable SQLite ledger: {exc}") from None
    finally:
        con.close()
    missing = LEDGER_COLUMNS - cols
    if "wall_ms" not in cols and "t_wall_ms" not in cols:
        missing = missing | {"wall_ms"}
    if missing:
        raise RunDirError(f"{path}: the orders table lacks {', '.join(sorted(missing))}")


def _check_history(path: Path) -> None:
    """Every line an operation; a last line without its newline may be torn (skipped)."""
    decoder = msgspec.json.Decoder(_OpShape)
    try:
        with path.open("rb") as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    decoder.decode(line)
                except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                    if not line.endswith(b"\n") and fh.peek(1) == b"":
                        return  # a torn last line: a writer killed mid-write
                    raise RunDirError(f"{path}:{n}: not a history operation: {exc}") from None
    except OSError as exc:
        raise RunDirError(f"{path}: cannot read: {exc.strerror or exc}") from None

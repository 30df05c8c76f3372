"""Scan some history files and write their facts to stdout as msgpack (one worker of ``gather``).

    python -m chaos.checkers.scan_worker '[[PATH, START, END], ...]'

Started by :func:`chaos.checkers.facts.gather` for long histories; a bad line
is reported on stderr (its file and line) with exit status 1.
"""

from __future__ import annotations

import gc
import json
import sys

from chaos.checkers.facts import HistoryError, _scan, encode_scan


def main(argv: list[str]) -> int:
    gc.disable()  # see facts.gc_paused
    try:
        scan = _scan([tuple(seg) for seg in json.loads(argv[0])])
    except (HistoryError, OSError) as exc:
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    sys.stdout.buffer.write(encode_scan(scan))
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

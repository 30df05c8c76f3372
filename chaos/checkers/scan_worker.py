"""Scan some history files and pickle their facts to stdout (one worker of ``gather``).

    python -m chaos.checkers.scan_worker FILE...

Started by :func:`chaos.checkers.facts.gather` for long histories; a bad line
is reported on stderr (its file and line) with exit status 1.
"""

from __future__ import annotations

import gc
import pickle
import sys

from chaos.checkers.facts import HistoryError, _scan


def main(argv: list[str]) -> int:
    gc.disable()  # see facts.gc_paused
    try:
        scan = _scan(argv)
    except (HistoryError, OSError) as exc:
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    sys.stdout.buffer.write(pickle.dumps(scan, protocol=pickle.HIGHEST_PROTOCOL))
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

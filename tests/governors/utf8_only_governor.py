#!/usr/bin/env python3
"""The reference governor with one bug a real service may well have: it dies on a plan
whose fields are not valid UTF-8 (it decodes strictly and lets the error end the process).

Until such a plan arrives it is the reference, permitting and blocking as it should; after
that it crash-loops, because a restarted instance keeps its consumer name and is handed
its pending entries (the poison among them) again. The harness must report this as a
finding about the governor, with the entry named (exit 1), never as "the governor command
does not start" (255); and every scenario without non-UTF-8 plans must stay VALID.

Environment as for any governor under test: ``REDIS_URL``, ``GOVERNOR_PREFIX``,
``GOVERNOR_CONSUMER``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from typing import Any

from governor_ref import cli
from governor_ref.protocol import Plan

_parse = Plan.from_fields.__func__  # type: ignore[attr-defined]


def _strict_utf8(cls: type[Plan], raw: Mapping[Any, Any]) -> Plan:
    for k, v in raw.items():
        for part in (k, v):
            if isinstance(part, bytes):
                try:
                    part.decode("utf-8")
                except UnicodeDecodeError as exc:
                    print(f"utf8-only governor: cannot decode plan field {k!r}: {exc}",
                          file=sys.stderr, flush=True)
                    os._exit(1)  # the bug: no BLOCK invalid_plan, the process just dies
    return _parse(cls, raw)


Plan.from_fields = classmethod(_strict_utf8)  # type: ignore[method-assign,assignment]

if __name__ == "__main__":
    sys.exit(cli.main(["run"]))

"""Registry of decision logics selectable with ``--variant``.

``reference`` is the correct governor; ``seed`` and ``legacy`` are the
designs under audit (docs/variants.md lists where each departs from it).
All three share the stream loop and protocol code of ``governor.py``.
"""

from __future__ import annotations

from .governor import Context, DecisionLogic, LogicFactory


def _reference(ctx: Context) -> DecisionLogic:
    from .reference import ReferenceLogic

    return ReferenceLogic(ctx)


def _seed(ctx: Context) -> DecisionLogic:
    from .seed import SeedLogic

    return SeedLogic(ctx)


def _legacy(ctx: Context) -> DecisionLogic:
    from .legacy import LegacyLogic

    return LegacyLogic(ctx)


VARIANTS: dict[str, LogicFactory] = {
    "reference": _reference,
    "seed": _seed,
    "legacy": _legacy,
}


def factory(name: str) -> LogicFactory:
    try:
        return VARIANTS[name]
    except KeyError:
        known = ", ".join(sorted(VARIANTS))
        raise ValueError(f"unknown variant {name!r}; known: {known}") from None

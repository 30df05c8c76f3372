"""Registry of decision logics selectable with ``--variant``."""

from __future__ import annotations

from .governor import Context, DecisionLogic


def _reference(ctx: Context) -> DecisionLogic:
    from .reference import ReferenceLogic

    return ReferenceLogic(ctx)


VARIANTS = {
    "reference": _reference,
}


def factory(name: str):
    try:
        return VARIANTS[name]
    except KeyError:
        known = ", ".join(sorted(VARIANTS))
        raise ValueError(f"unknown variant {name!r}; known: {known}") from None

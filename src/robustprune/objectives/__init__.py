"""Training objectives, registered by name; one object is handed to both training stages."""
from __future__ import annotations

import inspect
from typing import Any

from robustprune.infra.errors import UserError
from robustprune.objectives.base import OBJECTIVES, Objective
from robustprune.objectives import benign, certified, fast, mart, pgd, smooth, trades  # noqa: F401  (registration)


def _settings(cls: type) -> set[str]:
    return {name for name, p in inspect.signature(cls).parameters.items() if p.kind is p.POSITIONAL_OR_KEYWORD
            or p.kind is p.KEYWORD_ONLY}


def create(name: str, **params: Any) -> Objective:
    """``create("pgd", eps=0.3, steps=10)`` → an Objective.

    Settings that belong to *other* registered objectives (``steps`` for ``ibp``, ``kappa_end`` for ``pgd``) are
    dropped, so one settings dict serves every objective; a setting no objective takes is an error.
    """
    cls = OBJECTIVES.get(name)
    known = set().union(*(_settings(OBJECTIVES.get(n)) for n in OBJECTIVES.names()))
    unknown = sorted(set(params) - known)
    if unknown:
        raise UserError(f"unknown objective setting(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    accepted = _settings(cls)
    return cls(**{k: v for k, v in params.items() if k in accepted})


__all__ = ["OBJECTIVES", "Objective", "create"]

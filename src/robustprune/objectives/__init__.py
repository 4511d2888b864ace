"""Training objectives, registered by name; one object is handed to both training stages."""
from __future__ import annotations

from typing import Any

from robustprune.objectives.base import OBJECTIVES, NoSettings, Objective, settings_of
from robustprune.objectives import benign, certified, fast, mart, pgd, smooth, trades  # noqa: F401  (registration)


def create(name: str, *, eps: float = 0.0, norm: str = "linf", **settings: Any) -> Objective:
    """``create("pgd", eps=0.3, steps=10)`` → an Objective; ``settings`` are the objective's own (its ``Settings``
    dataclass): a key it does not declare is refused with "did you mean"."""
    cls = OBJECTIVES.get(name)
    return cls(eps=eps, norm=norm, settings=settings_of(cls, settings))


__all__ = ["OBJECTIVES", "NoSettings", "Objective", "create", "settings_of"]

"""Training objectives, registered by name; one object is handed to both training stages."""
from __future__ import annotations

from typing import Any

from robustprune.objectives.base import OBJECTIVES, Objective
from robustprune.objectives import benign, pgd  # noqa: F401  (registration)


def create(name: str, **params: Any) -> Objective:
    """``create("pgd", eps=0.3, steps=10)`` → an Objective."""
    return OBJECTIVES.get(name)(**params)


__all__ = ["OBJECTIVES", "Objective", "create"]

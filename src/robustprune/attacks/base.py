"""The one attack interface: every registered attack is called as ``attack(model, x, y, threat, settings, seed=)``.

``Threat`` is the threat model (norm and radius; the config's ``threat`` section is this class). Each attack class
declares its settings dataclass (``Settings``, a subclass of :class:`AttackSettings`); the config's ``evaluate``
section holds them as ``<attack>_<setting>`` keys (``pgd_steps``, ``square_queries``), so a new attack is one file
plus one registry line and its settings are configurable with no other file changed.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from robustprune.attacks.geometry import BALLS
from robustprune.infra.errors import UserError


@dataclass(frozen=True)
class Threat:
    """The threat model: an ``norm`` ball of radius ``eps`` around each input, intersected with [0, 1] (pixel units:
    every model normalises inside)."""

    norm: str = "linf"
    eps: float = 0.2

    def __post_init__(self) -> None:
        if self.norm not in BALLS:
            raise UserError(f"norm must be one of {', '.join(BALLS.names())}, got {self.norm!r}")
        if not self.eps >= 0:
            raise UserError(f"eps must be >= 0, got {self.eps}")


@dataclass(frozen=True)
class AttackSettings:
    """What evaluation needs of every attack; subclasses add the attack's own hyper-parameters."""

    n_samples: int | None = None  # run on the first n evaluated samples only (None: all of them)
    eps_fractions: tuple[float, ...] = ()  # also run at these fractions of ε: accuracy must not rise with ε

    def __post_init__(self) -> None:
        if self.n_samples is not None and self.n_samples < 1:
            raise UserError(f"n_samples must be >= 1, got {self.n_samples}")
        if not all(0 < f < 1 for f in self.eps_fractions):
            raise UserError(f"eps_fractions must lie in (0, 1), got {list(self.eps_fractions)}")


class Attack(ABC):
    """An evasion attack: points of the threat's ball ∩ [0, 1] that try to change the model's prediction.

    ``gradient_free`` marks an attack that needs no gradient (or, like AutoAttack, ends with one that does not):
    gradient masking does not fool it, so evaluation uses it as the masking check.
    """

    Settings: ClassVar[type[AttackSettings]] = AttackSettings
    gradient_free: ClassVar[bool] = False

    def active(self, settings: AttackSettings) -> bool:
        """Whether these settings run the attack at all (``pgd_steps: 0`` switches PGD off)."""
        return True

    @abstractmethod
    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: Threat,
                 settings: AttackSettings, *, seed: int = 0) -> torch.Tensor:
        """Adversarial points (shape of ``x``); the model's mode is the caller's (evaluation sets eval mode)."""

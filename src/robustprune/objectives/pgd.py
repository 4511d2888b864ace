"""``pgd``: Madry et al. (2018) adversarial training — cross-entropy on PGD points of the L∞ (or L2) ε-ball.

The attack runs with the model in eval mode (so batch-norm statistics are not updated by attack passes) and only
asks autograd for the input gradient; the update step then runs in training mode on the adversarial batch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from robustprune.attacks.pgd import default_step_size, pgd
from robustprune.infra.errors import UserError
from robustprune.objectives.base import OBJECTIVES, Objective, eval_mode


@dataclass(frozen=True)
class PGDSettings:
    steps: int = 10  # attack steps per training batch
    step_size: float | None = None  # default 2.5 * eps / steps (Madry et al.)
    random_start: bool = True

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise UserError(f"steps must be >= 1, got {self.steps}")
        if self.step_size is not None and not self.step_size > 0:
            raise UserError(f"step_size must be > 0, got {self.step_size}")


@OBJECTIVES.register("pgd")
class PGDTraining(Objective):
    name = "pgd"
    Settings = PGDSettings

    def adversarial(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """PGD points at the current ε (x itself at ε = 0), computed in eval mode."""
        eps = self.current_eps
        if eps <= 0:
            return x
        step = self.scaled_step(self.step_size, default_step_size(eps, self.steps))
        with eval_mode(model):
            return pgd(model, x, y, eps, self.steps, step, norm=self.norm, random_start=self.random_start)

    def forward(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model(self.adversarial(model, x, y))
        return F.cross_entropy(logits, y), logits

    def describe(self) -> dict:
        return {"name": self.name, "eps": self.eps, "steps": self.steps, "norm": self.norm,
                "step_size": self.step_size or default_step_size(self.eps, self.steps)}

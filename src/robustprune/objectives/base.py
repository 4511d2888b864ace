"""The Objective contract and its registry.

An objective is one object handed to every ``fit()`` (pre-training and fine-tuning use the same one unless the user
asks otherwise). ``forward`` returns the training loss and the logits it was computed from (for train accuracy).
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import nn

from robustprune.registry import Registry


class Objective(ABC):
    """A training loss. ``eps`` is the nominal radius; ``fit`` scales it through ``set_eps_scale`` (warm-up)."""

    name: str = ""

    def __init__(self, eps: float = 0.0) -> None:
        self.eps = float(eps)
        self.eps_scale = 1.0

    @property
    def current_eps(self) -> float:
        return self.eps * self.eps_scale

    def set_eps_scale(self, scale: float) -> None:
        self.eps_scale = float(min(max(scale, 0.0), 1.0))

    @abstractmethod
    def forward(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(scalar loss, logits (B, classes)) for a batch; the model is in training mode."""

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.forward(model, x, y)[0]

    def describe(self) -> dict:
        return {"name": self.name, "eps": self.eps}


OBJECTIVES: Registry[type[Objective]] = Registry("objective")

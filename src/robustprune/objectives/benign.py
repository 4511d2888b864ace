"""``benign``: plain cross-entropy on clean inputs (the non-robust baseline)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from robustprune.objectives.base import OBJECTIVES, Objective


@OBJECTIVES.register("benign")
class Benign(Objective):
    name = "benign"

    def __init__(self, eps: float = 0.0, norm: str = "linf", settings: object = None) -> None:
        super().__init__(0.0, norm, settings)  # clean inputs: the radius is 0 whatever the threat

    def forward(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model(x)
        return F.cross_entropy(logits, y), logits

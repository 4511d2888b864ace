"""The model registry and the Normalize layer every model starts with."""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from robustprune.registry import Registry

#: A builder takes the input shape (C, H, W) and the class count and returns the network body (no normalisation).
ModelBuilder = Callable[[tuple[int, ...], int], nn.Module]

MODELS: Registry[ModelBuilder] = Registry("model")


class Normalize(nn.Module):
    """(x - mean) / std per channel; inputs stay in pixel units [0, 1] outside the model, so ε means pixels."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

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


def kaiming_init_(model: nn.Module) -> nn.Module:
    """Kaiming-normal (fan-out, ReLU) conv weights, zero conv bias, BatchNorm (1, 0); Linear left at defaults.

    The initialisation of the reference implementations (torchvision ResNet/VGG, Wide ResNet, Wong et al.).
    """
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    return model

"""A three-layer fully connected ReLU network, the smallest baseline for certified training and pruning.

Shape: Flatten → Linear(C·H·W, 256) → ReLU → Linear(256, 256) → ReLU → Linear(256, classes).
Initialisation: PyTorch defaults (Kaiming-uniform weights, as in most verification papers' MLP baselines).
"""
from __future__ import annotations

import math

from torch import nn

from robustprune.models.base import MODELS

HIDDEN = 256


@MODELS.register("mlp")
def mlp(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Two hidden layers of 256 ReLU units on the flattened input (any input shape)."""
    in_features = math.prod(input_shape)
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(in_features, HIDDEN),
        nn.ReLU(),
        nn.Linear(HIDDEN, HIDDEN),
        nn.ReLU(),
        nn.Linear(HIDDEN, num_classes),
    )

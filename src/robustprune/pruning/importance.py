"""Importance rules: what to remove. A rule scores every weight of a layer; it never sees the objective."""
from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import nn

from robustprune.registry import Registry


class Importance(ABC):
    """Scores one layer's weights: higher = more important; the lowest-scored are pruned first."""

    name: str = ""

    @abstractmethod
    def scores(self, module: nn.Module) -> torch.Tensor:
        """A tensor shaped like ``module.weight``."""


PRUNERS: Registry[type[Importance]] = Registry("pruning rule")


@PRUNERS.register("magnitude")
class Magnitude(Importance):
    """|w| of the effective weight (Han et al. 2015; the seed's rule, layer-wise or global)."""

    name = "magnitude"

    def scores(self, module: nn.Module) -> torch.Tensor:
        return module.weight.detach().abs()

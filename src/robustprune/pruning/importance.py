"""Importance rules: what to remove. A rule scores weights (or whole channels); it never sees the objective.

``structured`` rules remove whole output channels (their masks come from ``pruning.structured``); ``learned`` rules
start from their scores and then train them with the run's objective (HYDRA; the pipeline runs that phase).
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import nn

from robustprune.registry import Registry


class Importance(ABC):
    """Scores one layer's weights: higher = more important; the lowest-scored are pruned first."""

    name: str = ""
    structured: bool = False
    learned: bool = False

    @abstractmethod
    def scores(self, module: nn.Module, generator: torch.Generator | None = None) -> torch.Tensor:
        """A tensor shaped like ``module.weight``."""


PRUNERS: Registry[type[Importance]] = Registry("pruning rule")


@PRUNERS.register("magnitude")
class Magnitude(Importance):
    """|w| of the effective weight (Han et al. 2015; the seed's rule, layer-wise or global)."""

    name = "magnitude"

    def scores(self, module: nn.Module, generator: torch.Generator | None = None) -> torch.Tensor:
        return module.weight.detach().abs()


@PRUNERS.register("random")
class Random(Importance):
    """Uniform random scores: the baseline every pruning paper reports (seeded by the run's seed)."""

    name = "random"

    def scores(self, module: nn.Module, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.rand(module.weight.shape, generator=generator).to(module.weight.device)


@PRUNERS.register("filter-l1")
class FilterL1(Importance):
    """Whole output channels (Conv2d filters, Linear rows) of smallest L1 norm (Li et al. 2017; the seed's
    structured rule). Coupled channels (batch norm, residual additions, the next layer's inputs) are grouped by
    torch-pruning's dependency graph and removed together; ``pruning.slim`` then cuts them out."""

    name = "filter-l1"
    structured = True

    def scores(self, module: nn.Module, generator: torch.Generator | None = None) -> torch.Tensor:
        weight = module.weight.detach()
        per_channel = weight.abs().flatten(1).sum(1)
        return per_channel.view(-1, *([1] * (weight.dim() - 1))).expand_as(weight).clone()


@PRUNERS.register("hydra")
class Hydra(Importance):
    """HYDRA (Sehwag et al. 2020): scores start from the weights (scaled per layer, so the initial layer-wise
    selection is the magnitude one), then are trained with the run's objective while the weights are frozen;
    the final top-k mask is fixed and the weights fine-tuned. See ``pruning.hydra``."""

    name = "hydra"
    learned = True

    def scores(self, module: nn.Module, generator: torch.Generator | None = None) -> torch.Tensor:
        return module.weight.detach().abs()


@PRUNERS.register("harp")
class Harp(Importance):
    """HARP (Zhao & Wressnegger, ICLR 2023): HYDRA's trained scores plus a trained density per layer, the network's
    total held to the requested compression by a penalty and made exact at the end; ``scope`` gives the starting
    densities. See ``pruning.harp``."""

    name = "harp"
    learned = True

    def scores(self, module: nn.Module, generator: torch.Generator | None = None) -> torch.Tensor:
        return module.weight.detach().abs()

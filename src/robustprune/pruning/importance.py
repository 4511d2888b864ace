"""Importance rules: what to remove. A rule scores weights or whole channels; it never sees the objective.

A :class:`WeightImportance` scores every weight of a layer (selection by scope in ``pruning.plan``); a
:class:`ChannelImportance` (``structured``) scores the output channels of a coupled channel group, and
``pruning.structured`` removes the lowest. ``learned`` rules start from their scores and then train them with the
run's objective (HYDRA, HARP; the pipeline runs that phase). Each rule names the ``scopes`` it can be selected in.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import nn

from robustprune.pruning.groups import WEIGHT, ChannelGroup, channel_mass
from robustprune.pruning.plan import RANKED_SCOPES, SCOPES
from robustprune.registry import Registry


class Importance(ABC):
    """A pruning rule: its registry name, its kind, and the scopes it may be selected in."""

    name: str = ""
    structured: bool = False
    learned: bool = False
    scopes: tuple[str, ...] = SCOPES


class WeightImportance(Importance):
    """Scores one layer's weights: higher = more important; the lowest-scored are pruned first."""

    @abstractmethod
    def scores(self, module: nn.Module, generator: torch.Generator | None = None) -> torch.Tensor:
        """A tensor shaped like ``module.weight``."""


class ChannelImportance(Importance):
    """Scores whole output channels: a channel goes with everything coupled to it, so the unit is a channel group.

    Channels, not weights, are the unit: ERK's per-weight counts do not map onto them, hence the ranked scopes only.
    """

    structured = True
    scopes = RANKED_SCOPES

    @abstractmethod
    def channel_scores(self, group: ChannelGroup, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per channel of ``group``, float64 on the CPU: higher = more important. ``params`` are the model's
        effective parameters (masks baked in) by path, so already-pruned weights count as zero."""


PRUNERS: Registry[type[Importance]] = Registry("pruning rule")


@PRUNERS.register("magnitude")
class Magnitude(WeightImportance):
    """|w| of the effective weight (Han et al. 2015; the seed's rule, layer-wise or global)."""

    name = "magnitude"

    def scores(self, module: nn.Module, generator: torch.Generator | None = None) -> torch.Tensor:
        return module.weight.detach().abs()


@PRUNERS.register("random")
class Random(WeightImportance):
    """Uniform random scores: the baseline every pruning paper reports (seeded by the run's seed)."""

    name = "random"

    def scores(self, module: nn.Module, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.rand(module.weight.shape, generator=generator).to(module.weight.device)


@PRUNERS.register("filter-l1")
class FilterL1(ChannelImportance):
    """Whole output channels (Conv2d filters, Linear rows) of smallest L1 norm (Li et al. 2017; the seed's
    structured rule). Coupled channels (batch norm, residual additions, the next layer's inputs) are grouped by
    torch-pruning's dependency graph and removed together; ``pruning.slim`` then cuts them out."""

    name = "filter-l1"

    def channel_scores(self, group: ChannelGroup, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """The L1 norm of the weight rows producing each channel, summed over the producers a residual addition
        couples. Biases, BatchNorm and the consumers' columns do not count: Torch-Pruning's
        ``GroupMagnitudeImportance(p=1)`` is not used because it also adds the consumers' input columns."""
        return channel_mass(group, params, (WEIGHT,))


@PRUNERS.register("hydra")
class Hydra(WeightImportance):
    """HYDRA (Sehwag et al. 2020): scores start from the weights (scaled per layer, so the initial layer-wise
    selection is the magnitude one), then are trained with the run's objective while the weights are frozen;
    the final top-k mask is fixed and the weights fine-tuned. See ``pruning.hydra``."""

    name = "hydra"
    learned = True

    def scores(self, module: nn.Module, generator: torch.Generator | None = None) -> torch.Tensor:
        return module.weight.detach().abs()


@PRUNERS.register("harp")
class Harp(WeightImportance):
    """HARP (Zhao & Wressnegger, ICLR 2023): HYDRA's trained scores plus a trained density per layer, the network's
    total held to the requested compression by a penalty and made exact at the end; ``scope`` gives the starting
    densities. See ``pruning.harp``."""

    name = "harp"
    learned = True

    def scores(self, module: nn.Module, generator: torch.Generator | None = None) -> torch.Tensor:
        return module.weight.detach().abs()

"""Structured pruning: remove whole output channels (filters) by the rule's channel importance, then cut them out.

The importance is a :class:`~robustprune.pruning.importance.ChannelImportance`; by default "filter-l1", the seed
paper's rule (H. Li, A. Kadav, I. Durdanovic, H. Samet, H. P. Graf, "Pruning Filters for Efficient ConvNets",
ICLR 2017): a channel's importance is the L1 norm of the weights that produce it.

Three steps, kept apart as in Torch-Pruning (what | how many where | how to cut):

- :func:`channel_groups` — Torch-Pruning's ``DependencyGraph`` couples every output channel of a Conv2d / Linear with
  everything that must go with it: the other producers of the same tensor (residual additions), BatchNorm entries,
  and the next layers' input columns (through Flatten: H·W consecutive Linear inputs per channel).
- :func:`channel_masks` — has the rule score each group's channels, picks the lowest per group (scope ``"layer"``)
  or over all groups (scope ``"global"``) so that the masked model reaches a requested compression, and returns 0/1
  masks for every parameter slice a removal touches (producer rows and biases, BatchNorm γ/β, consumer columns).
  Applied with :func:`robustprune.pruning.masks.apply_masks`, a removed channel is exactly 0 after its BatchNorm
  (γ = β = 0), so the masked model already computes what the slim model computes, and trains/attacks/verifies as an
  ordinary module.
- :func:`slim` — bakes the masks in and physically removes every channel that is zero in its whole group, with
  Torch-Pruning's pruning functions: a smaller ordinary model with the same outputs.

Assumption (true for every model in :mod:`robustprune.models`): the activations between layers map 0 to 0 (ReLU,
pooling, identity), so a channel that is 0 after its BatchNorm contributes nothing downstream.
"""
from __future__ import annotations

import bisect
import math
from typing import Iterable, Sequence

import torch
import torch_pruning as tp
from torch import nn

from robustprune.infra.errors import UserError
from robustprune.pruning.groups import (
    BIAS, INPUT, NORM, WEIGHT, ChannelGroup, all_groups, baked_copy, channel_groups, channel_mass, dependency_graph,
    describe, example_batch, resolve_ignored,
)
from robustprune.pruning.importance import ChannelImportance, FilterL1
from robustprune.pruning.masks import PRUNABLE_TYPES, masks

__all__ = ["ChannelGroup", "channel_groups", "channel_masks", "count_macs_params", "slim"]


def channel_masks(
    model: nn.Module,
    example_input: torch.Tensor | None = None,
    compression: float | None = None,
    scope: str = "layer",
    ignored_layers: Iterable[nn.Module | str] = (),
    min_density: float = 0.0,
    channel_fraction: float | None = None,
    importance: ChannelImportance | None = None,
) -> dict[str, torch.Tensor]:
    """Structured masks reaching ``compression`` (prunable / nonzero Conv+Linear weights) of ``model``.

    Channels are ranked by ``importance.channel_scores`` (default :class:`FilterL1`: the L1 norm of a channel's
    output weights, Li et al. 2017), which sees the parameters with masks baked in: already-zero weights count as
    zero, so pruning a pruned model only removes more. The scope must be one of ``importance.scopes``.

    Scope ``"layer"`` removes the same fraction of channels from every group (rounded down per group); ``"global"``
    ranks all channels by importance divided by their group's mean importance (so layers of different widths and
    fan-ins compare) and removes the lowest. The amount is chosen by bisection so that the masked model's nonzero
    weights (consumer columns included) come as close to ``total / compression`` as channel granularity allows:
    within half a step, i.e. half of ``weights_per_channel`` summed over the groups (layer) or of one group
    (global). ``channel_fraction`` instead removes that fraction of the channels (per group, or of all channels).

    Never removed: channels that reach the model output (the classifier's), output channels of ``ignored_layers``
    (modules or their paths) and of every layer coupled with them; each group keeps at least
    ``max(1, ceil(min_density · channels))`` channels. A request beyond reach raises :class:`UserError` naming the
    largest reachable compression. Returns masks by parameter path for every touched parameter (multiplied by the
    parameter's existing mask), ready for :func:`~robustprune.pruning.masks.apply_masks`; the model is unchanged.
    """
    importance = FilterL1() if importance is None else importance
    _check_request(compression, channel_fraction, scope, min_density, importance.scopes)
    ignored_layers = tuple(ignored_layers)
    baked = baked_copy(model)
    graph = dependency_graph(baked, example_batch(model, example_input))
    names = {module: name for name, module in baked.named_modules()}
    ignored = resolve_ignored(model, baked, ignored_layers)
    groups = [g for g in (describe(group, graph, names, ignored) for group in all_groups(graph)) if not g.frozen]
    params = dict(baked.named_parameters())
    scores = [_channel_scores(importance, g, params) for g in groups]
    cap = [g.channels - max(1, math.ceil(min_density * g.channels - 1e-9)) for g in groups]
    orders = [torch.argsort(imp, stable=True)[:c] for imp, c in zip(scores, cap)]
    schedule = _LayerSchedule(groups, orders) if scope == "layer" else _GlobalSchedule(groups, scores, orders)
    if channel_fraction is not None:
        step = schedule.step_for_fraction(channel_fraction)
    else:
        limits = f"min_density {min_density:g}, {len(ignored_layers)} ignored layer(s)"
        step = _closest_step(_NonzeroCounter(baked, groups), schedule, compression, limits)
    return _masks_for(groups, schedule.select(step), params, masks(model))


def _check_request(compression: float | None, channel_fraction: float | None, scope: str, min_density: float,
                   scopes: Sequence[str]) -> None:
    if (compression is None) == (channel_fraction is None):
        raise UserError("give exactly one of compression and channel_fraction")
    if compression is not None and not compression >= 1:
        raise UserError(f"compression must be >= 1, got {compression}")
    if channel_fraction is not None and not 0 <= channel_fraction < 1:
        raise UserError(f"channel_fraction must be in [0, 1), got {channel_fraction}")
    if scope not in scopes:
        raise UserError(f"unknown scope {scope!r} (choose from: {', '.join(scopes)})")
    if not 0 <= min_density <= 1:
        raise UserError(f"min_density must be in [0, 1], got {min_density}")


def _channel_scores(importance: ChannelImportance, group: ChannelGroup,
                    params: dict[str, torch.Tensor]) -> torch.Tensor:
    """The rule's scores for ``group``'s channels as float64 on the CPU, where the schedules rank them."""
    with torch.no_grad():
        scores = importance.channel_scores(group, params).detach().to("cpu", torch.float64)
    if scores.shape != (group.channels,):
        raise ValueError(f"rule {importance.name} scored {tuple(scores.shape)} for the {group.channels} channels of "
                         f"{group.name!r}")
    return scores


Selection = list[torch.Tensor]  # per group, a bool tensor: True = channel removed


class _Schedule:
    """Nested selections indexed by step 0..steps−1 (step 0 removes nothing; each step removes a superset)."""

    steps: int

    def select(self, step: int) -> Selection:
        raise NotImplementedError

    def step_for_fraction(self, fraction: float) -> int:
        raise NotImplementedError


class _LayerSchedule(_Schedule):
    """Step i removes fraction f_i of every group (rounded down, capped by min_density); f_i runs over every k/n."""

    def __init__(self, groups: list[ChannelGroup], orders: list[torch.Tensor]) -> None:
        self.sizes = [g.channels for g in groups]
        self.orders = orders
        self.fractions = sorted({k / g.channels for g, order in zip(groups, orders) for k in range(len(order) + 1)})
        self.steps = len(self.fractions)

    def select(self, step: int) -> Selection:
        # floor(k/n · n) must give k back: the epsilon absorbs float rounding of the division.
        return [_removed(n, order[: math.floor(self.fractions[step] * n + 1e-9)])
                for n, order in zip(self.sizes, self.orders)]

    def step_for_fraction(self, fraction: float) -> int:
        return bisect.bisect_right(self.fractions, fraction + 1e-9) - 1


class _GlobalSchedule(_Schedule):
    """Step k removes the k channels of lowest importance / group-mean importance (among those min_density allows)."""

    def __init__(self, groups: list[ChannelGroup], importance: list[torch.Tensor], orders: list[torch.Tensor]) -> None:
        self.sizes = [g.channels for g in groups]
        empty = torch.zeros(0, dtype=torch.long)
        self.owner = torch.cat([torch.full((len(o),), i, dtype=torch.long) for i, o in enumerate(orders)] + [empty])
        self.channel = torch.cat(list(orders) + [empty])
        scores = [imp[o] / imp.mean() if imp.mean() > 0 else torch.zeros(len(o), dtype=torch.float64)
                  for imp, o in zip(importance, orders)]
        self.ranked = torch.argsort(torch.cat(scores + [torch.zeros(0, dtype=torch.float64)]), stable=True)
        self.steps = len(self.ranked) + 1

    def select(self, step: int) -> Selection:
        chosen = self.ranked[:step]
        owner, channel = self.owner[chosen], self.channel[chosen]
        return [_removed(n, channel[owner == i]) for i, n in enumerate(self.sizes)]

    def step_for_fraction(self, fraction: float) -> int:
        return min(self.steps - 1, round(fraction * sum(self.sizes)))


def _removed(channels: int, indices: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(channels, dtype=torch.bool)
    out[indices] = True
    return out


class _NonzeroCounter:
    """Nonzero Conv/Linear weights of the model after a selection, without building masks.

    Each weight is reduced to a (out, in) matrix of nonzero counts, so a selection costs rowkeep · NZ · colkeep.
    """

    def __init__(self, model: nn.Module, groups: list[ChannelGroup]) -> None:
        self.groups = groups
        self.counts: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for name, module in model.named_modules():
                if isinstance(module, PRUNABLE_TYPES):
                    nz = (module.weight != 0).double().cpu()
                    self.counts[f"{name}.weight" if name else "weight"] = nz.reshape(*nz.shape[:2], -1).sum(2)
        self.total = sum(module.weight.numel() for module in model.modules() if isinstance(module, PRUNABLE_TYPES))

    def nonzero(self, removed: Selection) -> int:
        keep = _keep_vectors(self.groups, removed, {p: c.shape for p, c in self.counts.items()}, roles=(WEIGHT, INPUT))
        total = 0.0
        for path, nz in self.counts.items():
            rows = keep.get((path, 0), torch.ones(nz.shape[0], dtype=torch.float64))
            cols = keep.get((path, 1), torch.ones(nz.shape[1], dtype=torch.float64))
            total += float(rows @ nz @ cols)
        return round(total)


def _keep_vectors(groups: list[ChannelGroup], removed: Selection, shapes: dict[str, Sequence[int]],
                  roles: Sequence[str] = (WEIGHT, BIAS, NORM, INPUT)) -> dict[tuple[str, int], torch.Tensor]:
    """(path, dim) → 0/1 vector along ``dim``: 0 where a removed channel's entry lies."""
    keep: dict[tuple[str, int], torch.Tensor] = {}
    for group, gone in zip(groups, removed):
        if not gone.any():
            continue
        for s in group.slices:
            if s.role in roles:
                vector = keep.setdefault((s.path, s.dim), torch.ones(shapes[s.path][s.dim], dtype=torch.float64))
                vector[s.index[gone[s.root]]] = 0.0
    return keep


def _closest_step(counter: _NonzeroCounter, schedule: _Schedule, compression: float, limits: str) -> int:
    """Bisection for the step whose nonzero count is closest to ``total / compression`` (counts fall with step)."""
    target = counter.total / compression

    def nonzero(step: int) -> int:
        return counter.nonzero(schedule.select(step))

    last = schedule.steps - 1
    fewest = nonzero(last)
    if fewest > target * (1 + 1e-9):
        reachable = counter.total / fewest if fewest else float("inf")
        raise UserError(f"compression {compression:g} is out of reach by removing whole channels: the largest "
                        f"reachable is {reachable:.4g} (classifier outputs kept, every group keeps >= 1 channel, "
                        f"{limits})")
    lo, hi = 0, last  # invariant: nonzero(hi) <= target
    while lo < hi:
        mid = (lo + hi) // 2
        if nonzero(mid) <= target:
            hi = mid
        else:
            lo = mid + 1
    if hi > 0 and abs(nonzero(hi - 1) - target) < abs(nonzero(hi) - target):
        return hi - 1
    return hi


def _masks_for(groups: list[ChannelGroup], removed: Selection, params: dict[str, torch.Tensor],
               existing: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """0/1 masks for every parameter a removed channel touches, times the parameter's existing mask."""
    shapes = {path: tuple(p.shape) for path, p in params.items()}
    by_path: dict[str, list[tuple[int, torch.Tensor]]] = {}
    for (path, dim), vector in _keep_vectors(groups, removed, shapes).items():
        by_path.setdefault(path, []).append((dim, vector))
    out = {}
    for path, vectors in by_path.items():
        mask = torch.ones(shapes[path], dtype=torch.float32)
        for dim, vector in vectors:
            view = [1] * len(shapes[path])
            view[dim] = -1
            mask = mask * vector.float().view(view)
        if path in existing:
            mask = mask * existing[path].detach().float().cpu()
        out[path] = mask
    return out


# ---------------------------------------------------------------------------------------------------------------
# Physical removal and cost
# ---------------------------------------------------------------------------------------------------------------

def slim(model: nn.Module, example_input: torch.Tensor | None = None) -> nn.Module:
    """A smaller copy of ``model``: masks baked in, every channel that is zero in its whole group removed.

    A channel is removed when its producers' weight rows and biases and its BatchNorm γ/β are all exactly 0 (then it
    is 0 after BatchNorm, whatever the running statistics): the outputs equal the masked model's up to float
    rounding. Channels reaching the model output are kept, and so is one channel of an all-zero group (a layer
    cannot have zero outputs). Unstructured zeros stay as zeros. The result is an ordinary module (no
    parametrizations) in ``model``'s train/eval mode, with ``arch = dict(model.arch, slim=True)``.
    """
    slim_model = baked_copy(model)
    graph = dependency_graph(slim_model, example_batch(model, example_input))
    for group in all_groups(graph):  # a generator: each group is described after the previous cuts
        names = {module: name for name, module in slim_model.named_modules()}
        described = describe(group, graph, names, set())
        if described.frozen:
            continue
        zero = channel_mass(described, dict(slim_model.named_parameters()), (WEIGHT, BIAS, NORM)) == 0
        if zero.all():
            zero[0] = False
        if zero.any():
            group.prune(idxs=zero.nonzero().flatten().tolist())
    slim_model.train(model.training)
    if hasattr(model, "arch"):
        slim_model.arch = dict(model.arch, slim=True)
    return slim_model


def count_macs_params(model: nn.Module, example_input: torch.Tensor | None = None) -> tuple[int, int]:
    """(MACs per example, parameters) by ``tp.utils.count_ops_and_params`` on a copy with masks baked in.

    Masked weights still count (they are still computed); only :func:`slim` makes a model cheaper. Torch-Pruning
    counts Conv/Linear multiply-accumulates (plus their bias adds) and one op per element of BatchNorm (two if
    affine), ReLU and pooling; parameters are all of ``model.parameters()`` (biases and BatchNorm included).
    """
    baked = baked_copy(model)
    example = example_batch(model, example_input)
    with torch.no_grad():
        macs, params = tp.utils.count_ops_and_params(baked, example)
    return int(round(float(macs))), int(params)

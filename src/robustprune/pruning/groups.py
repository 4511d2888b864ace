"""Channel groups: Torch-Pruning's dependency graph described as the parameter slices each output channel owns.

Every output channel of a Conv2d / Linear is coupled with everything that must go with it: the other producers of
the same tensor (residual additions), BatchNorm entries, and the next layers' input columns (through Flatten: H·W
consecutive Linear inputs per channel). :mod:`robustprune.pruning.structured` selects channels over these groups and
cuts them out.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
import torch_pruning as tp
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils import parametrize

from robustprune.infra.errors import UserError
from robustprune.pruning.masks import PRUNABLE_TYPES

#: Torch-Pruning's stand-ins for traced tensor ops (ReLU, add, pooling, flatten, ...): they carry channels along
#: but own no parameters, so they add nothing to a group's slices.
_STRUCTURAL_OPS = (tp.ops._ElementWiseOp, tp.ops._ReshapeOp, tp.ops._ConcatOp, tp.ops._SplitOp, tp.ops._UnbindOp,
                   tp.ops._ExpandOp, tp.ops._SliceOp, tp.ops._OutputOp)

#: Roles of a slice: producer weight rows, producer bias entries, BatchNorm γ/β entries, consumer input columns.
WEIGHT, BIAS, NORM, INPUT = "weight", "bias", "norm", "input"


@dataclass(frozen=True)
class ChannelSlice:
    """The entries ``param.index_select(dim, index)`` of parameter ``path``; ``index[k]`` belongs to channel
    ``root[k]`` of its group (a Flatten maps one channel to H·W consecutive Linear inputs)."""

    path: str
    dim: int
    index: torch.Tensor
    root: torch.Tensor
    role: str


@dataclass
class ChannelGroup:
    """Output channels that can only be removed together with all of ``slices``.

    ``name`` is the root layer's path; ``frozen`` means the channels may not be removed (they reach the model output,
    e.g. the classifier, or a producer is in ``ignored_layers``); ``weights_per_channel`` counts the dense Conv/Linear
    weights (producer rows + consumer columns) that one channel owns: the granularity of structured compression.
    """

    name: str
    channels: int
    slices: list[ChannelSlice]
    frozen: bool
    weights_per_channel: int


# ---------------------------------------------------------------------------------------------------------------
# Groups
# ---------------------------------------------------------------------------------------------------------------

def channel_groups(
    model: nn.Module,
    example_input: torch.Tensor | None = None,
    ignored_layers: Iterable[nn.Module | str] = (),
) -> list[ChannelGroup]:
    """Every coupled group of output channels of ``model``'s Conv2d / Linear layers (see :class:`ChannelGroup`).

    ``example_input`` (a batch) is traced once; by default a zero batch of ``model.arch["input_shape"]``.
    The model is not changed (the graph is traced on a copy with the masks baked in).
    """
    baked = baked_copy(model)
    graph = dependency_graph(baked, example_batch(model, example_input))
    ignored = resolve_ignored(model, baked, ignored_layers)
    names = {module: name for name, module in baked.named_modules()}
    return [describe(group, graph, names, ignored) for group in all_groups(graph)]


def all_groups(graph: tp.DependencyGraph) -> Iterable[tp.dependency.Group]:
    """Groups rooted at each Conv2d / Linear output (each group once, with all its channel indices)."""
    return graph.get_all_groups(root_module_types=PRUNABLE_TYPES)


def describe(group: tp.dependency.Group, graph: tp.DependencyGraph, names: dict[nn.Module, str],
              ignored: set[nn.Module]) -> ChannelGroup:
    """Turn a Torch-Pruning group (items of dependency + indices) into parameter slices keyed by path."""
    root_module = group[0].dep.target.module
    channels = int(graph.get_out_channels(root_module))
    slices: list[ChannelSlice] = []
    frozen = False
    for item in group:
        dep = item.dep
        module = dep.target.module
        consumer = _is_input_side(graph, dep)
        # A producer-side node with no successor writes the model output: its channels are the logits.
        if not consumer and (not dep.target.outputs or module in ignored):
            frozen = True
        if isinstance(module, _STRUCTURAL_OPS):
            continue
        if module not in names or any(r is None for r in item.root_idxs):  # e.g. a bare nn.Parameter in a forward
            raise NotImplementedError(f"structured pruning cannot map the channels of {dep.target.name}")
        index = torch.as_tensor(list(item.idxs), dtype=torch.long)
        root = torch.as_tensor(list(item.root_idxs), dtype=torch.long)
        slices += _param_slices(module, names[module], consumer, index, root)
    return ChannelGroup(names[root_module], channels, slices, frozen, _weights_per_channel(slices, names, channels))


def _is_input_side(graph: tp.DependencyGraph, dep: tp.dependency.Dependency) -> bool:
    """True when the dependency removes *input* columns of a Conv/Linear (BatchNorm has one function for both)."""
    module = dep.target.module
    return isinstance(module, PRUNABLE_TYPES) and dep.handler == graph.get_pruner_of_module(module).prune_in_channels


def _param_slices(module: nn.Module, name: str, consumer: bool, index: torch.Tensor,
                  root: torch.Tensor) -> list[ChannelSlice]:
    """The parameter entries of one group item; unsupported layer types are refused, never skipped."""
    prefix = f"{name}." if name else ""
    if isinstance(module, PRUNABLE_TYPES):
        if isinstance(module, nn.Conv2d) and module.groups != 1:
            raise NotImplementedError(f"structured pruning of grouped convolution {name!r} is not supported")
        if consumer:
            return [ChannelSlice(prefix + "weight", 1, index, root, INPUT)]
        out = [ChannelSlice(prefix + "weight", 0, index, root, WEIGHT)]
        if module.bias is not None:
            out.append(ChannelSlice(prefix + "bias", 0, index, root, BIAS))
        return out
    if isinstance(module, _BatchNorm):
        if not module.affine:
            # Without γ/β a zero channel leaves BatchNorm as −mean/σ ≠ 0: it could not be removed exactly.
            raise NotImplementedError(f"structured pruning needs affine BatchNorm; {name!r} has no γ/β")
        return [ChannelSlice(prefix + param, 0, index, root, NORM) for param in ("weight", "bias")]
    raise NotImplementedError(f"structured pruning does not support {type(module).__name__} ({name!r})")


def channel_mass(group: ChannelGroup, params: dict[str, torch.Tensor], roles: Sequence[str]) -> torch.Tensor:
    """Per channel of ``group``: the summed |entries| of its slices with a role in ``roles`` (float64, on the CPU).

    Filter-L1 ranks channels by it (producer rows); ``slim`` finds all-zero channels with it.
    """
    mass = torch.zeros(group.channels, dtype=torch.float64)
    with torch.no_grad():
        for s in group.slices:
            if s.role in roles:
                param = params[s.path].detach()
                values = param.index_select(s.dim, s.index.to(param.device)).movedim(s.dim, 0)
                mass.index_add_(0, s.root, values.abs().reshape(len(s.index), -1).sum(1).double().cpu())
    return mass


def _weights_per_channel(slices: list[ChannelSlice], names: dict[nn.Module, str], channels: int) -> int:
    """Dense Conv/Linear weights one channel owns (the same for every channel of a group)."""
    modules = {name: module for module, name in names.items()}
    total = 0
    for s in slices:
        if s.role in (WEIGHT, INPUT):
            weight = modules[s.path.rpartition(".")[0]].weight
            total += len(s.index) * (weight.numel() // weight.shape[s.dim])
    return total // channels


# ---------------------------------------------------------------------------------------------------------------
# Masks
# ---------------------------------------------------------------------------------------------------------------


def baked_copy(model: nn.Module) -> nn.Module:
    """A deep copy whose parametrized parameters (masks) are replaced by their effective values."""
    baked = copy.deepcopy(model)
    for module in baked.modules():
        if parametrize.is_parametrized(module):
            # deepcopy keeps the original's injected "Parametrized<Layer>" class, and remove_parametrizations
            # deletes the property from that class — which would break the original model. Give the copy its own.
            cls = type(module)
            own = {k: v for k, v in vars(cls).items() if k not in ("__dict__", "__weakref__")}
            module.__class__ = type(cls.__name__, cls.__bases__, own)
            for name in list(module.parametrizations.keys()):
                parametrize.remove_parametrizations(module, name, leave_parametrized=True)
    return baked


def dependency_graph(model: nn.Module, example: torch.Tensor) -> tp.DependencyGraph:
    """Trace ``model`` (a copy: tracing switches it to eval mode) into Torch-Pruning's dependency graph."""
    with torch.enable_grad():  # the graph is recorded through autograd
        return tp.DependencyGraph().build_dependency(model, example_inputs=example, verbose=False)


def example_batch(model: nn.Module, example_input: torch.Tensor | None) -> torch.Tensor:
    """The traced batch: the given one, else zeros shaped like ``model.arch["input_shape"]``."""
    if example_input is not None:
        return example_input
    shape = getattr(model, "arch", {}).get("input_shape")
    if shape is None:
        raise ValueError("an example input is needed: the model has no arch['input_shape']")
    device = next(model.parameters()).device
    return torch.zeros(1, *shape, device=device)


def resolve_ignored(model: nn.Module, baked: nn.Module, ignored_layers: Iterable[nn.Module | str]) -> set[nn.Module]:
    """The baked copy's modules for ``ignored_layers`` given as modules of ``model`` or as paths."""
    names = {module: name for name, module in model.named_modules()}
    baked_modules = dict(baked.named_modules())
    out = set()
    for layer in ignored_layers:
        name = layer if isinstance(layer, str) else names.get(layer)
        if name is None:
            raise ValueError(f"ignored layer {layer!r} is not a module of the model")
        if name not in baked_modules:
            raise UserError(f"unknown layer {name!r} in ignored layers")
        out.add(baked_modules[name])
    return out

"""Masks live in the model: a parametrization ``weight = original * mask`` on each pruned Conv/Linear weight.

So ``module.weight`` is always the effective (masked) weight: training, attacks, bounds and export see an ordinary
module, and a pruned weight is exactly 0 whatever the optimiser does to the stored original. On disk a masked layer
is stored in plain form — ``<layer>.weight`` (the effective weight, zeros included) and ``<layer>.weight_mask`` —
independent of torch's parametrization internals.
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch import nn
from torch.nn.utils import parametrize

PRUNABLE_TYPES = (nn.Conv2d, nn.Linear)


class WeightMask(nn.Module):
    """Parametrization multiplying the weight by a fixed 0/1 mask (a buffer, saved with the model)."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask.detach().to(torch.float32).clone())

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.mask.to(weight.dtype)


def prunable_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name, module) of every Conv2d / Linear: their weights are the prunable parameters (not biases, not norms)."""
    for name, module in model.named_modules():
        if isinstance(module, PRUNABLE_TYPES):
            yield name, module


def get_mask(module: nn.Module) -> torch.Tensor | None:
    if parametrize.is_parametrized(module, "weight"):
        for p in module.parametrizations.weight:
            if isinstance(p, WeightMask):
                return p.mask
    return None


def set_mask(module: nn.Module, mask: torch.Tensor) -> None:
    """Attach (or replace) the mask of a layer and zero the stored weights it removes."""
    existing = get_mask(module)
    if existing is not None:
        existing.copy_(mask.to(existing.dtype))
    else:
        parametrize.register_parametrization(module, "weight", WeightMask(mask.to(module.weight.device)))
    with torch.no_grad():
        original = module.parametrizations.weight.original
        original.mul_(mask.to(original.dtype).to(original.device))


def masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """Masks by layer name (only the masked layers)."""
    found = {}
    for name, module in prunable_layers(model):
        mask = get_mask(module)
        if mask is not None:
            found[name] = mask
    return found


def sparsity_report(model: nn.Module) -> dict[str, float | int]:
    """Counts over prunable weights: ``compression`` = prunable / nonzero, ``sparsity`` = 1 − 1/compression."""
    total, nonzero = 0, 0
    with torch.no_grad():
        for _, module in prunable_layers(model):
            weight = module.weight
            total += weight.numel()
            nonzero += int(torch.count_nonzero(weight))
    compression = total / nonzero if nonzero else float("inf")
    return {"params_prunable": total, "params_nonzero": nonzero, "compression": compression,
            "sparsity": 1.0 - nonzero / total if total else 0.0}


def layer_density(model: nn.Module) -> dict[str, float]:
    """Fraction of nonzero weights per prunable layer."""
    with torch.no_grad():
        return {name: float(torch.count_nonzero(m.weight)) / m.weight.numel() for name, m in prunable_layers(model)}


def plain_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict with masked layers in plain form: ``<layer>.weight`` (effective) and ``<layer>.weight_mask``."""
    state = {}
    masked = masks(model)
    for key, value in model.state_dict().items():
        if ".parametrizations.weight." not in key:
            state[key] = value.detach()
    for name, module in prunable_layers(model):
        if name in masked:
            state[f"{name}.weight"] = module.weight.detach().clone()
            state[f"{name}.weight_mask"] = masked[name].detach().clone()
    return state


def load_plain_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Inverse of :func:`plain_state_dict`: attach the stored masks, then load every tensor strictly."""
    layers = dict(prunable_layers(model))
    state = dict(state)
    for key in [k for k in state if k.endswith(".weight_mask")]:
        name = key[: -len(".weight_mask")]
        if name not in layers:
            raise KeyError(f"mask for unknown layer {name!r}")
        set_mask(layers[name], state.pop(key))
        state[f"{name}.parametrizations.weight.original"] = state.pop(f"{name}.weight")
        state[f"{name}.parametrizations.weight.0.mask"] = get_mask(layers[name]).clone()
    model.load_state_dict(state, strict=True)

"""Masks live in the model: a parametrization ``param = original * mask`` on each pruned parameter.

So ``module.weight`` is always the effective (masked) weight: training, attacks, bounds and export see an ordinary
module, and a pruned weight is exactly 0 whatever the optimiser does to the stored original. Unstructured rules mask
Conv/Linear weights; structured rules also mask the biases and batch-norm affine parameters of removed channels.
Masks are keyed by parameter path (``"features.0.weight"``). On disk a masked parameter is stored in plain form —
``<layer>.<param>`` (the effective value, zeros included) and ``<layer>.<param>_mask`` — independent of torch's
parametrization internals.
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch import nn
from torch.nn.utils import parametrize

PRUNABLE_TYPES = (nn.Conv2d, nn.Linear)
MASK_SUFFIX = "_mask"


class ParamMask(nn.Module):
    """Parametrization multiplying a parameter by a fixed 0/1 mask (a buffer, saved with the model)."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask.detach().to(torch.float32).clone())

    def forward(self, value: torch.Tensor) -> torch.Tensor:
        return value * self.mask.to(value.dtype)


def prunable_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name, module) of every Conv2d / Linear: their weights are the prunable parameters (not biases, not norms)."""
    for name, module in model.named_modules():
        if isinstance(module, PRUNABLE_TYPES):
            yield name, module


def split_path(path: str) -> tuple[str, str]:
    """``"features.0.weight"`` → (``"features.0"``, ``"weight"``)."""
    module_name, _, param = path.rpartition(".")
    return module_name, param


def get_mask(module: nn.Module, param: str = "weight") -> torch.Tensor | None:
    if parametrize.is_parametrized(module, param):
        for p in getattr(module.parametrizations, param):
            if isinstance(p, ParamMask):
                return p.mask
    return None


def set_mask(module: nn.Module, mask: torch.Tensor, param: str = "weight") -> None:
    """Attach (or replace) the mask of ``module.<param>`` and zero the stored values it removes."""
    existing = get_mask(module, param)
    if existing is not None:
        existing.copy_(mask.to(existing.dtype))
    else:
        device = getattr(module, param).device
        parametrize.register_parametrization(module, param, ParamMask(mask.to(device)))
    with torch.no_grad():
        original = getattr(module.parametrizations, param).original
        original.mul_(mask.to(original.dtype).to(original.device))


def apply_masks(model: nn.Module, masks_by_path: dict[str, torch.Tensor]) -> None:
    """Attach every mask of ``{"layer.param": mask}`` to the model."""
    modules = dict(model.named_modules())
    for path, mask in masks_by_path.items():
        module_name, param = split_path(path)
        if module_name not in modules or not isinstance(getattr(modules[module_name], param, None), torch.Tensor):
            raise KeyError(f"mask for unknown parameter {path!r}")
        if tuple(getattr(modules[module_name], param).shape) != tuple(mask.shape):
            raise ValueError(f"mask for {path!r} has shape {tuple(mask.shape)}, the parameter "
                             f"{tuple(getattr(modules[module_name], param).shape)}")
        set_mask(modules[module_name], mask, param)


def masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every mask of the model by parameter path (``"features.0.weight"``)."""
    found = {}
    for name, module in model.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        for param in module.parametrizations.keys():
            mask = get_mask(module, param)
            if mask is not None:
                found[f"{name}.{param}" if name else param] = mask
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


def kept_per_layer(model: nn.Module) -> dict[str, tuple[int, int]]:
    """(nonzero, total) weights of every prunable layer, dense ones included."""
    with torch.no_grad():
        return {name: (int(torch.count_nonzero(m.weight)), m.weight.numel()) for name, m in prunable_layers(model)}


def layer_density(model: nn.Module) -> dict[str, float]:
    """Fraction of nonzero weights per prunable layer."""
    return {name: kept / total for name, (kept, total) in kept_per_layer(model).items()}


def plain_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict with masked parameters in plain form: ``<path>`` (effective value) and ``<path>_mask``."""
    state = {k: v.detach() for k, v in model.state_dict().items() if ".parametrizations." not in k
             and not k.startswith("parametrizations.")}
    modules = dict(model.named_modules())
    for path, mask in masks(model).items():
        module_name, param = split_path(path)
        state[path] = getattr(modules[module_name], param).detach().clone()
        state[path + MASK_SUFFIX] = mask.detach().clone()
    return state


def load_plain_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Inverse of :func:`plain_state_dict`: attach the stored masks, then load every tensor strictly."""
    state = dict(state)
    mask_paths = [k[: -len(MASK_SUFFIX)] for k in state if k.endswith(MASK_SUFFIX) and k[: -len(MASK_SUFFIX)] in state]
    apply_masks(model, {path: state.pop(path + MASK_SUFFIX) for path in mask_paths})
    attached = masks(model)
    for path in mask_paths:
        module_name, param = split_path(path)
        prefix = f"{module_name}." if module_name else ""
        state[f"{prefix}parametrizations.{param}.original"] = state.pop(path)
        state[f"{prefix}parametrizations.{param}.0.mask"] = attached[path].clone()
    model.load_state_dict(state, strict=True)

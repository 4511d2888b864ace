"""Architectures with the kept shapes of a slim (structurally cut) model, rebuilt without the dense weights.

A slim model is the registered architecture with some Conv2d / Linear / BatchNorm layers narrower. Its spec is the
model's ``arch`` plus ``"widths"``: for each such layer the weight shape (Conv2d, Linear) or the feature count
(BatchNorm) it keeps. :func:`build` creates the registered skeleton and swaps each listed layer for one of the kept
size (same kernel, stride, padding, bias, eps and momentum); the weights then load strictly. Nothing of the dense
model is needed, and a spec that names a layer the architecture does not have is refused.
"""
from __future__ import annotations

from typing import Any

from torch import nn

from robustprune.errors import UserError
from robustprune.models import model_from_spec

_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


def widths(model: nn.Module) -> dict[str, list[int]]:
    """Kept shapes of every Conv2d / Linear (weight shape) and BatchNorm (feature count) of ``model``."""
    out: dict[str, list[int]] = {}
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            out[name] = list(module.weight.shape)
        elif isinstance(module, _NORMS):
            out[name] = [module.num_features]
    return out


def spec(model: nn.Module) -> dict[str, Any]:
    """``model.arch`` with the widths a rebuild needs (only for slim models; others keep their arch as it is)."""
    arch = dict(model.arch)
    if arch.get("slim"):
        arch["slim"] = True
        arch["widths"] = widths(model)
    return arch


def build(arch: dict[str, Any]) -> nn.Module:
    """The model of ``arch``, every layer listed in ``arch["widths"]`` at its kept size."""
    model = model_from_spec(arch)
    modules = dict(model.named_modules())
    for name, shape in (arch.get("widths") or {}).items():
        if name not in modules:
            raise UserError(f"slim architecture names layer {name!r}, which {arch.get('name')!r} does not have")
        _replace(model, name, _resized(modules[name], shape, name))
    if arch.get("slim"):
        model.arch = dict(arch)
    return model


def _resized(module: nn.Module, shape: list[int], name: str) -> nn.Module:
    if isinstance(module, nn.Conv2d) and len(shape) == 4:
        return type(module)(shape[1] * module.groups, shape[0], module.kernel_size, module.stride, module.padding,
                         module.dilation, module.groups, module.bias is not None, module.padding_mode)
    if isinstance(module, nn.Linear) and len(shape) == 2:
        return nn.Linear(shape[1], shape[0], module.bias is not None)
    if isinstance(module, _NORMS) and len(shape) == 1:
        return type(module)(shape[0], module.eps, module.momentum, module.affine, module.track_running_stats)
    raise UserError(f"slim architecture gives layer {name!r} ({type(module).__name__}) the shape {shape}")


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)

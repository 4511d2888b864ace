"""Architectures with the kept shapes of a slim (structurally cut) model, rebuilt without the dense weights.

A slim model is the registered architecture with some Conv2d / Linear / BatchNorm layers narrower. Its spec is the
model's ``arch`` plus ``"widths"``: for each such layer the weight shape (Conv2d, Linear) or the feature count
(BatchNorm) it keeps. :func:`build` creates the registered skeleton and swaps each listed layer for one of the kept
size (same kernel, stride, padding, bias, eps and momentum); the weights then load strictly. Nothing of the dense
model is needed, and a spec that names a layer the architecture does not have, or widens one, is refused.

An architecture read from a file is checked before anything is allocated: :func:`skeleton` builds it on the meta
device (shapes only), caps its size and runs one meta forward pass, so layer widths that do not fit together are
refused here instead of failing inside an evaluation.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from robustprune.infra.errors import UserError
from robustprune.models import check_spec, model_from_spec

MAX_PARAMETERS = 2_000_000_000  # 8 GB of fp32 weights: far beyond the zoo; a larger spec is a crafted file
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


def widths(model: nn.Module) -> dict[str, list[int]]:
    """Kept shapes of every Conv2d / Linear (weight shape) and BatchNorm (feature count) of ``model``."""
    return {name: shape for name, module in model.named_modules() if (shape := _shape_of(module)) is not None}


def spec(model: nn.Module) -> dict[str, Any]:
    """``model.arch`` with the widths a rebuild needs (only for slim models; others keep their arch as it is)."""
    arch = dict(model.arch)
    if arch.get("slim"):
        arch["slim"] = True
        arch["widths"] = widths(model)
    return arch


def check(arch: Any) -> None:
    """Refuse (UserError) an architecture spec whose fields have the wrong types: the registered model's fields
    (``models.check_spec``) and, for a slim model, ``slim`` and ``widths``."""
    check_spec(arch)
    if not isinstance(arch.get("slim", False), bool):
        raise UserError(f"architecture slim must be true or false, got {arch['slim']!r:.80}")
    if "widths" not in arch:
        return
    if not arch.get("slim"):
        raise UserError("architecture lists layer widths but is not marked slim")
    kept = arch["widths"]
    if not (isinstance(kept, dict) and all(isinstance(shape, list) and 1 <= len(shape) <= 4
                                           and all(_positive_int(s) for s in shape) for shape in kept.values())):
        raise UserError("slim architecture widths must map layer names to lists of 1 to 4 positive integers")


def build(arch: dict[str, Any]) -> nn.Module:
    """The model of ``arch``, every layer listed in ``arch["widths"]`` at its kept size."""
    check(arch)
    model = model_from_spec(arch)
    modules = dict(model.named_modules())
    for name, shape in (arch.get("widths") or {}).items():
        if name not in modules:
            raise UserError(f"slim architecture names layer {name!r:.80}, which {arch.get('name', arch.get('factory'))!r} does not have")
        _replace(model, name, _resized(modules[name], shape, name))
    if arch.get("slim"):
        model.arch = dict(arch)
    return model


def skeleton(arch: dict[str, Any]) -> nn.Module:
    """The model of ``arch`` on the meta device (shapes, no memory), checked to be of a sane size and to compute:
    one meta forward pass of a (1, C, H, W) input gives (1, num_classes) logits."""
    with torch.device("meta"):
        model = build(arch)
    size = sum(t.numel() for t in model.state_dict().values())
    if size > MAX_PARAMETERS:
        raise UserError(f"architecture {arch.get('name', arch.get('factory'))!r} with input {arch['input_shape']} has {size:,} parameters "
                        f"(more than {MAX_PARAMETERS:,}): not a model this robustprune loads")
    try:
        with torch.no_grad():
            out = model.eval()(torch.empty((1, *arch["input_shape"]), device="meta"))
    except (RuntimeError, ValueError, IndexError) as err:
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise UserError(f"architecture does not compute: layer sizes do not fit together ({first})") from None
    if tuple(out.shape) != (1, arch["num_classes"]):
        raise UserError(f"architecture gives outputs of shape {tuple(out.shape[1:])}, not {arch['num_classes']} "
                        "class scores")
    return model


def _resized(module: nn.Module, shape: list[int], name: str) -> nn.Module:
    """``module`` at the kept ``shape``; a cut only removes channels, so a wider or reshaped layer is refused."""
    full = _shape_of(module)
    if full is None or len(shape) != len(full) or any(s > f for s, f in zip(shape, full)) \
            or (isinstance(module, nn.Conv2d) and shape[2:] != full[2:]):  # the kernel is never cut
        raise UserError(f"slim architecture gives layer {name!r} ({type(module).__name__}"
                        f"{f' of shape {full}' if full else ''}) the shape {shape}")
    if isinstance(module, nn.Conv2d):
        return type(module)(shape[1] * module.groups, shape[0], module.kernel_size, module.stride, module.padding,
                            module.dilation, module.groups, module.bias is not None, module.padding_mode)
    if isinstance(module, nn.Linear):
        return nn.Linear(shape[1], shape[0], module.bias is not None)
    return type(module)(shape[0], module.eps, module.momentum, module.affine, module.track_running_stats)


def _shape_of(module: nn.Module) -> list[int] | None:
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        return list(module.weight.shape)
    if isinstance(module, _NORMS):
        return [module.num_features]
    return None


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)

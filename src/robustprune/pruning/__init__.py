"""Pruning: importance rules (what), selection by scope (how many where), masks in the model (how)."""
from __future__ import annotations

import torch
from torch import nn

from robustprune.errors import UserError
from robustprune.pruning.importance import PRUNERS, Importance
from robustprune.pruning.masks import (
    layer_density, load_plain_state_dict, masks, plain_state_dict, prunable_layers, set_mask, sparsity_report,
)
from robustprune.pruning.plan import SELECTORS, PruningPlan


def prune(model: nn.Module, rule: str = "magnitude", compression: float = 10.0, scope: str = "layer") -> PruningPlan:
    """Prune ``model`` in place to ``compression`` = prunable / nonzero prunable weights; returns the plan.

    Already-pruned weights score lowest, so pruning a pruned model only removes more.
    """
    if not compression >= 1:
        raise UserError(f"compression must be >= 1, got {compression}")
    if scope not in SELECTORS:
        raise UserError(f"unknown scope {scope!r} (choose from: {', '.join(SELECTORS)})")
    importance = PRUNERS.get(rule)()
    layers = dict(prunable_layers(model))
    scores = {}
    with torch.no_grad():
        for name, module in layers.items():
            s = importance.scores(module).float()
            scores[name] = torch.where(module.weight != 0, s, torch.full_like(s, float("-inf")))
    chosen = SELECTORS[scope](scores, compression)
    for name, mask in chosen.items():
        set_mask(layers[name], mask)
    return PruningPlan(rule=rule, scope=scope, target_compression=float(compression), masks=chosen)


__all__ = ["PRUNERS", "Importance", "PruningPlan", "layer_density", "load_plain_state_dict", "masks",
           "plain_state_dict", "prunable_layers", "prune", "set_mask", "sparsity_report"]

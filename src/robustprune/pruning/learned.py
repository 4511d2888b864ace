"""A learned rule's phase (HYDRA, HARP) under the same budget rules as :func:`~robustprune.pruning.oneshot.prune`.

The pipeline runs it — attach, train with the objective (plus :func:`learned_penalty`), finalize — because it
trains, and ``pruning`` never imports ``train``. These functions keep the dense layers, floors and target of a
one-shot step, so a learned rule and a scored rule spend the same budget.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from robustprune.infra.errors import UserError
from robustprune.pruning import harp, hydra
from robustprune.pruning.masks import prunable_layers
from robustprune.pruning.oneshot import dense_layers, magnitude_selection
from robustprune.pruning.plan import erk_counts, floors, keep_budget, layer_counts


def attach_learned_scores(model: nn.Module, compression: float, scope: str = "layer", *, rule: str = "hydra",
                          keep_first_dense: bool = False, keep_last_dense: bool = False,
                          min_density: float = 0.0) -> list[nn.Parameter]:
    """Start a learned rule's training phase under the same budget rules as ``prune`` (dense layers, floors,
    target): HYDRA's scores, or HARP's scores and per-layer rates (which start from ``scope``'s allocation).

    Returns the trainable parameters; train them with the objective (HARP: plus :func:`harp.budget_penalty`), then
    call :func:`finalize_learned`.
    """
    layers = dict(prunable_layers(model))
    dense = dense_layers(model, keep_first_dense, keep_last_dense)
    sizes = {n: m.weight.numel() for n, m in layers.items()}
    scored = [n for n in layers if n not in dense]
    if rule == "harp":
        start = magnitude_selection(layers, compression, scope, dense, min_density)
        densities = {n: float(start[n].sum()) / sizes[n] for n in scored}
        return harp.attach_rates(model, {n: layers[n] for n in scored}, densities, dict.fromkeys(scored, min_density))
    if scope in ("layer", "erk"):  # a fixed count per layer: the scores compete only within their layer
        counts = (layer_counts(sizes, compression, dense, min_density) if scope == "layer" else
                  erk_counts({n: tuple(m.weight.shape) for n, m in layers.items()}, compression, dense, min_density))
        params = hydra.attach_scores(model, compression, "layer", layers=scored)
        for path, score_mask in hydra.score_masks(model).items():
            score_mask.k = min(counts[path.rpartition(".")[0]], int(score_mask.allowed.sum()))
            score_mask.clear_cache()
        return params
    if min_density > 0:
        raise UserError("rule hydra with scope global takes no min_density (use scope layer or erk)")
    budget = keep_budget(sizes, compression, floors(sizes, dense, 0.0))
    kept_in_scored = budget - sum(sizes[n] for n in dense)
    return hydra.attach_scores(model, sum(sizes[n] for n in scored) / kept_in_scored, "global", layers=scored)


def learned_penalty(model: nn.Module, compression: float,
                    weight: float) -> Callable[[nn.Module], torch.Tensor] | None:
    """The term a learned rule adds to the objective during its phase: HARP's budget penalty; None for HYDRA."""
    if not harp.rate_masks(model):
        return None
    return lambda net: harp.budget_penalty(net, compression, weight)


def learned_allocation(model: nn.Module) -> dict:
    """What the plan records of a learned rule's own choice: HARP's densities per layer; nothing for HYDRA."""
    return {"learned_densities": harp.learned_densities(model)} if harp.rate_masks(model) else {}


def finalize_learned(model: nn.Module, compression: float, *, keep_first_dense: bool = False,
                     keep_last_dense: bool = False, min_density: float = 0.0) -> dict[str, torch.Tensor]:
    """End a learned rule's phase: fixed masks, every parameter trainable. HYDRA keeps its top-k; HARP shares
    exactly the requested budget by its learned densities (same dense layers and floors as the attach)."""
    if not harp.rate_masks(model):
        return hydra.finalize_scores(model)
    layers = dict(prunable_layers(model))
    sizes = {n: m.weight.numel() for n, m in layers.items()}
    low = floors(sizes, dense_layers(model, keep_first_dense, keep_last_dense), min_density)
    return harp.finalize_rates(model, keep_budget(sizes, compression, low), sizes, low)

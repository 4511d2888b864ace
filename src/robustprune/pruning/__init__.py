"""Pruning: importance rules (what), selection by scope and floors (how many where), masks in the model (how),
structured removal (``slim``). Schedules (one-shot / iterative) and HYDRA's score training are run by the pipeline,
because they train — ``pruning`` never imports ``train``.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from robustprune.infra.errors import UserError
from robustprune.pruning.importance import PRUNERS, Importance
from robustprune.pruning.masks import (
    apply_masks, kept_per_layer, layer_density, load_plain_state_dict, masks, plain_state_dict, prunable_layers,
    set_mask, sparsity_report,
)
from robustprune.pruning import harp, hydra
from robustprune.pruning.plan import SELECTORS, PruningPlan, erk_counts, floors, keep_budget, layer_counts


def dense_layers(model: nn.Module, keep_first_dense: bool, keep_last_dense: bool) -> set[str]:
    """Names of the prunable layers asked to stay dense (the first and/or the last Conv/Linear)."""
    names = [name for name, _ in prunable_layers(model)]
    return {n for n, keep in ((names[0], keep_first_dense), (names[-1], keep_last_dense)) if keep} if names else set()


def prune(
    model: nn.Module,
    rule: str = "magnitude",
    compression: float = 10.0,
    scope: str = "layer",
    *,
    keep_first_dense: bool = False,
    keep_last_dense: bool = False,
    min_density: float = 0.0,
    seed: int = 0,
) -> PruningPlan:
    """Prune ``model`` in place to ``compression`` = prunable / nonzero prunable weights; returns the plan.

    Already-pruned weights score lowest, so pruning a pruned model only removes more. For ``hydra`` this applies the
    initial (magnitude-ordered) selection; training its scores is the pipeline's score phase.
    """
    if not (isinstance(compression, (int, float)) and math.isfinite(compression) and compression >= 1):
        raise UserError(f"compression must be a finite number >= 1, got {compression}")
    if scope not in SELECTORS:
        raise UserError(f"unknown scope {scope!r} (choose from: {', '.join(SELECTORS)})")
    if not 0.0 <= min_density <= 1.0:
        raise UserError(f"min_density must lie in [0, 1], got {min_density}")
    importance = PRUNERS.get(rule)()
    layers = dict(prunable_layers(model))
    dense = dense_layers(model, keep_first_dense, keep_last_dense)
    if importance.structured:
        from robustprune.pruning.structured import SCOPES, channel_masks

        if scope not in SCOPES:  # channels, not weights, are the unit: ERK's per-weight densities do not map onto them
            raise UserError(f"rule {rule} is structured and takes scope {' or '.join(SCOPES)}, not {scope!r}")
        chosen = channel_masks(model, None, compression, scope,
                               ignored_layers=[layers[n] for n in dense], min_density=min_density)
    else:
        scores = _layer_scores(layers, importance, torch.Generator().manual_seed(seed))
        chosen = {f"{n}.weight": m for n, m in SELECTORS[scope](scores, compression, dense, min_density).items()}
    apply_masks(model, chosen)
    options = {"keep_first_dense": keep_first_dense, "keep_last_dense": keep_last_dense, "min_density": min_density}
    return PruningPlan(rule=rule, scope=scope, target_compression=float(compression), masks=masks(model),
                       options=options)


def attach_learned_scores(model: nn.Module, compression: float, scope: str = "layer", *, rule: str = "hydra",
                          keep_first_dense: bool = False, keep_last_dense: bool = False,
                          min_density: float = 0.0) -> list[nn.Parameter]:
    """Start a learned rule's training phase under the same budget rules as :func:`prune` (dense layers, floors,
    target): HYDRA's scores, or HARP's scores and per-layer rates (which start from ``scope``'s allocation).

    Returns the trainable parameters; train them with the objective (HARP: plus :func:`harp.budget_penalty`), then
    call :func:`finalize_learned`.
    """
    layers = dict(prunable_layers(model))
    dense = dense_layers(model, keep_first_dense, keep_last_dense)
    sizes = {n: m.weight.numel() for n, m in layers.items()}
    scored = [n for n in layers if n not in dense]
    if rule == "harp":
        start = _magnitude_selection(layers, compression, scope, dense, min_density)
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


def _layer_scores(layers: dict[str, nn.Module], importance: Importance,
                  generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """The rule's scores per layer, -inf where a weight is already pruned (so pruning only ever removes more)."""
    scores = {}
    with torch.no_grad():
        for name, module in layers.items():
            s = importance.scores(module, generator).float()
            scores[name] = torch.where(module.weight != 0, s, torch.full_like(s, -math.inf))
    return scores


def _magnitude_selection(layers: dict[str, nn.Module], compression: float, scope: str, dense: set[str],
                         min_density: float) -> dict[str, torch.Tensor]:
    """What magnitude pruning in ``scope`` would keep (HARP's starting densities); pruned weights stay pruned."""
    return SELECTORS[scope](_layer_scores(layers, PRUNERS.get("magnitude")()), compression, dense, min_density)


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


def slim(model: nn.Module) -> nn.Module:
    """A new, smaller ordinary model with structurally pruned channels cut out (same outputs as ``model``)."""
    from robustprune.pruning.structured import slim as cut

    return cut(model)  # traced on a zero batch of model.arch['input_shape']


__all__ = ["PRUNERS", "Importance", "PruningPlan", "apply_masks", "attach_learned_scores", "dense_layers",
           "finalize_learned", "harp", "hydra", "kept_per_layer", "layer_density", "learned_allocation",
           "learned_penalty", "load_plain_state_dict", "masks", "plain_state_dict", "prunable_layers", "prune",
           "set_mask", "slim", "sparsity_report"]

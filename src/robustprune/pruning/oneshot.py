"""One pruning step: score with the rule, select by scope and floors, attach the masks (:func:`prune`).

The iterative schedule is repeated steps, and a learned rule's phase starts from :func:`magnitude_selection`; both are
the pipeline's to run (``pruning`` never trains).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from robustprune.infra.errors import UserError
from robustprune.pruning.importance import PRUNERS, WeightImportance
from robustprune.pruning.masks import apply_masks, masks, prunable_layers
from robustprune.pruning.plan import SCOPES, SELECTORS, PruningPlan
from robustprune.pruning.structured import channel_masks


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
    if scope not in SCOPES:
        raise UserError(f"unknown scope {scope!r} (choose from: {', '.join(SCOPES)})")
    if not 0.0 <= min_density <= 1.0:
        raise UserError(f"min_density must lie in [0, 1], got {min_density}")
    importance = PRUNERS.get(rule)()
    if scope not in importance.scopes:  # a structured rule's unit is the channel: ERK's per-weight counts do not fit
        kind = " is structured and" if importance.structured else ""
        raise UserError(f"rule {rule}{kind} takes scope {' or '.join(importance.scopes)}, not {scope!r}")
    layers = dict(prunable_layers(model))
    dense = dense_layers(model, keep_first_dense, keep_last_dense)
    if importance.structured:
        chosen = channel_masks(model, None, compression, scope, ignored_layers=[layers[n] for n in dense],
                               min_density=min_density, importance=importance)
    else:
        scores = layer_scores(layers, importance, torch.Generator().manual_seed(seed))
        chosen = {f"{n}.weight": m for n, m in SELECTORS[scope](scores, compression, dense, min_density).items()}
    apply_masks(model, chosen)
    options = {"keep_first_dense": keep_first_dense, "keep_last_dense": keep_last_dense, "min_density": min_density}
    return PruningPlan(rule=rule, scope=scope, target_compression=float(compression), masks=masks(model),
                       options=options)


def layer_scores(layers: dict[str, nn.Module], importance: WeightImportance,
                 generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """The rule's scores per layer, -inf where a weight is already pruned (so pruning only ever removes more)."""
    scores = {}
    with torch.no_grad():
        for name, module in layers.items():
            s = importance.scores(module, generator).float()
            scores[name] = torch.where(module.weight != 0, s, torch.full_like(s, -math.inf))
    return scores


def magnitude_selection(layers: dict[str, nn.Module], compression: float, scope: str, dense: set[str],
                        min_density: float) -> dict[str, torch.Tensor]:
    """What magnitude pruning in ``scope`` would keep (HARP's starting densities); pruned weights stay pruned."""
    return SELECTORS[scope](layer_scores(layers, PRUNERS.get("magnitude")()), compression, dense, min_density)

"""Pruning: importance rules (what), selection by scope and floors (how many where), masks in the model (how),
structured removal (``slim``). Schedules (one-shot / iterative) and the learned rules' score training are run by the
pipeline, because they train — ``pruning`` never imports ``train``.

Modules: ``importance`` (the rules, ``PRUNERS``), ``plan`` (selection by scope, ``SCOPES``, ``PruningPlan``),
``masks`` (masks in the model), ``oneshot`` (``prune``: one step), ``learned`` (HYDRA's / HARP's phase around
``hydra`` and ``harp``), ``groups`` and ``structured`` (channel groups, channel masks, ``slim``).
"""
from __future__ import annotations

from robustprune.pruning import harp, hydra
from robustprune.pruning.importance import PRUNERS, Importance
from robustprune.pruning.learned import attach_learned_scores, finalize_learned, learned_allocation, learned_penalty
from robustprune.pruning.masks import (
    apply_masks, kept_per_layer, layer_density, load_plain_state_dict, masks, plain_state_dict, prunable_layers,
    set_mask, sparsity_report,
)
from robustprune.pruning.oneshot import dense_layers, prune
from robustprune.pruning.plan import SCOPES, PruningPlan
from robustprune.pruning.structured import slim

__all__ = ["PRUNERS", "SCOPES", "Importance", "PruningPlan", "apply_masks", "attach_learned_scores", "dense_layers",
           "finalize_learned", "harp", "hydra", "kept_per_layer", "layer_density", "learned_allocation",
           "learned_penalty", "load_plain_state_dict", "masks", "plain_state_dict", "prunable_layers", "prune",
           "set_mask", "slim", "sparsity_report"]

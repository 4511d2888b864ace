"""Every pruning rule × scope × schedule keeps the pruning contract: the achieved compression is the request,
pruned weights stay zero through fine-tuning, and the plan round-trips through JSON onto a fresh model."""
from __future__ import annotations

import json

import pytest
import torch

from robustprune.config import load_config
from robustprune.models import create_model
from robustprune.pipeline import build_objective, finetune, prune_model
from robustprune.pruning import PRUNERS, PruningPlan, masks, prunable_layers, sparsity_report
from robustprune.train import FitOptions

from conftest import make_tiny_dataset

SHAPE = (1, 8, 8)


def _setup(rule: str, scope: str, schedule: str, compression: float = 4.0):
    data = make_tiny_dataset(n_train=48, n_test=16, shape=SHAPE)
    cfg = load_config(None, [f"prune.rule={rule}", f"prune.scope={scope}", f"prune.schedule={schedule}",
                             f"prune.compression={compression}", "prune.rounds=2", "prune.round_epochs=1",
                             "prune.score_training.epochs=2", "objective.steps=1", "threat.eps=0.1",
                             "finetune.epochs=1", "data.batch_size=16"])
    torch.manual_seed(0)
    model = create_model("cnn-large", SHAPE, data.num_classes)
    return cfg, data, model, build_objective(cfg.objective, cfg.threat)


def _weight_tolerance(model, rule: str) -> int:
    """One weight per layer for weight rules; for channel rules one channel per layer — its own weights plus the
    next layer's weights that read it — since whole channels are the unit there."""
    layers = [m for _, m in prunable_layers(model)]
    if not PRUNERS.get(rule).structured:
        return len(layers)
    tolerance = 0
    for i, module in enumerate(layers):
        tolerance += module.weight[0].numel()
        if i + 1 < len(layers):
            tolerance += layers[i + 1].weight.numel() // module.weight.shape[0]
    return tolerance


@pytest.mark.parametrize("rule", PRUNERS.names())
@pytest.mark.parametrize("scope", ["layer", "global"])
@pytest.mark.parametrize("schedule", ["oneshot", "iterative"])
def test_pruning_contract(rule, scope, schedule):
    cfg, data, model, objective = _setup(rule, scope, schedule)
    plan = prune_model(model, cfg, data, objective, FitOptions(quiet=True))
    report = sparsity_report(model)
    target = report["params_prunable"] / 4.0
    assert abs(report["params_nonzero"] - target) <= _weight_tolerance(model, rule)

    zero = {n: m.weight.detach() == 0 for n, m in prunable_layers(model)}
    finetune(model, cfg, data, objective, FitOptions(quiet=True))
    for name, module in prunable_layers(model):
        assert torch.all(module.weight[zero[name]] == 0), f"{rule}: a pruned weight of {name} revived"

    replayed = PruningPlan.from_json(json.loads(json.dumps(plan.to_json())))
    fresh = create_model("cnn-large", SHAPE, data.num_classes)
    replayed.apply(fresh)
    assert set(masks(fresh)) == set(masks(model))
    assert all(torch.equal(masks(fresh)[p], masks(model)[p]) for p in masks(model))

import json

import dataclasses

import pytest
import torch

from robustprune.config import TrainConfig
from robustprune.objectives import OBJECTIVES, create
from robustprune.objectives.ramps import linear_ramp
from robustprune.pruning import prunable_layers, prune
from robustprune.train import FitOptions, fit


@pytest.mark.parametrize("name", OBJECTIVES.names())
def test_every_objective_gives_a_differentiable_scalar(name, tiny_mlp, tiny_data):
    steps = {"steps": 2} if "steps" in {f.name for f in dataclasses.fields(OBJECTIVES.get(name).Settings)} else {}
    objective = create(name, eps=0.1, **steps)
    loss, logits = objective.forward(tiny_mlp.train(), tiny_data.train.x[:8], tiny_data.train.y[:8])
    assert loss.ndim == 0 and torch.isfinite(loss) and logits.shape == (8, 3)
    loss.backward()
    assert all(p.grad is not None for p in tiny_mlp.parameters())


def test_pgd_loss_is_at_least_the_clean_loss(tiny_mlp, tiny_data):
    x, y = tiny_data.train.x, tiny_data.train.y
    clean = create("benign").loss(tiny_mlp, x, y)
    robust = create("pgd", eps=0.2, steps=5, random_start=False).loss(tiny_mlp, x, y)
    assert robust >= clean


def test_pgd_objective_restores_training_mode(tiny_mlp, tiny_data):
    tiny_mlp.train()
    create("pgd", eps=0.1, steps=2).forward(tiny_mlp, tiny_data.train.x[:4], tiny_data.train.y[:4])
    assert tiny_mlp.training


def test_linear_ramp():
    assert linear_ramp(0.0, 2.0) == 0.0 and linear_ramp(1.0, 2.0) == 0.5 and linear_ramp(5.0, 2.0) == 1.0
    assert linear_ramp(0.0, 0.0) == 1.0


@pytest.mark.parametrize("schedule", ["cosine", "onecycle", "step", "constant"])
@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_fit_learns_and_logs_every_epoch(tiny_mlp, tiny_data, tmp_path, schedule, optimizer):
    cfg = TrainConfig(epochs=8, optimizer=optimizer, lr=0.05 if optimizer == "sgd" else 0.01, schedule=schedule)
    path = tmp_path / "metrics.jsonl"
    history = fit(tiny_mlp, create("benign"), tiny_data.train, cfg, FitOptions(batch_size=16, metrics_path=path, quiet=True,
                  generator=torch.Generator().manual_seed(0)))
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines == history and [r["epoch"] for r in lines] == list(range(1, 9))
    assert lines[-1]["train_acc"] > 0.9 and lines[-1]["loss"] < lines[0]["loss"]


def test_fit_ramps_eps_then_holds_it(tiny_mlp, tiny_data):
    objective = create("pgd", eps=0.2, steps=1)
    history = fit(tiny_mlp, objective, tiny_data.train, TrainConfig(epochs=4, eps_warmup_epochs=2), FitOptions(batch_size=64,
                  quiet=True))
    # one batch per epoch: the ε used in epoch e (0-based) is 0.2 * e / 2
    assert [round(r["eps"], 6) for r in history] == [0.0, 0.1, 0.2, 0.2]


def test_masks_survive_fit(tiny_data):
    from robustprune.models import create_model

    model = create_model("cnn-small", (1, 6, 6), 3)
    prune(model, "magnitude", 10.0)
    zeros = {n: m.weight == 0 for n, m in prunable_layers(model)}
    fit(model, create("pgd", eps=0.1, steps=2), tiny_data.train,
        TrainConfig(epochs=2, optimizer="sgd", lr=0.1, weight_decay=1e-3), FitOptions(batch_size=16, quiet=True))
    for name, module in prunable_layers(model):
        assert torch.all(module.weight[zeros[name]] == 0)
        assert torch.count_nonzero(module.weight) == (~zeros[name]).sum()  # kept weights did train, none zeroed


def test_fit_is_deterministic_for_a_seed(tiny_data):
    from robustprune.models import create_model

    def train_once():
        torch.manual_seed(0)
        model = create_model("mlp", (1, 6, 6), 3)
        fit(model, create("pgd", eps=0.1, steps=2), tiny_data.train, TrainConfig(epochs=2), FitOptions(batch_size=16,
            quiet=True, generator=torch.Generator().manual_seed(0)))
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    assert torch.equal(train_once(), train_once())

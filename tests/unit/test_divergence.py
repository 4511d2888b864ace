"""Training divergence: a non-finite loss or parameter stops the run with one line and exit 1, names the stage and
epoch, keeps the last good resume journal, and leaves metrics.jsonl strict JSON."""
from __future__ import annotations

import json
import math

import pytest
import torch

from robustprune.cli import main
from robustprune.config import TrainConfig
from robustprune.infra.errors import TrainingDiverged
from robustprune.objectives import create
from robustprune.infra.resume import Journal
from robustprune.train import FitOptions, fit


def _strict_json_lines(path) -> list[dict]:
    def refuse(constant: str):
        raise AssertionError(f"non-strict JSON constant {constant} in {path}")
    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


class PoisonedAfter:
    """Wraps an objective and turns its loss into NaN from the given epoch's first step on."""

    def __init__(self, inner, steps_before: int) -> None:
        self.inner, self.steps_left = inner, steps_before

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def forward(self, model, x, y):
        loss, logits = self.inner.forward(model, x, y)
        self.steps_left -= 1
        return (loss * float("nan") if self.steps_left < 0 else loss), logits


def test_nan_loss_in_epoch_two_stops_with_the_stage_and_epoch_and_keeps_epoch_one(tiny_mlp, tiny_data, tmp_path):
    cfg = TrainConfig(epochs=3, optimizer="sgd", lr=0.05)
    steps_per_epoch = math.ceil(len(tiny_data.train) / 16)
    journal = Journal(tmp_path)
    journal.begin("pretrain")
    metrics = tmp_path / "metrics.jsonl"
    objective = PoisonedAfter(create("benign"), steps_before=steps_per_epoch + 1)
    with pytest.raises(TrainingDiverged, match=r"pretrain diverged in epoch 2: the loss is nan \(lr 0.05"):
        fit(tiny_mlp, objective, tiny_data.train, cfg, FitOptions(batch_size=16, stage="pretrain", metrics_path=metrics,
            journal=journal))
    lines = _strict_json_lines(metrics)
    assert [(r["epoch"], r["loss"] is None) for r in lines] == [(1, False), (2, True)]
    resumed = Journal(tmp_path, resume=True)
    assert resumed.saved is not None and (resumed.saved.stage, resumed.saved.epoch) == ("pretrain", 1)


def test_a_non_finite_parameter_stops_training_even_with_a_finite_loss(tiny_mlp, tiny_data):
    class CorruptsSpare:
        name, current_eps = "benign", 0.0

        def set_eps_scale(self, scale):
            pass

        def forward(self, model, x, y):
            logits = model(x)
            with torch.no_grad():  # a corrupted step: the loss stays finite, a parameter it does not use does not
                model.spare.fill_(float("inf"))
            return torch.nn.functional.cross_entropy(logits, y), logits

    tiny_mlp.spare = torch.nn.Parameter(torch.zeros(1))
    with pytest.raises(TrainingDiverged, match=r"finetune diverged in epoch 1: parameter spare is not finite"):
        fit(tiny_mlp, CorruptsSpare(), tiny_data.train, TrainConfig(epochs=2, lr=1e-3), FitOptions(batch_size=16,
            stage="finetune"))


def test_an_honest_run_is_not_stopped(tiny_mlp, tiny_data):
    history = fit(tiny_mlp, create("benign"), tiny_data.train, TrainConfig(epochs=2, lr=1e-2), FitOptions(batch_size=16))
    assert len(history) == 2 and all(math.isfinite(r["loss"]) for r in history)


def test_cli_run_with_a_huge_learning_rate_exits_1_with_one_line(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["run", "--out", str(out), "--quiet", "--set", "pretrain.lr=1e30", "--set", "pretrain.optimizer=sgd",
                 "--set", "pretrain.epochs=2"])
    err = capsys.readouterr().err
    assert code == 1
    assert err.count("\n") == 1 and err.startswith("robustprune: error: pretrain diverged in epoch 1"), err
    assert "internal error" not in err and "Traceback" not in err
    assert not (out / "report.json").exists() and not (out / "pretrained.safetensors").exists()
    assert [r["loss"] for r in _strict_json_lines(out / "metrics.jsonl")] == [None]

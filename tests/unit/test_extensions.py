"""A new attack is one class plus one registry line, a new objective one class: both are registered inside the test
(``Registry.temporarily``), configured through the config's own keys, and run by ``evaluate`` and ``fit`` with no
other file changed. Config files keep loading: every registry name is checked when the config is read."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from robustprune.attacks import ATTACKS, Attack, AttackSettings
from robustprune.config import ThreatConfig, TrainConfig, config_from_dict, eval_config, load_config
from robustprune.evaluate import evaluate
from robustprune.infra.errors import UserError
from robustprune.models import create_model
from robustprune.objectives import OBJECTIVES, Objective
from robustprune.pipeline import build_objective
from robustprune.train import FitOptions, fit

from conftest import make_tiny_dataset

pytestmark = pytest.mark.usefixtures("one_thread")


@dataclass(frozen=True)
class NoiseSettings(AttackSettings):
    scale: float = 1.0  # fraction of ε


class UniformNoise(Attack):
    """A throw-away attack: each sample moved by ±scale·ε in every pixel (a fixed sign pattern)."""

    Settings = NoiseSettings
    calls: list = []

    def __call__(self, model, x, y, threat, settings, *, seed=0):
        self.calls.append((threat.eps, settings.scale, len(x)))
        sign = torch.where(torch.arange(x[0].numel()) % 2 == 0, 1.0, -1.0).view_as(x[0])
        return (x + settings.scale * threat.eps * sign).clamp(0, 1)


@dataclass(frozen=True)
class LabelSmoothingSettings:
    smoothing: float = 0.1

    def __post_init__(self) -> None:
        if not 0 <= self.smoothing < 1:
            raise UserError(f"smoothing must lie in [0, 1), got {self.smoothing}")


class LabelSmoothing(Objective):
    """A throw-away objective: cross-entropy with label smoothing."""

    name = "label-smoothing"
    Settings = LabelSmoothingSettings

    def forward(self, model, x, y):
        logits = model(x)
        return F.cross_entropy(logits, y, label_smoothing=self.settings.smoothing), logits


@pytest.fixture
def tiny():
    return make_tiny_dataset(n_train=96, n_test=40, shape=(1, 6, 6), classes=3)


def test_a_new_attack_runs_through_evaluate_with_its_own_settings(tiny):
    torch.manual_seed(0)
    model = create_model("mlp", (1, 6, 6), 3)
    UniformNoise.calls = []
    with ATTACKS.temporarily("noise", UniformNoise):
        cfg = eval_config(attacks=("noise",), noise_scale=0.5, noise_n_samples=30, noise_eps_fractions=(0.5,),
                          verifiers=(), masking_check=False)
        metrics = evaluate(model, tiny.test, ThreatConfig(eps=0.2), cfg)
        with pytest.raises(UserError, match="did you mean 'evaluate.noise_scale'"):
            eval_config(noise_scael=0.5)
    assert [eps for eps, _, _ in UniformNoise.calls] == [0.2, 0.1] and {s for _, s, _ in UniformNoise.calls} == {0.5}
    assert set(metrics["attack_acc"]) == {"noise", "noise@0.5"} and metrics["n_robust_eval"] == 30
    assert metrics["robust_acc"] == metrics["attack_acc"]["noise"]  # the one attack at ε is the worst case
    assert "noise" not in ATTACKS  # the registry is as it was


def test_a_new_objective_trains_through_fit_and_is_configured_by_its_own_keys(tiny):
    with OBJECTIVES.temporarily("label-smoothing", LabelSmoothing):
        cfg = load_config(None, ["objective.name=label-smoothing", "objective.smoothing=0.2"])
        objective = build_objective(cfg.objective, cfg.threat)
        assert objective.smoothing == 0.2 and cfg.to_dict()["objective"] == {"name": "label-smoothing", "eps": None,
                                                                              "smoothing": 0.2}
        with pytest.raises(UserError, match="objective.smoothing must lie in"):
            load_config(None, ["objective.name=label-smoothing", "objective.smoothing=1"])
        with pytest.raises(UserError, match="'objective.steps' is a setting of objective mart, pgd, trades, not of label-smoothing"):
            load_config(None, ["objective.name=label-smoothing", "objective.steps=3"])
        torch.manual_seed(0)
        model = create_model("mlp", (1, 6, 6), 3)
        history = fit(model, objective, tiny.train, TrainConfig(epochs=3, lr=1e-2), FitOptions(batch_size=32, quiet=True))
    assert len(history) == 3 and history[-1]["loss"] < history[0]["loss"]
    assert "label-smoothing" not in OBJECTIVES


def test_renaming_the_objective_keeps_only_the_settings_the_new_one_declares():
    pgd = load_config(None, ["objective.steps=7"])
    assert load_config(None, ["objective.steps=7", "objective.name=trades"]).objective.settings.steps == 7
    ibp = load_config(None, ["objective.steps=7", "objective.name=ibp"]).objective
    assert ibp.name == "ibp" and ibp.settings.kappa_end == 0.5
    assert pgd.objective.renamed("mart").settings.steps == 7
    assert config_from_dict(pgd.to_dict()) == pgd


def test_a_stored_config_of_the_union_era_still_loads():
    """Before objectives owned their settings, a stored objective section listed every objective's settings."""
    union = {"name": "pgd", "eps": None, "steps": 5, "step_size": None, "random_start": True, "kappa_start": 1.0,
             "kappa_end": 0.5, "beta_start": 1.0, "beta_end": 0.0, "trades_beta": 6.0, "mart_lambda": 5.0,
             "noise_sd": 0.25}
    cfg = config_from_dict({"objective": union, "finetune_objective": {**union, "name": "ibp"}})
    assert cfg.objective.settings.steps == 5 and cfg.finetune_objective.settings.kappa_end == 0.5
    stage = load_config(None, ["objective.name=trades"], base={"objective": union})
    assert stage.objective.name == "trades" and stage.objective.settings.steps == 5


@pytest.mark.parametrize("override, message", [
    ("evaluate.attacks=[autoatack]", "evaluate.attacks: unknown attack 'autoatack'; did you mean 'autoattack'?"),
    ("evaluate.verifiers=[crwn]", "did you mean 'crown'"),
    ("objective.name=trade", "objective.name: unknown objective 'trade'; did you mean 'trades'?"),
    ("prune.rule=hidra", "prune.rule: unknown pruning rule 'hidra'; did you mean 'hydra'?"),
    ("model.name=cnn-smal", "model.name: unknown model 'cnn-smal'; did you mean 'cnn-small'?"),
    ("data.name=digit", "data.name: unknown dataset 'digit'; did you mean 'digits'?"),
    ("evaluate.pgd_stepz=3", "did you mean 'evaluate.pgd_steps'"),
    ("evaluate.autoattack_attacks=[apgd]", "unknown AutoAttack attack 'apgd'"),
])
def test_every_name_is_checked_when_the_config_is_read(override, message):
    with pytest.raises(UserError, match=message.replace("?", r"\?")):
        load_config(None, [override])

"""robust_acc is the per-sample worst case over every attack run; the gradient-free Square check runs by default and
warns about gradient masking on a masked model, and stays quiet on an honest one."""
from __future__ import annotations

import importlib

import pytest
import torch
from torch import nn

from robustprune.attacks import ATTACKS, Attack
from robustprune.config import ThreatConfig, TrainConfig, eval_config
from robustprune.data import Split, load_dataset
from robustprune.evaluate import attack_plan, evaluate, worst_case
from robustprune.models import create_model
from robustprune.objectives import create
from robustprune.report import build_report, retention, stage_table
from robustprune.train import FitOptions, fit

CLASSES = 5
evaluation = importlib.import_module("robustprune.evaluate")  # the module (the package exports the function)


class PixelCode(nn.Module):
    """Predicts the class written in the first pixel (value c / 10): an attack that rewrites it breaks the sample."""

    def __init__(self) -> None:
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        code = (x[:, 0, 0, 0] * 10).round().long().clamp(0, CLASSES - 1)
        return nn.functional.one_hot(code, CLASSES).float()


def breaking(indices: list[int], needs_gradients: bool = True) -> type[Attack]:
    """A stand-in attack class that moves the listed sample indices to the next class."""
    class Breaks(Attack):
        gradient_free = not needs_gradients

        def __call__(self, model, x, y, threat, settings, *, seed=0):
            x_adv = x.clone()
            for i in indices:
                x_adv[i, 0, 0, 0] = ((y[i] + 1) % CLASSES) / 10
            return x_adv
    return Breaks


def test_two_attacks_that_break_different_samples_both_count():
    y = torch.arange(20) % CLASSES
    x = torch.zeros(20, 1, 2, 2)
    x[:, 0, 0, 0] = y / 10
    cfg = eval_config(attacks=("pgd",), pgd_eps_fractions=(), verifiers=(), masking_threshold=0.1)
    with ATTACKS.temporarily("pgd", breaking([0, 1])), ATTACKS.temporarily("square", breaking([2, 3, 4], False)):
        metrics = evaluate(PixelCode(), Split(x, y), ThreatConfig(eps=0.1), cfg)
    assert metrics["attack_acc"] == {"pgd": 18 / 20, "square": 17 / 20}
    assert metrics["robust_acc"] == 15 / 20 and metrics["n_robust_eval"] == 20
    assert metrics["masking_gap"] == 3 / 20
    assert any(w.startswith("gradient masking: Square") for w in metrics["warnings"])


def test_worst_case_covers_only_the_samples_every_attack_ran_on():
    clean = torch.tensor([True, True, True, False, True])
    held, count = worst_case(clean, {"pgd": torch.tensor([True, False, True, False, True]),
                                     "autoattack": torch.tensor([True, True, False])})
    assert count == 3 and held.tolist() == [True, False, False]
    assert worst_case(clean, {}) == (None, None)


@pytest.mark.parametrize("attacks, check, expected", [
    (("pgd",), True, ["pgd", "square"]),
    (("pgd", "autoattack"), True, ["pgd", "autoattack"]),  # AutoAttack ends with Square itself
    (("pgd",), False, ["pgd"]),
    ((), True, []),
    (("fgsm", "square"), True, ["fgsm", "square"]),
])
def test_the_square_check_joins_unless_autoattack_or_square_runs(attacks, check, expected):
    assert list(attack_plan(eval_config(attacks=attacks, masking_check=check), 100)) == expected


def test_report_leads_with_robust_accuracy_and_its_retention():
    stages = {"pretrained": {"robust_acc": 0.8, "benign_acc": 0.9, "n_robust_eval": 10, "attack_acc": {"pgd": 0.8}},
              "finetuned": {"robust_acc": 0.6, "benign_acc": 0.9, "n_robust_eval": 10, "attack_acc": {"pgd": 0.7}}}
    assert retention(stages)["robust"] == pytest.approx(0.75)
    report = build_report("0", {}, stages, {}, {})
    assert report["stages"]["finetuned"]["robust_acc"] == 0.6
    table = stage_table(report)
    assert table.splitlines()[0].startswith("| stage | compression | sparsity | robust (worst case) |")
    assert "**60.0%**" in table and "Robust = survives every attack run (pgd)" in table


class Staircase(nn.Module):
    """Quantises the input to a few levels: the network is unchanged in effect, its input gradient is zero almost
    everywhere — the textbook gradient-masking defence."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.round(x * 4) / 4


@pytest.fixture(scope="module")
def honest_digits():
    torch.manual_seed(0)
    data = load_dataset("digits")
    model = create_model("mlp", data.input_shape, data.num_classes, *data.channel_stats())
    fit(model, create("pgd", eps=0.2, steps=7), data.train, TrainConfig(epochs=15, lr=3e-3, eps_warmup_epochs=5),
        FitOptions(batch_size=64, generator=torch.Generator().manual_seed(0)))
    return model.eval(), data.test


def test_masking_warning_fires_on_a_masked_model_and_stays_quiet_on_the_honest_one(honest_digits):
    model, test = honest_digits
    # three restarts: with one, Square's 300 queries find 2-4% more on this MLP (a weak attack, not masking)
    cfg = eval_config(pgd_steps=20, pgd_restarts=3, verifiers=(), n_samples=200)
    honest = evaluate(model, test, ThreatConfig(eps=0.2), cfg)
    assert honest["robust_acc"] > 0.3  # a robust model: the check has samples to break
    assert honest["masking_gap"] <= 0.02 and not any("masking" in w for w in honest["warnings"])
    masked = evaluate(nn.Sequential(Staircase(), model).eval(), test, ThreatConfig(eps=0.2), cfg)
    assert masked["masking_gap"] > 0.02
    assert any(w.startswith("gradient masking: Square") for w in masked["warnings"])
    assert masked["robust_acc"] < masked["pgd_acc"]


def test_square_leaves_the_callers_random_stream_alone():
    """pyautoattack reseeds the global RNG; the check must not change the random starts of the attacks after it."""
    from robustprune.attacks import square

    model = create_model("mlp", (1, 8, 8), 10).eval()
    x, y = torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,))
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    square(model, x, y, 0.1, queries=20)
    assert torch.equal(torch.rand(3), expected)

"""``mart``: MART (Y. Wang et al., ICLR 2020, "Improving Adversarial Robustness Requires Revisiting Misclassified
Examples").

    loss = BCE(p(x'), y) + λ · mean_i[ KL(p(x_i) ‖ p(x'_i)) · (1 − p_y(x_i)) ],   p = softmax ∘ f,
    BCE(p(x'), y) = CE(f(x'), y) − log(1 − max_{k≠y} p_k(x')),

with x' a PGD point of the ε-ball ∩ [0, 1] on the cross-entropy. The KL term is weighted by how *un*confident the
model is on the clean input: misclassified examples get the most regularisation.

Choices, following the authors' code (github.com/YisenWang/MART, ``mart.py``):

* numerical guards as there: the boosting term is −log(1.0001 − p_k + 1e-12), the KL uses log(p(x') + 1e-12), and the
  weight is (1.0000001 − p_y(x));
* nothing is detached in the outer loss: gradients reach the weights through p(x) in the KL and in its weight too;
* the attack runs in eval mode, the outer loss in the caller's mode (training).

Unlike the reference (x + 0.001 · N(0, 1) start, L∞ only), x' comes from the library's ``pgd`` — a uniform random start
in the ball when ``random_start`` (else x itself) and the ``norm`` given — so ``mart`` and ``pgd`` train on the same
attack. Defaults: λ = 5 (the authors' training script defaults to 6), 10 steps of ``default_step_size``; a set
``step_size`` is scaled with the ε warm-up. At current ε = 0 the loss is plain cross-entropy (no attack is run; the
boosting and KL terms are dropped). Logits returned: the adversarial logits f(x') (like ``pgd``, the logits of the
points trained on).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from robustprune.infra.errors import UserError
from robustprune.objectives.base import OBJECTIVES
from robustprune.objectives.pgd import PGDSettings, PGDTraining


def boosted_cross_entropy(logits_adv: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """MART's BCE: CE(f(x'), y) − log(1 − max_{k≠y} p_k(x')), batch mean, guarded as in the reference code."""
    probs = F.softmax(logits_adv, dim=1)
    wrong = probs.masked_fill(F.one_hot(y, probs.shape[1]).bool(), -1.0).amax(dim=1)
    return F.cross_entropy(logits_adv, y) - torch.log(1.0001 - wrong + 1e-12).mean()


def mart_regulariser(logits_clean: torch.Tensor, logits_adv: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """mean_i KL(p(x_i) ‖ p(x'_i)) · (1 − p_y(x_i)), guarded as in the reference code."""
    p_clean = F.softmax(logits_clean, dim=1)
    p_adv = F.softmax(logits_adv, dim=1)
    kl = F.kl_div(torch.log(p_adv + 1e-12), p_clean, reduction="none").sum(dim=1)
    true = p_clean.gather(1, y.unsqueeze(1)).squeeze(1)
    return (kl * (1.0000001 - true)).mean()


@dataclass(frozen=True)
class MARTSettings(PGDSettings):
    mart_lambda: float = 5.0  # weight of the misclassification-aware KL term (Wang et al. 2020)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.mart_lambda >= 0:
            raise UserError(f"mart_lambda must be >= 0, got {self.mart_lambda}")


@OBJECTIVES.register("mart")
class MARTTraining(PGDTraining):
    """PGD training's attack, MART's loss on it."""

    name = "mart"

    Settings = MARTSettings

    def forward(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.current_eps <= 0:
            logits = model(x)
            return F.cross_entropy(logits, y), logits
        logits_adv = model(self.adversarial(model, x, y))
        loss = boosted_cross_entropy(logits_adv, y)
        if self.mart_lambda:
            loss = loss + self.mart_lambda * mart_regulariser(model(x), logits_adv, y)
        return loss, logits_adv

    def describe(self) -> dict:
        return {**super().describe(), "random_start": self.random_start, "mart_lambda": self.mart_lambda}

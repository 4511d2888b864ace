"""``trades``: TRADES (H. Zhang et al., ICML 2019, "Theoretically Principled Trade-off between Robustness and
Accuracy").

    loss = CE(f(x), y) + β · KL(p(x) ‖ p(x')),   p = softmax ∘ f,
    x' ≈ argmax over x' ∈ B_ε(x) ∩ [0, 1] of KL(p(x) ‖ p(x')).

Choices, following the authors' code (github.com/yaodongyu/TRADES, ``trades.py``):

* the KL is summed over classes and averaged over the batch (``KLDivLoss(size_average=False) / batch_size``,
  i.e. ``reduction="batchmean"``), so β weighs a per-sample KL against a per-sample CE as in the paper;
* the inner maximisation starts at x + 0.001 · N(0, 1) (a tiny start: the KL and its gradient are exactly 0 at x),
  here projected into the ball ∩ [0, 1] at once; it takes ``steps`` ascent steps of the ball's norm (sign steps for
  L∞, normalised-gradient steps for L2, both from ``BALLS``) on the summed KL, each followed by projection;
* the attack runs with the model in eval mode, against the clean distribution computed once (detached), and asks
  autograd for the input gradient only; the outer loss runs in the caller's mode (training) on the detached x', and
  its KL target softmax f(x) is *not* detached, so gradients reach the weights through both terms, as in the code.

Defaults: β = 6 (the paper's CIFAR-10 choice), 10 steps of the library's ``default_step_size`` (2.5 ε / steps; the
reference uses 0.007 for ε = 0.031, ≈ 2.26 ε / steps). A set ``step_size`` is scaled with the ε warm-up like
``pgd``. At current ε = 0 (or β = 0) the objective is plain cross-entropy and runs no attack. Logits returned: the
clean logits f(x) (what the CE term and train accuracy are about).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from robustprune.attacks.geometry import BALLS
from robustprune.attacks.pgd import default_step_size
from robustprune.infra.errors import UserError
from robustprune.objectives.base import OBJECTIVES, Objective, eval_mode

START_SD = 0.001  # the reference code's start: x + 0.001 · N(0, 1)


def kl_batchmean(logits_adv: torch.Tensor, probs_clean: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ softmax(logits_adv)) summed over classes, averaged over the batch."""
    return F.kl_div(F.log_softmax(logits_adv, dim=1), probs_clean, reduction="batchmean")


def trades_adversary(model: nn.Module, x: torch.Tensor, eps: float, steps: int, step_size: float,
                     norm: str = "linf") -> torch.Tensor:
    """x' of the ``norm`` ε-ball ∩ [0, 1] that (approximately) maximises KL(f(x) ‖ f(x')); the model's mode is left
    as the caller set it."""
    ball = BALLS.get(norm)()
    x = x.detach()
    with torch.no_grad():
        probs_clean = F.softmax(model(x), dim=1)
    x_adv = ball.project(x + START_SD * torch.randn_like(x), x, eps)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        loss = F.kl_div(F.log_softmax(model(x_adv), dim=1), probs_clean, reduction="sum")
        (grad,) = torch.autograd.grad(loss, x_adv)
        x_adv = ball.project(ball.step(x_adv.detach(), grad, step_size), x, eps)
    return x_adv.detach()


@dataclass(frozen=True)
class TradesSettings:
    steps: int = 10  # attack steps on the KL term per training batch
    step_size: float | None = None  # default 2.5 * eps / steps
    trades_beta: float = 6.0  # weight of the KL robustness term (Zhang et al. 2019)

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise UserError(f"steps must be >= 1, got {self.steps}")
        if self.step_size is not None and not self.step_size > 0:
            raise UserError(f"step_size must be > 0, got {self.step_size}")
        if not self.trades_beta >= 0:
            raise UserError(f"trades_beta must be >= 0, got {self.trades_beta}")


@OBJECTIVES.register("trades")
class TradesTraining(Objective):
    name = "trades"
    Settings = TradesSettings

    def forward(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        eps = self.current_eps
        if eps <= 0 or self.trades_beta == 0:
            logits = model(x)
            return F.cross_entropy(logits, y), logits
        step = self.scaled_step(self.step_size, default_step_size(eps, self.steps))
        with eval_mode(model):
            x_adv = trades_adversary(model, x, eps, self.steps, step, self.norm)
        logits = model(x)
        robust = kl_batchmean(model(x_adv), F.softmax(logits, dim=1))
        return F.cross_entropy(logits, y) + self.trades_beta * robust, logits

    def describe(self) -> dict:
        return {"name": self.name, "eps": self.eps, "steps": self.steps, "norm": self.norm,
                "step_size": self.step_size or default_step_size(self.eps, self.steps), "trades_beta": self.trades_beta}

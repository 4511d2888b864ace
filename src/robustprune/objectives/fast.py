"""``fast``: FGSM adversarial training with a random start (E. Wong, L. Rice, J. Z. Kolter, ICLR 2020, "Fast is better
than free: Revisiting adversarial training").

    δ₀ ~ U(B_ε), clipped so x + δ₀ ∈ [0, 1];   x' = Π_{B_ε(x) ∩ [0,1]}( x + δ₀ + α · sign ∇_x CE(f(x + δ₀), y) );
    loss = CE(f(x'), y).

For ``norm="l2"`` the start is uniform in the L2 ball and the step is α along the L2-normalised gradient (``BALLS``).
α defaults to 1.25 ε, the paper's choice (larger steps, e.g. 2 ε, led to catastrophic overfitting in the paper); a set
``step_size`` is scaled with the ε warm-up, as the default is through ε itself.

Choices against the authors' code (github.com/locuslab/fast_adversarial): the one gradient is taken with the model in
eval mode and for the input only (the reference stays in train mode and back-propagates into the weights too, then
zeroes them); the same eval-mode convention as ``pgd``/``trades``/``mart`` keeps batch-norm statistics out of attack
passes. The schedule tricks of the paper (cyclic learning rate, mixed precision, early stopping on PGD accuracy) are
the training loop's business, not the objective's. At current ε = 0 the loss is plain cross-entropy (no attack
pass). Logits returned: those of x' (the points trained on), as in ``pgd``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from robustprune.attacks.geometry import BALLS
from robustprune.infra.errors import UserError
from robustprune.objectives.base import OBJECTIVES, Objective, eval_mode

DEFAULT_ALPHA = 1.25  # α = 1.25 ε (Wong et al., 2020)


def fgsm_random_start(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, step_size: float,
                      norm: str = "linf") -> torch.Tensor:
    """One ascent step on the CE from a uniform random point of the ball, projected to the ball ∩ [0, 1]; the model's
    mode is left as the caller set it."""
    ball = BALLS.get(norm)()
    x = x.detach()
    x_adv = ball.project(ball.random_start(x, eps), x, eps).requires_grad_(True)
    loss = F.cross_entropy(model(x_adv), y, reduction="sum")
    (grad,) = torch.autograd.grad(loss, x_adv)
    return ball.project(ball.step(x_adv.detach(), grad, step_size), x, eps).detach()


@dataclass(frozen=True)
class FastSettings:
    step_size: float | None = None  # α; default 1.25 · ε (Wong et al. 2020)

    def __post_init__(self) -> None:
        if self.step_size is not None and not self.step_size > 0:
            raise UserError(f"step_size must be > 0, got {self.step_size}")


@OBJECTIVES.register("fast")
class FastTraining(Objective):
    name = "fast"
    Settings = FastSettings

    @property
    def current_step_size(self) -> float:
        """α for the current ε scale: ``step_size`` × warm-up scale, or 1.25 × current ε."""
        return self.scaled_step(self.step_size, DEFAULT_ALPHA * self.current_eps)

    def forward(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        eps = self.current_eps
        if eps > 0:
            with eval_mode(model):
                x = fgsm_random_start(model, x, y, eps, self.current_step_size, self.norm)
        logits = model(x)
        return F.cross_entropy(logits, y), logits

    def describe(self) -> dict:
        return {"name": self.name, "eps": self.eps, "norm": self.norm,
                "step_size": self.step_size or DEFAULT_ALPHA * self.eps}

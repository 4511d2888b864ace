"""Projected gradient descent (Madry et al., 2018, "Towards Deep Learning Models Resistant to Adversarial Attacks").

Threat model: ``norm`` ball of radius ``eps`` around ``x`` ∩ [0, 1]. Inputs ``x`` (B, C, H, W) in [0, 1], labels
``y`` (B,). Returns ``x_adv`` of the same shape, inside the ball. With ``restarts`` > 1 each sample keeps its worst
case over the restarts: a misclassifying point if any restart found one, else the point of highest loss.

Example::

    x_adv = pgd(model, x, y, eps=0.3, steps=50, restarts=5)
    robust_acc = (model(x_adv).argmax(1) == y).float().mean()
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from robustprune.attacks.geometry import BALLS


def default_step_size(eps: float, steps: int) -> float:
    """Madry et al.'s choice: 2.5 ε / steps, so the walk can cross the ball from any start."""
    return 2.5 * eps / max(steps, 1)


def pgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    steps: int,
    step_size: float | None = None,
    restarts: int = 1,
    norm: str = "linf",
    random_start: bool = True,
) -> torch.Tensor:
    """Untargeted PGD on the cross-entropy loss; the model's mode (train/eval) is left as the caller set it."""
    ball = BALLS.get(norm)()
    step_size = default_step_size(eps, steps) if step_size is None else step_size
    if eps == 0 or steps == 0:
        return x.detach().clone()
    best_adv, best_loss, best_fooled = x.detach().clone(), None, None
    for _ in range(restarts):
        x_adv = _pgd_once(model, x, y, ball, eps, steps, step_size, random_start)
        with torch.no_grad():
            logits = model(x_adv)
            loss = F.cross_entropy(logits, y, reduction="none")
            fooled = logits.argmax(1) != y
        if best_loss is None:
            best_adv, best_loss, best_fooled = x_adv, loss, fooled
            continue
        better = (fooled & ~best_fooled) | ((fooled == best_fooled) & (loss > best_loss))
        best_adv = torch.where(better.view(-1, 1, 1, 1), x_adv, best_adv)
        best_loss = torch.where(better, loss, best_loss)
        best_fooled = best_fooled | fooled
    return best_adv


def _pgd_once(model, x, y, ball, eps: float, steps: int, step_size: float, random_start: bool) -> torch.Tensor:
    x = x.detach()
    x_adv = ball.project(ball.random_start(x, eps), x, eps) if random_start else x.clone()
    for _ in range(steps):
        x_adv.requires_grad_(True)
        loss = F.cross_entropy(model(x_adv), y, reduction="sum")
        # Only the input gradient: autograd skips every weight-gradient kernel.
        (grad,) = torch.autograd.grad(loss, x_adv)
        x_adv = ball.project(ball.step(x_adv.detach(), grad, step_size), x, eps)
    return x_adv.detach()

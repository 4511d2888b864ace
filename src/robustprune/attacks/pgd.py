"""Projected gradient descent (Madry et al., 2018, "Towards Deep Learning Models Resistant to Adversarial Attacks").

Threat model: ``norm`` ball of radius ``eps`` around ``x`` ∩ [0, 1]. Inputs ``x`` (B, C, H, W) in [0, 1], labels
``y`` (B,). Returns ``x_adv`` of the same shape, inside the ball. With ``restarts`` > 1 each sample keeps its worst
case over the restarts: a point where the attack succeeded if any restart found one, else the point of highest loss.

Losses (``loss``): ``ce`` (cross-entropy) or ``margin`` (Carlini & Wagner's: max_{j≠y} z_j − z_y, which does not
saturate when the softmax does — the usual cure for a model whose cross-entropy gradients vanish). ``target``
(B,) makes the attack targeted: it descends the loss of the target class (CE) or ascends z_t − max_{j≠t} z_j
(margin), and succeeds when the model predicts the target.

Example::

    x_adv = pgd(model, x, y, eps=0.3, steps=50, restarts=5, loss="margin")
    robust_acc = (model(x_adv).argmax(1) == y).float().mean()
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from robustprune.attacks.base import Attack, AttackSettings, Threat
from robustprune.attacks.geometry import BALLS
from robustprune.infra.errors import UserError

LOSSES = ("ce", "margin")


def default_step_size(eps: float, steps: int) -> float:
    """Madry et al.'s choice: 2.5 ε / steps, so the walk can cross the ball from any start."""
    return 2.5 * eps / max(steps, 1)


def attack_loss(logits: torch.Tensor, y: torch.Tensor, loss: str = "ce", target: torch.Tensor | None = None
                ) -> torch.Tensor:
    """Per-sample loss the attack ascends (B,): higher is closer to success."""
    if loss not in LOSSES:
        raise UserError(f"unknown attack loss {loss!r} (choose from {', '.join(LOSSES)})")
    if target is None:
        if loss == "ce":
            return F.cross_entropy(logits, y, reduction="none")
        return _best_other(logits, y) - logits.gather(1, y[:, None]).squeeze(1)
    if loss == "ce":
        return -F.cross_entropy(logits, target, reduction="none")
    return logits.gather(1, target[:, None]).squeeze(1) - _best_other(logits, target)


def _best_other(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """max_{j ≠ label} z_j per sample."""
    return logits.scatter(1, label[:, None], float("-inf")).max(1).values


def succeeded(logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
    """Per sample: untargeted, the prediction is not y; targeted, the prediction is the target."""
    prediction = logits.argmax(1)
    return prediction != y if target is None else prediction == target


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
    loss: str = "ce",
    target: torch.Tensor | None = None,
) -> torch.Tensor:
    """PGD on ``loss`` (untargeted, or towards ``target``); the model's mode is left as the caller set it."""
    ball = BALLS.get(norm)()
    step_size = default_step_size(eps, steps) if step_size is None else step_size
    if loss not in LOSSES:
        raise UserError(f"unknown attack loss {loss!r} (choose from {', '.join(LOSSES)})")
    if eps == 0 or steps == 0:
        return x.detach().clone()
    # The model's weights do not change during the attack: the masked weights (weight · mask) are computed once,
    # not at every pass; and autograd is asked for the input gradient only.
    with parametrize.cached(), torch.enable_grad():
        if restarts == 1:  # nothing to choose from: no extra forward pass
            return _pgd_once(model, x, y, ball, eps, steps, step_size, random_start, loss, target)
        best_adv, best_loss, best_done = x.detach().clone(), None, None
        for _ in range(restarts):
            x_adv = _pgd_once(model, x, y, ball, eps, steps, step_size, random_start, loss, target)
            with torch.no_grad():
                logits = model(x_adv)
                value = attack_loss(logits, y, loss, target)
                done = succeeded(logits, y, target)
            if best_loss is None:
                best_adv, best_loss, best_done = x_adv, value, done
                continue
            better = (done & ~best_done) | ((done == best_done) & (value > best_loss))
            best_adv = torch.where(better.view(-1, *([1] * (x.dim() - 1))), x_adv, best_adv)
            best_loss = torch.where(better, value, best_loss)
            best_done = best_done | done
        return best_adv


def _pgd_once(model, x, y, ball, eps: float, steps: int, step_size: float, random_start: bool, loss: str,
              target: torch.Tensor | None) -> torch.Tensor:
    """One PGD run. No host synchronisation in the loop (no ``.item()``, no data-dependent branch), so on a GPU
    the steps queue without waiting."""
    x = x.detach()
    project = ball.projector(x, eps)
    x_adv = project(ball.random_start(x, eps)) if random_start else x.clone()
    for _ in range(steps):
        x_adv.requires_grad_(True)
        value = attack_loss(model(x_adv), y, loss, target).sum()
        # Only the input gradient: autograd skips every weight-gradient kernel.
        (grad,) = torch.autograd.grad(value, x_adv)
        x_adv = project(ball.step(x_adv.detach(), grad, step_size))
    return x_adv.detach()


def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, norm: str = "linf", loss: str = "ce",
         target: torch.Tensor | None = None) -> torch.Tensor:
    """Goodfellow et al. (2015)'s fast gradient sign method: one step of size ε from the clean point (for L2, one
    normalised-gradient step of length ε), projected to the ball ∩ [0, 1]. A weak attack, kept as the baseline
    that gradient masking fools first."""
    return pgd(model, x, y, eps, steps=1, step_size=eps, restarts=1, norm=norm, random_start=False, loss=loss,
               target=target)


@dataclass(frozen=True)
class PGDSettings(AttackSettings):
    steps: int = 50  # 0 switches the attack off
    restarts: int = 1  # a sample counts as robust only if it survives every restart
    step_size: float | None = None  # default 2.5 ε / steps
    loss: str = "ce"  # ce | margin (Carlini-Wagner)
    eps_fractions: tuple[float, ...] = (0.5,)

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_loss(self.loss)
        if self.steps < 0:
            raise UserError(f"steps must be >= 0 (0 switches the attack off), got {self.steps}")
        if self.restarts < 1:
            raise UserError(f"restarts must be >= 1, got {self.restarts}")
        if self.step_size is not None and not self.step_size > 0:
            raise UserError(f"step_size must be > 0, got {self.step_size}")


@dataclass(frozen=True)
class FGSMSettings(AttackSettings):
    loss: str = "ce"  # ce | margin

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_loss(self.loss)


def _check_loss(loss: str) -> None:
    if loss not in LOSSES:
        raise UserError(f"loss must be one of {', '.join(LOSSES)}, got {loss!r}")


class PGD(Attack):
    """``pgd`` in evaluation: PGD with the threat's radius, ``steps``, ``restarts``, ``step_size`` and ``loss``."""

    Settings = PGDSettings

    def active(self, settings: PGDSettings) -> bool:
        return settings.steps > 0

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: Threat, settings: PGDSettings,
                 *, seed: int = 0) -> torch.Tensor:
        return pgd(model, x, y, threat.eps, settings.steps, settings.step_size, settings.restarts, threat.norm,
                   loss=settings.loss)


class FGSM(Attack):
    """``fgsm`` in evaluation: one signed-gradient step of size ε."""

    Settings = FGSMSettings

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: Threat, settings: FGSMSettings,
                 *, seed: int = 0) -> torch.Tensor:
        return fgsm(model, x, y, threat.eps, threat.norm, loss=settings.loss)

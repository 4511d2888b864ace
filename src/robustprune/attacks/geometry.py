"""Threat-model geometry, apart from any attack loop: random start, ascent step and projection.

Every ball is intersected with the input domain [0, 1] (inputs live in pixel units; models normalise inside).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable

import torch

from robustprune.registry import Registry


def _per_sample(v: torch.Tensor) -> torch.Tensor:
    """Reshape a per-sample value (B,) so it broadcasts over (B, C, H, W)."""
    return v.view(-1, *([1] * 3))


class Ball(ABC):
    """An ε-ball around each clean input, intersected with [0, 1]."""

    @abstractmethod
    def random_start(self, x: torch.Tensor, eps: float) -> torch.Tensor:
        """A uniformly random point of the ball (before clipping to [0, 1])."""

    @abstractmethod
    def step(self, x_adv: torch.Tensor, grad: torch.Tensor, step_size: float) -> torch.Tensor:
        """One steepest-ascent step for this norm."""

    @abstractmethod
    def project(self, x_adv: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
        """Closest point of the ball around ``x``, then clipped to [0, 1]."""

    def projector(self, x: torch.Tensor, eps: float) -> Callable[[torch.Tensor], torch.Tensor]:
        """``project(·, x, eps)`` for many steps around the same ``x``: a ball may precompute what does not change
        from step to step (the same values as ``project``, bit for bit)."""
        return lambda x_adv: self.project(x_adv, x, eps)


BALLS: Registry[type[Ball]] = Registry("norm")


@BALLS.register("linf")
class LinfBall(Ball):
    def random_start(self, x: torch.Tensor, eps: float) -> torch.Tensor:
        return x + torch.empty_like(x).uniform_(-eps, eps)

    def step(self, x_adv: torch.Tensor, grad: torch.Tensor, step_size: float) -> torch.Tensor:
        return torch.add(x_adv, grad.sign(), alpha=step_size)  # = x_adv + step_size · sign: the product is exact

    def project(self, x_adv: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
        return torch.min(torch.max(x_adv, x - eps), x + eps).clamp_(0.0, 1.0)

    def projector(self, x: torch.Tensor, eps: float) -> Callable[[torch.Tensor], torch.Tensor]:
        # The box [max(x − ε, 0), min(x + ε, 1)] once, then one clamp per step: max/min select, never round, so
        # this equals ``project`` exactly.
        low, high = (x - eps).clamp_(min=0.0), (x + eps).clamp_(max=1.0)
        return lambda x_adv: torch.clamp(x_adv, low, high)


@BALLS.register("l2")
class L2Ball(Ball):
    def random_start(self, x: torch.Tensor, eps: float) -> torch.Tensor:
        direction = torch.randn_like(x)
        norms = direction.flatten(1).norm(dim=1).clamp_min(1e-12)
        dims = x[0].numel()
        radius = eps * torch.rand(x.shape[0], device=x.device, dtype=x.dtype) ** (1.0 / dims)
        return x + direction * _per_sample(radius / norms)

    def step(self, x_adv: torch.Tensor, grad: torch.Tensor, step_size: float) -> torch.Tensor:
        norms = grad.flatten(1).norm(dim=1).clamp_min(1e-12)
        return x_adv + step_size * grad / _per_sample(norms)

    def project(self, x_adv: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
        delta = x_adv - x
        norms = delta.flatten(1).norm(dim=1).clamp_min(1e-12)
        factor = torch.clamp(eps / norms, max=1.0)
        return (x + delta * _per_sample(factor)).clamp_(0.0, 1.0)

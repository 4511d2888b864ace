"""Square Attack (Andriushchenko et al., ECCV 2020) through ``pyautoattack`` — the gradient-free check.

A score-based random search: it only queries the model's logits, never its gradients, so a network whose gradients
are masked (flat, noisy or misleading) does not fool it. AutoAttack runs it last with 5,000 queries; robustprune
runs a short version (a few hundred queries, margin loss, the published square-size schedule rescaled to the budget)
after the gradient attacks by default, and a sample it breaks that they left counts against robust accuracy and,
past a threshold, raises the gradient-masking warning (``evaluate.py``).

Example::

    x_adv = square(model, x, y, eps=0.3, norm="linf", queries=300)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from robustprune.attacks.base import Attack, AttackSettings, Threat
from robustprune.infra.errors import UserError

_NORMS = {"linf": "Linf", "l2": "L2"}


def square(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, norm: str = "linf", queries: int = 300,
           seed: int = 0) -> torch.Tensor:
    """Points of the ε-ball ∩ [0, 1] (shape of ``x``): each breaks the sample where the search found a way, else the
    clean point. ``queries`` forward passes at most per sample; the model's mode is the caller's."""
    from pyautoattack.square import SquareAttack

    if norm not in _NORMS:
        raise UserError(f"the Square attack supports the threat norms {', '.join(_NORMS)}, not {norm!r}")
    if eps == 0 or len(x) == 0 or queries == 0:
        return x.detach().clone()
    runner = SquareAttack(model, norm=_NORMS[norm], n_queries=queries, eps=eps, seed=seed, loss="margin",
                          device=x.device)
    # pyautoattack reseeds the global RNG: a forked RNG keeps the caller's stream (later attacks' starts) unchanged
    with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []), torch.no_grad(), \
            parametrize.cached():  # logits only: no graph, the masked weights computed once
        return runner.perturb(x.detach(), y).detach()


@dataclass(frozen=True)
class SquareSettings(AttackSettings):
    queries: int = 300  # queries per sample (AutoAttack's own Square uses 5,000)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.queries < 1:
            raise UserError(f"queries must be >= 1, got {self.queries}")


class Square(Attack):
    """``square`` in evaluation: the gradient-free check (margin loss, ``queries`` per sample)."""

    Settings = SquareSettings
    gradient_free = True

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: Threat, settings: SquareSettings,
                 *, seed: int = 0) -> torch.Tensor:
        return square(model, x, y, threat.eps, threat.norm, settings.queries, seed=seed)

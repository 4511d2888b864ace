"""The Objective contract and its registry.

An objective is one object handed to every ``fit()`` (pre-training and fine-tuning use the same one unless the user
asks otherwise). ``forward`` returns the training loss and the logits it was computed from (for train accuracy).
"""
from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from typing import Callable, Iterator

import torch
from torch import nn

from robustprune.registry import Registry


class Objective(ABC):
    """A training loss. ``eps`` is the nominal radius; ``fit`` scales it through ``set_eps_scale`` (warm-up)."""

    name: str = ""

    def __init__(self, eps: float = 0.0) -> None:
        self.eps = float(eps)
        self.eps_scale = 1.0

    @property
    def current_eps(self) -> float:
        return self.eps * self.eps_scale

    def set_eps_scale(self, scale: float) -> None:
        self.eps_scale = float(min(max(scale, 0.0), 1.0))

    def scaled_step(self, step_size: float | None, default: float) -> float:
        """An attack step for the current ε: a set ``step_size`` follows the warm-up scale, else ``default``
        (computed by the caller from the current ε)."""
        return step_size * self.eps_scale if step_size else default

    @abstractmethod
    def forward(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(scalar loss, logits (B, classes)) for a batch; the model is in training mode."""

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.forward(model, x, y)[0]

    def describe(self) -> dict:
        return {"name": self.name, "eps": self.eps}


OBJECTIVES: Registry[type[Objective]] = Registry("objective")


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Attack passes of a training objective run in eval mode (batch-norm statistics are not updated by them); the
    caller's mode is restored afterwards, also on error."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


class Penalised(Objective):
    """An objective plus a penalty on the model itself (HARP's budget term): ``loss = inner + penalty(model)``.

    The ε schedule is the inner objective's (``fit`` scales this wrapper; it passes the scale on), so the robust
    loss is the very one the wrapped objective trains with.
    """

    def __init__(self, inner: Objective, penalty: Callable[[nn.Module], torch.Tensor]) -> None:
        super().__init__(inner.eps)
        self.inner, self.penalty = inner, penalty
        self.name = inner.name

    @property
    def current_eps(self) -> float:
        return self.inner.current_eps

    def set_eps_scale(self, scale: float) -> None:
        self.inner.set_eps_scale(scale)

    def forward(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loss, logits = self.inner.forward(model, x, y)
        return loss + self.penalty(model).to(loss.device, loss.dtype), logits

    def describe(self) -> dict:
        return {**self.inner.describe(), "penalised": True}

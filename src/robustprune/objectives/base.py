"""The Objective contract and its registry.

An objective is one object handed to every ``fit()`` (pre-training and fine-tuning use the same one unless the user
asks otherwise). ``forward`` returns the training loss and the logits it was computed from (for train accuracy).
"""
from __future__ import annotations

import contextlib
import dataclasses
import difflib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterator

import torch
from torch import nn

from robustprune.infra.errors import UserError
from robustprune.registry import Registry


@dataclass(frozen=True)
class NoSettings:
    """The settings of an objective that has none of its own."""


class Objective(ABC):
    """A training loss. ``eps`` is the nominal radius; ``fit`` scales it through ``set_eps_scale`` (warm-up).

    Each class declares its own settings dataclass (``Settings``, validated in its ``__post_init__``; the config's
    ``objective`` section holds exactly these keys besides ``name`` and ``eps``), the threat norms it trains for and
    whether it is ``certified`` (trains on sound bounds, so the model needs a bound class for every layer).
    """

    name: str = ""
    Settings: ClassVar[type] = NoSettings
    certified: ClassVar[bool] = False
    norms: ClassVar[tuple[str, ...]] = ("linf", "l2")

    def __init__(self, eps: float = 0.0, norm: str = "linf", settings: Any = None) -> None:
        if norm not in self.norms:
            raise UserError(f"objective {self.name} trains for the threat norms {', '.join(self.norms)}; "
                            f"threat.norm is {norm!r}")
        self.eps = float(eps)
        self.eps_scale = 1.0
        self.norm = norm
        self.settings = self.Settings() if settings is None else settings

    def __getattr__(self, name: str) -> Any:
        """A setting reads as an attribute of the objective (``objective.steps``)."""
        if name == "settings" or "settings" not in self.__dict__:
            raise AttributeError(name)
        try:
            return getattr(self.__dict__["settings"], name)
        except AttributeError:
            raise AttributeError(f"{type(self).__name__} has no attribute {name!r}") from None

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


def settings_of(cls: type[Objective], values: dict[str, Any]) -> Any:
    """``cls.Settings`` from keyword values; a key it does not declare is refused with "did you mean"."""
    names = [f.name for f in dataclasses.fields(cls.Settings)]
    for key in values:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f" (its settings: {', '.join(names) or 'none'})"
            raise UserError(f"objective {cls.name} has no setting {key!r}{hint}")
    return cls.Settings(**values)


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
        super().__init__(inner.eps, inner.norm, inner.settings)
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

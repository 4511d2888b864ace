"""``smooth``: Gaussian noise augmentation, the base-classifier training of randomized smoothing.

J. Cohen, E. Rosenfeld, J. Z. Kolter, "Certified Adversarial Robustness via Randomized Smoothing", ICML 2019:
the base classifier f is trained with cross-entropy on x + N(0, σ² I) so that the smoothed classifier
g(x) = argmax_c P(f(x + ε) = c) is accurate and confident; certify g with :func:`robustprune.smoothing.certify`
at the same σ.

As in the reference code the noisy inputs are not clipped to [0, 1]. The full σ (``noise_sd``) is used in every
batch: the ε warm-up of ``fit`` (``set_eps_scale``) does not apply to the noise, and ``eps`` is accepted only for the
objective contract (it is unused). Set ``generator`` on the object to draw the noise from a seeded generator.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from robustprune.infra.errors import UserError
from robustprune.objectives.base import OBJECTIVES, Objective


@dataclass(frozen=True)
class SmoothSettings:
    noise_sd: float = 0.25  # σ of the Gaussian noise added to training inputs (Cohen et al. 2019)

    def __post_init__(self) -> None:
        if not self.noise_sd > 0:
            raise UserError(f"noise_sd must be > 0, got {self.noise_sd}")


@OBJECTIVES.register("smooth")
class SmoothTraining(Objective):
    name = "smooth"
    Settings = SmoothSettings

    def __init__(self, eps: float = 0.0, norm: str = "linf", settings: SmoothSettings | None = None) -> None:
        super().__init__(eps, norm, settings)
        self.generator: torch.Generator | None = None  # source of the noise; None = torch's global generator

    def noisy(self, x: torch.Tensor) -> torch.Tensor:
        """x + N(0, σ² I), not clipped (Cohen et al.)."""
        device = self.generator.device if self.generator is not None else x.device
        noise = torch.randn(x.shape, generator=self.generator, device=device, dtype=x.dtype).to(x.device)
        return x + self.noise_sd * noise

    def forward(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model(self.noisy(x))
        return F.cross_entropy(logits, y), logits

    def describe(self) -> dict:
        return {"name": self.name, "eps": self.eps, "noise_sd": self.noise_sd}

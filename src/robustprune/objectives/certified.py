"""``ibp`` and ``crown-ibp``: certified (verifiable) training on worst-case logits from sound bounds.

S. Gowal et al., "On the Effectiveness of Interval Bound Propagation for Training Verifiably Robust Models", 2018;
H. Zhang et al., "Towards Stable and Efficient Training of Verifiably Robust Neural Networks" (CROWN-IBP), ICLR 2020.

loss = κ · CE(z(x), y) + (1 − κ) · CE(ẑ, y), where ẑ_j = −m_j is built from lower bounds m_j of the margins
z_y − z_j over the L∞ ball ∩ [0, 1] (ẑ_y = 0): the logits of the worst case the bounds allow. For ``crown-ibp`` the
margin bound is β · CROWN-IBP + (1 − β) · IBP. κ and β follow the ε ramp (``ramps.interpolate``): with the ramp
factor t, κ = κ_start → κ_end and β = β_start → β_end; at t = 1 and β = 0 the CROWN pass is skipped.
Defaults follow the papers: κ 1 → 0.5 (Gowal et al.), β 1 → 0 (Zhang et al.); the ε ramp length and the clean
epochs before it are per-stage settings (``eps_warmup_epochs``, ``clean_epochs``).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from robustprune.bounds import margin_bounds, margin_lower_bounds
from robustprune.infra.errors import UserError
from robustprune.objectives.base import OBJECTIVES, Objective
from robustprune.objectives.ramps import interpolate


def worst_case_logits(margin_lower: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(B, classes) logits with 0 at the label and −m_j elsewhere, from margin lower bounds m (B, classes − 1)."""
    batch, others = margin_lower.shape
    logits = margin_lower.new_zeros(batch, others + 1)
    classes = torch.arange(others + 1, device=y.device).expand(batch, -1)
    return logits.masked_scatter(classes != y.unsqueeze(1), -margin_lower)


@dataclass(frozen=True)
class IBPSettings:
    kappa_start: float = 1.0  # weight of the clean loss at the start of the ε ramp ...
    kappa_end: float = 0.5  # ... and at its end (Gowal et al. 2018)

    def __post_init__(self) -> None:
        for key, value in dataclasses.asdict(self).items():
            if not 0 <= value <= 1:
                raise UserError(f"{key} must be in [0, 1], got {value}")


@dataclass(frozen=True)
class CrownIBPSettings(IBPSettings):
    beta_start: float = 1.0  # weight of the CROWN-IBP bound against IBP at the start of the ramp ...
    beta_end: float = 0.0  # ... and at its end (Zhang et al. 2020)


@OBJECTIVES.register("ibp")
class IBPTraining(Objective):
    name = "ibp"
    Settings = IBPSettings
    certified = True
    norms = ("linf",)  # the bounds' input set is the L∞ ball

    @property
    def kappa(self) -> float:
        return interpolate(self.kappa_start, self.kappa_end, self.eps_scale)

    def margin_bounds(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return margin_lower_bounds(model, x, y, self.current_eps, "ibp")

    def forward(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model(x)
        clean = F.cross_entropy(logits, y)
        kappa = self.kappa
        if self.current_eps <= 0 or kappa >= 1:
            return clean, logits
        robust = F.cross_entropy(worst_case_logits(self.margin_bounds(model, x, y), y), y)
        return kappa * clean + (1 - kappa) * robust, logits

    def describe(self) -> dict:
        return {"name": self.name, "eps": self.eps, "kappa": [self.kappa_start, self.kappa_end]}


@OBJECTIVES.register("crown-ibp")
class CrownIBPTraining(IBPTraining):
    name = "crown-ibp"
    Settings = CrownIBPSettings

    @property
    def beta(self) -> float:
        return interpolate(self.beta_start, self.beta_end, self.eps_scale)

    def margin_bounds(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        beta = self.beta
        if beta <= 0:
            return margin_lower_bounds(model, x, y, self.current_eps, "ibp")
        bounds = margin_bounds(model, x, y, self.current_eps, ("ibp", "crown-ibp"))
        return beta * bounds["crown-ibp"] + (1 - beta) * bounds["ibp"]

    def describe(self) -> dict:
        return {**super().describe(), "beta": [self.beta_start, self.beta_end]}

"""Schedules of objective hyper-parameters over training (ε warm-up now; κ and β ramps belong here too)."""
from __future__ import annotations


def linear_ramp(epoch: float, warmup_epochs: float) -> float:
    """Factor in [0, 1]: grows linearly from 0 at epoch 0 to 1 at ``warmup_epochs``, then stays 1.

    Robust training from scratch at full ε can collapse to a constant prediction (MNIST, ε = 0.3); ramping ε over
    the first epochs avoids it (Gowal et al. 2018; Zhang et al. 2020 use the same ramp for IBP / CROWN-IBP).
    """
    if warmup_epochs <= 0:
        return 1.0
    return min(max(epoch / warmup_epochs, 0.0), 1.0)

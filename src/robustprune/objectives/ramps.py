"""Ramps of objective hyper-parameters over training: the ε ramp and the κ / β mixing weights that follow it.

Certified training (Gowal et al. 2018, IBP; Zhang et al. 2020, CROWN-IBP) trains clean for a few epochs, then ramps
ε linearly to its target; κ (weight of the clean loss) and β (weight of the CROWN-IBP bound against the IBP bound)
move linearly with the same ramp. ``fit`` computes the ramp factor t ∈ [0, 1]; the objective maps it to ε, κ, β.
"""
from __future__ import annotations


def linear_ramp(epoch: float, warmup_epochs: float, start: float = 0.0) -> float:
    """Factor in [0, 1]: 0 until ``start``, then grows linearly to 1 over ``warmup_epochs``, then stays 1.

    Robust training from scratch at full ε can collapse to a constant prediction (MNIST, ε = 0.3); ramping ε over
    the first epochs avoids it (Gowal et al. 2018; Zhang et al. 2020 use the same ramp for IBP / CROWN-IBP).
    """
    if warmup_epochs <= 0:
        return 1.0 if epoch >= start else 0.0
    return min(max((epoch - start) / warmup_epochs, 0.0), 1.0)


def interpolate(start: float, end: float, t: float) -> float:
    """``start`` at t = 0, ``end`` at t = 1, linear in between (the κ and β schedules)."""
    return start + (end - start) * min(max(t, 0.0), 1.0)

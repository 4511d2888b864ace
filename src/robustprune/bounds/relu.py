"""The one nonlinear bound class: ReLU and its triangle relaxation (CROWN, Zhang et al. 2018).

For a pre-activation ``x ∈ [l, u]``:
- stable active (l ≥ 0): ``relu(x) = x``; stable inactive (u ≤ 0): ``relu(x) = 0`` — both exact;
- unstable (l < 0 < u): ``α x ≤ relu(x) ≤ u (x − l) / (u − l)``, with the adaptive lower slope α = 1 if u > −l else
  0 (the choice of CROWN and CROWN-IBP, which minimises the area of the relaxation).
For a lower bound of ``A · relu(x)``, positive coefficients take the lower line and negative ones the upper line.
"""
from __future__ import annotations

import torch
from torch import nn

from robustprune.bounds.ops import BOUND_OPS, BoundOp, Interval, dot, sum_rest
from robustprune.bounds.patches import Patches


def relaxation(lower: torch.Tensor, upper: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(lower slope, upper slope, upper intercept) of the ReLU over [lower, upper], elementwise."""
    active = lower >= 0
    unstable = (lower < 0) & (upper > 0)
    width = torch.where(unstable, upper - lower, torch.ones_like(upper))
    upper_slope = torch.where(unstable, upper / width, active.to(upper.dtype))
    upper_intercept = torch.where(unstable, -lower * upper / width, torch.zeros_like(upper))
    lower_slope = torch.where(unstable, (upper > -lower).to(upper.dtype), active.to(upper.dtype))
    return lower_slope, upper_slope, upper_intercept


@BOUND_OPS.register("ReLU")
class ReLUBound(BoundOp):
    """``nn.ReLU``, elementwise, any shape."""

    module_types = (nn.ReLU,)
    nonlinear = True
    alpha: torch.Tensor | None = None  # α-CROWN's lower slopes (B, S, *shape), set during its passes only

    def interval(self, x: Interval) -> Interval:
        return x[0].clamp(min=0), x[1].clamp(min=0)

    def backward(self, A: torch.Tensor, x: Interval):
        lower_slope, upper_slope, upper_intercept = relaxation(*x)
        if self.alpha is not None:
            return self._alpha_backward(A, x, lower_slope, upper_slope, upper_intercept)
        A_in, negative = _split_by_sign(A, lower_slope.unsqueeze(1), upper_slope.unsqueeze(1))
        return [A_in], dot(negative, upper_intercept)

    def _alpha_backward(self, A: torch.Tensor, x: Interval, lower_slope: torch.Tensor, upper_slope: torch.Tensor,
                        upper_intercept: torch.Tensor):
        """``backward`` with the unstable neurons' lower slopes taken from ``alpha`` (any value in [0, 1] is sound);
        out of place, so autograd reaches the slopes."""
        unstable = ((x[0] < 0) & (x[1] > 0)).unsqueeze(1)
        lower = torch.where(unstable, self.alpha.clamp(0, 1), lower_slope.unsqueeze(1))
        negative = A.clamp(max=0)
        return [A.clamp(min=0) * lower + negative * upper_slope.unsqueeze(1)], dot(negative, upper_intercept)

    def patch_backward(self, A: Patches, x: Interval):
        if self.alpha is not None:  # α-CROWN's passes are dense (the slopes are one per specification and neuron)
            raise NotImplementedError
        lower_slope, upper_slope, upper_intercept = A.gather(torch.cat(relaxation(*x), 1)).chunk(3, dim=2)
        values, negative = _split_by_sign(A.values, lower_slope, upper_slope)
        return [A.replace(values)], sum_rest(negative * upper_intercept)


def _split_by_sign(A: torch.Tensor, lower_slope: torch.Tensor, upper_slope: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(A⁺ · lower slope + A⁻ · upper slope, A⁻): positive coefficients take the lower line, negative ones the
    upper line. In place where autograd allows it (the lower slope is piecewise constant: it has no gradient)."""
    negative = A.clamp(max=0)
    return A.clamp(min=0).mul_(lower_slope).addcmul_(negative, upper_slope), negative

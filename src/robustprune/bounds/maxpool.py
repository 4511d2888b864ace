"""Max pooling over non-overlapping windows (kernel = stride, no padding), as in VGG.

Interval: exact (max is monotone). Linear relaxation, per window with bounds [l_i, u_i]:
- lower: ``max ≥ x_k`` for k = argmax_i l_i (true for any k; this one is tightest at the lower corner);
- upper: ``max = x_k`` when l_k ≥ u_i for every other i (that input is always the maximum), else ``max ≤ max_i u_i``.
Both are sound for every point of the box; the constant upper bound is loose but keeps the op simple.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from robustprune.bounds.ops import BOUND_OPS, BoundOp, Interval, pair


@BOUND_OPS.register("MaxPool2d")
class MaxPoolBound(BoundOp):
    """``nn.MaxPool2d`` or ``F.max_pool2d`` with kernel = stride, no padding, no dilation, floor mode."""

    module_types = (nn.MaxPool2d,)
    nonlinear = True

    def __init__(self, kernel_size, stride=None, padding=0, dilation=1, ceil_mode: bool = False) -> None:
        super().__init__()
        kernel = pair(kernel_size)
        stride = kernel if stride is None or stride == [] else pair(stride)
        if kernel != stride or pair(padding) != (0, 0) or pair(dilation) != (1, 1) or ceil_mode:
            raise ValueError("only non-overlapping max pooling (kernel = stride, no padding, dilation or ceil mode)")
        self.kernel = kernel

    @classmethod
    def from_module(cls, module: nn.MaxPool2d) -> MaxPoolBound:
        op = cls(module.kernel_size, module.stride, module.padding, module.dilation, module.ceil_mode)
        op.module = module
        return op

    def interval(self, x: Interval) -> Interval:
        return F.max_pool2d(x[0], self.kernel), F.max_pool2d(x[1], self.kernel)

    def backward(self, A: torch.Tensor, x: Interval):
        lower, upper = x
        best_lower, index = F.max_pool2d(lower, self.kernel, return_indices=True)
        max_upper = F.max_pool2d(upper, self.kernel)
        # upper bound of the other inputs of each window: mask the chosen one out of the upper map
        others = upper.flatten(2).scatter(2, index.flatten(2), float("-inf")).view_as(upper)
        dominant = best_lower >= F.max_pool2d(others, self.kernel)
        positive, negative = A.clamp(min=0), A.clamp(max=0)
        exact = positive + torch.where(dominant.unsqueeze(1), negative, torch.zeros_like(negative))
        constant = (torch.where(dominant.unsqueeze(1), torch.zeros_like(negative), negative) * max_upper.unsqueeze(1))
        batch, specs = A.shape[:2]
        spread = F.max_unpool2d(exact.reshape(batch * specs, *A.shape[2:]),
                                index.unsqueeze(1).expand(-1, specs, -1, -1, -1).reshape(batch * specs, *A.shape[2:]),
                                self.kernel, output_size=lower.shape[-2:])
        return [spread.view(batch, specs, *lower.shape[1:])], constant.flatten(2).sum(-1)

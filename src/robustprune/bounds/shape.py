"""Bound classes of the ops that re-index or join traced tensors: flatten, view/reshape, concatenation, addition.

All keep the batch dimension first and never mix samples. Flatten, reshape and concatenation only move coordinates
(every output coordinate is one input coordinate), so their intervals are exact and their backward steps are the
same re-indexing applied to the coefficients; they are not ``mixing``. The contract is the one of ``ops.py``.

``ReshapeBound`` and ``CatBound`` come from functional code (``x.view(x.size(0), -1)``, ``torch.cat``), never from a
module, and are not in ``BOUND_OPS`` (whose entries are each exercised by the sampling tests of
``tests/unit/test_bounds.py``); the graph builder makes them from the traced call (``functional.py``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from robustprune.bounds.ops import BOUND_OPS, BoundOp, Interval
from robustprune.infra.errors import UserError


@BOUND_OPS.register("Flatten")
class FlattenBound(BoundOp):
    """``nn.Flatten`` or ``torch.flatten(x, 1)``: every dimension after the batch one into one."""

    module_types = (nn.Flatten,)

    def __init__(self, start_dim: int = 1, end_dim: int = -1) -> None:
        super().__init__()
        if start_dim != 1 or end_dim != -1:
            raise ValueError("only Flatten(start_dim=1, end_dim=-1)")

    @classmethod
    def from_module(cls, module: nn.Flatten) -> FlattenBound:
        op = cls(module.start_dim, module.end_dim)
        op.module = module
        return op

    def interval(self, x: Interval) -> Interval:
        return x[0].flatten(1), x[1].flatten(1)

    def backward(self, A, x: Interval):
        return [A.reshape(*A.shape[:2], *x[0].shape[1:])], 0.0


@dataclass(frozen=True)
class InputSize:
    """A size in a reshape's target read from its input when bounded: ``x.size(dim)`` (dim 0: the batch)."""

    dim: int


@BOUND_OPS.register("Reshape")
class ReshapeBound(BoundOp):
    """``x.view(*sizes)``, ``x.reshape(*sizes)``, ``torch.reshape(x, sizes)`` to a shape whose first dimension is
    still the batch: a pure re-indexing (the interval is reshaped, the coefficients reshaped back).

    ``sizes``: numbers (−1 once at most) and :class:`InputSize` entries. A target whose first dimension is not the
    batch size when bounded (``x.view(-1, 7)`` on a map of another size) is refused: it would mix samples.
    """

    def __init__(self, sizes: Sequence[int | InputSize]) -> None:
        super().__init__()
        self.sizes = tuple(sizes)

    def _target(self, x: torch.Tensor) -> list[int]:
        return [x.shape[s.dim] if isinstance(s, InputSize) else s for s in self.sizes]

    def interval(self, x: Interval) -> Interval:
        lower = x[0].reshape(self._target(x[0]))
        if lower.dim() == 0 or lower.shape[0] != x[0].shape[0]:
            raise UserError(f"cannot bound node {self.name!r}: it reshapes {tuple(x[0].shape)} to "
                            f"{tuple(lower.shape)}, which does not keep the batch as the first dimension")
        return lower, x[1].reshape(lower.shape)

    def backward(self, A: torch.Tensor, x: Interval):
        return [A.reshape(*A.shape[:2], *x[0].shape[1:])], 0.0


@BOUND_OPS.register("Cat")
class CatBound(BoundOp):
    """``torch.cat(inputs, dim)`` along a dimension after the batch one, of any number of inputs: the interval is
    the inputs' intervals concatenated, the backward step splits ``A`` back into one slice per input."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim

    def _dim(self, x: torch.Tensor) -> int:
        dim = self.dim + x.dim() if self.dim < 0 else self.dim
        if not 0 < dim < x.dim():
            raise UserError(f"cannot bound node {self.name!r}: it concatenates {x.dim()}-d tensors along dimension "
                            f"{self.dim} (only along a dimension after the batch one)")
        return dim

    def interval(self, *inputs: Interval) -> Interval:
        dim = self._dim(inputs[0][0])
        return torch.cat([x[0] for x in inputs], dim), torch.cat([x[1] for x in inputs], dim)

    def backward(self, A: torch.Tensor, *inputs: Interval):
        dim = self._dim(inputs[0][0])
        return list(A.split([x[0].shape[dim] for x in inputs], dim=dim + 1)), 0.0


@BOUND_OPS.register("Add")
class AddBound(BoundOp):
    """The sum of two traced tensors of one shape (``a + b``, ``torch.add``): the join of a residual block.

    Counted as mixing: the interval of a sum of two separately bounded paths is not exact even when both are affine.
    """

    mixing = True

    def interval(self, x: Interval, y: Interval) -> Interval:
        if x[0].shape != y[0].shape:
            raise UserError(f"cannot bound node {self.name!r}: it adds tensors of shapes {tuple(x[0].shape)} and "
                            f"{tuple(y[0].shape)} (only sums of equal shapes, no broadcasting)")
        return x[0] + y[0], x[1] + y[1]

    def backward(self, A, x=None, y=None):
        return [A, A], 0.0

    patch_backward = backward

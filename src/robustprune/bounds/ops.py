"""Bound classes of the linear layers, one per layer type, registered in ``BOUND_OPS``.

Contract of every bound class (auto_LiRPA's, kept small). Intervals are pairs ``(lower, upper)`` of tensors of the
layer's shape ``(B, *shape)``; linear coefficients ``A`` have shape ``(B, S, *out_shape)`` — S linear functions of the
layer's output per sample, whose *lower* bounds are wanted (an upper bound is the negated lower bound of −A).

- ``interval(*inputs) -> (lower, upper)``: a sound elementwise enclosure of the output over the input intervals (IBP).
- ``backward(A, *input_intervals) -> ([A_in per input], bias)``: coefficients on the inputs and a ``(B, S)`` constant
  with ``A · out ≥ Σ A_in · in + bias`` for every input inside its interval (CROWN's backward step). Linear layers
  make this an equality; only ReLU (``relu.py``) relaxes.
- ``mixing``: whether the op mixes coordinates (Linear, Conv, pooling). A chain from the input with at most one mixing
  op and no ReLU is affine *per coordinate of a box*, so its interval is already exact and CROWN is skipped there.

Weights are read from the module at call time (``module.weight`` is the masked weight of a pruned layer) and cast to
the dtype of the bounds, so verification can run in float64 on a float32 model without copying it. A functional call
(``F.linear(x, self.weight, self.bias)``, ``F.conv2d``) is bounded by the same class, its ``module`` a stand-in with
the layer's attributes that reads the tensors from the model at call time (``functional.FunctionalLayer``). Bound
classes are built from a module by ``from_module``, from a function's arguments by their constructors.
"""
from __future__ import annotations

import math
from functools import partial
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from robustprune.infra.errors import UserError
from robustprune.bounds.patches import Patches
from robustprune.models.base import Normalize
from robustprune.registry import Registry

Interval = tuple[torch.Tensor, torch.Tensor]


class BoundOp:
    """Bounds of one layer; subclasses name the module types they cover in ``module_types``."""

    module_types: tuple[type, ...] = ()
    mixing = False
    nonlinear = False

    def __init__(self, module: nn.Module | None = None) -> None:
        self.module = module
        self.name = ""  # the layer's name in the model, for error messages (set by the graph builder)

    @classmethod
    def from_module(cls, module: nn.Module) -> BoundOp:
        """The bound op of one of ``module_types`` (ValueError for settings it cannot bound)."""
        return cls(module)

    def interval(self, *inputs: Interval) -> Interval:
        raise NotImplementedError

    def backward(self, A: torch.Tensor, *inputs: Interval) -> tuple[list[torch.Tensor], torch.Tensor | float]:
        raise NotImplementedError

    def unit_backward(self, positions: torch.Tensor, x: Interval) -> tuple[torch.Tensor, torch.Tensor]:
        """``backward`` of unit specifications: output coordinate ``positions[b, s]`` (flat index) per row.

        The first backward step of every intermediate bound; mixing ops gather weight rows instead of pushing a
        mostly-zero tensor through their transpose. Returns (A_in (B, S, *in_shape), bias (B, S)).
        """
        raise NotImplementedError

    def unit_patches(self, positions: torch.Tensor, x: Interval) -> tuple[Patches, torch.Tensor]:
        """``unit_backward`` as :class:`Patches` on the input map (convolutions: the rows are weight windows)."""
        raise NotImplementedError

    def patch_backward(self, A: Patches, *inputs: Interval) -> tuple[list[Patches], torch.Tensor | float]:
        """``backward`` of coefficients kept as :class:`Patches`; ops that would spread them beyond a window (or
        have no such form) raise NotImplementedError and get dense coefficients instead."""
        raise NotImplementedError


BOUND_OPS: Registry[type[BoundOp]] = Registry("bound op")

#: Largest matrix (elements) a convolution builds to move coefficient windows back through itself in one product.
WINDOW_MATRIX_ELEMENTS = 2 ** 22


def center_radius(bounds: Interval) -> tuple[torch.Tensor, torch.Tensor]:
    lower, upper = bounds
    return (upper + lower) / 2, (upper - lower) / 2


def _param(module: nn.Module, name: str, like: torch.Tensor) -> torch.Tensor | None:
    value = getattr(module, name)
    return None if value is None else value.to(like.dtype)


def sum_rest(t: torch.Tensor) -> torch.Tensor:
    """Sum over every dimension after the first two: (B, S, ...) → (B, S)."""
    return t.flatten(2).sum(-1)


def _output_padding(in_size, out_size, kernel, stride, padding, dilation) -> list[int]:
    """``output_padding`` that makes a transposed convolution give back the input's exact size (floor mode drops
    rows and columns that the forward convolution never read)."""
    return [i - ((o - 1) * s - 2 * p + d * (k - 1) + 1)
            for i, o, k, s, p, d in zip(in_size, out_size, kernel, stride, padding, dilation)]


def conv_out(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    """Output size of a convolution (floor mode)."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def dot(A: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Σ A[b, s, ...] · v[b, ...] → (B, S), as one batched matrix product (no (B, S, ...) temporary)."""
    return (A.flatten(2) @ v.reshape(v.shape[0], -1, 1).expand(A.shape[0], -1, 1)).squeeze(-1)


@BOUND_OPS.register("Linear")
class LinearBound(BoundOp):
    """``y = x Wᵀ + b``, x (B, in) → y (B, out); ``W`` is the masked weight of a pruned layer."""

    module_types = (nn.Linear,)
    mixing = True

    def interval(self, x: Interval) -> Interval:
        center, radius = center_radius(x)
        weight = _param(self.module, "weight", center)
        mid = F.linear(center, weight, _param(self.module, "bias", center))
        rad = F.linear(radius, weight.abs())
        return mid - rad, mid + rad

    def backward(self, A: torch.Tensor, x: Interval | None = None):
        weight = _param(self.module, "weight", A)
        bias = _param(self.module, "bias", A)
        return [A @ weight], (0.0 if bias is None else A @ bias)

    def unit_backward(self, positions: torch.Tensor, x: Interval):
        weight = _param(self.module, "weight", x[0])
        bias = _param(self.module, "bias", x[0])
        return weight[positions], (torch.zeros_like(positions, dtype=x[0].dtype) if bias is None else bias[positions])


@BOUND_OPS.register("Conv2d")
class Conv2dBound(BoundOp):
    """2-D convolution with zero padding, x (B, C, H, W) → y (B, C', H', W'); backward is the transposed conv.

    ``module``: an ``nn.Conv2d`` or a stand-in with its ``weight``, ``bias``, ``stride``, ``padding``, ``dilation``,
    ``groups`` and ``padding_mode`` (the kernel size is the weight's).
    """

    module_types = (nn.Conv2d,)
    mixing = True

    def __init__(self, module: nn.Conv2d) -> None:
        super().__init__(module)
        if module.padding_mode != "zeros" or isinstance(module.padding, str):
            raise ValueError("only zero padding given as numbers")

    def _conv(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        m = self.module
        return F.conv2d(x, weight, bias, m.stride, m.padding, m.dilation, m.groups)

    def interval(self, x: Interval) -> Interval:
        center, radius = center_radius(x)
        weight = _param(self.module, "weight", center)
        mid = self._conv(center, weight, _param(self.module, "bias", center))
        rad = self._conv(radius, weight.abs(), None)
        return mid - rad, mid + rad

    def backward(self, A: torch.Tensor, x: Interval):
        """The transposed convolution. Where the columns (C_in·kh·kw) are no wider than the output channels — a first
        layer on 1-channel images — a matrix product plus ``fold`` (col2im) is 2× faster on CPU than
        ``conv_transpose2d``; elsewhere ``conv_transpose2d`` is (measured in docs/benchmarks.md)."""
        m = self.module
        batch, specs, channels, height, width = A.shape
        in_h, in_w = x[0].shape[-2:]
        weight = _param(m, "weight", A)
        flat = A.reshape(batch * specs, channels, height * width)
        if m.groups == 1 and weight[0].numel() <= channels:
            columns = weight.flatten(1).t() @ flat  # (N, C_in·kh·kw, H'·W')
            A_in = F.fold(columns, (in_h, in_w), weight.shape[-2:], m.dilation, m.padding, m.stride)
        else:
            out_pad = _output_padding((in_h, in_w), (height, width), weight.shape[-2:], m.stride, m.padding,
                                      m.dilation)
            A_in = F.conv_transpose2d(flat.view(-1, channels, height, width), weight, None, m.stride, m.padding,
                                      out_pad, m.groups, m.dilation)
        bias = _param(m, "bias", A)
        const = 0.0 if bias is None else (A.sum((-2, -1)) @ bias)
        return [A_in.view(batch, specs, *A_in.shape[1:])], const

    def patch_backward(self, A: Patches, x: Interval):
        """The transposed convolution of each window: a window of the input map, ``stride`` times the size."""
        m = self.module
        batch, specs = A.pixel.shape
        weight = _param(m, "weight", A.values)
        transpose = partial(F.conv_transpose2d, weight=weight, stride=m.stride, groups=m.groups, dilation=m.dilation)
        (kh, kw), (sh, sw), (dh, dw), (rows, cols) = A.kernel, m.stride, m.dilation, weight.shape[-2:]
        window = A.values.shape[2:]
        image = weight.shape[1] * m.groups * ((kh - 1) * sh + dh * (rows - 1) + 1) \
            * ((kw - 1) * sw + dw * (cols - 1) + 1)
        if math.prod(window) * image <= WINDOW_MATRIX_ELEMENTS:
            # the transposed convolution of one window is a fixed matrix (its image of the unit windows): one
            # matrix product for all windows is far faster than conv_transpose2d on many tiny images
            units = torch.eye(math.prod(window), dtype=weight.dtype, device=weight.device).view(-1, *window)
            images = transpose(units)
            values = (A.values.reshape(batch * specs, -1) @ images.flatten(1)).view(-1, *images.shape[1:])
        else:
            values = transpose(A.values.flatten(0, 1))
        stride = tuple(a * s for a, s in zip(A.stride, m.stride))
        padding = tuple(a * s + p for a, s, p in zip(A.padding, m.stride, m.padding))
        bias = _param(m, "bias", A.values)
        const = 0.0 if bias is None else A.values.sum((-2, -1)) @ bias
        moved = A.replace(values.view(batch, specs, *values.shape[1:]), stride, padding)
        return [moved.masked(*x[0].shape[-2:])], const

    def unit_patches(self, positions: torch.Tensor, x: Interval):
        """The (dilated) weight of output channel c on the window that output pixel (i, j) reads."""
        m = self.module
        weight = _param(m, "weight", x[0])
        if m.groups != 1:
            raise NotImplementedError
        in_h, in_w = x[0].shape[-2:]
        (kh, kw), (dh, dw) = weight.shape[-2:], m.dilation
        out_h, out_w = (conv_out(i, k, s, p, d) for i, k, s, p, d in
                        zip((in_h, in_w), (kh, kw), m.stride, m.padding, m.dilation))
        if (dh, dw) != (1, 1):
            dilated = weight.new_zeros(*weight.shape[:2], dh * (kh - 1) + 1, dw * (kw - 1) + 1)
            dilated[..., ::dh, ::dw] = weight
            weight = dilated
        channel = positions // (out_h * out_w)
        windows = Patches(weight[channel], positions % (out_h * out_w), (out_h, out_w), m.stride, m.padding)
        bias = _param(m, "bias", x[0])
        return windows.masked(in_h, in_w), (torch.zeros_like(positions, dtype=x[0].dtype) if bias is None
                                            else bias[channel])

    def unit_backward(self, positions: torch.Tensor, x: Interval):
        windows, bias = self.unit_patches(positions, x)
        return windows.dense(x[0].shape[1:]), bias


class ElementwiseAffine(BoundOp):
    """``y = a ⊙ x + b`` with per-channel ``a`` (any sign) and ``b``, broadcast over (B, C, ...)."""

    def coefficients(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def interval(self, x: Interval) -> Interval:
        center, radius = center_radius(x)
        a, b = self.coefficients(center)
        a, b = _channel_view(a, center), _channel_view(b, center)
        mid, rad = center * a + b, radius * a.abs()
        return mid - rad, mid + rad

    def backward(self, A: torch.Tensor, x: Interval | None = None):
        a, b = (_channel_view(v, A[:, 0]).unsqueeze(1) for v in self.coefficients(A))
        return [A * a], sum_rest(A * b)

    def patch_backward(self, A: Patches, x: Interval | None = None):
        (values,), bias = self.backward(A.values)  # per channel: the same on a window as on the map
        return [A.replace(values)], bias


def _channel_view(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-channel vector shaped to broadcast against (B, C, *spatial)."""
    return v.reshape(1, -1, *([1] * (like.dim() - 2)))


@BOUND_OPS.register("Normalize")
class NormalizeBound(ElementwiseAffine):
    """robustprune's input normalisation ``(x − mean) / std`` (exact: an elementwise affine map)."""

    module_types = (Normalize,)

    def coefficients(self, like):
        mean, std = self.module.mean.to(like.dtype).flatten(), self.module.std.to(like.dtype).flatten()
        return 1 / std, -mean / std


@BOUND_OPS.register("BatchNorm2d")
class BatchNormBound(ElementwiseAffine):
    """Batch norm with its running statistics (eval mode): ``γ (x − μ) / √(σ² + ϵ) + β``, per channel.

    The network is bounded as it predicts at test time; a model in training mode is bounded with the same running
    statistics (certified-training objectives use this as an approximation while the statistics settle).
    """

    module_types = (nn.BatchNorm1d, nn.BatchNorm2d)

    def __init__(self, module: nn.Module) -> None:
        super().__init__(module)
        if module.running_mean is None or module.running_var is None:
            raise ValueError("batch norm without running statistics (track_running_stats=False) has no fixed "
                             "test-time function to bound")

    def coefficients(self, like):
        m = self.module
        mean, var = m.running_mean.to(like.dtype), m.running_var.to(like.dtype)
        scale = torch.rsqrt(var + m.eps)
        if m.weight is not None:
            scale = scale * m.weight.to(like.dtype)
        shift = -mean * scale
        if m.bias is not None:
            shift = shift + m.bias.to(like.dtype)
        return scale, shift


@BOUND_OPS.register("Identity")
class IdentityBound(BoundOp):
    """Identity and Dropout (the identity at test time)."""

    module_types = (nn.Identity, nn.Dropout)

    def interval(self, x: Interval) -> Interval:
        return x

    def backward(self, A, x=None):
        return [A], 0.0

    patch_backward = backward


def pair(value: int | Sequence[int]) -> tuple[int, int]:
    """A 2-D size or step as ``(rows, columns)``, from one number or a sequence of one or two."""
    values = tuple(value) if isinstance(value, (tuple, list)) else (value, value)
    return (values[0], values[0]) if len(values) == 1 else values


@BOUND_OPS.register("AvgPool2d")
class AvgPoolBound(BoundOp):
    """Average pooling: ``AvgPool2d`` / ``F.avg_pool2d`` with zero-padding counted, or ``AdaptiveAvgPool2d`` /
    ``F.adaptive_avg_pool2d`` (given ``output_size``) on sizes it divides evenly (then a uniform pooling)."""

    module_types = (nn.AvgPool2d, nn.AdaptiveAvgPool2d)
    mixing = True

    def __init__(self, kernel_size=None, stride=None, padding=0, *, output_size=None, ceil_mode: bool = False,
                 count_include_pad: bool = True, divisor_override: int | None = None, kind: str = "AvgPool2d"):
        super().__init__()
        if ceil_mode or not count_include_pad or divisor_override:
            raise ValueError(f"only {kind} with ceil_mode=False, count_include_pad=True and no divisor_override")
        self.kind = kind  # the layer type or function, for error messages
        self.output_size = None if output_size is None else pair(output_size)
        if output_size is None:
            self.kernel = pair(kernel_size)
            self.stride = pair(stride) if stride is not None and stride != [] else self.kernel
            self.padding = pair(padding)

    @classmethod
    def from_module(cls, module: nn.Module) -> AvgPoolBound:
        if isinstance(module, nn.AdaptiveAvgPool2d):
            op = cls(output_size=module.output_size, kind=type(module).__name__)
        else:
            op = cls(module.kernel_size, module.stride, module.padding, ceil_mode=module.ceil_mode,
                     count_include_pad=module.count_include_pad, divisor_override=module.divisor_override,
                     kind=type(module).__name__)
        op.module = module
        return op

    def _geometry(self, size: Sequence[int]) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
        if self.output_size is None:
            return self.kernel, self.stride, self.padding
        out = [s if o is None else o for o, s in zip(self.output_size, size)]
        if any(s % o for s, o in zip(size, out)):
            raise UserError(f"cannot bound layer {self.name!r} ({self.kind}): from {tuple(size)} to "
                            f"{tuple(out)} it is not a uniform pooling")
        kernel = tuple(s // o for s, o in zip(size, out))
        return kernel, kernel, (0, 0)

    def interval(self, x: Interval) -> Interval:
        kernel, stride, padding = self._geometry(x[0].shape[-2:])
        return tuple(F.avg_pool2d(t, kernel, stride, padding) for t in x)

    def backward(self, A: torch.Tensor, x: Interval):
        batch, specs, channels, height, width = A.shape
        in_h, in_w = x[0].shape[-2:]
        kernel, stride, padding = self._geometry((in_h, in_w))
        weight = A.new_full((channels, 1, *kernel), 1.0 / (kernel[0] * kernel[1]))
        out_pad = _output_padding((in_h, in_w), (height, width), kernel, stride, padding, (1, 1))
        A_in = F.conv_transpose2d(A.reshape(batch * specs, channels, height, width), weight, None, stride, padding,
                                  out_pad, groups=channels)
        return [A_in.view(batch, specs, *A_in.shape[1:])], 0.0

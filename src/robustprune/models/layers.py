"""``InputConv2d``: the first convolution of a network, with a faster input gradient on CPU.

Attacks differentiate the loss with respect to the image, so every attack step needs the input gradient of the
network's first convolution; training never does. On CPU, oneDNN's backward-data kernel is slow when the layer has
few input channels (1 for MNIST, 3 for CIFAR): at batch 128 PyTorch's own GEMM + col2im kernel
(``slow_conv_transpose2d``) is 2.6× faster for MNIST ``cnn-small``'s first layer and 3× for a 3→64 3×3 stem
(``benchmarks/conv_input_grad.py``, docs/benchmarks.md). With 16 or more input channels oneDNN is the faster one,
so only image-input layers use this class.

Everything else is ``nn.Conv2d`` bit for bit: the forward pass, the weight and bias gradients (the same kernels,
still skipped by autograd when no one asks for them), the state dict, ``isinstance`` checks. Only the input gradient
is computed by a different kernel, so it differs from oneDNN's in float rounding (about 1e-7 relative). Inputs that do
not require grad, GPU tensors, mixed precision (autocast), grouped convolutions and string paddings take the plain
``nn.Conv2d`` path. Second derivatives through this layer are not supported (no robustprune objective uses
them) and raise an error rather than give a wrong value.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

#: Up to this many input channels the GEMM + col2im input gradient is the faster kernel on CPU (measured).
NATIVE_INPUT_GRAD_MAX_CHANNELS = 3


class _AttachInputGradient(torch.autograd.Function):
    """Returns the convolution output itself; its backward gives the input's gradient through the direct kernel.

    The output ``y`` was computed from the detached input, so autograd's own convolution node carries the weight and
    bias gradients (and is pruned by the engine when they are not wanted); this node adds the input's branch.
    """

    @staticmethod
    def forward(ctx: Any, y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, geometry: tuple) -> torch.Tensor:
        ctx.save_for_backward(weight)
        ctx.geometry = geometry
        ctx.input_size = x.shape[-2:]
        ctx.mark_dirty(y)  # y's history is rebased onto this node, no copy and no view (in-place ReLUs stay legal)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        grad_x = None
        if ctx.needs_input_grad[1]:
            (weight,) = ctx.saved_tensors
            stride, padding, dilation = ctx.geometry
            kernel = weight.shape[-2:]
            output_padding = [
                ctx.input_size[i] - ((grad.shape[-2 + i] - 1) * stride[i] - 2 * padding[i]
                                     + dilation[i] * (kernel[i] - 1) + 1)
                for i in range(2)
            ]
            grad_x = torch.ops.aten.slow_conv_transpose2d(
                grad.contiguous(), weight, list(kernel), None, list(stride), list(padding), output_padding,
                list(dilation))
        return grad, grad_x, None, None


class InputConv2d(nn.Conv2d):
    """``nn.Conv2d`` for the image-input layer; see the module docstring."""

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if not (input.requires_grad and torch.is_grad_enabled() and input.device.type == "cpu"
                and input.dtype in (torch.float32, torch.float64) and not torch.is_autocast_enabled("cpu")
                and self.groups == 1 and not isinstance(self.padding, str)
                and self.in_channels <= NATIVE_INPUT_GRAD_MAX_CHANNELS):
            return super()._conv_forward(input, weight, bias)
        padding = self.padding
        if self.padding_mode != "zeros":
            input = F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = (0, 0)
        y = F.conv2d(input.detach(), weight, bias, self.stride, padding, self.dilation)
        return _AttachInputGradient.apply(y, input, weight.detach(), (self.stride, padding, self.dilation))

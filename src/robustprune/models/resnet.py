"""ResNet-18 in its CIFAR form (3×3 stem, no max-pool), and the residual block shared with Wide ResNet.

K. He, X. Zhang, S. Ren, J. Sun, "Deep Residual Learning for Image Recognition", CVPR 2016; CIFAR variant as in
kuangliu/pytorch-cifar and most adversarial-robustness papers (Madry et al. 2018, Rice et al. 2020, HYDRA).
Stem Conv3×3(64)+BN+ReLU; four stages of two BasicBlocks, widths 64/128/256/512, strides 1/2/2/2; a 1×1 conv+BN
shortcut where the shape changes; AdaptiveAvgPool2d(1) → Flatten → Linear(512, classes). Convs have no bias.
Initialisation: Kaiming-normal fan-out convs, BatchNorm (1, 0), PyTorch-default Linear (as torchvision).
"""
from __future__ import annotations

import torch
from torch import nn

from robustprune.models.base import MODELS
from robustprune.models.base import kaiming_init_
from robustprune.models.layers import InputConv2d


class ResidualBlock(nn.Module):
    """``post(residual(x) + shortcut(x))``: the only non-sequential op of our models, kept explicit for bounds.

    ``residual`` is an ``nn.Sequential`` of standard layers; ``shortcut`` an ``nn.Sequential`` (1×1 conv, maybe BN)
    or ``nn.Identity``; ``post`` a stateless ``nn.ReLU`` (ResNet) or ``nn.Identity`` (pre-activation Wide ResNet).
    Shapes: x (B, C_in, H, W) → (B, C_out, H', W'); both branches must produce the same shape.
    """

    def __init__(self, residual: nn.Sequential, shortcut: nn.Module, post: nn.Module) -> None:
        super().__init__()
        self.residual = residual
        self.shortcut = shortcut
        self.post = post

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.post(self.residual(x) + self.shortcut(x))


def basic_block(in_channels: int, out_channels: int, stride: int) -> ResidualBlock:
    """He et al.'s BasicBlock: Conv3×3-BN-ReLU-Conv3×3-BN plus shortcut, then ReLU."""
    residual = nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(),
        nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
    )
    shortcut: nn.Module = nn.Identity()
    if stride != 1 or in_channels != out_channels:
        shortcut = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
        )
    return ResidualBlock(residual, shortcut, nn.ReLU())


@MODELS.register("resnet18")
def resnet18(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """CIFAR ResNet-18 (≈11.2 M parameters); works for any input with H, W ≥ 1."""
    channels = input_shape[0]
    layers: list[nn.Module] = [InputConv2d(channels, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU()]
    in_channels = 64
    for width, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
        layers += [basic_block(in_channels, width, stride), basic_block(width, width, 1)]
        in_channels = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, num_classes)]
    return kaiming_init_(nn.Sequential(*layers))

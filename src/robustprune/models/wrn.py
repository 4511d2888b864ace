"""Wide ResNet 28-4 with pre-activation blocks (BN-ReLU-Conv).

S. Zagoruyko, N. Komodakis, "Wide Residual Networks", BMVC 2016; the WRN-28 family of adversarial training papers
(Madry et al. 2018, Zhang et al. 2019 TRADES, Sehwag et al. 2020 HYDRA). Depth 28 → n = 4 blocks per group,
widen factor 4 → widths 16 (stem), 64, 128, 256, group strides 1/2/2; final BN-ReLU, AdaptiveAvgPool2d(1),
Flatten, Linear. No dropout. Convs have no bias.

Where a block changes shape, the reference code applies the 1×1 shortcut conv to the *pre-activated* input
relu(bn(x)). We express that exactly by placing that block's BN-ReLU just before it in the Sequential, so every block
is the plain ``ResidualBlock``: residual(x) + shortcut(x) (see :mod:`robustprune.models.resnet`).
Initialisation: Kaiming-normal fan-out convs, BatchNorm (1, 0), PyTorch-default Linear.
"""
from __future__ import annotations

from torch import nn

from robustprune.models.base import MODELS
from robustprune.models.base import kaiming_init_
from robustprune.models.layers import InputConv2d
from robustprune.models.resnet import ResidualBlock


def _conv3x3(in_channels: int, out_channels: int, stride: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


def preact_block(in_channels: int, out_channels: int, stride: int) -> list[nn.Module]:
    """One pre-activation block as a list of modules: [BN, ReLU, ResidualBlock] or [ResidualBlock]."""
    tail = [nn.BatchNorm2d(out_channels), nn.ReLU(), _conv3x3(out_channels, out_channels, 1)]
    if stride == 1 and in_channels == out_channels:
        residual = nn.Sequential(nn.BatchNorm2d(in_channels), nn.ReLU(), _conv3x3(in_channels, out_channels, 1), *tail)
        return [ResidualBlock(residual, nn.Identity(), nn.Identity())]
    residual = nn.Sequential(_conv3x3(in_channels, out_channels, stride), *tail)
    shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False))
    return [nn.BatchNorm2d(in_channels), nn.ReLU(), ResidualBlock(residual, shortcut, nn.Identity())]


def wide_resnet(input_shape: tuple[int, ...], num_classes: int, depth: int, widen: int) -> nn.Sequential:
    """WRN-depth-widen: a 16-channel stem, three groups of (depth − 4) / 6 blocks, BN-ReLU-pool-linear head."""
    blocks_per_group = (depth - 4) // 6
    layers: list[nn.Module] = [InputConv2d(input_shape[0], 16, 3, padding=1, bias=False)]
    in_channels = 16
    for width, stride in [(16 * widen, 1), (32 * widen, 2), (64 * widen, 2)]:
        for index in range(blocks_per_group):
            layers += preact_block(in_channels, width, stride if index == 0 else 1)
            in_channels = width
    layers += [nn.BatchNorm2d(in_channels), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    layers.append(nn.Linear(in_channels, num_classes))
    return kaiming_init_(nn.Sequential(*layers))


@MODELS.register("wrn-28-4")
def wrn_28_4(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """WRN-28-4 (≈5.9 M parameters); works for any input with H, W ≥ 1."""
    return wide_resnet(input_shape, num_classes, depth=28, widen=4)

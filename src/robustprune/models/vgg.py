"""VGG-16 with batch normalisation, in the CIFAR form used by robust-pruning work (HYDRA, ATMC, Sehwag et al.).

K. Simonyan, A. Zisserman, "Very Deep Convolutional Networks for Large-Scale Image Recognition", ICLR 2015.
Features: configuration D (64,64,M,128,128,M,256×3,M,512×3,M,512×3,M), each number a Conv3×3(pad 1)+BN+ReLU.
A max-pool is only inserted while both spatial sizes are ≥ 2, so small inputs (8×8 digits) never shrink to 0.
Head (our choice): Flatten → Linear(512·h·w, 512) → ReLU → Linear(512, classes), where h×w is the final feature
map (1×1 for 8×8, 28×28 and 32×32 inputs). Convolutions have no bias (the BatchNorm's shift replaces it).
Initialisation: Kaiming-normal fan-out convs, BatchNorm (1, 0), PyTorch-default Linear layers.
"""
from __future__ import annotations

from torch import nn

from robustprune.models.base import MODELS
from robustprune.models.base import kaiming_init_
from robustprune.models.layers import InputConv2d

#: Configuration "D" of Simonyan & Zisserman: channel counts, "M" for a 2×2 max-pool.
VGG16: list[int | str] = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
HIDDEN = 512


@MODELS.register("vgg16-bn")
def vgg16_bn(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """VGG-16-BN features plus a 512-unit hidden layer; works for any input with H, W ≥ 1."""
    channels, height, width = input_shape
    layers: list[nn.Module] = []
    for item in VGG16:
        if item == "M":
            if height >= 2 and width >= 2:  # skip pools that would shrink a 1-pixel map to nothing
                layers.append(nn.MaxPool2d(2))
                height, width = height // 2, width // 2
            continue
        out_channels = int(item)
        conv = InputConv2d if not layers else nn.Conv2d  # the image-input layer gets the fast input gradient
        layers += [conv(channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels), nn.ReLU()]
        channels = out_channels
    head = [nn.Flatten(), nn.Linear(channels * height * width, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, num_classes)]
    return kaiming_init_(nn.Sequential(*layers, *head))

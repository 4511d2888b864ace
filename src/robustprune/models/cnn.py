"""The "small" and "large" convolutional networks of Wong & Kolter.

E. Wong, J. Z. Kolter, "Provable defenses against adversarial examples via the convex outer adversarial polytope",
ICML 2018; E. Wong, F. Schmidt, J. H. Metzen, J. Z. Kolter, "Scaling provable adversarial defenses", NeurIPS 2018.
These are the standard benchmarks of certified training (IBP, CROWN-IBP) and of robust pruning.

- ``cnn-small``: Conv(C,16,4,s2,p1) ReLU Conv(16,32,4,s2,p1) ReLU Flatten Linear(→100) ReLU Linear(100,classes).
- ``cnn-large``: Conv(C,32,3,s1,p1) ReLU Conv(32,32,4,s2,p1) ReLU Conv(32,64,3,s1,p1) ReLU Conv(64,64,4,s2,p1) ReLU
  Flatten Linear(→512) ReLU Linear(512,512) ReLU Linear(512,classes).

The flatten size follows the actual input (28×28 → 7×7, 32×32 → 8×8, 8×8 → 2×2); inputs need H, W ≥ 4.
Initialisation: conv weights N(0, 2/(k·k·out)) and zero bias (Kaiming fan-out), as in Wong et al.'s reference code
for its CIFAR models; Linear layers keep PyTorch defaults.
"""
from __future__ import annotations

from torch import nn

from robustprune.infra.errors import UserError
from robustprune.models.base import MODELS, kaiming_init_
from robustprune.models.layers import InputConv2d


def conv_out_size(size: int, kernel: int, stride: int, padding: int) -> int:
    """Spatial output size of a convolution (floor arithmetic, as ``nn.Conv2d``)."""
    return (size + 2 * padding - kernel) // stride + 1


def _conv_stack(input_shape: tuple[int, ...], specs: list[tuple[int, int, int, int]]) -> tuple[list[nn.Module], int]:
    """Conv+ReLU layers for ``specs`` of (out_channels, kernel, stride, padding); returns them and the flat size."""
    channels, height, width = input_shape
    layers: list[nn.Module] = []
    for out_channels, kernel, stride, padding in specs:
        conv = InputConv2d if not layers else nn.Conv2d  # the image-input layer gets the fast input gradient
        layers += [conv(channels, out_channels, kernel, stride=stride, padding=padding), nn.ReLU()]
        channels = out_channels
        height = conv_out_size(height, kernel, stride, padding)
        width = conv_out_size(width, kernel, stride, padding)
    if height < 1 or width < 1:
        raise UserError(f"input of shape {tuple(input_shape)} is too small for this network (need H, W >= 4)")
    return layers, channels * height * width


@MODELS.register("cnn-small")
def cnn_small(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Wong & Kolter's small network: two stride-2 convolutions and one hidden layer of 100 units."""
    convs, flat = _conv_stack(input_shape, [(16, 4, 2, 1), (32, 4, 2, 1)])
    head = [nn.Flatten(), nn.Linear(flat, 100), nn.ReLU(), nn.Linear(100, num_classes)]
    return kaiming_init_(nn.Sequential(*convs, *head))


@MODELS.register("cnn-large")
def cnn_large(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Wong et al.'s large network: four convolutions (two stride-2) and two hidden layers of 512 units."""
    convs, flat = _conv_stack(input_shape, [(32, 3, 1, 1), (32, 4, 2, 1), (64, 3, 1, 1), (64, 4, 2, 1)])
    head = [nn.Flatten(), nn.Linear(flat, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, num_classes)]
    return kaiming_init_(nn.Sequential(*convs, *head))

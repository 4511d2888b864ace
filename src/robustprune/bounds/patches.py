"""Patches: linear coefficients that are zero outside one small window of a feature map (auto_LiRPA's "patches mode").

The bound of one neuron of a convolution's output depends only on its receptive field: on the convolution's input
a k×k window, two convolutions back a larger one, and so on. Full CROWN needs such a bound for every unstable neuron
of every convolution, and dense coefficients ``(B, S, C, H, W)`` spend almost all their time on zeros. A
:class:`Patches` keeps only ``(B, S, C, kh, kw)`` values plus where each window sits: the window of specification
``(b, s)`` is window ``pixel[b, s]`` of the grid that ``F.unfold(map, (kh, kw), stride, padding)`` walks (row-major,
``grid`` windows per column and per row). Convolutions, ReLUs and per-channel affine maps act on the patch alone;
any other layer, or a window grown as large as its map, turns it back into a dense tensor (:meth:`Patches.dense`).

Invariant: values at window cells outside the map (the padding) are zero; the bound classes that can move a window
outside the map (convolutions) mask it again with :meth:`Patches.masked`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Patches:
    values: torch.Tensor  # (B, S, C, kh, kw)
    pixel: torch.Tensor  # (B, S) long: which window of the grid, row-major
    grid: tuple[int, int]  # windows per column, per row
    stride: tuple[int, int]
    padding: tuple[int, int]  # rows / columns of the window grid above / left of the map

    @property
    def kernel(self) -> tuple[int, int]:
        return tuple(self.values.shape[-2:])

    def replace(self, values: torch.Tensor, stride: tuple[int, int] | None = None,
                padding: tuple[int, int] | None = None) -> Patches:
        return Patches(values, self.pixel, self.grid, stride or self.stride, padding or self.padding)

    def worth_keeping(self, shape: torch.Size) -> bool:
        """Whether the window is still smaller than the (C, H, W) map it lies on."""
        return len(shape) == 3 and self.kernel[0] * self.kernel[1] < shape[1] * shape[2]

    def _layout(self, height: int, width: int) -> tuple[tuple[int, int, int, int], int]:
        """F.pad amounts that put every window of the grid inside the padded map, and windows per unfold row."""
        (gh, gw), (kh, kw), (sh, sw), (ph, pw) = self.grid, self.kernel, self.stride, self.padding
        bottom = max(0, (gh - 1) * sh + kh - ph - height)
        right = max(0, (gw - 1) * sw + kw - pw - width)
        return (pw, right, ph, bottom), (pw + width + right - kw) // sw + 1

    def _window(self, windows_per_row: int) -> torch.Tensor:
        """(B, S) index of each specification's window among the windows ``F.unfold`` walks."""
        grid_w = self.grid[1]
        return (self.pixel // grid_w) * windows_per_row + self.pixel % grid_w

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """The values of a (B, C, H, W) map in every window, (B, S, C, kh, kw); zero outside the map."""
        pads, per_row = self._layout(*t.shape[-2:])
        columns = F.unfold(F.pad(t, pads), self.kernel, stride=self.stride).transpose(1, 2)  # (B, L, C·kh·kw)
        batch, windows = columns.shape[:2]
        rows = self._window(per_row) + windows * torch.arange(batch, device=t.device).unsqueeze(1)
        picked = columns.reshape(batch * windows, -1).index_select(0, rows.flatten())
        return picked.view(self.values.shape[:2] + (t.shape[1],) + self.kernel)

    def masked(self, height: int, width: int) -> Patches:
        """The same patches with the cells outside an H×W map zeroed."""
        (kh, kw), (sh, sw), (ph, pw), grid_w = self.kernel, self.stride, self.padding, self.grid[1]
        device = self.pixel.device
        rows = ((self.pixel // grid_w) * sh - ph).unsqueeze(-1) + torch.arange(kh, device=device)
        cols = ((self.pixel % grid_w) * sw - pw).unsqueeze(-1) + torch.arange(kw, device=device)
        inside = (((rows >= 0) & (rows < height)).unsqueeze(-1) & ((cols >= 0) & (cols < width)).unsqueeze(-2))
        return self.replace(self.values * inside.unsqueeze(2).to(self.values.dtype))

    def dense(self, shape: torch.Size) -> torch.Tensor:
        """The coefficients as a dense (B, S, C, H, W) tensor on a map of ``shape`` (C, H, W) (the transpose of
        :meth:`gather`): each window scattered into a zero padded map, the padding then cut off."""
        channels, height, width = shape
        batch, specs = self.pixel.shape
        (left, right, top, bottom), _ = self._layout(height, width)
        padded_w = left + width + right
        (kh, kw), (sh, sw), grid_w = self.kernel, self.stride, self.grid[1]
        device = self.pixel.device
        corner = (self.pixel // grid_w) * sh * padded_w + (self.pixel % grid_w) * sw
        cells = (torch.arange(kh, device=device).view(-1, 1) * padded_w + torch.arange(kw, device=device)).flatten()
        index = (corner.unsqueeze(-1) + cells).unsqueeze(2).expand(-1, -1, channels, -1)
        padded = self.values.new_zeros(batch, specs, channels, (top + height + bottom) * padded_w)
        padded.scatter_(3, index, self.values.flatten(3))
        return padded.view(batch, specs, channels, -1, padded_w)[..., top:top + height, left:left + width]

    def negated_too(self) -> Patches:
        """The patches followed by their negations (2S specifications: lower then upper bounds)."""
        return Patches(torch.cat([self.values, -self.values], 1), torch.cat([self.pixel, self.pixel], 1),
                       self.grid, self.stride, self.padding)


def add(a: torch.Tensor | Patches, b: torch.Tensor | Patches, shape: torch.Size) -> torch.Tensor | Patches:
    """Sum of two coefficient sets on the same map of ``shape`` (C, H, W): a patch if both share their windows."""
    if isinstance(a, Patches) and isinstance(b, Patches) and a.kernel == b.kernel and a.stride == b.stride \
            and a.padding == b.padding and a.grid == b.grid and torch.equal(a.pixel, b.pixel):
        return a.replace(a.values + b.values)
    return to_dense(a, shape) + to_dense(b, shape)


def to_dense(A: torch.Tensor | Patches, shape: torch.Size) -> torch.Tensor:
    return A.dense(shape) if isinstance(A, Patches) else A

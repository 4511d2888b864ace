"""Patches (window-local coefficients, ``robustprune.bounds.patches``) agree exactly with dense coefficients: the
representation's own algebra, every bound class's ``patch_backward`` against its dense ``backward``, and full CROWN
bounds computed with and without patches on networks with convolutions, padding, strides, dilation, groups, batch
norm, pooling and residual blocks."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from robustprune.bounds import build_graph
from robustprune.bounds.ops import Conv2dBound, conv_out
from robustprune.bounds.patches import Patches, add
from robustprune.bounds.propagate import crown_bounds, input_box
from robustprune.models import create_model

from tests.unit.test_bounds import NETWORKS, OP_CASES, _bound_op, make_network

pytestmark = pytest.mark.usefixtures("one_thread")

GEOMETRIES = [  # (map C, H, W), kernel, stride, padding: windows of a convolution reading the map
    ((2, 6, 6), (3, 3), (2, 2), (1, 1)),
    ((1, 7, 5), (4, 2), (1, 2), (2, 0)),
    ((3, 5, 5), (10, 10), (4, 4), (3, 3)),  # windows larger than the map
    ((2, 4, 6), (1, 1), (1, 1), (0, 0)),
]


def random_patches(shape, kernel, stride, padding, batch=2, specs=5, seed=0) -> Patches:
    torch.manual_seed(seed)
    channels, height, width = shape
    grid = (conv_out(height, kernel[0], stride[0], padding[0], 1), conv_out(width, kernel[1], stride[1], padding[1], 1))
    grid = (max(grid[0], 1), max(grid[1], 1))
    pixel = torch.randint(0, grid[0] * grid[1], (batch, specs))
    values = torch.randn(batch, specs, channels, *kernel, dtype=torch.float64)
    return Patches(values, pixel, grid, stride, padding).masked(height, width)


@pytest.mark.parametrize("shape, kernel, stride, padding", GEOMETRIES)
def test_gather_is_the_transpose_of_dense(shape, kernel, stride, padding):
    """Σ values · gather(t) = dense · t for any map t: the two views of the same linear functions."""
    patches = random_patches(shape, kernel, stride, padding)
    t = torch.randn(2, *shape, dtype=torch.float64)
    via_windows = (patches.values * patches.gather(t)).flatten(2).sum(-1)
    via_dense = torch.einsum("bschw,bchw->bs", patches.dense(torch.Size(shape)), t)
    assert torch.allclose(via_windows, via_dense, atol=1e-12)


@pytest.mark.parametrize("shape, kernel, stride, padding", GEOMETRIES)
def test_windows_hold_the_right_cells_and_nothing_outside_the_map(shape, kernel, stride, padding):
    patches = random_patches(shape, kernel, stride, padding)
    channels, height, width = shape
    coordinates = torch.arange(height * width, dtype=torch.float64).view(1, 1, height, width) + 1
    cells = patches.gather(coordinates.expand(2, channels, -1, -1))  # flat position + 1, 0 outside the map
    grid_w = patches.grid[1]
    for b in range(2):
        for s in range(patches.pixel.shape[1]):
            top = int(patches.pixel[b, s]) // grid_w * stride[0] - padding[0]
            left = int(patches.pixel[b, s]) % grid_w * stride[1] - padding[1]
            for i in range(kernel[0]):
                for j in range(kernel[1]):
                    r, c = top + i, left + j
                    expected = r * width + c + 1 if 0 <= r < height and 0 <= c < width else 0
                    assert cells[b, s, 0, i, j] == expected
                    if expected == 0:
                        assert torch.all(patches.values[b, s, :, i, j] == 0), "masked() left a value outside"


def test_adding_patches_keeps_windows_when_they_match_and_densifies_otherwise():
    shape = torch.Size((2, 6, 6))
    a = random_patches(shape, (3, 3), (2, 2), (1, 1), seed=1)
    b = a.replace(torch.randn_like(a.values)).masked(6, 6)
    same = add(a, b, shape)
    assert isinstance(same, Patches) and torch.allclose(same.dense(shape), a.dense(shape) + b.dense(shape))
    other = random_patches(shape, (3, 3), (2, 2), (1, 1), seed=2)
    mixed = add(a, other, shape)
    assert isinstance(mixed, torch.Tensor) and torch.allclose(mixed, a.dense(shape) + other.dense(shape))
    assert torch.allclose(add(a, other.dense(shape), shape), mixed)


PATCH_OPS = ["conv2d", "conv2d-rect-dilated", "conv2d-groups", "normalize", "batchnorm2d", "identity", "dropout",
             "relu"]


@pytest.mark.parametrize("name", PATCH_OPS)
def test_patch_backward_equals_dense_backward(name):
    torch.manual_seed(0)
    factory, shape = OP_CASES[name]
    module = factory().double().eval()
    op = _bound_op(module)
    center = torch.randn(2, *shape, dtype=torch.float64)
    box = (center - 0.6, center + 0.6)  # unstable ReLUs included
    out_shape = op.interval(box)[0].shape[1:]
    patches = random_patches(out_shape, (2, 2), (1, 1), (1, 0), specs=7)
    (moved,), bias = op.patch_backward(patches, box)
    (dense,), dense_bias = op.backward(patches.dense(out_shape), box)
    assert torch.allclose(moved.dense(torch.Size(shape)), dense, atol=1e-12)
    assert torch.allclose(torch.as_tensor(bias, dtype=dense.dtype).expand(2, 7),
                          torch.as_tensor(dense_bias, dtype=dense.dtype).expand(2, 7), atol=1e-12)


def test_conv_patch_backward_uses_the_window_matrix_and_the_transposed_convolution_alike(monkeypatch):
    import robustprune.bounds.ops as ops
    op = _bound_op(nn.Conv2d(3, 4, 3, stride=2, padding=1).double())
    box = (torch.zeros(2, 3, 8, 8, dtype=torch.float64), torch.ones(2, 3, 8, 8, dtype=torch.float64))
    patches = random_patches((4, 4, 4), (2, 2), (1, 1), (0, 0))
    (by_matrix,), _ = op.patch_backward(patches, box)
    monkeypatch.setattr(ops, "WINDOW_MATRIX_ELEMENTS", 0)
    (by_transpose,), _ = op.patch_backward(patches, box)
    assert torch.allclose(by_matrix.values, by_transpose.values, atol=1e-12)


def _both_ways(graph, box, monkeypatch):
    """Full CROWN bounds of every node with patches, then with convolutions refusing them (dense coefficients)."""
    def refuse(self, positions, x):
        raise NotImplementedError

    with torch.no_grad():
        with_patches = crown_bounds(graph, box, "crown")
        monkeypatch.setattr(Conv2dBound, "unit_patches", refuse)
        return with_patches, crown_bounds(graph, box, "crown")


CONV_NETWORKS = [name for name in NETWORKS if "conv" in name or name in (
    "normalize", "batchnorm", "avgpool", "maxpool", "residual-identity-shortcut", "residual-first")]


@pytest.mark.parametrize("name", CONV_NETWORKS)
def test_crown_bounds_are_the_same_with_and_without_patches(name, monkeypatch):
    model, x = make_network(name)
    graph = build_graph(model)
    with_patches, dense = _both_ways(graph, input_box(x, 0.1), monkeypatch)
    for index in with_patches:
        for got, want in zip(with_patches[index], dense[index]):
            assert torch.allclose(got, want, atol=1e-10), f"{name}: node {graph.nodes[index].name} differs"


@pytest.mark.parametrize("model_name, shape", [("cnn-small", (1, 28, 28)), ("cnn-large", (3, 12, 12))])
def test_registered_cnns_get_the_same_crown_bounds_with_and_without_patches(model_name, shape, monkeypatch):
    torch.manual_seed(0)
    model = create_model(model_name, shape, 10).double().eval()
    x = torch.rand(2, *shape, dtype=torch.float64)
    graph = build_graph(model)
    with_patches, dense = _both_ways(graph, input_box(x, 0.02), monkeypatch)
    assert torch.allclose(with_patches[graph.output][0], dense[graph.output][0], atol=1e-9)
    assert torch.allclose(with_patches[graph.output][1], dense[graph.output][1], atol=1e-9)

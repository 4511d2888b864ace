"""Soundness of the bounds in ``robustprune.bounds`` by sampling: every point of the ε-ball ∩ [0, 1] — uniform
samples, corners, the center, points clipped to the domain, PGD's points — has logits (and margins, and
intermediate values) inside the computed bounds. Plus eps = 0 exactness, masks, tightness ordering, verify(),
unsupported layers and differentiability. Everything runs in float64 with a 1e-9 tolerance.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robustprune.attacks import pgd
from robustprune.bounds import (BOUND_OPS, VERIFIERS, build_graph, compute_bounds, margin_lower_bounds, margin_spec,
                                verify)
from robustprune.bounds.propagate import crown_bounds, input_box, interval_pass
from robustprune.infra.errors import UserError
from robustprune.models import create_model
from robustprune.models.base import Normalize
from robustprune.models.resnet import ResidualBlock
from robustprune.pruning import prune

METHODS = ("ibp", "crown-ibp", "crown")
TOL = 1e-9



pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------------------------------------- helpers

def _random_bn(bn: nn.modules.batchnorm._BatchNorm) -> nn.Module:
    """Random running statistics and a random affine map (negative scales included)."""
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn_like(bn.running_mean) * 0.5)
        bn.running_var.copy_(torch.rand_like(bn.running_var) * 1.5 + 0.2)
        if bn.weight is not None:
            bn.weight.copy_(torch.randn_like(bn.weight))
            bn.bias.copy_(torch.randn_like(bn.bias) * 0.3)
    return bn


def _randomise_bns(model: nn.Module) -> nn.Module:
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            _random_bn(module)
    return model


def _net_linear():
    return (2, 4, 4), nn.Sequential(nn.Flatten(), nn.Linear(32, 12), nn.ReLU(), nn.Linear(12, 10), nn.ReLU(),
                                    nn.Linear(10, 4))


def _net_conv2d():
    # stride 2 + padding on an even map (transposed conv needs output_padding), a rectangular kernel/stride,
    # dilation and groups
    return (2, 6, 6), nn.Sequential(
        nn.Conv2d(2, 4, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(4, 4, (3, 2), stride=(1, 2), padding=(2, 1)), nn.ReLU(),
        nn.Conv2d(4, 4, (2, 1), dilation=(2, 1), groups=2, bias=False), nn.ReLU(),  # 5×2 → 3×2
        nn.Conv2d(4, 4, 2, dilation=(2, 1), padding=(1, 0)), nn.ReLU(),  # 3×2 → 3×1
        nn.Flatten(), nn.Linear(4 * 3 * 1, 4))


def _net_conv2d_odd():
    return (1, 7, 7), nn.Sequential(nn.Conv2d(1, 3, 3, stride=2, padding=1), nn.ReLU(),
                                    nn.Conv2d(3, 3, 3, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(3, 4))


def _net_normalize():
    return (2, 4, 4), nn.Sequential(Normalize([0.3, 0.6], [0.2, 0.5]), nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(),
                                    nn.Flatten(), nn.Linear(48, 8), nn.ReLU(), nn.Linear(8, 4))


def _net_batchnorm():
    return (2, 5, 5), _randomise_bns(nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 4, 3, stride=2, bias=False), nn.BatchNorm2d(4, affine=False), nn.ReLU(),
        nn.Flatten(), nn.Linear(16, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 4)))


def _net_flatten():
    return (2, 4, 4), nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Flatten(), nn.Linear(12, 6),
                                    nn.ReLU(), nn.Linear(6, 4))


def _net_identity():
    return (1, 5, 5), nn.Sequential(nn.Identity(), nn.Conv2d(1, 3, 3), nn.Identity(), nn.ReLU(), nn.Flatten(),
                                    nn.Linear(27, 6), nn.ReLU(), nn.Identity(), nn.Linear(6, 4))


def _net_dropout():
    return (1, 5, 5), nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Dropout(0.5), nn.Flatten(),
                                    nn.Linear(27, 6), nn.ReLU(), nn.Dropout(0.3), nn.Linear(6, 4))


def _net_avgpool():
    return (2, 6, 6), nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.AvgPool2d(3, stride=2, padding=1),  # 6 → 3 (output_padding)
        nn.Conv2d(3, 3, 2), nn.ReLU(), nn.AvgPool2d(2),  # 2 → 1
        nn.Flatten(), nn.Linear(3, 4))


def _net_avgpool_odd():
    # 7 → 4 (no output_padding), then 3 → 1 (the last row/column is dropped by the floor)
    return (1, 7, 7), nn.Sequential(nn.AvgPool2d(3, stride=2, padding=1), nn.Conv2d(1, 4, 2), nn.AvgPool2d(2),
                                    nn.ReLU(), nn.Flatten(), nn.Linear(4, 4))


def _net_adaptive_avgpool():
    return (2, 6, 6), nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d((3, None)),
                                    nn.Conv2d(4, 4, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                    nn.Linear(4, 4))


def _net_maxpool():
    return (2, 6, 6), nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.MaxPool2d(2), nn.ReLU(),
                                    nn.Conv2d(4, 4, 2), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4, 4))


def _net_maxpool_odd():
    # a 7×7 map floors to 3×3 windows (last row/column dropped); the pool reads the raw input first
    return (1, 7, 7), nn.Sequential(nn.MaxPool2d(2, stride=2), nn.Conv2d(1, 3, 2), nn.ReLU(), nn.MaxPool2d(1),
                                    nn.Flatten(), nn.Linear(12, 4))


def _net_relu():
    # ends in a ReLU: the last op is nonlinear
    return (1, 3, 3), nn.Sequential(nn.Flatten(), nn.Linear(9, 10), nn.ReLU(), nn.Linear(10, 10), nn.ReLU(),
                                    nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 4), nn.ReLU())


def _net_residual_conv_shortcut():
    block = ResidualBlock(
        nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                      nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)),
        nn.Sequential(nn.Conv2d(3, 4, 1, stride=2, bias=False), nn.BatchNorm2d(4)),
        nn.ReLU())
    return (2, 6, 6), _randomise_bns(nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), block, nn.Flatten(),
                                                   nn.Linear(36, 4)))


def _net_residual_identity_shortcut():
    def block():
        return ResidualBlock(nn.Sequential(nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 3, 3, padding=1)),
                             nn.Identity(), nn.Identity())
    return (2, 4, 4), _randomise_bns(nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), block(), block(),
                                                   nn.ReLU(), nn.Flatten(), nn.Linear(48, 4)))


def _net_residual_first():
    # a residual block reading the input directly (the Add joins two affine branches before any ReLU)
    block = ResidualBlock(nn.Sequential(nn.Conv2d(2, 2, 3, padding=1)), nn.Identity(), nn.ReLU())
    return (2, 4, 4), nn.Sequential(block, nn.Flatten(), nn.Linear(32, 6), nn.ReLU(), nn.Linear(6, 4))


class _ViewCat(nn.Module):
    """A written-out forward (traced by torch.fx): a view, a reshape and a concatenation skip."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.a, self.b, self.head = nn.Linear(48, 6), nn.Linear(32, 5), nn.Linear(11, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x)).view(x.size(0), -1)
        skip = self.b(x.reshape(x.size(0), -1))
        return self.head(torch.relu(torch.cat([self.a(h), skip], dim=1)))


def _net_view_cat():
    return (2, 4, 4), _ViewCat()


NETWORKS = {
    "view-cat": _net_view_cat,
    "linear": _net_linear, "conv2d": _net_conv2d, "conv2d-odd": _net_conv2d_odd, "normalize": _net_normalize,
    "batchnorm": _net_batchnorm, "flatten": _net_flatten, "identity": _net_identity, "dropout": _net_dropout,
    "avgpool": _net_avgpool, "avgpool-odd": _net_avgpool_odd, "adaptive-avgpool": _net_adaptive_avgpool,
    "maxpool": _net_maxpool, "maxpool-odd": _net_maxpool_odd, "relu": _net_relu,
    "residual-conv-shortcut": _net_residual_conv_shortcut,
    "residual-identity-shortcut": _net_residual_identity_shortcut,
    "residual-first": _net_residual_first,
}


def make_network(name: str, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    """A float64 eval-mode network and a batch of 2 inputs in [0, 1] (with some pixels at exactly 0 and 1)."""
    torch.manual_seed(seed)
    shape, model = NETWORKS[name]()
    model = model.double().eval()
    x = torch.rand(2, *shape, dtype=torch.float64)
    x.view(2, -1)[:, 0] = 0.0
    x.view(2, -1)[:, 1] = 1.0
    x.view(2, -1)[:, 2] = 0.02
    return model, x


def ball_points(x: torch.Tensor, eps: float, n_uniform: int = 150, n_corners: int = 150) -> torch.Tensor:
    """(N, B, *shape) points of the ball ∩ [0, 1]: the center, uniform samples in the box, uniform samples of the
    ball clipped to [0, 1], random corners (sign vectors), and corners of the unclipped ball clipped to [0, 1]."""
    low, high = input_box(x, eps)
    n = x.shape
    uniform = low + (high - low) * torch.rand(n_uniform, *n, dtype=x.dtype)
    clipped = (x + eps * (2 * torch.rand(n_uniform, *n, dtype=x.dtype) - 1)).clamp(0, 1)
    signs = torch.randint(0, 2, (n_corners, *n)).to(x.dtype)
    corners = low + (high - low) * signs
    ball_corners = (x + eps * (2 * signs - 1)).clamp(0, 1)
    return torch.cat([x.unsqueeze(0), uniform, clipped, corners, ball_corners])


def outputs_at(model: nn.Module, points: torch.Tensor) -> torch.Tensor:
    """Model outputs (N, B, K) at points (N, B, *shape)."""
    with torch.no_grad():
        out = model(points.flatten(0, 1))
    return out.view(*points.shape[:2], -1)


def assert_inside(values: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor, what: str) -> None:
    """values (N, B, ...) inside [lower, upper] (B, ...) up to TOL."""
    below = (lower.unsqueeze(0) - values).max().item()
    above = (values - upper.unsqueeze(0)).max().item()
    assert below <= TOL and above <= TOL, f"{what}: a point lies outside the bounds by {max(below, above):.3g}"


def margins_of(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """z_y − z_j for j ≠ y in increasing j, logits (..., B, K) → (..., B, K − 1)."""
    spec = margin_spec(y, logits.shape[-1], logits.dtype)  # (B, K-1, K)
    return torch.einsum("bsk,...bk->...bs", spec, logits)


def logit_extreme_attack(model: nn.Module, x: torch.Tensor, eps: float, steps: int = 15) -> torch.Tensor:
    """Projected sign-gradient steps pushing each logit up and down, from the center and from a random point:
    (4K, B, *shape) points (all objectives run as one batch)."""
    low, high = input_box(x, eps)
    with torch.no_grad():
        classes = model(x).shape[1]
    objectives = torch.cat([torch.eye(classes), -torch.eye(classes)]).to(x.dtype)  # (2K, K)
    starts = torch.cat([x.expand(2 * classes, *x.shape),
                        low + (high - low) * torch.rand(2 * classes, *x.shape, dtype=x.dtype)])
    weights = torch.cat([objectives, objectives]).unsqueeze(1)  # (4K, 1, K)
    point = starts.clone()
    for _ in range(steps):
        point.requires_grad_(True)
        out = model(point.flatten(0, 1)).view(*point.shape[:2], classes)
        (grad,) = torch.autograd.grad((weights * out).sum(), point)
        point = torch.min(torch.max(point.detach() + 0.5 * eps * grad.sign(), low), high)
    return point.detach()


def ce_attack_points(model: nn.Module, x: torch.Tensor, eps: float) -> torch.Tensor:
    """robustprune's PGD (cross-entropy, 2 restarts) aimed at every label: (K, B, *shape) points."""
    with torch.no_grad():
        classes = model(x).shape[1]
    return torch.stack([pgd(model, x, torch.full((len(x),), k), eps, steps=10, restarts=2) for k in range(classes)])


# ------------------------------------------------------------------------------------- 0. the contract of each op

def _bound_op(module: nn.Module):
    graph = build_graph(nn.Sequential(module))
    return graph.nodes[1].op


OP_CASES = {
    "linear": (lambda: nn.Linear(6, 5), (6,)),
    "linear-no-bias": (lambda: nn.Linear(6, 5, bias=False), (6,)),
    "conv2d": (lambda: nn.Conv2d(2, 3, 3, stride=2, padding=1), (2, 6, 6)),
    "conv2d-rect-dilated": (lambda: nn.Conv2d(2, 3, (3, 2), stride=(1, 2), padding=(2, 1), dilation=(1, 2)),
                            (2, 5, 7)),
    "conv2d-groups": (lambda: nn.Conv2d(4, 4, 2, groups=2, bias=False), (4, 3, 3)),
    "normalize": (lambda: Normalize([0.3, 0.6], [0.2, 0.5]), (2, 3, 3)),
    "batchnorm2d": (lambda: _random_bn(nn.BatchNorm2d(3)), (3, 3, 3)),
    "batchnorm1d": (lambda: _random_bn(nn.BatchNorm1d(5)), (5,)),
    "identity": (nn.Identity, (2, 3, 3)),
    "dropout": (lambda: nn.Dropout(0.5), (2, 3, 3)),
    "flatten": (nn.Flatten, (2, 3, 3)),
    "avgpool": (lambda: nn.AvgPool2d(3, stride=2, padding=1), (2, 6, 6)),
    "adaptive-avgpool": (lambda: nn.AdaptiveAvgPool2d(2), (2, 6, 6)),
    "maxpool": (lambda: nn.MaxPool2d(2), (2, 5, 5)),
    "relu": (nn.ReLU, (3, 4, 4)),
}


def _box_points(low: torch.Tensor, high: torch.Tensor, n: int = 300) -> torch.Tensor:
    """(N, *box shape) points: uniform samples and random corners of the box."""
    u = torch.rand(n, *low.shape, dtype=low.dtype)
    corners = torch.randint(0, 2, (n, *low.shape)).to(low.dtype)
    return torch.cat([low + (high - low) * u, low + (high - low) * corners, low.unsqueeze(0), high.unsqueeze(0)])


@pytest.mark.parametrize("name", OP_CASES)
def test_bound_op_contract(name):
    """interval encloses the layer's outputs; backward gives A·out ≥ A_in·in + bias at every point of the box;
    unit_backward (where implemented) equals backward with one-hot rows."""
    torch.manual_seed(0)
    factory, shape = OP_CASES[name]
    module = factory().double().eval()
    op = _bound_op(module)
    center = torch.randn(2, *shape, dtype=torch.float64) * 0.5
    radius = torch.rand(2, *shape, dtype=torch.float64) * 0.4
    radius.view(-1)[:3] = 0.0  # some degenerate coordinates
    if name == "maxpool":  # radius 0.25: the window's largest input dominates iff it leads the others by ≥ 0.5
        radius = torch.full_like(radius, 0.25)
        for (row, col), gap in zip([(0, 0), (0, 2), (2, 0)], [0.501, 0.499, 0.5]):  # dominant, not by a hair, tie
            center[:, :, row:row + 2, col:col + 2] = torch.tensor([[1.0, 1.0 - gap], [0.0, -0.5]])
    box = (center - radius, center + radius)
    points = _box_points(*box)  # (N, 2, *shape)
    with torch.no_grad():
        out = module(points.flatten(0, 1)).view(points.shape[0], 2, -1)
    low, high = op.interval(box)
    assert_inside(out, low.flatten(1), high.flatten(1), f"{name} interval")
    A = torch.randn(2, 4, *low.shape[1:], dtype=torch.float64)
    (A_in,), bias = op.backward(A, box)
    relaxed = torch.einsum("bsi,nbi->nbs", A_in.flatten(2), points.flatten(2)) + bias
    true = torch.einsum("bso,nbo->nbs", A.flatten(2), out)
    gap = (relaxed - true).max().item()
    assert gap <= TOL, f"{name}: backward's linear lower bound exceeds A·out by {gap:.3g} at a point of the box"
    try:
        positions = torch.tensor([[0, 3, low[0].numel() - 1], [1, 1, 2]])
        unit_A, unit_bias = op.unit_backward(positions, box)
    except NotImplementedError:
        return
    onehot = torch.zeros(2, 3, low[0].numel(), dtype=torch.float64).scatter_(2, positions.unsqueeze(2), 1.0)
    (ref_A,), ref_bias = op.backward(onehot.view(2, 3, *low.shape[1:]), box)
    assert torch.allclose(unit_A, ref_A, atol=1e-12), f"{name}: unit_backward's coefficients differ from backward's"
    assert torch.allclose(unit_bias, torch.as_tensor(ref_bias, dtype=unit_bias.dtype).expand_as(unit_bias),
                          atol=1e-12), f"{name}: unit_backward's bias differs from backward's"


def test_add_op_contract():
    op = build_graph(nn.Sequential(ResidualBlock(nn.Sequential(nn.Identity()), nn.Identity(), nn.Identity()))) \
        .nodes[3].op
    torch.manual_seed(0)
    boxes = [(c - r, c + r) for c, r in ((torch.randn(2, 6, dtype=torch.float64), torch.rand(2, 6, dtype=torch.float64))
                                         for _ in range(2))]
    low, high = op.interval(*boxes)
    assert torch.equal(low, boxes[0][0] + boxes[1][0]) and torch.equal(high, boxes[0][1] + boxes[1][1])
    A = torch.randn(2, 3, 6, dtype=torch.float64)
    (A_x, A_y), bias = op.backward(A, *boxes)
    assert torch.equal(A_x, A) and torch.equal(A_y, A) and float(torch.as_tensor(bias).abs().max()) == 0


# ----------------------------------------------------------------------------------------------- 1. sampling soundness

def test_every_bound_op_type_is_exercised():
    """The parametrised networks below cover every registered bound class (and both residual shortcut kinds)."""
    used = set()
    for name in NETWORKS:
        model, _ = make_network(name)
        used |= {type(node.op).__name__ for node in build_graph(model).nodes[1:]}
    expected = {BOUND_OPS.get(entry).__name__ for entry in BOUND_OPS.names()}
    assert expected <= used, f"bound classes without a sampling test: {expected - used}"


@pytest.mark.parametrize("name", NETWORKS)
def test_bounds_contain_outputs_at_sampled_and_attacked_points(name):
    model, x = make_network(name)
    eps = 0.08
    y = torch.tensor([0, 3])
    torch.manual_seed(1)
    points = torch.cat([ball_points(x, eps), logit_extreme_attack(model, x, eps), ce_attack_points(model, x, eps)])
    low, high = input_box(x, eps)
    assert torch.all(points >= low - 1e-12) and torch.all(points <= high + 1e-12), "test bug: point outside the ball"
    logits = outputs_at(model, points)
    margins = margins_of(logits, y)
    for method in METHODS:
        lb, ub = compute_bounds(model, x, eps, method)
        assert lb.shape == ub.shape == logits.shape[1:]
        assert (ub - lb).max() > 0, f"{method}: bounds should be non-trivial for eps > 0"
        assert_inside(logits, lb, ub, f"{name}/{method} logits")
        margin_lb = margin_lower_bounds(model, x, y, eps, method)
        assert margin_lb.shape == (2, logits.shape[-1] - 1)
        assert_inside(margins, margin_lb, torch.full_like(margin_lb, float("inf")), f"{name}/{method} margins")


@pytest.mark.parametrize("name", NETWORKS)
def test_alpha_crown_contains_the_outputs_and_is_never_looser_than_crown(name):
    """α-CROWN on every bound class: sampled and attacked outputs inside its bounds, which lie inside CROWN's."""
    model, x = make_network(name)
    eps, y = 0.08, torch.tensor([0, 3])
    torch.manual_seed(1)
    points = torch.cat([ball_points(x, eps), logit_extreme_attack(model, x, eps), ce_attack_points(model, x, eps)])
    logits = outputs_at(model, points)
    lb, ub = compute_bounds(model, x, eps, "alpha-crown")
    crown_lb, crown_ub = compute_bounds(model, x, eps, "crown")
    assert_inside(logits, lb, ub, f"{name}/alpha-crown logits")
    assert torch.all(lb >= crown_lb - 1e-12) and torch.all(ub <= crown_ub + 1e-12)
    margin_lb = margin_lower_bounds(model, x, y, eps, "alpha-crown")
    assert_inside(margins_of(logits, y), margin_lb, torch.full_like(margin_lb, float("inf")), f"{name} margins")
    assert torch.all(margin_lb >= margin_lower_bounds(model, x, y, eps, "crown") - 1e-12)


@pytest.mark.parametrize("name", ["linear", "conv2d", "batchnorm", "maxpool", "avgpool",
                                  "residual-conv-shortcut", "residual-identity-shortcut", "residual-first"])
@pytest.mark.parametrize("intermediate", ["ibp", "crown"])
def test_intermediate_bounds_contain_every_node_value(name, intermediate):
    """Every node's interval (IBP or CROWN-tightened pre-activations) contains its value at sampled points."""
    model, x = make_network(name)
    eps = 0.1
    graph = build_graph(model)
    bounds = crown_bounds(graph, input_box(x, eps), intermediate)
    points = ball_points(x, eps, 100, 100).flatten(0, 1)
    values = interval_pass(graph, (points, points))  # point intervals: the exact values of every node
    with torch.no_grad():
        assert torch.allclose(values[graph.output][0], model(points), atol=1e-12, rtol=0)
    for index in range(1, len(graph.nodes)):
        value = values[index][0].view(-1, *bounds[index][0].shape)
        assert_inside(value, *bounds[index], f"{name}/{intermediate} node {graph.nodes[index].name}")


# --------------------------------------------------------------------------------------------- 2. tightness ordering

@pytest.mark.parametrize("seed", range(4))
def test_crown_is_tighter_than_ibp_on_average_on_relu_networks(seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 20), nn.ReLU(), nn.Linear(20, 20), nn.ReLU(),
                          nn.Linear(20, 20), nn.ReLU(), nn.Linear(20, 5)).double().eval()
    x = torch.rand(4, 1, 4, 4, dtype=torch.float64)
    widths = {m: (lambda b: (b[1] - b[0]).mean().item())(compute_bounds(model, x, 0.05, m)) for m in METHODS}
    assert widths["crown"] <= widths["ibp"], f"crown mean width {widths['crown']} > ibp {widths['ibp']}"
    margin = {m: margin_lower_bounds(model, x, torch.zeros(4, dtype=torch.long), 0.05, m).mean().item()
              for m in METHODS}
    assert margin["crown"] >= margin["ibp"], margin


def test_crown_intermediate_bounds_lie_inside_ibp_ones():
    """Full CROWN intersects each tightened pre-activation with its interval: never looser than IBP per node."""
    model, x = make_network("residual-conv-shortcut")
    graph = build_graph(model)
    box = input_box(x, 0.1)
    ibp, crown = interval_pass(graph, box), crown_bounds(graph, box, "crown")
    tightened = 0
    for index in range(1, len(graph.nodes)):
        assert torch.all(crown[index][0] >= ibp[index][0] - TOL) and torch.all(crown[index][1] <= ibp[index][1] + TOL)
        tightened += int((crown[index][1] - crown[index][0] < ibp[index][1] - ibp[index][0] - 1e-9).any())
    assert tightened > 0, "CROWN should tighten some intermediate bound of this network"


def test_max_pool_bounds_hold_when_windows_almost_have_a_dominant_input():
    """Windows whose largest input beats the others by slightly less than 2ε (not dominant) or slightly more
    (dominant): the relaxation must switch between the exact and the constant upper line at the right place."""
    torch.manual_seed(0)
    eps = 0.05
    x = torch.full((2, 2, 4, 4), 0.5, dtype=torch.float64)
    x[:, :, ::2, ::2] += torch.tensor([2 * eps - 0.01, 2 * eps + 0.01], dtype=torch.float64).view(2, 1, 1, 1)
    x[:, :, 1::2, 1::2] -= 0.2  # a clearly smaller input in each window
    model = nn.Sequential(nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3)).double().eval()
    with torch.no_grad():
        model[2].weight.copy_(-model[2].weight.abs())  # negative coefficients use the upper line of the max
    points = torch.cat([ball_points(x, eps, 100, 400), logit_extreme_attack(model, x, eps)])
    logits = outputs_at(model, points)
    for method in METHODS:
        lb, ub = compute_bounds(model, x, eps, method)
        assert_inside(logits, lb, ub, f"max-pool near ties/{method}")


def test_bounds_use_the_ball_clipped_to_the_input_domain():
    """x at 0 or 1 with radius 0.2 is the box [0, 0.2] or [0.8, 1]: the same box as radius 0.1 around 0.1 or 0.9."""
    model, _ = make_network("conv2d")
    x = (torch.rand(2, 2, 6, 6) > 0.5).to(torch.float64)
    shifted = torch.where(x > 0.5, torch.full_like(x, 0.9), torch.full_like(x, 0.1))
    for method in METHODS:
        clipped, inner = compute_bounds(model, x, 0.2, method), compute_bounds(model, shifted, 0.1, method)
        for a, b in zip(clipped, inner):
            assert torch.allclose(a, b, atol=1e-12, rtol=0), f"{method}: the ball is not clipped to [0, 1]"


def test_crown_is_exact_on_affine_prefixes_of_several_layers():
    """Two Linear layers before the first ReLU bound like their product: CROWN must tighten that pre-activation
    (IBP through two mixing layers is loose), giving the bounds of the merged network."""
    torch.manual_seed(0)
    first, second = nn.Linear(8, 8).double(), nn.Linear(8, 6).double()
    head = nn.Sequential(nn.ReLU(), nn.Linear(6, 3)).double()
    split = nn.Sequential(nn.Flatten(), first, second, *head).eval()
    merged_layer = nn.Linear(8, 6).double()
    with torch.no_grad():
        merged_layer.weight.copy_(second.weight @ first.weight)
        merged_layer.bias.copy_(second.weight @ first.bias + second.bias)
    merged = nn.Sequential(nn.Flatten(), merged_layer, *head).double().eval()
    x = torch.rand(3, 2, 2, 2, dtype=torch.float64)
    for a, b in zip(compute_bounds(split, x, 0.1, "crown"), compute_bounds(merged, x, 0.1, "crown")):
        assert torch.allclose(a, b, atol=1e-9, rtol=0)


def test_crown_is_exact_on_a_residual_block_reading_the_input():
    """conv(x) + x then ReLU is the single conv with 1 added at the kernel's center: same CROWN bounds expected."""
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 2, 3, padding=1).double()
    head = nn.Sequential(nn.ReLU(), nn.Flatten(), nn.Linear(32, 3)).double()
    residual = nn.Sequential(ResidualBlock(nn.Sequential(conv), nn.Identity(), head[0]), *head[1:]).double()
    merged_conv = copy.deepcopy(conv)
    with torch.no_grad():
        merged_conv.weight[0, 0, 1, 1] += 1
        merged_conv.weight[1, 1, 1, 1] += 1
    merged = nn.Sequential(merged_conv, *head).double()
    x = torch.rand(1, 2, 4, 4, dtype=torch.float64)
    with torch.no_grad():
        assert torch.allclose(residual(x), merged(x), atol=1e-12)
    for a, b in zip(compute_bounds(residual, x, 0.1, "crown"), compute_bounds(merged, x, 0.1, "crown")):
        assert torch.allclose(a, b, atol=1e-9, rtol=0)


# ------------------------------------------------------------------------------------------ 3. every registered model

# (name, input shape, batch, methods): full CROWN is too slow on the deep models, so those run ibp and crown-ibp
MODEL_CASES = [
    ("mlp", (1, 8, 8), 2, METHODS),
    ("cnn-small", (1, 8, 8), 2, METHODS),
    ("cnn-large", (3, 8, 8), 2, METHODS),
    ("vgg16-bn", (3, 4, 4), 1, ("ibp", "crown-ibp")),
    ("resnet18", (3, 4, 4), 1, ("ibp", "crown-ibp")),
    ("wrn-28-4", (3, 4, 4), 1, ("ibp", "crown-ibp")),
]


def _gentle_bns(model: nn.Module) -> nn.Module:
    """Non-trivial batch-norm statistics that keep deep networks' activations at a sane scale."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.0)
                module.bias.uniform_(-0.1, 0.1)
    return model


@pytest.mark.parametrize("name,shape,batch,methods", MODEL_CASES, ids=[c[0] for c in MODEL_CASES])
def test_registered_models_bounds_contain_outputs(name, shape, batch, methods):
    torch.manual_seed(0)
    model = create_model(name, shape, 5, mean=[0.4] * shape[0], std=[0.3] * shape[0])
    model = _gentle_bns(model).double().eval()
    build_graph(model)
    x = torch.rand(batch, *shape, dtype=torch.float64)
    eps = 0.002
    points = ball_points(x, eps, 8, 8)
    logits = outputs_at(model, points)
    for method in methods:
        lb, ub = compute_bounds(model, x, eps, method)
        assert torch.isfinite(lb).all() and torch.isfinite(ub).all()
        assert_inside(logits, lb, ub, f"{name}/{method}")
        lb0, ub0 = compute_bounds(model, x, 0.0, method)
        scale = max(1.0, logits.abs().max().item())
        assert torch.allclose(lb0, logits[0], atol=TOL * scale, rtol=0) and torch.allclose(ub0, logits[0],
                                                                                            atol=TOL * scale, rtol=0)


# ------------------------------------------------------------------------------------------------------ 4. masks

@pytest.mark.parametrize("name,shape", [("mlp", (1, 6, 6)), ("cnn-small", (1, 8, 8))])
def test_pruning_masks_are_honoured(name, shape):
    torch.manual_seed(0)
    dense = create_model(name, shape, 5).double().eval()
    pruned = copy.deepcopy(dense)
    prune(pruned, "magnitude", compression=10.0)
    # the same function with the masked weights written into a plain copy (no parametrisation)
    baked = copy.deepcopy(dense)
    pruned_modules = dict(pruned.named_modules())
    with torch.no_grad():
        for module_name, module in baked.named_modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                module.weight.copy_(pruned_modules[module_name].weight)
    zeros = sum(int((m.weight == 0).sum()) for m in pruned.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))
    assert zeros > 0, "test setup: magnitude pruning should zero weights"

    x = torch.rand(3, *shape, dtype=torch.float64)
    with torch.no_grad():
        logits, dense_logits = pruned(x), dense(x)
    eps = 0.02
    points = ball_points(x, eps, 50, 50)
    sampled = outputs_at(pruned, points)
    for method in METHODS:
        lb0, ub0 = compute_bounds(pruned, x, 0.0, method)
        assert torch.allclose(lb0, logits, atol=TOL, rtol=0) and torch.allclose(ub0, logits, atol=TOL, rtol=0), \
            f"{method}: eps = 0 bounds of the pruned model are not its logits"
        assert not torch.allclose(lb0, dense_logits, atol=1e-6), "test setup: pruning should change the logits"
        lb, ub = compute_bounds(pruned, x, eps, method)
        assert_inside(sampled, lb, ub, f"pruned {name}/{method}")
        lb_baked, ub_baked = compute_bounds(baked, x, eps, method)
        assert torch.allclose(lb, lb_baked, atol=TOL, rtol=1e-12) and torch.allclose(ub, ub_baked, atol=TOL,
                                                                                      rtol=1e-12), \
            f"{method}: masked model bounded differently from the same weights written densely"
        lb_dense, ub_dense = compute_bounds(dense, x, eps, method)
        assert (lb - lb_dense).abs().max() > 1e-6 and (ub - ub_dense).abs().max() > 1e-6, \
            f"{method}: bounds ignore the pruning masks"


# ------------------------------------------------------------------------------------------------------ 5. eps = 0

@pytest.mark.parametrize("name", NETWORKS)
def test_zero_eps_bounds_equal_the_logits(name):
    model, x = make_network(name, seed=3)
    with torch.no_grad():
        logits = model(x)
    y = torch.tensor([1, 2])
    for method in METHODS:
        lb, ub = compute_bounds(model, x, 0.0, method)
        assert torch.allclose(lb, logits, atol=TOL, rtol=0), f"{method}: lb {lb} != logits {logits}"
        assert torch.allclose(ub, logits, atol=TOL, rtol=0), f"{method}: ub {ub} != logits {logits}"
        margins = margin_lower_bounds(model, x, y, 0.0, method)
        assert torch.allclose(margins, margins_of(logits, y), atol=TOL, rtol=0), f"{method}: margins at eps = 0"


def test_margin_spec_rows_are_true_minus_other_classes_in_increasing_order():
    spec = margin_spec(torch.tensor([0, 2, 3]), 4, torch.float64)
    assert spec.shape == (3, 3, 4)
    expected_others = [[1, 2, 3], [0, 1, 3], [0, 1, 2]]
    for b, (y, others) in enumerate(zip([0, 2, 3], expected_others)):
        for row, j in enumerate(others):
            target = torch.zeros(4, dtype=torch.float64)
            target[y], target[j] = 1.0, -1.0
            assert torch.equal(spec[b, row], target)


# ------------------------------------------------------------------------------------------------------ 6. verify

@pytest.fixture
def trained_mlp(tiny_data):
    torch.manual_seed(0)
    model = create_model("mlp", (1, 6, 6), 3).double()
    optim = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = tiny_data.train.x.double(), tiny_data.train.y
    for _ in range(60):
        loss = F.cross_entropy(model(x), y)
        optim.zero_grad()
        loss.backward()
        optim.step()
    return model.eval()


@pytest.mark.parametrize("method", METHODS)
def test_verified_samples_are_never_broken(trained_mlp, tiny_data, method):
    model = trained_mlp
    x, y = tiny_data.test.x.double(), tiny_data.test.y
    eps = 0.03
    verified = verify(model, x, y, eps, method)
    assert verified.dtype == torch.bool and verified.shape == (len(x),)
    assert 0 < int(verified.sum()), f"{method}: test setup should verify some samples at eps={eps}"
    with torch.no_grad():
        clean_pred = model(x).argmax(1)
    assert torch.all(clean_pred[verified] == y[verified]), "a verified sample is misclassified on the clean input"
    x_adv = pgd(model, x, y, eps, steps=20, restarts=3)
    with torch.no_grad():
        adv_pred = model(x_adv).argmax(1)
    assert torch.all(adv_pred[verified] == y[verified]), "PGD broke a verified sample"

    lower = margin_lower_bounds(model, x, y, eps, method)
    torch.manual_seed(0)
    sampled = margins_of(outputs_at(model, ball_points(x, eps, 40, 40)), y)
    positive = lower > 0
    assert torch.all(sampled[:, positive] > 0), "a margin with a positive lower bound is negative at a sampled point"
    assert torch.equal(verified, positive.all(1))


@pytest.mark.parametrize("method", METHODS)
def test_verify_refuses_misclassified_samples(trained_mlp, tiny_data, method):
    x = tiny_data.test.x.double()
    with torch.no_grad():
        pred = trained_mlp(x).argmax(1)
    wrong = (pred + 1) % 3
    assert not verify(trained_mlp, x, wrong, 0.0, method).any(), "a misclassified clean sample was verified"
    assert not verify(trained_mlp, x, wrong, 0.01, method).any()
    assert torch.equal(verify(trained_mlp, x, pred, 0.0, method), torch.ones(len(x), dtype=torch.bool))


def test_verify_runs_float32_models_in_float64_and_restores_the_mode(tiny_data):
    torch.manual_seed(0)
    model32 = create_model("mlp", (1, 6, 6), 3)
    model64 = copy.deepcopy(model32).double().eval()
    model32.train()
    x, y = tiny_data.test.x, tiny_data.test.y
    with torch.no_grad():
        y = model64(x.double()).argmax(1)
    for method in METHODS:
        got = verify(model32, x, y, 0.005, method)
        assert model32.training, "verify should restore training mode"
        assert torch.equal(got, verify(model64, x.double(), y, 0.005, method))
    assert next(model32.parameters()).dtype == torch.float32, "verify must not cast the model"


# ------------------------------------------------------------------------------------------- 7. margin spec tightness

@pytest.mark.parametrize("name", ["linear", "relu", "conv2d", "batchnorm", "maxpool", "residual-conv-shortcut"])
@pytest.mark.parametrize("method", METHODS)
def test_margin_bounds_are_at_least_as_tight_as_subtracting_logit_bounds(name, method):
    model, x = make_network(name, seed=5)
    y = torch.tensor([2, 0])
    eps = 0.08
    lb, ub = compute_bounds(model, x, eps, method)
    margin_lb = margin_lower_bounds(model, x, y, eps, method)
    naive = torch.stack([torch.stack([lb[b, y[b]] - ub[b, j] for j in range(lb.shape[1]) if j != y[b]])  # lb_y − ub_j
                         for b in range(len(y))])
    assert torch.all(margin_lb >= naive - TOL), \
        f"{method}: margin bound {margin_lb} looser than logit-bound difference {naive}"


# ----------------------------------------------------------------------------------------------- 8. unsupported layers

def test_unsupported_activation_is_refused_naming_the_layer():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.Tanh())
    with pytest.raises(UserError, match=r"'2'.*Tanh"):
        build_graph(model)
    with pytest.raises(UserError, match=r"Tanh"):
        compute_bounds(model, torch.rand(1, 1, 2, 2), 0.1, "ibp")
    nested = nn.Sequential(Normalize([0.5], [0.5]), nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.Sigmoid()))
    with pytest.raises(UserError, match=r"'1\.2'.*Sigmoid"):
        build_graph(nested)


def test_overlapping_max_pool_is_refused():
    model = nn.Sequential(nn.MaxPool2d(3, stride=2), nn.Flatten(), nn.Linear(9, 3))
    with pytest.raises(UserError, match=r"'0'.*MaxPool2d"):
        build_graph(model)
    with pytest.raises(UserError, match="MaxPool2d"):
        build_graph(nn.Sequential(nn.MaxPool2d(2, padding=1), nn.Flatten(), nn.Linear(9, 3)))


class _CustomBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(x) * 2


class _SequentialWithOwnForward(nn.Sequential):
    def forward(self, x):
        return super().forward(x) + 1


@pytest.mark.parametrize("container,type_name", [(_CustomBlock, "_CustomBlock"),
                                                 (lambda: _SequentialWithOwnForward(nn.Linear(4, 4)),
                                                  "_SequentialWithOwnForward")])
def test_custom_containers_are_refused_naming_them(container, type_name):
    model = nn.Sequential(nn.Flatten(), container(), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(UserError, match=rf"'1'.*{type_name}"):
        build_graph(model)


@pytest.mark.parametrize("layer", [nn.Flatten(start_dim=2), nn.Conv2d(1, 1, 3, padding="same"),
                                   nn.Conv2d(1, 1, 3, padding=1, padding_mode="reflect"),
                                   nn.MaxPool2d(2, ceil_mode=True)],
                         ids=["flatten-start2", "conv-same", "conv-reflect", "max-ceil"])
def test_unsupported_layer_options_are_refused(layer):
    with pytest.raises(UserError, match=rf"'0'.*{type(layer).__name__}"):
        build_graph(nn.Sequential(layer, nn.Flatten(), nn.LazyLinear(3)))


UNSUPPORTED_POOLS = [nn.AvgPool2d(2, ceil_mode=True), nn.AvgPool2d(3, padding=1, count_include_pad=False),
                     nn.AvgPool2d(2, divisor_override=3), nn.AdaptiveAvgPool2d(3)]
POOL_IDS = ["avg-ceil", "avg-no-pad-count", "avg-divisor", "adaptive-not-divisible"]


@pytest.mark.parametrize("layer", UNSUPPORTED_POOLS, ids=POOL_IDS)
def test_unsupported_pooling_is_refused_when_bounded(layer):
    model = nn.Sequential(layer, nn.Flatten()).double()
    with pytest.raises(ValueError, match=type(layer).__name__):
        compute_bounds(model, torch.rand(1, 1, 5, 5, dtype=torch.float64), 0.1, "ibp")


@pytest.mark.parametrize("layer", UNSUPPORTED_POOLS, ids=POOL_IDS)
def test_unsupported_pooling_is_a_user_error_naming_the_layer(layer):
    model = nn.Sequential(layer, nn.Flatten()).double()
    with pytest.raises(UserError, match=rf"'0'.*{type(layer).__name__}"):
        build_graph(model)
        compute_bounds(model, torch.rand(1, 1, 5, 5, dtype=torch.float64), 0.1, "ibp")


def test_batchnorm_without_running_statistics_is_a_user_error():
    model = nn.Sequential(nn.BatchNorm2d(1, track_running_stats=False), nn.Flatten(), nn.Linear(16, 3)).double()
    with pytest.raises(UserError, match="BatchNorm2d"):
        build_graph(model)
        compute_bounds(model.eval(), torch.rand(2, 1, 4, 4, dtype=torch.float64), 0.1, "ibp")


def test_models_without_class_logits_are_refused():
    with pytest.raises(UserError, match="logits"):
        compute_bounds(nn.Sequential(nn.Conv2d(1, 2, 3)).double(), torch.rand(1, 1, 4, 4, dtype=torch.float64),
                       0.1, "crown")


def test_verifier_registry_names_the_methods():
    """The three of METHODS, tested everywhere above, α-CROWN (its own sampling test above, the exact MILP in
    test_bounds_milp.py) and bab (test_verification_exact.py), which decides margins and gives no bounds."""
    assert set(VERIFIERS.names()) == {*METHODS, "alpha-crown", "bab"}
    with pytest.raises(UserError, match="gives no bounds"):
        compute_bounds(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)), torch.rand(1, 4), 0.1, "bab")


# ----------------------------------------------------------------------------------------------- 9. differentiability

@pytest.mark.parametrize("method", ["ibp", "crown-ibp"])
def test_margin_bounds_are_differentiable(method):
    torch.manual_seed(0)
    model = create_model("cnn-small", (1, 8, 8), 4)
    x = torch.rand(3, 1, 8, 8)
    y = torch.tensor([0, 1, 3])
    lower = margin_lower_bounds(model, x, y, 0.05, method)
    assert lower.dtype == torch.float32 and lower.requires_grad
    lower.sum().backward()
    first_conv = model[1][0]
    first_linear = next(m for m in model.modules() if isinstance(m, nn.Linear))
    for layer in (first_conv, first_linear):
        grad = layer.weight.grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, \
            f"{method}: no gradient on {layer}"


def test_margin_bounds_are_differentiable_through_pruning_masks():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(9, 8), nn.ReLU(), nn.Linear(8, 3))
    prune(model, "magnitude", compression=2.0)
    lower = margin_lower_bounds(model, torch.rand(4, 1, 3, 3), torch.tensor([0, 1, 2, 0]), 0.1, "crown-ibp")
    lower.sum().backward()
    original = model[1].parametrizations.weight.original
    assert original.grad is not None and torch.isfinite(original.grad).all() and original.grad.abs().sum() > 0

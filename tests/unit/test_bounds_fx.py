"""Bounds of models written with a functional ``forward`` (the bound graph is built by ``torch.fx`` tracing).

- A functional model gets the very same bounds as its ``nn.Sequential`` / ``ResidualBlock`` twin with the same
  weights (bit for bit, float64), for every method.
- A concatenation skip (``torch.cat``) is sound against an exact MILP (the model rewritten as a ReLU network for the
  MILP of ``test_bounds_milp.py``) and at sampled points of the ball.
- What cannot be traced or bounded is refused with one line naming the node and its source line.
- Every registered model traces to the graph the former hand-written walk of ``nn.Sequential`` and ``ResidualBlock``
  built (a frozen copy below): same nodes, ops, modules and edges, hence the same bounds. Pruned models trace with
  their parametrized layers as leaves and honour the masks; graphs are cached per model and rebuilt when it changes.
"""
from __future__ import annotations

import copy
import functools
import gc
import math
import re
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from robustprune.bounds import build_graph, compute_bounds, margin_bounds, margin_spec, spec_lower_bounds
from robustprune.bounds.graph import Graph, bound_op_for
from robustprune.bounds.propagate import crown_bounds, input_box, interval_pass
from robustprune.bounds.shape import AddBound, CatBound, ReshapeBound
from robustprune.infra.errors import UserError
from robustprune.models import MODELS, create_model
from robustprune.models.resnet import ResidualBlock
from robustprune.pruning import prune

METHODS = ("ibp", "crown-ibp", "crown")
TOL = 1e-9
SOUND_TOL = 1e-7
THIS_FILE = Path(__file__).read_text().splitlines()

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------- functional models

class DenseSkip(nn.Module):
    """conv → F.relu → (a flatten form) → F.linear on its own parameters + nn.Linear skip → relu → F.dropout →
    nn.Linear. ``flatten`` picks how the map is flattened."""

    def __init__(self, flatten: str) -> None:
        super().__init__()
        self.flatten = flatten
        self.conv = nn.Conv2d(2, 3, 3, stride=2, padding=1)
        self.weight = nn.Parameter(torch.randn(8, 27) * 0.3)
        self.bias = nn.Parameter(torch.randn(8) * 0.1)
        self.skip = nn.Linear(27, 8)
        self.out = nn.Linear(8, 4)

    def forward(self, x):
        h = F.relu(self.conv(x))
        if self.flatten == "view":
            h = h.view(h.size(0), -1)
        elif self.flatten == "reshape-shape":
            h = h.reshape(h.shape[0], -1)
        elif self.flatten == "view-minus-one":
            h = h.view(-1, 27)
        elif self.flatten == "torch-flatten":
            h = torch.flatten(h, 1)
        else:  # "reshape-sizes": the batch from another tensor, a size of the reshaped one, then a flatten
            h = torch.reshape(h, (x.size(0), h.size(1), -1)).flatten(1)
        z = torch.relu(F.linear(h, self.weight, self.bias) + self.skip(h))
        return self.out(F.dropout(z, 0.5, self.training))


def dense_skip_twin(model: DenseSkip) -> nn.Module:
    """The same function as layers: Sequential(Conv, ReLU, Flatten, ResidualBlock(Linear, Linear, ReLU), Linear)."""
    linear = nn.Linear(27, 8)
    linear.weight, linear.bias = model.weight, model.bias
    block = ResidualBlock(nn.Sequential(linear), model.skip, nn.ReLU())
    return nn.Sequential(model.conv, nn.ReLU(), nn.Flatten(), block, model.out)


class Pools(nn.Module):
    """F.conv2d on its own parameters, then the functional pools, a method ReLU and x.flatten(1)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 2, 3, 3) * 0.4)
        self.bias = nn.Parameter(torch.randn(4) * 0.1)
        self.conv = nn.Conv2d(4, 4, 2)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        h = F.conv2d(x, self.weight, self.bias, stride=1, padding=1)  # 6 → 6
        h = F.max_pool2d(h, 2).relu()  # 6 → 3
        h = F.avg_pool2d(h, 3, stride=1, padding=1)  # 3 → 3
        h = F.relu(self.conv(h), inplace=True)  # 3 → 2
        h = F.adaptive_avg_pool2d(h, 1)
        return self.fc(h.flatten(1))


def pools_twin(model: Pools) -> nn.Module:
    conv = nn.Conv2d(2, 4, 3, padding=1)
    conv.weight, conv.bias = model.weight, model.bias
    return nn.Sequential(conv, nn.MaxPool2d(2), nn.ReLU(), nn.AvgPool2d(3, stride=1, padding=1), model.conv,
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), model.fc)


class CatDense(nn.Module):
    """A concatenation skip: out(relu(fc2(cat[relu(fc1(x)), proj(x)]))) on flattened inputs."""

    def __init__(self, n_in: int, hidden: int, projected: int, second: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(n_in, hidden)
        self.proj = nn.Linear(n_in, projected)
        self.fc2 = nn.Linear(hidden + projected, second)
        self.out = nn.Linear(second, 3)

    def forward(self, x):
        x = x.flatten(1)
        h = F.relu(self.fc1(x))
        z = torch.cat([h, self.proj(x)], dim=1)
        return self.out(F.relu(self.fc2(z)))


class CatConv(nn.Module):
    """Channel concatenation of a ReLU branch, a linear branch and the input itself (dim=-3), then a conv."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(2, 3, 3, padding=1)
        self.b = nn.Conv2d(2, 2, 1)
        self.mix = nn.Conv2d(7, 4, 3, stride=2)
        self.fc = nn.Linear(4 * 2 * 2, 4)

    def forward(self, x):
        h = torch.cat((F.relu(self.a(x)), self.b(x), x), -3)
        h = F.relu(self.mix(h))
        return self.fc(h.view(x.shape[0], -1))


def _double(model: nn.Module, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return model.double().eval()


def _input(shape, batch: int = 2, seed: int = 1) -> torch.Tensor:
    x = torch.rand(batch, *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    x.view(batch, -1)[:, 0] = 0.0
    x.view(batch, -1)[:, 1] = 1.0
    return x


def _signature(graph: Graph) -> list:
    return [(type(node.op).__name__, node.inputs, node.mixing_depth) for node in graph.nodes]


def assert_same_bounds(model: nn.Module, twin: nn.Module, x: torch.Tensor, eps: float) -> None:
    y = torch.arange(len(x)) % 3
    for method in METHODS:
        got, want = compute_bounds(model, x, eps, method), compute_bounds(twin, x, eps, method)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), f"{method}: logit bounds differ"
        got, want = margin_bounds(model, x, y, eps, (method,)), margin_bounds(twin, x, y, eps, (method,))
        assert torch.equal(got[method], want[method]), f"{method}: margin bounds differ"


# ------------------------------------------------------------------------------------ 1. the same as its twin

@pytest.mark.parametrize("flatten", ["view", "reshape-shape", "view-minus-one", "torch-flatten", "reshape-sizes"])
def test_functional_model_has_the_bounds_of_its_sequential_twin(flatten):
    torch.manual_seed(0)
    model = _double(DenseSkip(flatten))
    twin = dense_skip_twin(model).eval()
    x = _input((2, 6, 6))
    with torch.no_grad():
        assert torch.equal(model(x), twin(x)), "test setup: the twin computes another function"
    assert ReshapeBound in {type(node.op) for node in build_graph(model).nodes} or flatten == "torch-flatten"
    assert_same_bounds(model, twin, x, 0.05)


def test_functional_model_graph_mirrors_its_twin():
    """One node per layer and per traced function (dropout is none), named by module and function; the twin's
    inputs and mixing depths."""
    model = DenseSkip("view")
    graph, twin_graph = build_graph(model), build_graph(dense_skip_twin(model))
    assert [n.name for n in graph.nodes] == ["input", "conv", "relu", "view", "linear", "skip", "add", "relu_1", "out"]
    assert [type(n.op) for n in graph.nodes][3:7:3] == [ReshapeBound, AddBound]
    assert [(n.inputs, n.mixing_depth) for n in graph.nodes] == [(n.inputs, n.mixing_depth) for n in twin_graph.nodes]


def test_functional_pools_and_conv_have_the_bounds_of_their_twin():
    torch.manual_seed(0)
    model = _double(Pools())
    twin = pools_twin(model).eval()
    x = _input((2, 6, 6))
    with torch.no_grad():
        assert torch.equal(model(x), twin(x)), "test setup: the twin computes another function"
    assert _signature(build_graph(model)) == _signature(build_graph(twin))
    assert_same_bounds(model, twin, x, 0.05)


def test_functional_bounds_are_differentiable_in_float32():
    torch.manual_seed(0)
    model = DenseSkip("view").train()
    lower = margin_bounds(model, torch.rand(3, 2, 6, 6), torch.tensor([0, 1, 2]), 0.05, ("crown-ibp",))["crown-ibp"]
    lower.sum().backward()
    for name in ("weight", "bias"):  # read by F.linear: its bound op reads them from the model at call time
        grad = getattr(model, name).grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name


# --------------------------------------------------------------------------------- 2. soundness: sampled points

def _ball_points(x: torch.Tensor, eps: float, n: int = 300) -> torch.Tensor:
    low, high = input_box(x, eps)
    uniform = low + (high - low) * torch.rand(n, *x.shape, dtype=x.dtype)
    corners = low + (high - low) * torch.randint(0, 2, (n, *x.shape)).to(x.dtype)
    return torch.cat([x.unsqueeze(0), uniform, corners])


NETS = {"dense-skip": (lambda: DenseSkip("view"), (2, 6, 6)), "pools": (Pools, (2, 6, 6)),
        "cat-dense": (lambda: CatDense(6, 7, 3, 6), (1, 2, 3)), "cat-conv": (CatConv, (2, 5, 5))}


@pytest.mark.parametrize("name", NETS)
def test_outputs_and_every_node_lie_inside_the_bounds(name):
    factory, shape = NETS[name]
    torch.manual_seed(0)
    model = _double(factory())
    x = _input(shape)
    eps = 0.1
    points = _ball_points(x, eps)
    with torch.no_grad():
        logits = model(points.flatten(0, 1)).view(*points.shape[:2], -1)
    for method in METHODS:
        lower, upper = compute_bounds(model, x, eps, method)
        assert (lower.unsqueeze(0) - logits).max() <= TOL and (logits - upper.unsqueeze(0)).max() <= TOL, method
    graph = build_graph(model)
    flat = points.flatten(0, 1)
    values = interval_pass(graph, (flat, flat))  # point intervals: every node's exact value
    with torch.no_grad():
        assert torch.allclose(values[graph.output][0], model(flat), atol=1e-12, rtol=0)
    for intermediate in ("ibp", "crown"):
        bounds = crown_bounds(graph, input_box(x, eps), intermediate)
        for index in range(1, len(graph.nodes)):
            value = values[index][0].view(-1, *bounds[index][0].shape)
            assert (bounds[index][0] - value).max() <= TOL and (value - bounds[index][1]).max() <= TOL, \
                f"{intermediate}: node {graph.nodes[index].name} outside its bounds"


def test_every_new_shape_op_is_exercised():
    used = {type(node.op) for name in NETS for node in build_graph(NETS[name][0]()).nodes[1:]}
    assert {ReshapeBound, CatBound, AddBound} <= used


# ----------------------------------------------------------------------------- 3. soundness: the exact MILP

MILP_CASES = range(50)


def cat_case(seed: int) -> tuple[nn.Module, torch.Tensor, int, float]:
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    shape = (1, 2, 2) if seed % 2 == 0 else (1, 2, 3)
    hidden, projected, second = (int(v) for v in torch.randint(3, 8, (3,), generator=generator))
    model = CatDense(math.prod(shape), hidden, projected, second).double().eval()
    x = torch.rand(1, *shape, generator=generator, dtype=torch.float64)
    eps = float(0.05 + 0.25 * torch.rand((), generator=generator, dtype=torch.float64))
    return model, x, int(torch.randint(0, 3, (), generator=generator)), eps


def relu_network_maps(model: CatDense) -> list[tuple[np.ndarray, np.ndarray]]:
    """The cat model as a plain ReLU network (W, b) maps: the linear branch p passes a ReLU layer as
    relu(p) − relu(−p), so layer 1 is [fc1; proj; −proj] and fc2 reads [h, p⁺, p⁻] with [W_h, W_p, −W_p]."""
    weights = {name: (m.weight.detach().numpy(), m.bias.detach().numpy()) for name, m in model.named_children()}
    (W1, b1), (P, c), (W2, b2), (W3, b3) = weights["fc1"], weights["proj"], weights["fc2"], weights["out"]
    hidden = W1.shape[0]
    first = (np.concatenate([W1, P, -P]), np.concatenate([b1, c, -c]))
    second = (np.concatenate([W2[:, :hidden], W2[:, hidden:], -W2[:, hidden:]], axis=1), b2)
    return [first, second, (W3, b3)]


@functools.lru_cache(maxsize=None)
def solve_cat_case(seed: int) -> dict:
    """Exact min and max of each logit and min of each margin (MILP), and the bounds of the three methods."""
    milp = pytest.importorskip("tests.unit.test_bounds_milp")
    model, x, y, eps = cat_case(seed)
    low_t, high_t = input_box(x, eps)
    low, high = low_t.flatten().numpy(), high_t.flatten().numpy()
    maps = relu_network_maps(model)
    points = torch.rand(20, *x.shape[1:], dtype=torch.float64) * (high_t - low_t) + low_t
    with torch.no_grad():
        want = model(points).numpy()
    got = _forward_maps(maps, points.flatten(1).numpy())
    assert np.allclose(got, want, atol=1e-12), "test setup: the ReLU network differs from the cat model"
    pre = milp.ibp_preactivations(maps, low, high)
    # a fourth, zero output: the margins z_k − 0 and 0 − z_k are the logit k and its negation
    W, b = maps[-1]
    padded = maps[:-1] + [(np.vstack([W, np.zeros(W.shape[1])]), np.append(b, 0.0))]
    lowest = np.array([milp.milp_min_margin(padded, pre, low, high, k, 3)[0] for k in range(3)])
    highest = np.array([-milp.milp_min_margin(padded, pre, low, high, 3, k)[0] for k in range(3)])
    margins = np.array([milp.milp_min_margin(maps, pre, low, high, y, j)[0] for j in range(3) if j != y])
    bounds = {m: tuple(t[0].detach().numpy() for t in compute_bounds(model, x, eps, m)) for m in METHODS}
    margin_lb = {m: v[0].detach().numpy() for m, v in margin_bounds(model, x, torch.tensor([y]), eps, METHODS).items()}
    return {"lowest": lowest, "highest": highest, "margins": margins, "bounds": bounds, "margin_lb": margin_lb}


def _forward_maps(maps, inputs: np.ndarray) -> np.ndarray:
    h = inputs
    for index, (W, b) in enumerate(maps):
        h = h @ W.T + b
        if index < len(maps) - 1:
            h = np.maximum(h, 0)
    return h


@pytest.mark.parametrize("method", METHODS)
def test_cat_bounds_contain_the_exact_extremes(method):
    for seed in MILP_CASES:
        r = solve_cat_case(seed)
        lower, upper = r["bounds"][method]
        assert np.all(lower <= r["lowest"] + SOUND_TOL), f"seed {seed}: lower {lower} above the minimum {r['lowest']}"
        assert np.all(upper >= r["highest"] - SOUND_TOL), f"seed {seed}: upper {upper} below the maximum"
        assert np.all(r["margin_lb"][method] <= r["margins"] + SOUND_TOL), f"seed {seed}: margin bound unsound"


def test_crown_is_at_least_as_tight_as_ibp_on_cat_models():
    results = [solve_cat_case(seed) for seed in MILP_CASES]
    gap = {m: float(np.mean([np.mean(r["lowest"] - r["bounds"][m][0]) + np.mean(r["bounds"][m][1] - r["highest"])
                             for r in results])) for m in METHODS}
    margin_gap = {m: float(np.mean([np.mean(r["margins"] - r["margin_lb"][m]) for r in results])) for m in METHODS}
    assert gap["crown"] <= gap["ibp"], gap
    assert margin_gap["crown"] <= margin_gap["ibp"], margin_gap
    assert gap["ibp"] > 1e-3, "test setup: the cases should not all be exact"


# ---------------------------------------------------------------------------------------- 4. what is refused

class Sigmoid(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return torch.sigmoid(self.fc(x.flatten(1)))


class Tanh(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))

    def forward(self, x):
        return self.body(x).tanh()


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        if x.sum() > 0:
            return self.fc(x.flatten(1))
        return -self.fc(x.flatten(1))


def _line_of(message: str) -> str:
    match = re.search(r"at test_bounds_fx\.py:(\d+) in forward", message)
    assert match, f"no source line in {message!r}"
    return THIS_FILE[int(match.group(1)) - 1]


@pytest.mark.parametrize("model,node,call,source", [
    (Sigmoid(), "sigmoid", "torch.sigmoid", "torch.sigmoid("),
    (nn.Sequential(nn.Identity(), Tanh()), "1.tanh", "Tensor.tanh", ".tanh()"),
], ids=["sigmoid", "nested-tanh"])
def test_unsupported_function_is_refused_naming_the_node_and_line(model, node, call, source):
    with pytest.raises(UserError, match=rf"cannot bound node '{re.escape(node)}' \({re.escape(call)}\)") as err:
        compute_bounds(model, torch.rand(1, 1, 2, 2), 0.1, "crown")
    message = str(err.value)
    assert source in _line_of(message) and "no bound class" in message and "\n" not in message


def test_data_dependent_control_flow_is_refused_in_one_line():
    with pytest.raises(UserError, match=r"cannot trace DataDependent .*control flow") as err:
        compute_bounds(DataDependent(), torch.rand(1, 1, 2, 2), 0.1, "ibp")
    assert "if x.sum() > 0" in _line_of(str(err.value)) and "\n" not in str(err.value)


class _Forms(nn.Module):
    def __init__(self, form: str) -> None:
        super().__init__()
        self.form = form
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        h = self.fc(x.flatten(1))
        if self.form == "add-constant":
            return h + 1.0
        if self.form == "cat-batch":
            return torch.cat([h, h])
        if self.form == "tensor-made-in-forward":
            return h * torch.ones(4)
        if self.form == "tuple":
            return h, h
        if self.form == "slice":
            return h[:, :2]
        return h.view(-1, 2)  # "view-mixing-samples": (B, 4) → (2B, 2)


@pytest.mark.parametrize("form,pattern", [
    ("add-constant", r"node 'add' \(operator\.add\) at .*: it adds a constant"),
    ("cat-batch", r"node 'cat' \(torch\.cat\) at .*batch dimension"),
    ("tensor-made-in-forward", r"cannot trace _Forms .*neither a parameter nor a buffer"),
    ("tuple", r"must return one tensor"),
    ("slice", r"node 'getitem' \(operator\.getitem\) at .*slicing"),
    ("view-mixing-samples", r"node 'view'.*does not keep the batch"),
])
def test_unsupported_forms_are_refused(form, pattern):
    model = _Forms(form)
    with pytest.raises(UserError, match=pattern):
        compute_bounds(model, torch.rand(2, 1, 2, 2), 0.1, "ibp")
    assert not any(name.startswith("_tensor_constant") for name in vars(model)), "tracing changed the model"


class _Doubled(nn.Linear):
    def forward(self, x):
        return super().forward(x) * 2


class _Passthrough(nn.Linear):
    def forward(self, x):
        return super().forward(x)


def test_a_layer_subclass_with_its_own_forward_is_traced_not_bounded_as_the_layer():
    with pytest.raises(UserError, match=r"cannot bound node '1\.mul' \(operator\.mul\) in layer '1' \(_Doubled\)"):
        build_graph(nn.Sequential(nn.Flatten(), _Doubled(4, 3)))
    torch.manual_seed(0)
    model = _double(nn.Sequential(nn.Flatten(), _Passthrough(4, 5), nn.ReLU(), nn.Linear(5, 3)))
    twin = nn.Sequential(nn.Flatten(), nn.Linear(4, 5), nn.ReLU(), model[3]).double().eval()
    twin[1].weight, twin[1].bias = model[1].weight, model[1].bias
    assert [n.name for n in build_graph(model).nodes] == ["input", "0", "1.linear", "2", "3"]
    assert_same_bounds(model, twin, _input((1, 2, 2)), 0.1)


def test_a_second_input_is_refused():
    class TwoInputs(nn.Module):
        def forward(self, x, y):
            return x + y

    with pytest.raises(UserError, match="more than one input"):
        build_graph(TwoInputs())


# ----------------------------------------------------------------- 5. the zoo: the former walk, pruning, cache

def former_walk(model: nn.Module) -> Graph:
    """A frozen copy of the hand-written walk that built the graph before tracing (nn.Sequential, ResidualBlock)."""
    graph = Graph()

    def add(module: nn.Module, name: str, source: int) -> int:
        if isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward:
            for child_name, child in module.named_children():
                source = add(child, f"{name}.{child_name}" if name else child_name, source)
            return source
        if isinstance(module, ResidualBlock):
            residual = add(module.residual, f"{name}.residual", source)
            shortcut = add(module.shortcut, f"{name}.shortcut", source)
            joined = graph.append(f"{name}.add", AddBound(), [residual, shortcut])
            return add(module.post, f"{name}.post", joined)
        return graph.append(name or type(module).__name__, bound_op_for(module, name or "model"), [source])

    add(model, "", 0)
    return graph


def _structure(graph: Graph) -> list:
    return [(n.name, type(n.op).__name__, n.inputs, n.mixing_depth, None if n.op is None else id(n.op.module))
            for n in graph.nodes]


@pytest.mark.parametrize("name", MODELS.names())
def test_every_registered_model_traces_to_the_former_graph(name):
    model = create_model(name, (3, 8, 8), 5)
    assert _structure(build_graph(model)) == _structure(former_walk(model))


@pytest.mark.parametrize("name,shape", [("mlp", (1, 6, 6)), ("cnn-small", (1, 8, 8))])
def test_pruned_model_traces_its_masked_layers_as_leaves(name, shape):
    torch.manual_seed(0)
    model = create_model(name, shape, 5).double().eval()
    x = _input(shape)
    build_graph(model)  # cached before pruning: the cache must see the parametrizations
    baked = copy.deepcopy(model)  # will hold the masked weights as plain parameters
    prune(model, "magnitude", compression=5.0)
    graph = build_graph(model)
    masked = [n for n in graph.nodes[1:] if parametrize.is_parametrized(n.op.module)]
    assert masked and all(type(n.op.module).__name__.startswith("Parametrized") for n in masked)
    assert _structure(graph) == _structure(former_walk(model))
    layers = dict(model.named_modules())
    with torch.no_grad():
        for layer_name, layer in baked.named_modules():
            if parametrize.is_parametrized(layers[layer_name]):
                layer.weight.copy_(layers[layer_name].weight)
    assert all(float((layers[n.name].weight == 0).double().mean()) > 0.5 for n in masked)
    box = input_box(x, 0.03)
    spec = margin_spec(torch.tensor([0, 1]), 5, torch.float64)
    for method in METHODS:
        got = compute_bounds(model, x, 0.03, method)
        want = compute_bounds(baked, x, 0.03, method)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), f"{method}: masks not honoured"
        assert torch.equal(spec_lower_bounds(graph, box, spec, method),
                           spec_lower_bounds(former_walk(model), box, spec, method)), method


def test_graphs_are_cached_per_model_and_rebuilt_when_it_changes():
    torch.manual_seed(0)
    model = create_model("cnn-small", (1, 8, 8), 4)
    graph = build_graph(model)
    assert build_graph(model) is graph
    model.eval()
    evaluated = build_graph(model)
    assert evaluated is not graph, "a train/eval switch may change a traced forward"
    assert build_graph(model.train()) is graph and build_graph(model.eval()) is evaluated, "one graph per mode"
    model[1][2] = nn.Conv2d(16, 32, 4, stride=2, padding=1)
    rebuilt = build_graph(model)
    assert rebuilt is not graph and rebuilt.nodes[4].op.module is model[1][2]


def test_the_cache_keeps_no_model_alive():
    torch.manual_seed(0)
    models = [create_model("mlp", (1, 4, 4), 3), DenseSkip("view")]
    refs = [weakref.ref(m) for m in models]
    x = torch.rand(2, 1, 4, 4)
    compute_bounds(models[0], x, 0.1, "crown")
    compute_bounds(models[1], torch.rand(2, 2, 6, 6), 0.1, "crown")
    del models
    gc.collect()
    assert all(ref() is None for ref in refs), "a cached graph keeps its model alive"

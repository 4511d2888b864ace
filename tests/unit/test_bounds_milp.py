"""Bounds against the exact answer: the minimum of each margin z_y − z_j over the ε-ball ∩ [0, 1] of a tiny ReLU
network, found by a mixed-integer linear program (big-M encoding of the unstable ReLUs, solved by HiGHS).

Every bound method must stay below that minimum; CROWN should be closer to it than IBP on average. The MILP
encoding is itself checked: its optimal input point, run through the model, has the claimed margin, and no sampled
point of the ball has a smaller margin.
"""
from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from torch import nn

from robustprune.bounds import AlphaSettings, build_graph, margin_lower_bounds
from robustprune.bounds.propagate import input_box, interval_pass
from robustprune.models.base import Normalize
from robustprune.pruning import prune

optimize = pytest.importorskip("scipy.optimize")

METHODS = ("ibp", "crown-ibp", "crown", "alpha-crown", "alpha-crown-intermediate")
INTERMEDIATE = AlphaSettings(intermediate=True)  # "alpha-crown-intermediate": α-CROWN optimising every bound
SOUND_TOL = 1e-7  # the MILP optimum is exact up to the solver's feasibility tolerances


pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------------------- the cases

def make_case(case: str) -> tuple[nn.Module, torch.Tensor, int, float]:
    """(float64 model, input (1, C, H, W) in [0, 1], label, eps) for ``"seed-N"``, ``"normalize"`` or ``"pruned"``."""
    seed = {"normalize": 100, "pruned": 101}.get(case) or int(case.split("-")[1])
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    shape = (1, 2, 2) if seed % 2 == 0 else (1, 2, 3)
    n_in = int(np.prod(shape))
    h1, h2 = (int(v) for v in torch.randint(6, 11, (2,), generator=generator))
    layers: list[nn.Module] = [nn.Flatten(), nn.Linear(n_in, h1), nn.ReLU(), nn.Linear(h1, h2), nn.ReLU(),
                               nn.Linear(h2, 3)]
    if case == "normalize":
        layers.insert(0, Normalize([0.45], [0.25]))
    model = nn.Sequential(*layers).double().eval()
    if case == "pruned":
        prune(model, "magnitude", compression=3.0)
    x = torch.rand(1, *shape, generator=generator, dtype=torch.float64)
    eps = float(0.05 + 0.25 * torch.rand((), generator=generator, dtype=torch.float64))
    if case == "pruned":
        eps = 0.3  # pruned networks have fewer unstable neurons: a wide ball keeps the MILP non-trivial
    y = int(torch.randint(0, 3, (), generator=generator))
    return model, x, y, eps


CASES = [f"seed-{i}" for i in range(20)] + ["normalize", "pruned"]


# ---------------------------------------------------------------------------------------------- the network as maps

def affine_layers(model: nn.Sequential, n_in: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """The network as affine maps (W, b) with a ReLU between consecutive ones (Normalize folded into the first)."""
    maps: list[tuple[np.ndarray, np.ndarray]] = []
    W, b = np.eye(n_in), np.zeros(n_in)
    for module in model:
        if isinstance(module, Normalize):
            channels = module.mean.numel()
            per = n_in // channels
            mean = np.repeat(module.mean.flatten().numpy(), per)
            std = np.repeat(module.std.flatten().numpy(), per)
            W, b = W / std[:, None], (b - mean) / std
        elif isinstance(module, nn.Flatten):
            continue
        elif isinstance(module, nn.Linear):
            weight = module.weight.detach().numpy()  # the masked weight of a pruned layer
            W, b = weight @ W, weight @ b + module.bias.detach().numpy()
        elif isinstance(module, nn.ReLU):
            maps.append((W, b))
            W, b = np.eye(len(b)), np.zeros(len(b))
        else:
            raise AssertionError(f"test helper does not handle {module}")
    maps.append((W, b))
    return maps


def ibp_preactivations(maps, low: np.ndarray, high: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """Interval bounds of each hidden layer's pre-activation, computed by hand."""
    bounds = []
    for W, b in maps[:-1]:
        center, radius = (high + low) / 2, (high - low) / 2
        mid, rad = W @ center + b, np.abs(W) @ radius
        bounds.append((mid - rad, mid + rad))
        low, high = np.maximum(mid - rad, 0), np.maximum(mid + rad, 0)
    return bounds


def milp_min_margin(maps, pre_bounds, low: np.ndarray, high: np.ndarray, y: int, j: int):
    """Exact min of z_y − z_j over the box: (minimum, input point, number of binary variables)."""
    sizes = [len(low)] + [len(b) for _, b in maps[:-1]]
    # variables: x, then per hidden layer its post-activations a and indicators d
    offsets, n_vars = [0], sizes[0]
    for size in sizes[1:]:
        offsets.append(n_vars)
        n_vars += 2 * size
    var_low, var_high = np.zeros(n_vars), np.zeros(n_vars)
    var_low[:sizes[0]], var_high[:sizes[0]] = low, high
    integrality = np.zeros(n_vars)
    rows, row_low, row_high = [], [], []
    binaries = 0
    for layer, ((W, b), (l, u)) in enumerate(zip(maps[:-1], pre_bounds)):
        prev, prev_size = offsets[layer], sizes[layer]
        a0, d0 = offsets[layer + 1], offsets[layer + 1] + sizes[layer + 1]
        for k in range(len(b)):
            def row(a_coef=0.0, d_coef=0.0, w_coef=0.0):
                r = np.zeros(n_vars)
                r[a0 + k], r[d0 + k] = a_coef, d_coef
                r[prev:prev + prev_size] = w_coef * W[k]
                return r
            if u[k] <= 0:  # stably inactive: a = 0
                continue
            var_high[a0 + k] = u[k]
            if l[k] >= 0:  # stably active: a = z
                rows.append(row(1.0, 0.0, -1.0)), row_low.append(b[k]), row_high.append(b[k])
                var_low[a0 + k] = l[k]
                continue
            binaries += 1
            var_high[d0 + k], integrality[d0 + k] = 1.0, 1
            rows.append(row(1.0, 0.0, -1.0)), row_low.append(b[k]), row_high.append(np.inf)  # a ≥ z
            # a ≤ z − l(1 − d)
            rows.append(row(1.0, -l[k], -1.0)), row_low.append(-np.inf), row_high.append(b[k] - l[k])
            rows.append(row(1.0, -u[k], 0.0)), row_low.append(-np.inf), row_high.append(0.0)  # a ≤ u d
    W_last, b_last = maps[-1]
    spec = np.zeros(len(b_last))
    spec[y], spec[j] = 1.0, -1.0
    cost = np.zeros(n_vars)
    last = offsets[-1]
    cost[last:last + sizes[-1]] = spec @ W_last
    constraints = [optimize.LinearConstraint(np.array(rows), row_low, row_high)] if rows else []
    result = optimize.milp(cost, constraints=constraints, integrality=integrality,
                           bounds=optimize.Bounds(var_low, var_high),
                           options={"mip_rel_gap": 0.0, "presolve": True, "time_limit": 30})
    assert result.status == 0, f"MILP not solved to optimality: {result.message}"
    return result.fun + spec @ b_last, result.x[:sizes[0]], binaries


@functools.lru_cache(maxsize=None)
def solve_case(case: str) -> dict:
    """Exact minimum margins and the three methods' lower bounds (each (K − 1,), j ≠ y in increasing order)."""
    model, x, y, eps = make_case(case)
    low_t, high_t = input_box(x, eps)
    low, high = low_t.flatten().numpy(), high_t.flatten().numpy()
    maps = affine_layers(model, len(low))
    pre_bounds = ibp_preactivations(maps, low, high)

    # the hand-computed intervals are robustprune's interval pass at the ReLU inputs
    graph = build_graph(model)
    intervals = interval_pass(graph, (low_t, high_t))
    for (l, u), index in zip(pre_bounds, sorted(graph.relu_inputs())):
        assert np.allclose(intervals[index][0].detach().flatten().numpy(), l, atol=1e-12)
        assert np.allclose(intervals[index][1].detach().flatten().numpy(), u, atol=1e-12)

    exact, points, binaries = [], [], 0
    for j in (k for k in range(3) if k != y):
        value, point, count = milp_min_margin(maps, pre_bounds, low, high, y, j)
        exact.append(value)
        points.append(point)
        binaries += count
    target = torch.tensor([y])
    bounds = {m: margin_lower_bounds(model, x, target, eps, m.removesuffix("-intermediate"),
                                     INTERMEDIATE if m.endswith("-intermediate") else None).detach()[0].numpy()
              for m in METHODS}
    return {"model": model, "x": x, "y": y, "eps": eps, "exact": np.array(exact), "points": points,
            "binaries": binaries, "bounds": bounds}


# ---------------------------------------------------------------------------------------------------------- tests

@pytest.mark.parametrize("case", CASES)
def test_milp_encoding_is_exact_at_its_optimum(case):
    """The MILP's input point lies in the box, and the model's margin there is the MILP's optimum."""
    r = solve_case(case)
    model, x, y, eps = r["model"], r["x"], r["y"], r["eps"]
    low, high = (t.flatten().numpy() for t in input_box(x, eps))
    others = [k for k in range(3) if k != y]
    for j, value, point in zip(others, r["exact"], r["points"]):
        assert np.all(point >= low - 1e-9) and np.all(point <= high + 1e-9), "MILP point outside the ball"
        with torch.no_grad():
            logits = model(torch.from_numpy(point).view_as(x))[0]
        margin = float(logits[y] - logits[j])
        assert abs(margin - value) <= 1e-6, f"{case}: model margin {margin} at the MILP optimum != MILP value {value}"
    # no sampled point of the ball does better than the exact minimum
    generator = torch.Generator().manual_seed(0)
    low_t, high_t = input_box(x, eps)
    u = torch.rand(2000, *x.shape[1:], generator=generator, dtype=torch.float64)
    corners = torch.randint(0, 2, (2000, *x.shape[1:]), generator=generator).to(torch.float64)
    samples = torch.cat([low_t + (high_t - low_t) * u, low_t + (high_t - low_t) * corners])
    with torch.no_grad():
        logits = model(samples)
    sampled_min = (logits[:, [y]] - logits[:, others]).min(0).values.numpy()
    assert np.all(r["exact"] <= sampled_min + 1e-9), f"{case}: MILP minimum {r['exact']} above sampled {sampled_min}"


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("method", METHODS)
def test_bounds_never_exceed_the_exact_minimum_margin(case, method):
    r = solve_case(case)
    bound = r["bounds"][method]
    assert np.all(r["exact"] >= bound - SOUND_TOL), \
        f"{case}/{method}: lower bound {bound} above the exact minimum margin {r['exact']} (unsound)"


def test_crown_is_closer_to_the_exact_minimum_than_ibp_on_average():
    results = [solve_case(case) for case in CASES]
    assert sum(r["binaries"] for r in results) > 20, "test setup: the cases should have unstable ReLUs"
    gap = {m: float(np.mean([np.mean(r["exact"] - r["bounds"][m]) for r in results])) for m in METHODS}
    print(f"mean gap exact - bound: {gap}")
    assert gap["crown"] <= gap["ibp"], f"crown is looser than ibp on average: {gap}"
    assert gap["crown"] >= -SOUND_TOL and gap["crown-ibp"] >= -SOUND_TOL
    assert solve_case("pruned")["binaries"] > 0, "test setup: the pruned case should have unstable ReLUs"
    pruned = solve_case("pruned")["model"]
    assert any(float((m.weight == 0).float().mean()) > 0.5 for m in pruned if isinstance(m, nn.Linear)), \
        "test setup: the pruned case should have masked weights"


def test_alpha_crown_is_never_looser_than_crown_and_closer_to_the_exact_minimum_on_average():
    """Any lower slope in [0, 1] is sound; α-CROWN starts from CROWN's and keeps the best bound per margin."""
    results = [solve_case(case) for case in CASES]
    optimised = ("alpha-crown", "alpha-crown-intermediate")
    for r in results:
        for method in optimised:
            assert np.all(r["bounds"][method] >= r["bounds"]["crown"] - 1e-12)
    gap = {m: float(np.mean([np.mean(r["exact"] - r["bounds"][m]) for r in results])) for m in ("crown", *optimised)}
    print(f"mean gap exact - bound: {gap}")
    assert gap["alpha-crown"] < gap["crown"], f"alpha-crown is not tighter than crown on average: {gap}"
    assert gap["alpha-crown-intermediate"] < gap["crown"], f"optimised intermediate bounds are looser: {gap}"


def test_branch_and_bound_is_sound_and_proves_at_least_what_crown_proves():
    """On every case: a margin BaB proves positive is positive at the exact MILP minimum; BaB proves every image
    CROWN proves, and more of those whose exact minimum margin is positive."""
    from robustprune.bounds.bab import branch_and_bound

    proved = {"crown": 0, "bab": 0, "exact": 0}
    for case in CASES:
        r = solve_case(case)
        model, x, y, eps = make_case(case)
        model = model.double()
        result = branch_and_bound(model, x.double(), torch.tensor([y]), eps, timeout=20.0)
        exact_positive = bool(np.all(r["exact"] > 0))
        if result.verified:
            assert exact_positive, f"{case}: BaB proved a margin whose exact minimum is {r['exact'].min()}"
        crown = bool(np.all(r["bounds"]["crown"] > 0))
        assert result.verified or not crown, f"{case}: CROWN proves it, BaB did not"
        proved["crown"] += crown
        proved["bab"] += result.verified
        proved["exact"] += exact_positive
    print(f"images proved: {proved}")
    assert proved["bab"] >= proved["crown"]

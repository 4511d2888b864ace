"""Per-layer budgets: scopes layer, global and erk (Erdős–Rényi-Kernel, Evci et al. 2020) all meet the requested
compression; erk keeps small layers denser than large ones, honours dense layers and floors, and is reachable from
the config and the command line."""
from __future__ import annotations

import math

import pytest
import torch

from robustprune.cli import main
from robustprune.config import load_config
from robustprune.infra.errors import UserError
from robustprune.models import create_model
from robustprune.pruning import PRUNERS, layer_density, prunable_layers, prune, sparsity_report
from robustprune.pruning.plan import erk_counts, floors, keep_budget

MODELS = {"cnn-small": (1, 28, 28), "mlp": (1, 28, 28)}


def _model(name: str, shape=None):
    torch.manual_seed(0)
    return create_model(name, shape or MODELS[name], 10)


def _shapes(model) -> dict[str, tuple[int, ...]]:
    return {name: tuple(module.weight.shape) for name, module in prunable_layers(model)}


def _rigl_loop(shapes: dict[str, tuple[int, ...]], density: float) -> dict[str, float]:
    """RigL's ERK allocation (sparse_utils.get_sparsities, no floors), as kept weights per layer."""
    dense: set[str] = set()
    total = sum(math.prod(s) for s in shapes.values())
    while True:
        free = {n: s for n, s in shapes.items() if n not in dense}
        scale = (density * total - sum(math.prod(shapes[n]) for n in dense)) / sum(sum(s) for s in free.values())
        densest = max(free, key=lambda n: sum(free[n]) / math.prod(free[n]))
        if scale * sum(free[densest]) <= math.prod(free[densest]):
            return {n: math.prod(s) if n in dense else scale * sum(s) for n, s in shapes.items()}
        dense.add(densest)


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("scope", ["layer", "global", "erk"])
@pytest.mark.parametrize("compression", [2.0, 10.0, 100.0])
def test_every_scope_meets_the_requested_compression(name, scope, compression):
    model = _model(name)
    plan = prune(model, "magnitude", compression, scope)
    report = sparsity_report(model)
    layers = len(list(prunable_layers(model)))
    # Rounding to whole weights: at most one weight per layer away from the request.
    assert abs(report["params_nonzero"] - report["params_prunable"] / compression) <= layers
    assert plan.summary()["masked_compression"] == pytest.approx(report["compression"])
    if scope == "erk":  # ERK's counts add up to the budget exactly
        assert report["params_nonzero"] == round(report["params_prunable"] / compression)


@pytest.mark.parametrize("rule", [n for n in PRUNERS.names() if not PRUNERS.get(n).structured])
def test_erk_works_with_every_unstructured_rule(rule):
    model = _model("cnn-small")
    prune(model, rule, 10.0, "erk")
    counts = erk_counts(_shapes(model), 10.0)
    assert {n: int(torch.count_nonzero(m.weight)) for n, m in prunable_layers(model)} == counts


@pytest.mark.parametrize("compression", [2.0, 10.0, 100.0])
def test_erk_keeps_small_layers_denser_than_large_ones(compression):
    model = _model("cnn-small")
    prune(model, "magnitude", compression, "erk")
    erk = layer_density(model)
    first_conv, biggest_linear = "1.0", max(erk, key=lambda n: dict(prunable_layers(model))[n].weight.numel())
    assert erk[first_conv] > erk[biggest_linear]
    assert max(erk.values()) <= 1.0
    # Against one rate for all: the densest layer by ERK's ratio gains, the sparsest loses (the biggest Linear
    # itself can end a hair above 1/compression when the small layers saturate at density 1, as at compression 2).
    shapes = _shapes(model)
    sparsest = min(shapes, key=lambda n: sum(shapes[n]) / math.prod(shapes[n]))
    prune(layerwise := _model("cnn-small"), "magnitude", compression, "layer")
    same_rate = layer_density(layerwise)
    assert erk[first_conv] > same_rate[first_conv] and erk[sparsest] < same_rate[sparsest]


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("compression", [2.0, 10.0, 100.0])
def test_erk_counts_follow_rigl_loop(name, compression):
    shapes = _shapes(_model(name))
    counts = erk_counts(shapes, compression)
    reference = _rigl_loop(shapes, 1.0 / compression)
    assert all(abs(counts[n] - reference[n]) <= 1 for n in shapes)
    assert all(counts[n] <= math.prod(s) for n, s in shapes.items())


def test_erk_respects_dense_layers():
    model = _model("cnn-large", (1, 8, 8))
    prune(model, "magnitude", 10.0, "erk", keep_first_dense=True, keep_last_dense=True)
    density = layer_density(model)
    names = list(density)
    assert density[names[0]] == 1.0 and density[names[-1]] == 1.0
    assert all(d < 1.0 for d in list(density.values())[1:-1])
    report = sparsity_report(model)
    assert report["params_nonzero"] == round(report["params_prunable"] / 10)


def test_erk_min_density_floor_binds_and_is_counted_in_the_budget():
    shapes = _shapes(_model("mlp"))
    sizes = {n: math.prod(s) for n, s in shapes.items()}
    assert min(k / sizes[n] for n, k in erk_counts(shapes, 100.0).items()) < 0.009  # the floor below binds
    counts = erk_counts(shapes, 100.0, min_density=0.009)
    low = floors(sizes, set(), 0.009)
    assert all(low[n] <= counts[n] <= sizes[n] for n in sizes)
    assert any(counts[n] == low[n] for n in sizes)
    assert sum(counts.values()) == keep_budget(sizes, 100.0, low)


def test_erk_min_density_through_prune():
    model = _model("cnn-large", (1, 8, 8))
    prune(model, "magnitude", 50.0, "erk", min_density=0.01)
    assert min(layer_density(model).values()) >= 0.01 - 1e-9
    report = sparsity_report(model)
    assert report["params_nonzero"] == round(report["params_prunable"] / 50)


def test_unreachable_or_unsupported_requests_are_refused():
    with pytest.raises(UserError, match="unreachable"):
        prune(_model("mlp"), "magnitude", 10.0, "erk", keep_first_dense=True)  # the first layer holds most weights
    with pytest.raises(UserError, match="unreachable"):
        erk_counts(_shapes(_model("mlp")), 100.0, min_density=0.5)
    with pytest.raises(UserError, match="structured and takes scope layer or global"):
        prune(_model("cnn-small"), "filter-l1", 2.0, "erk")


def test_hydra_score_phase_uses_erk_counts():
    from robustprune.pruning import attach_learned_scores, hydra

    model = _model("cnn-small", (1, 8, 8))
    attach_learned_scores(model, 10.0, "erk")
    model(torch.rand(2, 1, 8, 8)).sum().backward()
    hydra.finalize_scores(model)
    kept = {n: int(torch.count_nonzero(m.weight)) for n, m in prunable_layers(model)}
    assert kept == erk_counts(_shapes(model), 10.0)


def test_config_accepts_erk_and_lists_the_scopes():
    assert load_config(None, ["prune.scope=erk"]).prune.scope == "erk"
    with pytest.raises(UserError, match="scope must be one of layer, global, erk"):
        load_config(None, ["prune.scope=uniform"])


def test_cli_prune_with_scope_erk(tmp_path, capsys):
    from robustprune import pipeline
    from robustprune.export import load

    cfg = load_config(None)
    torch.manual_seed(0)
    torch.save(pipeline.new_model(cfg, pipeline.load_data(cfg)).state_dict(), tmp_path / "weights.pt")
    dense, pruned = tmp_path / "dense.safetensors", tmp_path / "pruned.safetensors"
    assert main(["import", str(tmp_path / "weights.pt"), "--out", str(dense)]) == 0
    assert main(["prune", str(dense), "--compression", "10", "--scope", "erk", "--out", str(pruned)]) == 0
    printed = capsys.readouterr().out
    assert "compression 10.00×" in printed and "| layer | weights | kept | density |" in printed  # the allocation
    model = load(str(pruned), torch.device("cpu"))
    kept = {n: int(torch.count_nonzero(m.weight)) for n, m in prunable_layers(model)}
    assert kept == erk_counts(_shapes(model), 10.0)

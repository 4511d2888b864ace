"""HARP (Zhao & Wressnegger, ICLR 2023): per-layer densities learned with the scores, held to the budget by a
penalty, made exact at the end; floors (min_density, dense layers) respected throughout."""
from __future__ import annotations

import math

import pytest
import torch

from robustprune.config import TrainConfig, load_config
from robustprune.models import create_model
from robustprune.objectives import create
from robustprune.objectives.base import Penalised
from robustprune.pruning import attach_learned_scores, finalize_learned, harp, prunable_layers
from robustprune.pruning.plan import erk_counts, floors, layer_counts
from robustprune.train import FitOptions, fit


def _model(shape=(1, 28, 28), classes=10):
    torch.manual_seed(0)
    return create_model("cnn-small", shape, classes)


def _sizes(model) -> dict[str, int]:
    return {name: module.weight.numel() for name, module in prunable_layers(model)}


def _kept(model) -> dict[str, int]:
    return {name: int(torch.count_nonzero(module.weight)) for name, module in prunable_layers(model)}


def _set_densities(model, densities: dict[str, float]) -> None:
    """Move each rate so the layer's density is the given one (as if training had chosen it)."""
    with torch.no_grad():
        for path, rate_mask in harp.rate_masks(model).items():
            fraction = (densities[path.rpartition(".")[0]] - rate_mask.floor) / (1 - rate_mask.floor)
            rate_mask.rate.fill_(math.log(fraction / (1 - fraction)))


@pytest.mark.parametrize("compression", [10.0, 100.0])
def test_starting_densities_are_the_scopes_allocation(compression):
    model = _model()
    sizes = _sizes(model)
    attach_learned_scores(model, compression, "layer", rule="harp")
    expected = layer_counts(sizes, compression)
    for name, density in harp.learned_densities(model).items():
        assert density * sizes[name] == pytest.approx(expected[name], rel=1e-3, abs=1.0)
    model = _model()
    attach_learned_scores(model, compression, "erk", rule="harp")
    expected = erk_counts({n: tuple(m.weight.shape) for n, m in prunable_layers(model)}, compression)
    for name, density in harp.learned_densities(model).items():
        assert density * sizes[name] == pytest.approx(expected[name], rel=1e-2, abs=1.0)


@pytest.mark.parametrize("compression", [2.0, 10.0, 37.0, 100.0])
def test_finalize_meets_the_compression_exactly_whatever_the_densities(compression):
    model = _model()
    sizes = _sizes(model)
    attach_learned_scores(model, compression, "layer", rule="harp")
    generator = torch.Generator().manual_seed(int(compression))
    learned = {n: float(torch.rand((), generator=generator)) * 0.9 + 0.05 for n in sizes}  # far off the budget
    _set_densities(model, learned)
    finalize_learned(model, compression)
    kept = _kept(model)
    assert sum(kept.values()) == round(sum(sizes.values()) / compression)
    # One factor for every layer: a layer's share follows its learned density times its size (up to rounding and
    # the clamp at dense).
    ratio = {n: kept[n] / (learned[n] * sizes[n]) for n in sizes if 1 < kept[n] < sizes[n]}
    assert max(ratio.values()) / min(ratio.values()) == pytest.approx(1.0, abs=0.05)


def test_rates_respect_min_density_and_dense_layers():
    model = _model()
    sizes = _sizes(model)
    names = list(sizes)
    attach_learned_scores(model, 100.0, "layer", rule="harp", keep_last_dense=True, min_density=0.002)
    assert set(harp.learned_densities(model)) == set(names[:-1])  # the dense layer gets no rate
    with torch.no_grad():
        for rate_mask in harp.rate_masks(model).values():
            rate_mask.rate.fill_(-50.0)  # training drove every rate to the bottom
    for name, density in harp.learned_densities(model).items():
        assert density >= 0.002
    finalize_learned(model, 100.0, keep_last_dense=True, min_density=0.002)
    kept = _kept(model)
    low = floors(sizes, {names[-1]}, 0.002)
    assert all(kept[n] >= low[n] for n in names) and kept[names[-1]] == sizes[names[-1]]
    assert sum(kept.values()) == round(sum(sizes.values()) / 100.0)


def test_density_gradient_is_the_gain_from_restoring_the_pruned_weights():
    torch.manual_seed(0)
    layer = torch.nn.Linear(20, 10)
    rate_mask = harp.RateMask(layer.weight, density=0.3, floor=0.0)
    upstream = torch.randn(10, 20)
    (rate_mask(layer.weight.detach()) * upstream).sum().backward()
    kept = rate_mask.keep_mask()
    assert int(kept.sum()) == 60
    per_entry = upstream * layer.weight.detach()  # the gradient reaching the mask
    d_density = per_entry[~kept].mean() * 200
    sigmoid = torch.sigmoid(rate_mask.rate.detach())
    expected = d_density * sigmoid * (1 - sigmoid) * (1 - rate_mask.floor)
    assert rate_mask.rate.grad == pytest.approx(float(expected), rel=1e-5)
    assert torch.allclose(rate_mask.scores.grad, per_entry * torch.sign(rate_mask.scores.detach()))


def test_budget_penalty_is_zero_within_budget_and_pulls_densities_down_above_it():
    model = _model()
    attach_learned_scores(model, 10.0, "layer", rule="harp")
    assert float(harp.budget_penalty(model, 10.0, 1.0).detach()) == pytest.approx(0.0, abs=1e-3)
    _set_densities(model, dict.fromkeys(_sizes(model), 0.5))
    penalty = harp.budget_penalty(model, 10.0, 2.0)
    assert float(penalty.detach()) == pytest.approx(2.0 * (0.5 * 10 - 1), rel=1e-4)
    penalty.backward()
    assert all(rm.rate.grad > 0 for rm in harp.rate_masks(model).values())  # gradient descent lowers every rate


def test_penalised_objective_adds_the_penalty_and_shares_the_eps_schedule():
    model = _model((1, 6, 6), 3)
    inner = create("pgd", eps=0.1, steps=1)
    wrapped = Penalised(inner, lambda net: torch.tensor(0.25))
    wrapped.set_eps_scale(0.5)
    assert inner.current_eps == wrapped.current_eps == pytest.approx(0.05)
    x, y = torch.rand(4, 1, 6, 6), torch.arange(4) % 3
    torch.manual_seed(1)
    plain, _ = inner.forward(model, x, y)
    torch.manual_seed(1)
    total, _ = wrapped.forward(model, x, y)
    assert float(total.detach()) == pytest.approx(float(plain.detach()) + 0.25)


def test_the_joint_phase_trains_scores_and_rates_and_moves_the_allocation(tiny_data):
    model = create_model("cnn-small", (1, 6, 6), 3)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()}
    attach_learned_scores(model, 5.0, "layer", rule="harp")
    start = harp.learned_densities(model)
    objective = Penalised(create("pgd", eps=0.1, steps=2), lambda net: harp.budget_penalty(net, 5.0, 1.0))
    fit(model, objective, tiny_data.train, TrainConfig(epochs=2, lr=0.5), FitOptions(batch_size=32, quiet=True))
    assert harp.learned_densities(model) != start
    finalize_learned(model, 5.0)
    assert sum(_kept(model).values()) == round(sum(_sizes(model).values()) / 5.0)
    for name, p in model.named_parameters():
        plain = name.replace("parametrizations.weight.original", "weight")
        kept = p.detach() != 0
        assert torch.equal(p.detach()[kept], frozen[plain][kept])  # weights untouched, only masked


def test_config_takes_harp_and_refuses_a_negative_penalty():
    cfg = load_config(None, ["prune.rule=harp", "prune.rate_penalty=3"])
    assert cfg.prune.rule == "harp" and cfg.prune.rate_penalty == 3.0
    from robustprune.infra.errors import UserError

    with pytest.raises(UserError, match="rate_penalty must be a finite number >= 0"):
        load_config(None, ["prune.rate_penalty=-1"])


def test_a_harp_run_records_its_learned_allocation(tmp_path):
    import json

    from robustprune.pipeline import run

    overrides = ["prune.rule=harp", "prune.scope=erk", "prune.score_training.epochs=1", "pretrain.epochs=1",
                 "finetune.epochs=1", "objective.steps=2", "evaluate.pgd_steps=2", "evaluate.verifiers=[]",
                 "evaluate.n_samples=40", "evaluate.pgd_eps_fractions=[]", "evaluate.masking_check=false"]
    report = run(load_config(None, overrides), tmp_path / "run", quiet=True, log=lambda _: None)
    plan = json.loads((tmp_path / "run" / "plan.json").read_text())
    learned = plan["options"]["learned_densities"]
    layers = {row["layer"]: row for row in report["layers"]}
    assert set(learned) == set(layers) and all(layers[n]["learned_density"] == learned[n] for n in learned)
    fine = report["stages"]["finetuned"]
    assert sum(row["kept"] for row in layers.values()) == fine["params_nonzero"] == round(
        fine["params_prunable"] / 10)
    assert (tmp_path / "run" / "plots" / "densities.png").is_file()


def test_report_layers_list_dense_layers_too(tmp_path):
    from robustprune.pipeline import run

    overrides = ["prune.keep_last_dense=true", "pretrain.epochs=1", "finetune.epochs=0", "objective.steps=1",
                 "evaluate.pgd_steps=1", "evaluate.verifiers=[]", "evaluate.n_samples=20",
                 "evaluate.pgd_eps_fractions=[]", "evaluate.masking_check=false"]
    report = run(load_config(None, overrides), tmp_path / "run", quiet=True, log=lambda _: None)
    last = report["layers"][-1]
    assert last["density"] == 1.0 and last["kept"] == last["weights"] and last["learned_density"] is None
    assert sum(row["kept"] for row in report["layers"]) == report["stages"]["finetuned"]["params_nonzero"]

import pytest
import torch

from robustprune.infra.errors import UserError
from robustprune.models import create_model
from robustprune.pruning import (
    PRUNERS, layer_density, load_plain_state_dict, masks, plain_state_dict, prunable_layers, prune, sparsity_report,
)


def _model(name="cnn-small", shape=(1, 8, 8)):
    torch.manual_seed(0)
    return create_model(name, shape, 10)


UNSTRUCTURED = [name for name in PRUNERS.names() if not PRUNERS.get(name).structured]


@pytest.mark.parametrize("rule", UNSTRUCTURED)
@pytest.mark.parametrize("scope", ["layer", "global"])
@pytest.mark.parametrize("compression", [1.0, 2.0, 10.0, 100.0])
def test_achieved_compression_matches_the_request(rule, scope, compression):
    model = _model()
    prune(model, rule, compression, scope)
    report = sparsity_report(model)
    layers = len(list(prunable_layers(model)))
    expected_kept = report["params_prunable"] / compression
    # Rounding to whole weights: at most one weight per layer away from the request (and >= 1 kept per layer).
    assert abs(report["params_nonzero"] - expected_kept) <= layers
    assert report["sparsity"] == pytest.approx(1 - report["params_nonzero"] / report["params_prunable"])


def test_layer_scope_gives_every_layer_the_same_rate():
    model = _model()
    prune(model, "magnitude", 10.0, "layer")
    for name, module in prunable_layers(model):
        n = module.weight.numel()
        assert int(torch.count_nonzero(module.weight)) == max(1, round(n / 10))


def test_magnitude_keeps_the_largest_weights():
    model = _model("mlp")
    originals = {n: m.weight.detach().abs().clone() for n, m in prunable_layers(model)}
    prune(model, "magnitude", 4.0, "layer")
    for name, module in prunable_layers(model):
        kept = module.weight.detach() != 0
        assert originals[name][kept].min() >= originals[name][~kept].max()


def test_global_scope_uses_one_threshold():
    model = _model("mlp")
    originals = torch.cat([m.weight.detach().abs().flatten() for _, m in prunable_layers(model)])
    prune(model, "magnitude", 5.0, "global")
    kept = torch.cat([(m.weight.detach() != 0).flatten() for _, m in prunable_layers(model)])
    assert originals[kept].min() >= originals[~kept].max()
    densities = layer_density(model)
    assert max(densities.values()) > min(densities.values())  # not the same per layer


def test_pruned_weights_stay_zero_through_optimiser_steps():
    model = _model()
    prune(model, "magnitude", 10.0, "layer")
    before = {n: (m.weight == 0).clone() for n, m in prunable_layers(model)}
    optim = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9, weight_decay=0.1)
    for _ in range(5):
        loss = model(torch.rand(8, 1, 8, 8)).pow(2).sum()
        optim.zero_grad()
        loss.backward()
        optim.step()
    for name, module in prunable_layers(model):
        assert torch.all(module.weight[before[name]] == 0)


def test_pruning_again_only_removes_more():
    model = _model()
    prune(model, "magnitude", 2.0, "layer")
    first = {n: m.weight != 0 for n, m in prunable_layers(model)}
    prune(model, "magnitude", 8.0, "layer")
    for name, module in prunable_layers(model):
        now = module.weight != 0
        assert not torch.any(now & ~first[name])
    assert sparsity_report(model)["compression"] == pytest.approx(8.0, rel=0.05)


def test_plain_state_dict_round_trip():
    model = _model()
    prune(model, "magnitude", 10.0, "global")
    state = plain_state_dict(model)
    assert all(".parametrizations." not in k for k in state)
    fresh = _model()
    load_plain_state_dict(fresh, state)
    x = torch.rand(4, 1, 8, 8)
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)
    assert set(masks(fresh)) == set(masks(model))


def test_bad_requests():
    model = _model()
    with pytest.raises(UserError, match="compression must be a finite number >= 1"):
        prune(model, "magnitude", 0.5)
    with pytest.raises(UserError, match="did you mean 'magnitude'"):
        prune(model, "magnitud", 2.0)
    with pytest.raises(UserError, match="unknown scope"):
        prune(model, "magnitude", 2.0, "row")


def test_plan_summary_is_json_serialisable():
    import json

    model = _model()
    plan = prune(model, "magnitude", 10.0, "layer")
    summary = json.loads(json.dumps(plan.summary()))
    assert summary["masked_compression"] == pytest.approx(sparsity_report(model)["compression"])
    assert set(summary["params"]) == {f"{n}.weight" for n, _ in prunable_layers(model)}


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_keep_first_and_last_dense_still_reach_the_target(scope):
    model = _model("cnn-large")
    prune(model, "magnitude", 10.0, scope, keep_first_dense=True, keep_last_dense=True)
    density = layer_density(model)
    names = list(density)
    assert density[names[0]] == 1.0 and density[names[-1]] == 1.0
    report = sparsity_report(model)
    assert abs(report["params_nonzero"] - report["params_prunable"] / 10) <= len(names)


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_min_density_is_a_floor_per_layer(scope):
    model = _model("cnn-large")
    prune(model, "magnitude", 50.0, scope, min_density=0.01)
    assert min(layer_density(model).values()) >= 0.01 - 1e-9
    report = sparsity_report(model)
    assert abs(report["params_nonzero"] - report["params_prunable"] / 50) <= len(layer_density(model))


def test_unreachable_request_is_refused():
    model = _model("mlp")
    with pytest.raises(UserError, match="unreachable"):
        prune(model, "magnitude", 10.0, keep_first_dense=True)  # the first layer alone holds most weights


def test_random_rule_is_seeded():
    a, b, c = _model(), _model(), _model()
    prune(a, "random", 5.0, seed=1)
    prune(b, "random", 5.0, seed=1)
    prune(c, "random", 5.0, seed=2)
    assert all(torch.equal(masks(a)[k], masks(b)[k]) for k in masks(a))
    assert any(not torch.equal(masks(a)[k], masks(c)[k]) for k in masks(a))


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_hydra_scores_follow_the_same_budget_rules(scope):
    from robustprune.pruning import attach_learned_scores, hydra

    model = _model("cnn-large")
    attach_learned_scores(model, 10.0, scope, keep_first_dense=True, keep_last_dense=True)
    model(torch.rand(2, 1, 8, 8)).sum().backward()  # scores train; weights are frozen
    hydra.finalize_scores(model)
    density = layer_density(model)
    names = list(density)
    assert density[names[0]] == 1.0 and density[names[-1]] == 1.0
    report = sparsity_report(model)
    assert abs(report["params_nonzero"] - report["params_prunable"] / 10) <= len(names)
    assert all(p.requires_grad for p in model.parameters())


def test_plan_json_round_trip_and_bad_plans():
    import json

    from robustprune.pruning import PruningPlan

    model = _model()
    plan = prune(model, "magnitude", 7.0, "global")
    again = PruningPlan.from_json(json.loads(json.dumps(plan.to_json())))
    assert again.rule == "magnitude" and again.scope == "global" and again.target_compression == 7.0
    assert all(torch.equal(again.masks[p], plan.masks[p]) for p in plan.masks)
    with pytest.raises(UserError, match="malformed pruning plan"):
        PruningPlan.from_json({"rule": "magnitude"})
    broken = plan.to_json()
    first = next(iter(broken["masks"]))
    broken["masks"][first]["shape"] = [3, 3]
    with pytest.raises(UserError, match="malformed pruning plan"):
        PruningPlan.from_json(broken)
    other = create_model("mlp", (1, 8, 8), 10)
    with pytest.raises(UserError, match="does not fit this model"):
        again.apply(other)

"""HYDRA learned scores (Sehwag et al., NeurIPS 2020): exact top-k, straight-through gradient, finalize."""
import copy

import pytest
import torch
from torch import nn

from robustprune.config import TrainConfig
from robustprune.infra.errors import UserError
from robustprune.models import create_model
from robustprune.objectives import create
from robustprune.pruning.hydra import (
    ScoreMask, attach_scores, finalize_scores, keep_count, scaled_score_init, score_masks,
)
from robustprune.pruning.masks import ParamMask, apply_masks, masks, plain_state_dict, prunable_layers
from robustprune.train import FitOptions, fit


def _model(name="cnn-small", shape=(1, 8, 8), classes=10):
    torch.manual_seed(0)
    return create_model(name, shape, classes)


def _blobs(n=96, dim=8, classes=3, seed=0):
    """Gaussian blobs: a real classification task for a small MLP."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, dim, generator=g) * 2
    y = torch.arange(n) % classes
    return centers[y] + torch.randn(n, dim, generator=g), y


def _mlp(dim=8, hidden=32, classes=3):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, classes))


def _kept(model):
    """{"layer.weight": bool keep-mask} of the attached scores."""
    return {path: sm.keep_mask().clone() for path, sm in score_masks(model).items()}


@pytest.mark.parametrize("compression", [1.0, 2.0, 3.7, 10.0, 1000.0])
def test_layer_scope_keeps_exactly_k_per_layer(compression):
    model = _model()
    attach_scores(model, compression, "layer")
    for _, module in prunable_layers(model):
        n = module.weight.numel()
        assert int(torch.count_nonzero(module.weight)) == keep_count(n, compression) == max(1, round(n / compression))


@pytest.mark.parametrize("compression", [2.0, 5.0, 30.0])
def test_global_scope_keeps_round_n_over_c_with_one_threshold(compression):
    model = _model()
    attach_scores(model, compression, "global")
    kept = _kept(model)
    total = sum(m.numel() for m in kept.values())
    assert sum(int(m.sum()) for m in kept.values()) == round(total / compression)
    scores = torch.cat([sm.scores.detach().abs().flatten() for sm in score_masks(model).values()])
    flags = torch.cat([m.flatten() for m in kept.values()])
    assert scores[flags].min() >= scores[~flags].max()
    rates = [float(m.float().mean()) for m in kept.values()]
    assert max(rates) > min(rates)  # not the same rate per layer
    assert sum(int(torch.count_nonzero(m.weight)) for _, m in prunable_layers(model)) == round(total / compression)


def test_global_ranking_follows_score_updates():
    model = _model()
    attach_scores(model, 4.0, "global")
    path, first = next(iter(score_masks(model).items()))
    with torch.no_grad():
        first.scores.fill_(100.0)  # in place: the cache must notice
    kept = _kept(model)
    assert bool(kept[path].all())
    assert sum(int(m.sum()) for m in kept.values()) == round(sum(m.numel() for m in kept.values()) / 4.0)


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_scores_are_the_only_trainable_parameters(scope):
    model = _model()
    scores = attach_scores(model, 5.0, scope)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(scores) == len(list(prunable_layers(model))) and len(trainable) == len(scores)
    assert {id(p) for p in trainable} == {id(s) for s in scores}
    assert all(name.endswith(".scores") for name, p in model.named_parameters() if p.requires_grad)


def test_gradient_is_straight_through_to_scores_and_not_to_weights():
    torch.manual_seed(0)
    layer = nn.Linear(6, 4)
    model = nn.Sequential(layer)
    (scores,) = attach_scores(model, 3.0)
    x = torch.randn(5, 6)
    model(x).sum().backward()
    # loss = Σ x W_effᵀ → dloss/dW_eff[i, j] = Σ_b x[b, j]; STE: dW_eff/d|s| = w, then |s| → s gives sign(s).
    weight = layer.parametrizations.weight.original
    expected = x.sum(0).expand(4, 6) * weight.detach() * scores.detach().sign()
    torch.testing.assert_close(scores.grad, expected)
    assert bool((scores.grad[~score_masks(model)["0.weight"].keep_mask()] != 0).all())  # pruned ones learn too
    assert weight.grad is None and layer.bias.grad is None


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_score_training_lowers_the_loss_and_changes_the_mask(scope):
    x, y = _blobs()
    model = _mlp()
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    scores = attach_scores(model, 4.0, scope)
    before = _kept(model)
    optimizer = torch.optim.SGD(scores, lr=0.2, momentum=0.9)  # HYDRA trains scores with SGD
    losses = []
    for _ in range(40):
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    after = _kept(model)
    assert losses[-1] < 0.8 * losses[0]
    assert any(not torch.equal(before[p], after[p]) for p in before)
    counts = lambda kept: {p: int(m.sum()) for p, m in kept.items()}  # noqa: E731
    if scope == "layer":  # the count never moves: per layer, or in total (global scope reallocates across layers)
        assert counts(after) == counts(before)
    assert sum(counts(after).values()) == sum(counts(before).values())
    frozen = {n.replace("parametrizations.weight.original", "weight"): p for n, p in model.named_parameters()
              if not n.endswith("scores")}
    assert all(torch.equal(frozen[n], w) for n, w in weights.items())


def test_fit_with_the_robust_objective_trains_only_the_scores(tiny_data):
    model = create_model("cnn-small", (1, 6, 6), 3)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()}
    scores = attach_scores(model, 3.0, "layer")
    start = [s.detach().clone() for s in scores]
    fit(model, create("pgd", eps=0.1, steps=2), tiny_data.train, TrainConfig(epochs=2, lr=0.05), FitOptions(batch_size=32,
        quiet=True))
    assert any(not torch.equal(s, s0) for s, s0 in zip(scores, start))
    finalize_scores(model)
    for name, p in model.named_parameters():
        plain = name.replace("parametrizations.weight.original", "weight")
        kept = p.detach() != 0
        assert torch.equal(p.detach()[kept], frozen[plain][kept])  # weights untouched, only masked


def test_layer_scope_starts_from_the_magnitude_top_k():
    model = _model()
    magnitudes = {f"{n}.weight": m.weight.detach().abs().clone() for n, m in prunable_layers(model)}
    attach_scores(model, 6.0, "layer")
    for path, kept in _kept(model).items():
        mag = magnitudes[path]
        expected = torch.zeros(mag.numel(), dtype=torch.bool)
        expected[torch.topk(mag.flatten(), int(kept.sum())).indices] = True
        assert torch.equal(kept.flatten(), expected)
        assert mag[kept].min() >= mag[~kept].max()


def test_scaled_init_is_sqrt6_over_fan_in_times_normalised_weight():
    conv = nn.Conv2d(3, 5, 3)
    w = conv.weight.detach()
    torch.testing.assert_close(scaled_score_init(w), (6 / 27) ** 0.5 * w / w.abs().max())
    linear = nn.Linear(10, 2)
    assert float(scaled_score_init(linear.weight).abs().max()) == pytest.approx((6 / 10) ** 0.5)


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_finalize_gives_fixed_masks_and_the_same_function(scope):
    model = _model()
    attach_scores(model, 5.0, scope)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    model(torch.rand(4, 1, 8, 8)).logsumexp(1).sum().backward()
    optimizer.step()  # move the scores off their initial ranking
    x = torch.rand(7, 1, 8, 8)
    with torch.no_grad():
        expected = model(x)
    counts = {path: int(m.sum()) for path, m in _kept(model).items()}
    final = finalize_scores(model)
    assert score_masks(model) == {}
    assert set(final) == set(masks(model)) == {f"{n}.weight" for n, _ in prunable_layers(model)}
    assert {path: int(m.sum()) for path, m in final.items()} == counts
    assert all(torch.equal(final[p], masks(model)[p]) for p in final)
    assert all(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        assert torch.equal(model(x), expected)
    modules = dict(model.named_modules())
    for path, mask in final.items():
        weight = modules[path.rpartition(".")[0]].weight
        assert int(torch.count_nonzero(weight)) == counts[path] and not bool(weight[mask == 0].any())
    assert not any("scores" in k for k in model.state_dict())
    assert not any("scores" in k for k in plain_state_dict(model))
    assert not any("scores" in n for n, _ in model.named_parameters())


def _random_masks(model, density=0.5, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {f"{n}.weight": (torch.rand(m.weight.shape, generator=g) < density).float() for n, m in
            prunable_layers(model)}


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_existing_masks_are_never_revived(scope):
    model = _model()
    old = _random_masks(model)
    apply_masks(model, old)
    scores = attach_scores(model, 4.0, scope)
    with torch.no_grad():  # even huge scores on pruned positions must not select them
        for path, sm in score_masks(model).items():
            sm.scores[old[path] == 0] = 1e3
    optimizer = torch.optim.SGD(scores, lr=1.0)
    for _ in range(3):
        for path, kept in _kept(model).items():
            assert not bool(kept[old[path] == 0].any())
        optimizer.zero_grad()
        model(torch.rand(4, 1, 8, 8)).logsumexp(1).sum().backward()
        optimizer.step()
    final = finalize_scores(model)
    for path, mask in final.items():
        assert not bool(mask[old[path] == 0].any())
    layers = dict(prunable_layers(model))
    for path, mask in final.items():
        chain = layers[path.rpartition(".")[0]].parametrizations.weight
        assert len(chain) == 1 and isinstance(chain[0], ParamMask)  # one fixed mask, the new one
        assert torch.equal(chain[0].mask, mask)


def test_too_few_survivors_keeps_all_of_them():
    model = _model()
    old = _random_masks(model, density=0.1)
    apply_masks(model, old)
    attach_scores(model, 2.0, "layer")  # asks for 50% of each layer; only ~10% survive
    for path, kept in _kept(model).items():
        assert torch.equal(kept, old[path].bool())


def test_only_the_named_layers_get_scores():
    model = _model()
    names = [n for n, _ in prunable_layers(model)]
    attach_scores(model, 4.0, "global", layers=names[:2])
    assert set(score_masks(model)) == {f"{n}.weight" for n in names[:2]}
    assert not any(p.requires_grad for n, p in model.named_parameters() if not n.endswith("scores"))
    assert set(finalize_scores(model)) == {f"{n}.weight" for n in names[:2]}


def test_deepcopy_keeps_the_global_group_consistent():
    model = _model()
    attach_scores(model, 4.0, "global")
    clone = copy.deepcopy(model)
    originals, copies = score_masks(model), score_masks(clone)
    assert all(copies[p].group is next(iter(copies.values())).group for p in copies)
    assert all(copies[p].group.members[copies[p].group_index] is copies[p] for p in copies)
    x = torch.rand(3, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(model(x), clone(x))
        next(iter(copies.values())).scores.fill_(100.0)  # changing the copy leaves the original alone
    assert not torch.equal(_kept(model)[next(iter(originals))], _kept(clone)[next(iter(copies))])


def test_bad_arguments_are_reported():
    model = _model()
    with pytest.raises(UserError, match="compression"):
        attach_scores(model, 0.5)
    with pytest.raises(UserError, match="scope"):
        attach_scores(model, 2.0, "channel")
    with pytest.raises(UserError, match="not prunable"):
        attach_scores(model, 2.0, layers=["nope"])
    with pytest.raises(ValueError, match="attach_scores"):
        finalize_scores(model)
    attach_scores(model, 2.0)
    with pytest.raises(ValueError, match="already attached"):
        attach_scores(model, 2.0)
    assert isinstance(next(iter(score_masks(model).values())), ScoreMask)

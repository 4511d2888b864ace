"""Structured (filter-L1) pruning: coupled channel masks, compression within channel granularity, exact slimming."""
from __future__ import annotations

import copy
import functools
import math
import re
from dataclasses import dataclass

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from robustprune.infra.errors import UserError
from robustprune.models import MODELS, create_model
from robustprune.pruning.masks import apply_masks, masks, prunable_layers, sparsity_report
from robustprune.pruning.structured import (
    BIAS, NORM, WEIGHT, ChannelGroup, channel_groups, channel_masks, count_macs_params, slim,
)

CLASSES = 10
SMALL = {"mlp": (1, 8, 8), "cnn-small": (1, 8, 8), "cnn-large": (1, 8, 8)}


def input_shape(name: str) -> tuple[int, int, int]:
    return SMALL.get(name, (3, 16, 16))


def random_bn_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BatchNorm running statistics and affine parameters, so that BN really acts in eval mode."""
    g = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            n = module.num_features
            module.running_mean.copy_(torch.rand(n, generator=g) * 2 - 1)
            module.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
            with torch.no_grad():
                module.weight.copy_(torch.rand(n, generator=g) + 0.5)
                module.bias.copy_(torch.rand(n, generator=g) - 0.5)
    return model


def build(name: str, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    model = random_bn_(create_model(name, input_shape(name), CLASSES), seed).eval()
    return model, torch.rand(2, *input_shape(name), generator=torch.Generator().manual_seed(seed))


@dataclass
class Case:
    model: nn.Module
    x: torch.Tensor
    masks: dict[str, torch.Tensor]
    masked: nn.Module
    slim: nn.Module
    groups: list[ChannelGroup]


@functools.lru_cache(maxsize=None)
def case(name: str, scope: str) -> Case:
    """Compression 2 for one model and scope (cached; tests only read it)."""
    model, x = build(name)
    found = channel_masks(model, x, 2.0, scope)
    masked = copy.deepcopy(model)
    apply_masks(masked, found)
    groups = [g for g in channel_groups(model, x) if not g.frozen]
    return Case(model, x, found, masked, slim(masked, x), groups)


def removed_channels(group: ChannelGroup, found: dict[str, torch.Tensor]) -> torch.Tensor:
    """Channels of ``group`` whose producer weight rows are entirely masked."""
    gone = torch.ones(group.channels, dtype=torch.bool)
    for s in group.slices:
        if s.role == WEIGHT:
            if s.path not in found:
                return torch.zeros(group.channels, dtype=torch.bool)
            rows = found[s.path].index_select(0, s.index).flatten(1).sum(1) == 0
            gone &= torch.zeros(group.channels, dtype=torch.bool).index_put((s.root,), rows)
    return gone


MODEL_NAMES = MODELS.names()


@pytest.mark.parametrize("scope", ["layer", "global"])
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_compression_is_reached_within_channel_granularity(name: str, scope: str) -> None:
    c = case(name, scope)
    report = sparsity_report(c.masked)
    target = report["params_prunable"] / 2.0
    per_channel = [g.weights_per_channel for g in c.groups]
    # Consecutive candidates differ by at most one channel of every group (layer) or one channel (global), and the
    # closer of the two bracketing the target is chosen: the error is at most half a step.
    step = sum(per_channel) if scope == "layer" else max(per_channel)
    assert abs(report["params_nonzero"] - target) <= step / 2
    assert report["compression"] == pytest.approx(2.0, rel=0.1)


@pytest.mark.parametrize("scope", ["layer", "global"])
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_slim_model_equals_masked_model_and_is_smaller(name: str, scope: str) -> None:
    c = case(name, scope)
    with torch.no_grad():
        expected, got = c.masked(c.x), c.slim(c.x)
    assert got.shape == (2, CLASSES)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    dense_macs, dense_params = count_macs_params(c.model, c.x)
    assert count_macs_params(c.masked, c.x) == (dense_macs, dense_params)
    slim_macs, slim_params = count_macs_params(c.slim, c.x)
    assert slim_macs < dense_macs and slim_params < dense_params
    # Every remaining prunable weight is a nonzero of the masked model: removal was exact, nothing extra kept.
    assert sparsity_report(c.slim)["params_prunable"] == sparsity_report(c.masked)["params_nonzero"]
    assert not any(parametrize.is_parametrized(m) for m in c.slim.modules())
    assert c.slim.arch == dict(c.model.arch, slim=True)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_removed_channels_are_zero_in_every_coupled_slice(name: str) -> None:
    c = case(name, "layer")
    modules = dict(c.masked.named_modules())
    total_removed = 0
    for group in c.groups:
        gone = removed_channels(group, c.masks)
        total_removed += int(gone.sum())
        for s in group.slices:
            module_name, _, param_name = s.path.rpartition(".")
            value = getattr(modules[module_name], param_name).detach()  # the effective (masked) parameter
            mask = c.masks.get(s.path, torch.ones_like(value))
            removed, kept = s.index[gone[s.root]], s.index[~gone[s.root]]
            assert (mask.index_select(s.dim, removed) == 0).all(), s.path
            assert (value.index_select(s.dim, removed) == 0).all(), s.path
            if s.role in (BIAS, NORM):  # kept channels keep their bias and BatchNorm entries
                assert (mask.index_select(s.dim, kept) == 1).all(), s.path
            elif s.role == WEIGHT:  # and their rows (columns of removed inputs aside)
                assert (mask.index_select(s.dim, kept).flatten(1).sum(1) > 0).all(), s.path
    assert total_removed > 0


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_classifier_outputs_are_never_pruned(name: str) -> None:
    c = case(name, "global")
    classifier_name, classifier = list(prunable_layers(c.model))[-1]
    assert f"{classifier_name}.bias" not in c.masks
    if f"{classifier_name}.weight" in c.masks:
        assert (c.masks[f"{classifier_name}.weight"].sum(1) > 0).all()
    assert dict(c.slim.named_modules())[classifier_name].out_features == classifier.out_features == CLASSES


@pytest.mark.parametrize("name, ignored", [("cnn-large", "1.0"), ("resnet18", "1.0"), ("vgg16-bn", "1.3")])
def test_ignored_layers_keep_their_output_channels(name: str, ignored: str) -> None:
    model, x = build(name)
    layer = dict(model.named_modules())[ignored]
    found = channel_masks(model, x, 1.5, "global", ignored_layers=[layer])
    frozen = [g for g in channel_groups(model, x, ignored_layers=[ignored]) if g.frozen]
    coupled = [g for g in frozen if any(s.path == f"{ignored}.weight" and s.role == WEIGHT for s in g.slices)]
    assert len(coupled) == 1  # the ignored layer freezes its whole group (e.g. a residual stream in resnet18)
    for s in coupled[0].slices:
        if s.role in (WEIGHT, BIAS, NORM):
            assert s.path not in found or (found[s.path].index_select(s.dim, s.index).flatten(1).sum(1) > 0).all()
    masked = copy.deepcopy(model)
    apply_masks(masked, found)
    assert sparsity_report(masked)["compression"] == pytest.approx(1.5, rel=0.1)
    assert dict(slim(masked, x).named_modules())[ignored].out_channels == layer.out_channels


@pytest.mark.parametrize("request_", [{"compression": 2.5, "scope": "global"},
                                      {"channel_fraction": 0.7, "scope": "layer"}])
def test_min_density_is_honoured(request_: dict) -> None:
    model, x = build("cnn-large")
    found = channel_masks(model, x, min_density=0.5, **request_)
    groups = [g for g in channel_groups(model, x) if not g.frozen]
    kept = [g.channels - int(removed_channels(g, found).sum()) for g in groups]
    assert all(k >= math.ceil(0.5 * g.channels) for k, g in zip(kept, groups))
    assert any(k == math.ceil(0.5 * g.channels) for k, g in zip(kept, groups))  # the floor was binding somewhere


def test_unreachable_compression_names_the_largest_reachable() -> None:
    model, x = build("mlp")
    with pytest.raises(UserError, match="largest reachable is") as error:
        channel_masks(model, x, 1e4, "layer")
    largest = float(re.search(r"largest reachable is ([0-9.]+)", str(error.value)).group(1))
    masked = copy.deepcopy(model)
    apply_masks(masked, channel_masks(model, x, largest * 0.999, "layer"))  # the named value is reachable
    assert sparsity_report(masked)["compression"] == pytest.approx(largest, rel=1e-3)
    with pytest.raises(UserError, match="min_density 0.9"):
        channel_masks(model, x, 2.0, "global", min_density=0.9)


def test_channel_fraction_removes_half_of_every_group() -> None:
    model, x = build("vgg16-bn")
    masked = copy.deepcopy(model)
    apply_masks(masked, channel_masks(model, x, channel_fraction=0.5))
    small = slim(masked, x)
    layers = list(prunable_layers(model))[:-1]  # all but the classifier
    sizes = dict(prunable_layers(small))
    for name, layer in layers:
        out = layer.out_channels if isinstance(layer, nn.Conv2d) else layer.out_features
        new = sizes[name].out_channels if isinstance(layer, nn.Conv2d) else sizes[name].out_features
        assert new == out // 2, name


def test_existing_masks_are_kept_and_the_model_is_unchanged() -> None:
    model, x = build("cnn-small")
    unstructured = (torch.rand(32, 16, 4, 4, generator=torch.Generator().manual_seed(1)) > 0.3).float()
    apply_masks(model, {"1.2.weight": unstructured})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    found = channel_masks(model, x, 3.0, "layer")
    assert (found["1.2.weight"] <= unstructured).all()
    assert model.training and masks(model).keys() == {"1.2.weight"}
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    small = slim(model, x)
    assert small.training
    model(x)  # the original parametrized model still works after copies were baked (shared-class pitfall)


def test_unstructured_zeros_stay_and_only_whole_zero_channels_go() -> None:
    model, x = build("mlp")
    mask = (torch.rand(256, 256, generator=torch.Generator().manual_seed(2)) > 0.5).float()
    mask[3] = 0
    bias = torch.ones(256)
    bias[3] = 0
    apply_masks(model, {"1.3.weight": mask, "1.3.bias": bias})
    small = slim(model, x)
    assert small[1][3].out_features == 255 and small[1][1].out_features == 256
    # Unstructured zeros stay; the removed unit also takes its (unmasked) classifier column with it.
    lost = int(torch.count_nonzero(model[1][5].weight[:, 3]))
    assert sparsity_report(small)["params_nonzero"] == sparsity_report(model)["params_nonzero"] - lost
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kwargs, message", [
    ({"compression": 0.5}, "compression must be"),
    ({"compression": 2.0, "scope": "net"}, "unknown scope"),
    ({}, "exactly one of"),
    ({"compression": 2.0, "channel_fraction": 0.5}, "exactly one of"),
    ({"compression": 2.0, "min_density": 1.5}, "min_density"),
])
def test_bad_requests_are_user_errors(kwargs: dict, message: str) -> None:
    model, x = build("mlp")
    with pytest.raises(UserError, match=message):
        channel_masks(model, x, **kwargs)


def test_unsupported_layers_are_refused_not_skipped() -> None:
    model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.GroupNorm(2, 8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 3))
    with pytest.raises(NotImplementedError, match="GroupNorm"):
        channel_masks(model, torch.rand(2, 1, 8, 8), 1.5)

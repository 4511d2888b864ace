"""The pruning package's seams: channel scores come from the rule's Importance class, scope names come from the
selector table (the one list config and the command line should use), and the package root only re-exports."""
from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest
import torch

import robustprune.pruning as pruning
from robustprune.config import load_config
from robustprune.infra.errors import UserError
from robustprune.models import create_model
from robustprune.pruning import PRUNERS, SCOPES, prune
from robustprune.pruning.groups import WEIGHT, baked_copy, channel_groups, channel_mass
from robustprune.pruning.importance import ChannelImportance, FilterL1
from robustprune.pruning.plan import RANKED_SCOPES, SELECTORS
from robustprune.pruning.structured import channel_masks


def _model():
    torch.manual_seed(0)
    return create_model("cnn-small", (1, 8, 8), 10)


def _l1_and_removed(model) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per removable group: (L1 of each channel's weight rows before pruning, which channels filter-l1 removed)."""
    groups = [g for g in channel_groups(model) if not g.frozen]
    before = dict(model.named_parameters())
    l1 = [channel_mass(g, before, (WEIGHT,)) for g in groups]
    prune(model, "filter-l1", 2.0, "layer")
    after = dict(baked_copy(model).named_parameters())
    return [(imp, channel_mass(g, after, (WEIGHT,)) == 0) for g, imp in zip(groups, l1)]


def test_structured_channels_are_chosen_by_the_rules_channel_scores(monkeypatch):
    plain = _l1_and_removed(_model())
    original = FilterL1.channel_scores
    monkeypatch.setattr(FilterL1, "channel_scores", lambda self, group, params: -original(self, group, params))
    reversed_ = _l1_and_removed(_model())
    assert any(gone.any() for _, gone in plain)
    for (l1, gone), (same_l1, gone_reversed) in zip(plain, reversed_):
        assert torch.equal(l1, same_l1)
        assert int(gone.sum()) == int(gone_reversed.sum())  # the layer scope's counts do not depend on the scores
        if gone.any() and (~gone).any():
            assert l1[gone].max() <= l1[~gone].min()  # the lowest L1 go ...
            assert l1[gone_reversed].min() >= l1[~gone_reversed].max()  # ... or, scores reversed, the highest
    assert any(not torch.equal(a, b) for (_, a), (_, b) in zip(plain, reversed_))


def test_channel_masks_takes_the_rule_object_and_its_scopes():
    class LayerOnly(ChannelImportance):
        name = "layer-only"
        scopes = ("layer",)

        def channel_scores(self, group, params):
            return torch.arange(group.channels, dtype=torch.float64)

    model = _model()
    x = torch.rand(2, 1, 8, 8)
    with pytest.raises(UserError, match=r"unknown scope 'global' \(choose from: layer\)"):
        channel_masks(model, x, 2.0, "global", importance=LayerOnly())
    assert channel_masks(model, x, 2.0, "layer", importance=LayerOnly())


def test_scopes_are_the_selector_tables_keys():
    assert SCOPES == tuple(SELECTORS) == ("layer", "global", "erk")
    assert set(RANKED_SCOPES) <= set(SCOPES)
    for name in PRUNERS.names():
        rule = PRUNERS.get(name)
        assert rule.scopes == (RANKED_SCOPES if rule.structured else SCOPES), name


def test_config_accepts_exactly_the_scopes():
    for scope in SCOPES:
        assert load_config(None, [f"prune.scope={scope}"]).prune.scope == scope
    with pytest.raises(UserError, match="scope"):
        load_config(None, ["prune.scope=row"])


def test_the_package_root_only_reexports():
    tree = ast.parse(Path(pruning.__file__).read_text())
    assert not [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef, ast.Assign)) and
                not (isinstance(n, ast.Assign) and n.targets[0].id == "__all__")]
    for name in pruning.__all__:
        value = getattr(pruning, name)
        if inspect.isfunction(value) or inspect.isclass(value):
            assert value.__module__.startswith("robustprune.pruning."), name
    assert inspect.isfunction(pruning.prune) and inspect.isfunction(pruning.masks)

"""data.val_fraction holds training images out of training; evaluate.split: val reports on them (settings are
chosen on held-out training images, never on the test images a claim is measured on)."""
from __future__ import annotations

import pytest
import torch

from robustprune import pipeline
from robustprune.config import load_config
from robustprune.data import Split, hold_out
from robustprune.infra.errors import UserError


def _rows(split: Split) -> set[bytes]:
    return {row.numpy().tobytes() for row in split.x.flatten(1)}


def test_hold_out_is_a_fixed_disjoint_cover_of_the_training_split():
    x = torch.arange(100, dtype=torch.float32).view(100, 1, 1, 1)
    split = Split(x, torch.arange(100) % 10)
    rest, held = hold_out(split, 0.2)
    assert len(held) == 20 and len(rest) == 80
    assert sorted(torch.cat([rest.x, held.x]).flatten().tolist()) == list(range(100))
    again_rest, again_held = hold_out(split, 0.2)
    assert torch.equal(held.x, again_held.x) and torch.equal(rest.y, again_rest.y)
    assert torch.equal(held.y, held.x.flatten().long() % 10)  # labels stay with their images


def test_pipeline_trains_without_the_held_out_images_and_evaluates_on_them_when_asked():
    full = pipeline.load_data(load_config(None))
    held_test = pipeline.load_data(load_config(None, ["data.val_fraction=0.25"]))
    held_val = pipeline.load_data(load_config(None, ["data.val_fraction=0.25", "evaluate.split=val"]))
    assert len(held_test.train) + len(held_val.test) == len(full.train)
    assert torch.equal(held_test.test.x, full.test.x)  # split: test keeps the test images
    assert not _rows(held_val.train) & _rows(held_val.test)
    assert _rows(held_val.test) <= _rows(full.train)
    assert not _rows(held_val.test) & _rows(full.test) - _rows(full.train)


@pytest.mark.parametrize("overrides, message", [
    (["evaluate.split=val"], "needs data.val_fraction > 0"),
    (["data.val_fraction=1"], "val_fraction must lie in"),
    (["evaluate.split=train"], "split must be test or val"),
])
def test_bad_validation_settings_are_refused(overrides, message):
    with pytest.raises(UserError, match=message):
        load_config(None, overrides)

"""Shared fixtures: tiny synthetic data and models so unit tests run in milliseconds."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import nn

from robustprune.data import Dataset, Split

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("ROBUSTPRUNE_DATA") or REPO.parent / "shared" / "data")


def make_tiny_dataset(n_train: int = 64, n_test: int = 32, shape=(1, 6, 6), classes: int = 3, seed: int = 0) -> Dataset:
    """Linearly separable-ish blobs in [0, 1] (class c brightens block c)."""
    g = torch.Generator().manual_seed(seed)

    def split(n: int) -> Split:
        y = torch.arange(n) % classes
        x = torch.rand(n, *shape, generator=g) * 0.3
        for c in range(classes):
            x[y == c, :, c * 2:(c * 2) + 2, :] += 0.6
        return Split(x.clamp(0, 1), y)

    return Dataset("tiny", split(n_train), split(n_test), classes)


def fit_full_batch(model: nn.Module, data: Dataset, steps: int = 100, lr: float = 1e-2) -> nn.Module:
    """Adam on the whole (tiny) training split at once; returns the model in eval mode."""
    import torch.nn.functional as F

    optim = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        loss = F.cross_entropy(model(data.train.x), data.train.y)
        optim.zero_grad()
        loss.backward()
        optim.step()
    return model.eval()


@pytest.fixture
def tiny_data() -> Dataset:
    return make_tiny_dataset()


@pytest.fixture
def tiny_mlp() -> nn.Module:
    from robustprune.models import create_model

    torch.manual_seed(0)
    return create_model("mlp", (1, 6, 6), 3)


@pytest.fixture(scope="module")
def one_thread():
    """Tests of tiny tensors: one intra-op thread is faster than two on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


WALL_TIMES = ("time_s", "seconds_per_sample", "median_s", "worst_s")


def without_wall_times(value):
    """``value`` (nested dicts and lists) without its wall-time entries: what two identical runs share."""
    if isinstance(value, dict):
        return {k: without_wall_times(v) for k, v in value.items() if k not in WALL_TIMES}
    if isinstance(value, list):
        return [without_wall_times(v) for v in value]
    return value

"""The real MNIST files, read from the shared data root: $ROBUSTPRUNE_DATA, else ``../shared/data`` beside the repo."""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch

from robustprune.data import load_dataset

ROOT = Path(os.environ.get("ROBUSTPRUNE_DATA") or Path(__file__).resolve().parents[2].parent / "shared" / "data")
TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]

pytestmark = pytest.mark.skipif(not (ROOT / "mnist").is_dir(), reason=f"real MNIST not found at {ROOT / 'mnist'} "
                                "(set $ROBUSTPRUNE_DATA to a folder holding mnist/)")


def test_real_mnist_loads_fast_and_matches_the_canonical_set():
    start = time.perf_counter()
    ds = load_dataset("mnist", root=ROOT)
    elapsed = time.perf_counter() - start
    assert elapsed < 10.0, f"loading MNIST took {elapsed:.1f} s"  # about 0.4 s on a laptop; generous for slow CI
    assert (len(ds.train), len(ds.test)) == (60000, 10000)
    assert ds.train.x.shape == (60000, 1, 28, 28) and ds.test.x.shape == (10000, 1, 28, 28)
    assert ds.input_shape == (1, 28, 28) and ds.num_classes == 10
    for split in (ds.train, ds.test):
        assert split.x.dtype == torch.float32 and split.y.dtype == torch.int64
        assert split.x.min() == 0.0 and split.x.max() == 1.0
    assert torch.bincount(ds.train.y, minlength=10).tolist() == TRAIN_COUNTS
    assert torch.bincount(ds.test.y, minlength=10).tolist() == TEST_COUNTS
    mean, std = ds.channel_stats()
    assert mean[0] == pytest.approx(0.1307, abs=1e-4) and std[0] == pytest.approx(0.3081, abs=1e-4)

"""``digits``: scikit-learn's bundled 8x8 handwritten digits, the embedded default dataset (no download).

Source: the UCI "Optical Recognition of Handwritten Digits" test set as shipped inside scikit-learn
(``sklearn.datasets.load_digits``): 1797 grey-level images, 8x8 pixels with values 0..16, 10 classes.
The split is a fixed stratified 80/20 train/test split (``train_test_split(..., stratify=y, random_state=0)``).
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from robustprune.data.base import DATASETS, Dataset, DatasetSource, Split


@lru_cache(maxsize=1)
def _arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, y_train, x_test, y_test) as numpy arrays, read once per process."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = (bunch.images.astype(np.float32) / 16.0)[:, None, :, :]
    y = bunch.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.2, stratify=y, random_state=0)
    return x_train, y_train, x_test, y_test


@DATASETS.register("digits")
class Digits(DatasetSource):
    """The 8x8 digits bundled with scikit-learn: (N, 1, 8, 8) inputs in [0, 1], 10 classes; ignores the data root."""

    name = "digits"
    folder = ""

    def load(self, root: Path, path: Path | None = None) -> Dataset:
        x_train, y_train, x_test, y_test = _arrays()
        # fresh tensors each call, so a caller editing its tensors in place cannot corrupt the cached copy
        return Dataset(
            name=self.name,
            train=Split(torch.tensor(x_train), torch.tensor(y_train)),
            test=Split(torch.tensor(x_test), torch.tensor(y_test)),
            num_classes=10,
        )

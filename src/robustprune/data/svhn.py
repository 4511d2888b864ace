"""``svhn``: the Street View House Numbers, cropped-digits format (http://ufldl.stanford.edu/housenumbers/).

``train_32x32.mat`` (73,257 images) and ``test_32x32.mat`` (26,032) are MATLAB files with ``X`` (32, 32, 3, N)
uint8 RGB images and ``y`` (N, 1) labels 1..10, where 10 stands for the digit 0 (mapped to 0 here).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import scipy.io
import torch

from robustprune.data.base import DATASETS, Dataset, DatasetSource, Split
from robustprune.infra.errors import UserError

FILES = {"train": "train_32x32.mat", "test": "test_32x32.mat"}


def read_mat(path: Path) -> Split:
    """One SVHN ``.mat`` file as a Split of (N, 3, 32, 32) inputs in [0, 1] and labels 0..9."""
    try:
        mat = scipy.io.loadmat(str(path), variable_names=["X", "y"])
    except Exception as exc:  # scipy raises ValueError, TypeError, OSError, MatReadError, ... for a bad file
        raise UserError(f"{path}: not a readable MATLAB file ({type(exc).__name__}: "
                        f"{' '.join(str(exc).split())})") from None
    if "X" not in mat or "y" not in mat:
        raise UserError(f"{path}: expected variables X and y, found {sorted(k for k in mat if not k.startswith('__'))}")
    x, y = mat["X"], np.asarray(mat["y"]).reshape(-1)
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[2] != 3:
        raise UserError(f"{path}: X must be uint8 of shape (H, W, 3, N), got {x.dtype} {x.shape}")
    if len(y) != x.shape[3] or not np.issubdtype(y.dtype, np.integer):
        raise UserError(f"{path}: y must hold {x.shape[3]} integer labels, got {y.dtype} {mat['y'].shape}")
    if y.size and (y.min() < 0 or y.max() > 10):
        raise UserError(f"{path}: labels must lie in 1..10, found {int(y.min())}..{int(y.max())}")
    y = np.where(y == 10, 0, y).astype(np.int64)
    images = np.ascontiguousarray(x.transpose(3, 2, 0, 1))  # (H, W, C, N) -> (N, C, H, W)
    return Split(torch.from_numpy(images.astype(np.float32)).div_(255.0), torch.from_numpy(y))


@DATASETS.register("svhn")
class Svhn(DatasetSource):
    """SVHN cropped digits (Netzer et al. 2011): (N, 3, 32, 32) inputs in [0, 1], 10 classes; no ``extra`` set."""

    name = "svhn"
    folder = "svhn"

    def load(self, root: Path, path: Path | None = None) -> Dataset:
        paths = {split: root / self.folder / f for split, f in FILES.items()}
        missing = [p for p in paths.values() if not p.is_file()]
        if missing:
            raise self.missing(missing)
        return Dataset(name=self.name, train=read_mat(paths["train"]), test=read_mat(paths["test"]), num_classes=10)

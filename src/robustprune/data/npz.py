"""``npz``: a user's own dataset, one NumPy ``.npz`` file with arrays ``x_train``, ``y_train``, ``x_test``, ``y_test``.

Inputs may be (N, H, W), channels-last (N, H, W, C) with C in {1, 3}, or channels-first (N, C, H, W) (a 4-D array is
taken as channels-last when its last axis is 1 or 3 and its second axis is not); uint8 values
are divided by 255, float values must already lie in [0, 1]. Labels are integers in [0, K); K = largest label + 1
(at most ``models.MAX_CLASSES``).
Read with ``numpy.load(allow_pickle=False)``, so object arrays (pickles) are refused.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from robustprune.data.base import DATASETS, Dataset, DatasetSource, Split
from robustprune.infra.errors import UserError
from robustprune.models import MAX_CLASSES

KEYS = ("x_train", "y_train", "x_test", "y_test")


def to_nchw(x: np.ndarray, where: str) -> np.ndarray:
    """Inputs as float32 (N, C, H, W) in [0, 1]."""
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        x = x.transpose(0, 3, 1, 2)  # channels-last -> channels-first
    elif x.ndim != 4:
        raise UserError(f"{where}: expected shape (N, H, W), (N, H, W, C) or (N, C, H, W), got {x.shape}")
    if 0 in x.shape[1:]:
        raise UserError(f"{where}: images of shape {x.shape[1:]} hold no pixels")
    if x.dtype == np.uint8:
        return np.ascontiguousarray(x, dtype=np.float32) / np.float32(255.0)
    if not np.issubdtype(x.dtype, np.floating):
        raise UserError(f"{where}: inputs must be uint8 (0..255) or float in [0, 1], got dtype {x.dtype}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.size and not (x.min() >= 0.0 and x.max() <= 1.0):  # also catches NaN
        raise UserError(f"{where}: float inputs must lie in [0, 1] (found {x.min():g}..{x.max():g}); "
                        "scale them, or store uint8 0..255")
    return x


def to_labels(y: np.ndarray, n: int, where: str) -> np.ndarray:
    """Labels as int64 (N,), checked against the number of inputs."""
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1 or len(y) != n or not np.issubdtype(y.dtype, np.integer):
        raise UserError(f"{where}: expected {n} integer labels of shape ({n},), got {y.dtype} {y.shape}")
    if y.size:
        low, high = int(y.min()), int(y.max())  # Python ints: a uint64 label must not wrap to -1 in int64
        if low < 0:
            raise UserError(f"{where}: labels must be >= 0, found {low}")
        if high >= MAX_CLASSES:
            raise UserError(f"{where}: labels must be class indices below {MAX_CLASSES:,}, found {high}")
    return y.astype(np.int64)


@DATASETS.register("npz")
class Npz(DatasetSource):
    """A user's ``.npz``: the ``path`` argument, else ``<root>/npz/data.npz``."""

    name = "npz"
    folder = "npz"

    def load(self, root: Path, path: Path | None = None) -> Dataset:
        path = path or root / self.folder / "data.npz"
        if not path.is_file():
            raise self.missing([path])
        arrays = self._read(path)
        splits = {}
        for split in ("train", "test"):
            x = to_nchw(arrays[f"x_{split}"], f"{path}: x_{split}")
            y = to_labels(arrays[f"y_{split}"], len(x), f"{path}: y_{split}")
            if len(x) == 0:
                raise UserError(f"{path}: x_{split} is empty")
            splits[split] = Split(torch.from_numpy(x), torch.from_numpy(y))
        if splits["train"].x.shape[1:] != splits["test"].x.shape[1:]:
            raise UserError(f"{path}: x_train images are {tuple(splits['train'].x.shape[1:])} "
                            f"but x_test images are {tuple(splits['test'].x.shape[1:])}")
        num_classes = int(max(splits["train"].y.max(), splits["test"].y.max())) + 1
        return Dataset(name=self.name, train=splits["train"], test=splits["test"], num_classes=num_classes)

    def missing(self, paths: list[Path]) -> UserError:
        # a user's own data: there is nothing to download, so say how to point at the file instead
        return UserError(f"npz: no file at {', '.join(map(str, paths))}; pass the .npz path (data.path) or place it "
                         f"at <data root>/npz/data.npz, holding arrays {', '.join(KEYS)}")

    @staticmethod
    def _read(path: Path) -> dict[str, np.ndarray]:
        """The four arrays, read eagerly so the file is closed and every decoding error surfaces here."""
        try:
            loaded = np.load(path, allow_pickle=False)
            if not hasattr(loaded, "files"):
                raise UserError(f"{path}: holds a single .npy array, expected an .npz archive with {', '.join(KEYS)}")
            with loaded as f:
                missing = [k for k in KEYS if k not in f.files]
                if missing:
                    found = ", ".join(f.files) or "none"
                    raise UserError(f"{path}: missing arrays {', '.join(missing)} (found: {found};"
                                    f" expected {', '.join(KEYS)})")
                return {k: f[k] for k in KEYS}
        except UserError:
            raise
        except Exception as exc:  # BadZipFile, ValueError (object arrays, bad header), EOFError, OSError, ...
            raise UserError(f"{path}: not a readable .npz file ({type(exc).__name__}: "
                            f"{' '.join(str(exc).split())})") from None

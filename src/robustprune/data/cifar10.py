"""``cifar10``: the publisher's "CIFAR-10 python version" (https://www.cs.toronto.edu/~kriz/cifar.html).

The extracted ``cifar-10-python.tar.gz`` gives ``cifar-10-batches-py/`` with ``data_batch_1`` .. ``data_batch_5``
(10,000 images each) and ``test_batch``: Python 2 pickles of a dict with ``b'data'`` (N, 3072) uint8, rows of
1024 red, 1024 green, 1024 blue values of a 32x32 image in row-major order, and ``b'labels'`` (N ints in 0..9).
Pickles can run code when loaded, so they are read with an unpickler that can only rebuild numpy arrays.
"""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from robustprune.data.base import DATASETS, Dataset, DatasetSource, Split
from robustprune.infra.errors import UserError

try:  # numpy >= 2 (and the forward-compatibility alias in 1.26)
    from numpy._core.multiarray import _reconstruct
except ImportError:  # pragma: no cover - older numpy
    from numpy.core.multiarray import _reconstruct

TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_FILES = ["test_batch"]


def _latin1_encode(text: str, encoding: str = "latin1", errors: str = "strict") -> bytes:
    """What Python 3 pickles of protocol < 3 call to rebuild a ``bytes`` object; nothing else is allowed."""
    if not isinstance(text, str) or encoding != "latin1":
        raise pickle.UnpicklingError("_codecs.encode is only allowed as bytes rebuilding (str, 'latin1')")
    return text.encode("latin1")


ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
}


class NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals needed to rebuild plain numpy arrays; anything else is refused."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise UserError(f"refusing to load {module}.{name} "
                            "(only numpy arrays may appear in a dataset pickle)") from None


def read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 batch file as (images (N, 3, 32, 32) uint8, labels (N,) int64)."""
    try:
        with path.open("rb") as f:
            batch = NumpyOnlyUnpickler(f, encoding="bytes").load()
    except UserError as exc:
        raise UserError(f"{path}: {exc}") from None
    except Exception as exc:  # a corrupt pickle can fail in many ways; all mean the same to the user
        raise UserError(f"{path}: not a valid CIFAR-10 batch pickle ({type(exc).__name__}: "
                        f"{' '.join(str(exc).split())})") from None
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise UserError(f"{path}: expected a dict with keys b'data' and b'labels'")
    data, labels = batch[b"data"], np.asarray(batch[b"labels"])
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise UserError(f"{path}: b'data' must be a uint8 array of shape (N, 3072), "
                        f"got {getattr(data, 'dtype', type(data).__name__)} {getattr(data, 'shape', '')}")
    if labels.shape != (len(data),) or not np.issubdtype(labels.dtype, np.integer):
        raise UserError(f"{path}: b'labels' must hold {len(data)} integers, got shape {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= 10):
        raise UserError(f"{path}: labels must lie in 0..9, found {int(labels.min())}..{int(labels.max())}")
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


@DATASETS.register("cifar10")
class Cifar10(DatasetSource):
    """CIFAR-10 (Krizhevsky 2009): 50,000 train / 10,000 test 32x32 colour images, 10 classes, (N, 3, 32, 32)."""

    name = "cifar10"
    folder = "cifar10"

    def load(self, root: Path, path: Path | None = None) -> Dataset:
        batches = root / self.folder / "cifar-10-batches-py"
        missing = [batches / f for f in TRAIN_FILES + TEST_FILES if not (batches / f).is_file()]
        if missing:
            raise self.missing(missing)
        return Dataset(name=self.name, train=self._split(batches, TRAIN_FILES),
                       test=self._split(batches, TEST_FILES), num_classes=10)

    @staticmethod
    def _split(folder: Path, files: list[str]) -> Split:
        parts = [read_batch(folder / f) for f in files]
        x = np.concatenate([p[0] for p in parts])
        y = np.concatenate([p[1] for p in parts])
        return Split(torch.from_numpy(x.astype(np.float32)).div_(255.0), torch.from_numpy(y))

"""``mnist`` and ``fashion-mnist``: the publishers' IDX files, gzipped (``.gz``) or raw.

Format (http://yann.lecun.com/exdb/mnist/, https://github.com/zalandoresearch/fashion-mnist): a big-endian header of
magic ``0x00000803`` (unsigned bytes, 3 dims) for images or ``0x00000801`` (1 dim) for labels, then one uint32 per
dimension, then the unsigned-byte data in C order. Both datasets ship the same four files:
``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``.
"""
from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np
import torch

from robustprune.data.base import DATASETS, Dataset, DatasetSource, Split
from robustprune.infra.errors import UserError

IMAGES_MAGIC = 0x00000803
LABELS_MAGIC = 0x00000801
SPLIT_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
               "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def read_idx(path: Path, magic: int) -> np.ndarray:
    """Read one IDX file (gzipped if its name ends in ``.gz``) into a uint8 array shaped as its header says."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:
        raise UserError(f"{path}: cannot read ({' '.join(str(exc).split())})") from None
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise UserError(f"{path}: truncated IDX header ({len(raw)} bytes)")
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise UserError(f"{path}: bad IDX magic number 0x{found:08x}, expected 0x{magic:08x}")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(dims))
    if len(raw) - header != expected:
        raise UserError(f"{path}: IDX header says {dims} = {expected} bytes of data "
                        f"but the file holds {len(raw) - header}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


class IdxSource(DatasetSource):
    """Shared reader of the four IDX files: (N, 1, 28, 28) inputs in [0, 1], int64 labels in [0, 10)."""

    def load(self, root: Path, path: Path | None = None) -> Dataset:
        folder = root / self.folder
        found = {stem: self._locate(folder, stem) for pair in SPLIT_FILES.values() for stem in pair}
        missing = [folder / f"{stem}.gz" for stem, p in found.items() if p is None]
        if missing:
            raise self.missing(missing)
        train, test = (self._split(found[images], found[labels]) for images, labels in SPLIT_FILES.values())
        return Dataset(name=self.name, train=train, test=test, num_classes=10)

    @staticmethod
    def _locate(folder: Path, stem: str) -> Path | None:
        """The ``.gz`` file if present, else the raw one, else None."""
        return next((p for p in (folder / f"{stem}.gz", folder / stem) if p.is_file()), None)

    def _split(self, images_path: Path, labels_path: Path) -> Split:
        images = read_idx(images_path, IMAGES_MAGIC)
        labels = read_idx(labels_path, LABELS_MAGIC)
        if len(images) != len(labels):
            raise UserError(f"{self.name}: {images_path} holds {len(images)} images but {labels_path} "
                            f"holds {len(labels)} labels")
        if labels.size and labels.max() >= 10:
            raise UserError(f"{self.name}: {labels_path} holds label {int(labels.max())}, expected 0..9")
        x = torch.from_numpy(images.astype(np.float32)[:, None]).div_(255.0)
        return Split(x, torch.from_numpy(labels.astype(np.int64)))


@DATASETS.register("mnist")
class Mnist(IdxSource):
    """MNIST handwritten digits (LeCun, Cortes, Burges): 60,000 train / 10,000 test, 28x28 grey levels."""

    name = "mnist"
    folder = "mnist"


@DATASETS.register("fashion-mnist")
class FashionMnist(IdxSource):
    """Fashion-MNIST (Xiao, Rasul, Vollgraf 2017): Zalando article images in MNIST's IDX layout and sizes."""

    name = "fashion-mnist"
    folder = "fashion-mnist"

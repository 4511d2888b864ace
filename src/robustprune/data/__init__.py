"""Datasets: in-memory tensors with inputs in [0, 1]. Importing this package registers every reader."""
from robustprune.data.base import DATASETS, Dataset, DatasetSource, Split, hold_out, load_dataset, resolve_root
from robustprune.data import digits, idx, cifar10, svhn, npz  # noqa: F401  (registration)

__all__ = ["DATASETS", "Dataset", "DatasetSource", "Split", "hold_out", "load_dataset", "resolve_root"]

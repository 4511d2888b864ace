"""What every dataset reader returns, the dataset registry and the data-root rule (DESIGN.md §3)."""
from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import torch

from robustprune.infra.errors import UserError
from robustprune.registry import Registry


@dataclass(frozen=True)
class Split:
    """One split held in memory: ``x`` float32 (N, C, H, W) in [0, 1], ``y`` int64 (N,)."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return int(self.y.shape[0])


@dataclass(frozen=True)
class Dataset:
    """A train/test pair of in-memory splits of one classification task."""

    name: str
    train: Split
    test: Split
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.x.shape[1:])  # type: ignore[return-value]

    def channel_stats(self) -> tuple[list[float], list[float]]:
        """Per-channel mean and std of the training inputs (for the model's Normalize layer)."""
        x = self.train.x.transpose(0, 1).reshape(self.train.x.shape[1], -1).double()
        return x.mean(1).tolist(), x.std(1).clamp_min(1e-6).tolist()


def hold_out(split: Split, fraction: float) -> tuple[Split, Split]:
    """(the rest, the held-out part): ``round(fraction · N)`` images drawn by a fixed permutation (seed 0), so the
    same images are held out whatever the run's seed and runs with different seeds stay comparable."""
    count = round(fraction * len(split))
    order = torch.randperm(len(split), generator=torch.Generator().manual_seed(0))
    held, rest = order[:count].sort().values, order[count:].sort().values
    return Split(split.x[rest], split.y[rest]), Split(split.x[held], split.y[held])


class DatasetSource(ABC):
    """A registered reader: knows which files it expects under the data root and how to read them."""

    name: str = ""
    folder: str = ""  # sub-folder of the data root, in the publisher's layout

    @abstractmethod
    def load(self, root: Path, path: Path | None = None) -> Dataset:
        """Read the dataset; raise UserError naming the expected paths when files are missing or malformed."""

    def missing(self, paths: list[Path]) -> UserError:
        listed = ", ".join(str(p) for p in paths)
        return UserError(
            f"{self.name}: missing data files; expected {listed} (run `robustprune download {self.name}` "
            f"or set data.root / $ROBUSTPRUNE_DATA to a folder holding {self.folder}/)"
        )


DATASETS: Registry[type[DatasetSource]] = Registry("dataset")


def resolve_root(root: str | os.PathLike | None = None) -> Path:
    """``data.root``, else ``$ROBUSTPRUNE_DATA``, else ``~/.cache/robustprune``."""
    if root:
        return Path(root).expanduser()
    env = os.environ.get("ROBUSTPRUNE_DATA")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "robustprune"


def load_dataset(name: str, root: str | os.PathLike | None = None, path: str | os.PathLike | None = None) -> Dataset:
    """Load a registered dataset as in-memory tensors with inputs in [0, 1]."""
    source = DATASETS.get(name)()
    return source.load(resolve_root(root), Path(path).expanduser() if path else None)

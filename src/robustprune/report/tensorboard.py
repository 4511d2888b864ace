"""Optional TensorBoard scalars beside metrics.jsonl (extra ``robustprune[tensorboard]``; config ``tensorboard: true``).

Each training epoch of every stage becomes the scalars ``<stage>/loss``, ``<stage>/train_acc``, ``<stage>/lr`` and
``<stage>/eps`` at a global epoch step (stages follow each other on one axis), and each evaluated stage its
accuracies under ``eval/<metric>``. Written with ``torch.utils.tensorboard.SummaryWriter`` into ``RUN/tensorboard``:
``tensorboard --logdir RUN/tensorboard``.
"""
from __future__ import annotations

from pathlib import Path

from robustprune.infra.errors import UserError

_EPOCH_SCALARS = ("loss", "train_acc", "lr", "eps")
_EVAL_SCALARS = ("benign_acc", "pgd_acc", "autoattack_acc", "verified_acc", "compression")


def summary_writer_class() -> type:
    """``SummaryWriter``, or a one-line UserError when the extra is not installed (checked before a run starts)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError("TensorBoard scalars need the optional extra: pip install 'robustprune[tensorboard]'") \
            from None
    return SummaryWriter


class Scalars:
    """A SummaryWriter with robustprune's names; ``epoch`` is ``fit``'s ``on_epoch`` callback."""

    def __init__(self, folder: str | Path) -> None:
        self.writer = summary_writer_class()(log_dir=str(folder))
        self.step = 0

    def epoch(self, record: dict) -> None:
        self.step += 1
        for key in _EPOCH_SCALARS:
            if isinstance(record.get(key), (int, float)):
                self.writer.add_scalar(f"{record['stage']}/{key}", record[key], self.step)
        self.writer.flush()

    def stage(self, name: str, metrics: dict) -> None:
        for key in _EVAL_SCALARS:
            if isinstance(metrics.get(key), (int, float)):
                self.writer.add_scalar(f"eval/{key}", metrics[key], self.step)
                self.writer.add_scalar(f"eval_{name}/{key}", metrics[key], self.step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()

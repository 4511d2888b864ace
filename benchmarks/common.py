"""Shared by the benchmark scripts (run as ``python benchmarks/NAME.py``, so this folder is on ``sys.path``)."""
from __future__ import annotations

import torch

from robustprune.export import load
from robustprune.models import create_model


def mnist_cnn(checkpoint: str | None) -> torch.nn.Module:
    """The checkpoint's network on the CPU, or a fresh seeded MNIST ``cnn-small``; in eval mode."""
    if checkpoint:
        model = load(checkpoint, torch.device("cpu"))
    else:
        torch.manual_seed(0)
        model = create_model("cnn-small", (1, 28, 28), 10)
    return model.eval()

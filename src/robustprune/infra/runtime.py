"""Run-time set-up shared by every stage: the device rule and seeding."""
from __future__ import annotations

import os
import random

import numpy as np
import torch

from robustprune.infra.errors import UserError


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` → CUDA when present, else CPU; ``cuda[:N]`` is checked to exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r} (use auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device {name!r} asked for, but no CUDA device is available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"device {name!r} asked for, but only {torch.cuda.device_count()} CUDA device(s) exist")
    return device


def set_threads(threads: int | None) -> None:
    """Intra-op CPU threads: ``None`` leaves torch's choice (``OMP_NUM_THREADS``, else one per core) untouched."""
    if threads is not None and threads != torch.get_num_threads():
        torch.set_num_threads(threads)


def threads_per_worker(workers: int) -> int:
    """An equal share of this machine's cores (at least 1): torch defaults to one intra-op thread per core in every
    process, so workers sharing a machine would each take all of it and run no faster than one after the other."""
    return max(1, (os.cpu_count() or 1) // max(1, workers))


def start(cfg) -> torch.Generator:
    """Every command's set-up from a config: thread count, then seeds; returns the data-order generator."""
    set_threads(cfg.threads)
    return seed_everything(cfg.seed)


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; returns a CPU generator for data order."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)

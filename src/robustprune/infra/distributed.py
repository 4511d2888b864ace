"""Data-parallel training and evaluation under ``torchrun`` (gloo on CPU, nccl on CUDA); no-ops in one process.

The algorithm is DistributedDataParallel's: every rank starts from rank 0's parameters and buffers, takes its shard
of each global batch, and the gradients are averaged over the ranks before every optimiser step, so the ranks'
parameters stay identical. The averaging is an explicit all-reduce rather than the ``DistributedDataParallel``
wrapper because robust objectives call the model many times per step (every attack step, TRADES' two passes, the
bound propagation of certified training, which walks the module graph) — the wrapper's reducer expects exactly one
forward per backward. Buffers (batch-norm statistics) are broadcast from rank 0 after every step, as the wrapper's
``broadcast_buffers`` does. The global batch keeps the config's ``batch_size``; each rank computes
``batch_size / world`` samples, weighted so the averaged gradient is the gradient of the global batch's mean loss.
"""
from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from robustprune.infra.errors import UserError


def requested() -> bool:
    """Launched by torchrun (or any launcher that sets WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def local_device(device: torch.device) -> torch.device:
    """Each rank of a CUDA run takes the GPU of its LOCAL_RANK."""
    if device.type == "cuda" and requested() and device.index is None:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def setup(device: torch.device) -> None:
    """Join the process group torchrun prepared (idempotent; nothing to do in one process)."""
    if not requested() or active():
        return
    if not dist.is_available():
        raise UserError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, timeout=timedelta(minutes=30))


def barrier() -> None:
    if active():
        dist.barrier()


def shard(indices: torch.Tensor) -> torch.Tensor:
    """This rank's part of a global batch (every ``world``-th sample)."""
    return indices[rank()::world()] if active() else indices


def broadcast_module(model: nn.Module) -> None:
    """Rank 0's parameters and buffers on every rank."""
    if not active():
        return
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            dist.broadcast(tensor.data, src=0)


def broadcast_buffers(model: nn.Module) -> None:
    if active():
        with torch.no_grad():
            for buffer in model.buffers():
                dist.broadcast(buffer.data, src=0)


def average_gradients(model: nn.Module) -> None:
    """Mean of the ranks' gradients (a rank without a gradient for a parameter contributes zeros)."""
    if not active():
        return
    for param in model.parameters():
        if not param.requires_grad:
            continue
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        dist.all_reduce(param.grad, op=dist.ReduceOp.SUM)
        param.grad.div_(world())


def all_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over the ranks, in place (the tensor is returned for chaining)."""
    if active():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def gather_flags(flags: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Per-sample flags each rank filled for its own batches (zeros elsewhere) → the full flags on every rank."""
    if not active():
        return flags
    counts = flags.to(device=device, dtype=torch.int32)
    dist.all_reduce(counts, op=dist.ReduceOp.SUM)
    return counts.cpu() > 0


def my_starts(starts: range) -> list[int]:
    """The evaluation batches (by start index) this rank computes."""
    return list(starts)[rank()::world()]


def teardown() -> None:
    if active():
        dist.barrier()
        dist.destroy_process_group()

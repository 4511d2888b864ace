"""``fit()``: the one training loop, for pre-training and fine-tuning alike.

The loop knows nothing about pruning: masks live in the model as parametrizations, so pruned weights stay exactly 0
whatever the optimiser does. It knows nothing about attacks either: the objective computes the loss.
"""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from robustprune.infra import distributed
from robustprune.config import TrainConfig
from robustprune.data import Split
from robustprune.infra.errors import TrainingDiverged
from robustprune.infra.fileio import append_jsonl
from robustprune.objectives import Objective
from robustprune.objectives.schedules import linear_ramp
from robustprune.infra.resume import SKIP, Journal


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=True)
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int):
    """Per-step learning-rate schedule over the whole stage."""
    if cfg.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=total_steps,
                                                   cycle_momentum=cfg.optimizer == "sgd")
    if cfg.schedule == "cosine":
        factor = lambda t: 0.5 * (1 + math.cos(math.pi * t / total_steps))  # noqa: E731
    elif cfg.schedule == "step":
        marks = [m * total_steps for m in cfg.milestones]
        factor = lambda t: cfg.gamma ** sum(t >= m for m in marks)  # noqa: E731
    else:
        factor = lambda t: 1.0  # noqa: E731
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def fit(
    model: nn.Module,
    objective: Objective,
    train: Split,
    cfg: TrainConfig,
    *,
    batch_size: int,
    stage: str = "train",
    generator: torch.Generator | None = None,
    metrics_path: str | Path | None = None,
    quiet: bool = False,
    on_epoch: Callable[[dict], None] | None = None,
    journal: Journal | None = None,
    precision: str = "fp32",
    channels_last: bool = False,
    compile: bool = False,
) -> list[dict]:
    """Train ``model`` in place with ``objective`` for ``cfg.epochs``; returns (and appends) per-epoch metrics.

    The objective's ε is 0 for ``cfg.clean_epochs``, then ramped linearly over ``cfg.eps_warmup_epochs`` (then left
    at full scale); objectives derive their other schedules (κ, β) from the same ramp factor.

    With a ``journal`` the state (weights, masks, scores, optimiser, scheduler, RNG) is saved after every epoch, and
    a resumed run skips or continues this call where the journal says. Under torchrun each rank trains on its shard
    of every batch and the gradients are averaged (``distributed.py``). ``precision`` bf16/fp16 runs the objective
    (attack included) under autocast; ``channels_last`` trains in that memory layout. Evaluation is never autocast.
    ``compile`` runs the objective's passes (training attacks included) through ``torch.compile`` (the same
    parameters; the first batches of each mode compile).
    """
    index = journal.next_fit() if journal is not None else 0
    device = next(model.parameters()).device
    x_all, y_all = train.x.to(device), train.y.to(device)
    n = len(train)
    steps_per_epoch = math.ceil(n / batch_size)
    if cfg.epochs == 0 or n == 0:
        return []
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, cfg, cfg.epochs * steps_per_epoch)
    first_epoch, history = 0, []
    restored = journal.restore(index, model, optimizer, scheduler, generator) if journal is not None else None
    if restored == SKIP:
        return []
    if restored is not None:
        first_epoch, history = restored
    distributed.broadcast_module(model)
    step = TrainStep(model, optimizer, scheduler, objective, precision, device, compile=compile)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    bar = tqdm(total=cfg.epochs * steps_per_epoch, initial=first_epoch * steps_per_epoch, desc=stage, unit="batch",
               leave=False, disable=quiet or not sys.stderr.isatty())
    for epoch in range(first_epoch, cfg.epochs):
        start = time.perf_counter()
        model.train()
        order = torch.randperm(n, generator=generator).to(device)
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        for i in range(steps_per_epoch):
            objective.set_eps_scale(linear_ramp(epoch + i / steps_per_epoch, cfg.eps_warmup_epochs,
                                                   cfg.clean_epochs))
            idx = order[i * batch_size:(i + 1) * batch_size]
            local = distributed.shard(idx)
            loss, logits = step(x_all[local], y_all[local], len(local) / len(idx))
            loss_sum += loss * len(local)
            correct += (logits.argmax(1) == y_all[local]).sum()
            bar.update(1)
        distributed.all_sum(loss_sum)
        distributed.all_sum(correct)
        record = {"stage": stage, "epoch": epoch + 1, "loss": float(loss_sum) / n, "train_acc": float(correct) / n,
                  "lr": optimizer.param_groups[0]["lr"], "eps": objective.current_eps,
                  "time_s": round(time.perf_counter() - start, 3)}
        diverged = _divergence(record["loss"], model)
        if diverged:  # the epoch is logged (null loss: metrics.jsonl stays strict JSON), the journal is not
            bar.close()
            if metrics_path is not None:
                append_jsonl(metrics_path, record)
            raise TrainingDiverged(f"{stage} diverged in epoch {epoch + 1}: {diverged} (lr {cfg.lr:g}, ε "
                                   f"{objective.current_eps:g}); try a lower {_section(stage)}.lr or a longer ε ramp "
                                   f"({_section(stage)}.eps_warmup_epochs); the resume journal keeps the last good "
                                   "epoch")
        bar.set_postfix(loss=f"{record['loss']:.3f}", acc=f"{record['train_acc']:.3f}")
        history.append(record)
        if metrics_path is not None:
            append_jsonl(metrics_path, record)
        if on_epoch is not None:
            on_epoch(record)
        if journal is not None:
            journal.save_epoch(index, epoch + 1, model, optimizer, scheduler, generator, history)
    bar.close()
    if channels_last:
        model.to(memory_format=torch.contiguous_format)
    return history


def _divergence(loss: float, model: nn.Module) -> str | None:
    """Why training must stop (a non-finite epoch loss or parameter), or None. Checked once per epoch: the epoch's
    loss sum is non-finite as soon as one step's loss was, and a NaN weight poisons every later loss, so nothing is
    missed while the training loop itself stays free of host synchronisations."""
    if not math.isfinite(loss):
        return f"the loss is {loss}"
    bad = next((name for name, p in model.named_parameters() if not torch.isfinite(p).all()), None)
    return None if bad is None else f"parameter {bad} is not finite"


def _section(stage: str) -> str:
    """The config section holding the settings of a ``fit`` stage (for the divergence hint)."""
    if stage == "hydra-scores":
        return "prune.score_training"
    return "finetune" if stage.startswith("prune-round") else stage


AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


class TrainStep:
    """One optimiser step on this rank's part of a batch: loss (under autocast if asked), backward, gradient
    averaging over the ranks, step. ``share`` is this rank's fraction of the global batch: the loss is weighted by
    ``share · world`` so the averaged gradient is the gradient of the global batch's mean loss."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, objective: Objective,
                 precision: str, device: torch.device, compile: bool = False) -> None:
        if precision not in ("fp32", *AUTOCAST):
            raise ValueError(f"precision must be fp32, bf16 or fp16, got {precision!r}")
        self.model, self.optimizer, self.scheduler, self.objective = model, optimizer, scheduler, objective
        # The objective calls ``net``: the model itself, or its compiled form (which shares its parameters).
        self.net = torch.compile(model) if compile else model
        self.dtype = AUTOCAST.get(precision)
        self.device = device
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    def __call__(self, x: torch.Tensor, y: torch.Tensor, share: float) -> tuple[torch.Tensor, torch.Tensor]:
        self.optimizer.zero_grad(set_to_none=True)
        if len(y) == 0:  # a rank with no sample in a short last batch still joins the gradient average
            distributed.average_gradients(self.model)
            self._step()
            return torch.zeros((), device=self.device), torch.zeros(0, 1, device=self.device)
        with torch.autocast(self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
            loss, logits = self.objective.forward(self.net, x, y)
        weight = share * distributed.world() if distributed.active() else 1.0
        self.scaler.scale(loss * weight if weight != 1.0 else loss).backward()
        distributed.average_gradients(self.model)
        self._step()
        return loss.detach().float(), logits.detach()

    def _step(self) -> None:
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        distributed.broadcast_buffers(self.model)

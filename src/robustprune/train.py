"""``fit()``: the one training loop, for pre-training and fine-tuning alike.

The loop knows nothing about pruning: masks live in the model as parametrizations, so pruned weights stay exactly 0
whatever the optimiser does. It knows nothing about attacks either: the objective computes the loss.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
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
from robustprune.objectives.ramps import linear_ramp
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


@dataclass(frozen=True)
class FitOptions:
    """How one ``fit`` call runs (what it trains is the model, the objective, the data and the ``TrainConfig``)."""

    batch_size: int = 64
    stage: str = "train"  # the name in metrics.jsonl, the progress bar and error messages
    generator: torch.Generator | None = None  # data order (None: torch's global generator)
    metrics_path: str | Path | None = None  # append one JSON line per epoch here
    quiet: bool = False  # no progress bar
    on_epoch: Callable[[dict], None] | None = None  # called with every epoch's record (TensorBoard)
    journal: Journal | None = None  # resume journal: saved after every epoch, restored on resume
    precision: str = "fp32"  # fp32 | bf16 | fp16: the objective (attack included) under autocast
    channels_last: bool = False  # train in that memory layout
    compile: bool = False  # the objective's passes through torch.compile (same parameters)


def fit(model: nn.Module, objective: Objective, train: Split, cfg: TrainConfig,
        options: FitOptions | None = None) -> list[dict]:
    """Train ``model`` in place with ``objective`` for ``cfg.epochs``; returns (and appends) per-epoch metrics.

    The objective's ε is 0 for ``cfg.clean_epochs``, then ramped linearly over ``cfg.eps_warmup_epochs`` (then left
    at full scale); objectives derive their other schedules (κ, β) from the same ramp factor.

    With a ``journal`` the state (weights, masks, scores, optimiser, scheduler, RNG) is saved after every epoch, and
    a resumed run skips or continues this call where the journal says. Under torchrun each rank trains on its shard
    of every batch and the gradients are averaged (``infra/distributed.py``). Evaluation is never autocast.
    """
    o = options or FitOptions()
    index = o.journal.next_fit() if o.journal is not None else 0
    if cfg.epochs == 0 or len(train) == 0:
        return []
    loop = _Loop(model, objective, train, cfg, o)
    restored = o.journal.restore(index, model, loop.optimizer, loop.scheduler, o.generator) if o.journal else None
    if restored == SKIP:
        return []
    first_epoch, history = restored if restored is not None else (0, [])
    distributed.broadcast_module(model)
    if o.channels_last:
        model.to(memory_format=torch.channels_last)
    loop.open_bar(first_epoch)
    for epoch in range(first_epoch, cfg.epochs):
        record = loop.epoch(epoch)
        loop.plain_line(record)
        history.append(record)
        if o.metrics_path is not None:
            append_jsonl(o.metrics_path, record)
        if o.on_epoch is not None:
            o.on_epoch(record)
        if o.journal is not None:
            o.journal.save_epoch(index, epoch + 1, model, loop.optimizer, loop.scheduler, o.generator, history)
    loop.bar.close()
    if o.channels_last:
        model.to(memory_format=torch.contiguous_format)
    return history


class _Loop:
    """The epochs of one ``fit`` call: data on the device, optimiser, schedule, the step and the progress bar."""

    def __init__(self, model: nn.Module, objective: Objective, train: Split, cfg: TrainConfig,
                 options: FitOptions) -> None:
        self.model, self.objective, self.cfg, self.options = model, objective, cfg, options
        self.device = next(model.parameters()).device
        self.x, self.y = train.x.to(self.device), train.y.to(self.device)
        self.steps = math.ceil(len(train) / options.batch_size)
        self.optimizer = make_optimizer(model, cfg)
        self.scheduler = make_scheduler(self.optimizer, cfg, cfg.epochs * self.steps)
        self.step = TrainStep(model, self.optimizer, self.scheduler, objective, options.precision, self.device,
                              compile=options.compile)

    def open_bar(self, first_epoch: int) -> None:
        self.bar = tqdm(total=self.cfg.epochs * self.steps, initial=first_epoch * self.steps, desc=self.options.stage,
                        unit="batch", leave=False, disable=self.options.quiet or not sys.stderr.isatty())

    def plain_line(self, record: dict) -> None:
        """Where no bar is drawn (stderr is a batch job's log, not a terminal), one line per finished epoch."""
        if self.options.quiet or sys.stderr.isatty() or not distributed.is_main():
            return
        print(f"{self.options.stage} epoch {record['epoch']}/{self.cfg.epochs}: loss {record['loss']:.4f}  "
              f"train acc {record['train_acc']:.3f}  ε {record['eps']:.4g}  ({record['time_s']:.1f} s)",
              file=sys.stderr, flush=True)

    def epoch(self, epoch: int) -> dict:
        """One pass over the data in a fresh random order; its record (a diverged epoch raises, logged first)."""
        start, n, size = time.perf_counter(), len(self.y), self.options.batch_size
        self.model.train()
        order = torch.randperm(n, generator=self.options.generator).to(self.device)
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device, dtype=torch.long)
        for i in range(self.steps):
            self.objective.set_eps_scale(linear_ramp(epoch + i / self.steps, self.cfg.eps_warmup_epochs,
                                                     self.cfg.clean_epochs))
            idx = order[i * size:(i + 1) * size]
            local = distributed.shard(idx)
            loss, logits = self.step(self.x[local], self.y[local], len(local) / len(idx))
            loss_sum += loss * len(local)
            correct += (logits.argmax(1) == self.y[local]).sum()
            self.bar.update(1)
        distributed.all_sum(loss_sum)
        distributed.all_sum(correct)
        record = {"stage": self.options.stage, "epoch": epoch + 1, "loss": float(loss_sum) / n,
                  "train_acc": float(correct) / n, "lr": self.optimizer.param_groups[0]["lr"],
                  "eps": self.objective.current_eps, "time_s": round(time.perf_counter() - start, 3)}
        self._check_divergence(record)
        self.bar.set_postfix(loss=f"{record['loss']:.3f}", acc=f"{record['train_acc']:.3f}")
        return record

    def _check_divergence(self, record: dict) -> None:
        """A diverged epoch is logged (null loss: metrics.jsonl stays strict JSON), the journal is not."""
        diverged = _divergence(record["loss"], self.model)
        if not diverged:
            return
        self.bar.close()
        if self.options.metrics_path is not None:
            append_jsonl(self.options.metrics_path, record)
        section = _section(self.options.stage)
        raise TrainingDiverged(f"{self.options.stage} diverged in epoch {record['epoch']}: {diverged} (lr "
                               f"{self.cfg.lr:g}, ε {self.objective.current_eps:g}); try a lower {section}.lr or a "
                               f"longer ε ramp ({section}.eps_warmup_epochs); the resume journal keeps the last good "
                               "epoch")


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
    if stage.endswith("-scores"):  # hydra-scores, harp-scores
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

"""A sweep's units of work — one pre-training per objective, then one task per point — runnable in any process that
sees the sweep folder: this one, a local worker, a Ray task or a Slurm job.

A task reads everything it needs from the folder (``config.yaml``, the pre-trained checkpoints) and writes its result
atomically (``pretrained-<objective>.safetensors``, ``points/<key>.json``) under a claim (``infra/claims.py``): a
finished task is never recomputed, a claimed one is left to its live worker, a dead worker's claim is broken.
"""
from __future__ import annotations

import dataclasses
import json
import os
import socket
import time
from pathlib import Path

from robustprune import pipeline
from robustprune.config import Config, load_stored
from robustprune.export import load, read_metadata, save
from robustprune.infra import claims
from robustprune.infra.fileio import write_json
from robustprune.infra.runtime import resolve_device, start
from robustprune.report import STAGE_FIELDS, finite
from robustprune.train import FitOptions

PRETRAIN, POINT = "pretrain", "point"
WAIT_S = 0.5  # how often a point waiting for another worker's pre-training looks again


@dataclasses.dataclass(frozen=True)
class Point:
    pretrain: str
    finetune: str
    rule: str
    compression: float

    @property
    def key(self) -> str:
        return f"{self.pretrain}--{self.finetune}--{self.rule}--{self.compression:g}x"


@dataclasses.dataclass(frozen=True)
class Task:
    kind: str  # pretrain | point
    objective: str  # pretrain: the objective it trains with
    point: Point | None = None

    @property
    def key(self) -> str:
        return self.point.key if self.point else f"pretrained-{self.objective}"

    def result(self, folder: Path) -> Path:
        if self.point is None:
            return folder / f"pretrained-{self.objective}.safetensors"
        return folder / "points" / f"{self.point.key}.json"

    def claim_path(self, folder: Path) -> Path:
        return folder / "points" / f".{self.key}.claim"


def point_config(cfg: Config, point: Point) -> Config:
    """The run config of one point: its rule and compression, its fine-tuning objective (same settings)."""
    prune = dataclasses.replace(cfg.prune, rule=point.rule, compression=point.compression, sparsity=None)
    finetune_objective = (cfg.finetune_objective or cfg.objective).renamed(point.finetune)
    objective = cfg.objective.renamed(point.pretrain)
    return dataclasses.replace(cfg, prune=prune, objective=objective, finetune_objective=finetune_objective)


def run_task(folder: str | Path, task: Task, *, data=None, threads: int | None = None, device: str | None = None,
             quiet: bool = True) -> bool:
    """Do ``task`` unless it is done or claimed by a live worker; True when this call did it. ``data``: the dataset
    when the caller holds it (a worker loads it from the stored config); ``threads``: this worker's share of the
    cores (None: the config's ``threads``); ``device``: this worker's GPU (None: the config's ``device``)."""
    folder = Path(folder)
    if task.result(folder).is_file():
        return False
    if task.point is not None:
        _wait_for_pretraining(folder, task.point.pretrain, data, threads, device, quiet)
    claim = claims.try_claim(task.claim_path(folder))
    if claim is None:
        return False
    with claim:
        if task.result(folder).is_file():  # finished between our look and our claim
            return False
        cfg = load_stored(folder / "config.yaml")
        cfg = cfg if threads is None else dataclasses.replace(cfg, threads=threads)
        cfg = cfg if device is None else dataclasses.replace(cfg, device=device)
        data = _data(folder, cfg) if data is None else data
        started = time.perf_counter()
        if task.point is None:
            _pretrain(cfg, task.objective, data, task.result(folder), started, quiet)
        else:
            record = _point(cfg, task.point, Task(PRETRAIN, task.point.pretrain).result(folder), data, quiet)
            record.update(time_s=round(time.perf_counter() - started, 2), worker=_worker())
            write_json(task.result(folder), finite(record))
    return True


def _wait_for_pretraining(folder: Path, objective: str, data, threads: int | None, device: str | None,
                          quiet: bool) -> None:
    """A point needs its pre-trained checkpoint: do the pre-training here if nobody holds it, else wait for its live
    worker (so a point started early — Ray and Slurm keep no order — never waits on work nobody does)."""
    pretraining = Task(PRETRAIN, objective)
    while not pretraining.result(folder).is_file():
        if not run_task(folder, pretraining, data=data, threads=threads, device=device, quiet=quiet):
            time.sleep(WAIT_S)


_DATA: dict[str, object] = {}  # a worker process loads a sweep's dataset once, for all its tasks of that folder


def _data(folder: Path, cfg: Config):
    key = str(folder.resolve())  # one folder, one config (resuming with another one is refused)
    if key not in _DATA:
        _DATA[key] = pipeline.load_data(cfg)
    return _DATA[key]


def _pretrain(cfg: Config, name: str, data, path: Path, started: float, quiet: bool) -> None:
    run_cfg = dataclasses.replace(cfg, objective=cfg.objective.renamed(name))
    generator = start(cfg)
    model = pipeline.new_model(run_cfg, data).to(resolve_device(cfg.device))
    pipeline.pretrain(model, run_cfg, data, pipeline.build_objective(run_cfg.objective, cfg.threat),
                      FitOptions(generator=generator, quiet=quiet))
    metrics = finite(pipeline.measure(model, run_cfg, data))
    metrics.update(time_s=round(time.perf_counter() - started, 2), worker=_worker())
    save(model, path, stage="pretrained", config=run_cfg.to_dict(), metrics=metrics)


def _point(cfg: Config, point: Point, checkpoint: Path, data, quiet: bool) -> dict:
    run_cfg = point_config(cfg, point)
    generator = start(cfg)
    model = load(checkpoint, resolve_device(cfg.device)).train()
    objective = pipeline.build_objective(run_cfg.finetune_objective, cfg.threat)
    if point.compression > 1:
        pipeline.prune_model(model, run_cfg, data, objective, FitOptions(generator=generator, quiet=quiet))
    pipeline.finetune(model, run_cfg, data, objective, FitOptions(generator=generator, quiet=quiet))
    metrics = pipeline.measure(model, run_cfg, data)
    # the point's nominal compression names it; the measured one (whole weights) is kept beside it
    return {**{f: metrics.get(f) for f in STAGE_FIELDS}, **dataclasses.asdict(point), "key": point.key,
            "measured_compression": metrics.get("compression")}


def finished(folder: Path, task: Task) -> dict | None:
    """The task's result record (a point's JSON, a pre-training's metrics), or None while it is not done."""
    path = task.result(folder)
    if not path.is_file():
        return None
    return read_metadata(path)["metrics"] if task.point is None else json.loads(path.read_text())


def _worker() -> str:
    return f"{socket.gethostname()} pid {os.getpid()}"

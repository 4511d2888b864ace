"""Sweeps: the seed's study as one command — accuracy as compression grows, per pre-training objective, fine-tuning
objective and pruning rule.

Each pre-training objective trains once (``pretrained-<objective>.safetensors``, its evaluation stored inside) and
every point reuses it: load, prune to the point's compression with the point's rule, fine-tune with the point's
objective, evaluate with the config's evaluation. These are tasks (``tasks.py``): the pre-trainings first, then the
points, each run by whichever worker claims it (``backends.py``: this process, local workers, Ray, Slurm), each
result a file written atomically (a point's JSON in ``points/``). Running the same sweep again — or a second sweep
command on the same folder at once, on this machine or another sharing the folder — skips what is done and what a
live worker holds, and redoes what a dead worker left. ``sweep.json`` holds one record per point (the report.json
stage fields plus the point's settings, its time and worker), ``sweep.md`` the tables, and ``plots/`` the PNGs.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Sequence

import yaml

from robustprune import pipeline
from robustprune.config import Config, load_stored
from robustprune.infra import outdir
from robustprune.infra.errors import UserError
from robustprune.infra.fileio import write_json, write_text
from robustprune.infra.version import __version__
from robustprune.report import finite, render_sweep
from robustprune.sweep import backends
from robustprune.sweep.backends import BackendOptions
from robustprune.sweep.tasks import POINT, PRETRAIN, Point, Task, point_config
from robustprune.sweep.waves import run_wave

__all__ = ["BackendOptions", "Point", "point_config", "points", "sweep"]

Log = Callable[[str], None]
LOCK_WAIT_S = 120.0  # the longest wait for the folder lock another sweep command holds (it writes files, no more)


def points(compressions: Sequence[float], pretrain: Sequence[str], finetune: Sequence[str],
           rules: Sequence[str]) -> list[Point]:
    return [Point(p, f, r, float(c)) for p in pretrain for f in finetune for r in rules for c in compressions]


def sweep(cfg: Config, out: str | Path, compressions: Sequence[float], pretrain: Sequence[str] = (),
          finetune: Sequence[str] = (), rules: Sequence[str] = (), *, quiet: bool = False,
          log: Log = print, backend: BackendOptions = BackendOptions()) -> dict:
    """Run (or resume, or help) the sweep in ``out``; returns the sweep record (also written as sweep.json /
    sweep.md). ``backend``: where the tasks run (default: this process)."""
    pretrain = list(pretrain) or [cfg.objective.name]
    finetune = list(finetune) or [(cfg.finetune_objective or cfg.objective).name]
    rules = list(rules) or [cfg.prune.rule]
    if not compressions or any(c < 1 for c in compressions):
        raise UserError("--compression needs values >= 1, e.g. 1,2,5,10")
    todo = points(compressions, pretrain, finetune, rules)
    for point in todo:  # every name and budget is checked before anything runs
        pipeline.check_names(point_config(cfg, point))
    backends.check(backend)
    out = Path(out)
    _check_out(out, cfg)  # before any work: a bad --out fails at once
    data = pipeline.load_data(cfg)
    budgets = {(p.rule, p.compression): p for p in todo if p.compression > 1}  # objectives do not change a budget
    for point in budgets.values():
        pipeline.check_prunable(point_config(cfg, point), pipeline.new_model(cfg, data))
    with _folder_lock(out, cfg):  # marker and config: one writer at a time, briefly
        _check_same_sweep(out, cfg)  # again under the lock: another sweep may have written its config meanwhile
        (out / "points").mkdir(parents=True, exist_ok=True)
        if not (out / "config.yaml").is_file():
            write_text(out / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return _run_sweep(cfg, out, todo, pretrain, data, quiet, log, backend)


def _run_sweep(cfg: Config, out: Path, todo: list[Point], pretrain: list[str], data, quiet: bool, log: Log,
               backend: BackendOptions) -> dict:
    """The pre-trainings, then the points (each done once, by whoever claims it), then sweep.json, sweep.md and the
    plots."""
    from robustprune.report.plots import sweep_plots  # matplotlib only when plots are drawn: the CLI starts faster

    # one wave: a point whose pre-training is not done does it or waits for it (tasks.run_task), so a worker free
    # early starts the points of a short pre-training while a long one still runs
    tasks = [Task(PRETRAIN, name) for name in pretrain] + [Task(POINT, p.pretrain, p) for p in todo]
    done = run_wave(out, tasks, backend, data, quiet, log)
    dense = {name: done[f"pretrained-{name}"] for name in pretrain}
    result = finite({"robustprune_version": __version__, "config": cfg.to_dict(),
                     "threat": {"norm": cfg.threat.norm, "eps": cfg.threat.eps},
                     "dense": dense,
                     "points": [done[p.key] for p in todo]})
    with _folder_lock(out, cfg):  # two sweep commands that finish together write these one after the other
        result["plots"] = [p.relative_to(out).as_posix() for p in sweep_plots(result, out / "plots")]  # portable
        write_json(out / "sweep.json", result)
        write_text(out / "sweep.md", render_sweep(result, out))
    return result


def _folder_lock(out: Path, cfg: Config) -> outdir.Lock:
    """The sweep folder's lock, waited for (another sweep command on the folder holds it for seconds at most)."""
    deadline = time.monotonic() + LOCK_WAIT_S
    while True:
        try:
            return outdir.claim_folder(out, outdir.SWEEP, cfg.name)
        except outdir.FolderInUse:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _check_out(out: Path, cfg: Config) -> None:
    """A new or empty folder, or a sweep folder of this very config (``outdir.check_folder``, then the config)."""
    outdir.check_folder(out, outdir.SWEEP)
    _check_same_sweep(out, cfg)


def _check_same_sweep(out: Path, cfg: Config) -> None:
    """Resuming needs the same config: points computed under another one would be mixed in silently."""
    stored = out / "config.yaml"
    # read back through load_stored: settings added by a newer robustprune take their defaults on both sides
    if stored.is_file() and load_stored(stored).to_dict() != cfg.to_dict():
        raise UserError(f"{out} holds a sweep with another config; give a new --out or delete the folder")



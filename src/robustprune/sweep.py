"""Sweeps: the seed's study as one command — accuracy as compression grows, per pre-training objective, fine-tuning
objective and pruning rule.

Each pre-training objective trains once (``pretrained-<objective>.safetensors``, its evaluation stored inside) and
every point reuses it: load, prune to the point's compression with the point's rule, fine-tune with the point's
objective, evaluate with the config's evaluation. A finished point is a JSON file in ``points/``, written atomically;
running the same sweep again skips every point (and pre-training) already on disk, so an interrupted sweep resumes
where it stopped. ``sweep.json`` holds one record per point (the report.json stage fields plus the point's
settings), ``sweep.md`` the tables, and ``plots/`` the PNGs (``plots.py``).
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Callable, Sequence

import yaml

from robustprune.infra import outdir
from robustprune.infra.version import __version__
from robustprune.config import Config, load_stored
from robustprune.infra.errors import UserError
from robustprune.export import load, read_metadata, save
from robustprune.infra.fileio import write_json, write_text
from robustprune import pipeline
from robustprune.infra.runtime import resolve_device, start
from robustprune.report import METRICS, STAGE_FIELDS, finite, render_sweep
from robustprune.train import FitOptions

Log = Callable[[str], None]


@dataclasses.dataclass(frozen=True)
class Point:
    pretrain: str
    finetune: str
    rule: str
    compression: float

    @property
    def key(self) -> str:
        return f"{self.pretrain}--{self.finetune}--{self.rule}--{self.compression:g}x"


def points(compressions: Sequence[float], pretrain: Sequence[str], finetune: Sequence[str],
           rules: Sequence[str]) -> list[Point]:
    return [Point(p, f, r, float(c)) for p in pretrain for f in finetune for r in rules for c in compressions]


def point_config(cfg: Config, point: Point) -> Config:
    """The run config of one point: its rule and compression, its fine-tuning objective (same settings)."""
    prune = dataclasses.replace(cfg.prune, rule=point.rule, compression=point.compression, sparsity=None)
    finetune_objective = (cfg.finetune_objective or cfg.objective).renamed(point.finetune)
    objective = cfg.objective.renamed(point.pretrain)
    return dataclasses.replace(cfg, prune=prune, objective=objective, finetune_objective=finetune_objective)


def sweep(cfg: Config, out: str | Path, compressions: Sequence[float], pretrain: Sequence[str] = (),
          finetune: Sequence[str] = (), rules: Sequence[str] = (), *, quiet: bool = False,
          log: Log = print) -> dict:
    """Run (or resume) the sweep into ``out``; returns the sweep record (also written as sweep.json / sweep.md)."""
    pretrain = list(pretrain) or [cfg.objective.name]
    finetune = list(finetune) or [(cfg.finetune_objective or cfg.objective).name]
    rules = list(rules) or [cfg.prune.rule]
    if not compressions or any(c < 1 for c in compressions):
        raise UserError("--compression needs values >= 1, e.g. 1,2,5,10")
    todo = points(compressions, pretrain, finetune, rules)
    for point in todo:  # every name and budget is checked before anything runs
        pipeline.check_names(point_config(cfg, point))
    out = Path(out)
    _check_out(out, cfg)  # before any work: a bad --out fails at once
    data = pipeline.load_data(cfg)
    budgets = {(p.rule, p.compression): p for p in todo if p.compression > 1}  # objectives do not change a budget
    for point in budgets.values():
        pipeline.check_prunable(point_config(cfg, point), pipeline.new_model(cfg, data))
    with outdir.claim_folder(out, outdir.SWEEP, cfg.name):  # one writer at a time, for the whole sweep
        _check_same_sweep(out, cfg)  # again under the lock: another sweep may have written its config meanwhile
        return _run_sweep(cfg, out, todo, pretrain, data, quiet, log)


def _run_sweep(cfg: Config, out: Path, todo: list[Point], pretrain: list[str], data, quiet: bool, log: Log) -> dict:
    """Every point not yet on disk, then sweep.json, sweep.md and the plots, in the claimed folder ``out``."""
    from robustprune.report.plots import sweep_plots  # matplotlib only when plots are drawn: the CLI starts faster

    (out / "points").mkdir(parents=True, exist_ok=True)
    write_text(out / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    dense = {name: _pretrained(cfg, name, data, out, quiet, log) for name in pretrain}
    records = []
    for index, point in enumerate(todo, start=1):
        path = out / "points" / f"{point.key}.json"
        if path.is_file():
            records.append(json.loads(path.read_text()))
            log(f"[{index}/{len(todo)}] {point.key}: done before, skipped")
            continue
        started = time.perf_counter()
        record = _run_point(cfg, point, dense[point.pretrain]["checkpoint"], data, quiet)
        record["time_s"] = round(time.perf_counter() - started, 2)
        write_json(path, finite(record))
        records.append(record)
        log(f"[{index}/{len(todo)}] {point.key}: " + "  ".join(
            f"{label} {record[key]:.3f}" for key, label in METRICS if record.get(key) is not None)
            + f"  ({record['time_s']:.1f} s)")
    result = finite({"robustprune_version": __version__, "config": cfg.to_dict(),
                     "threat": {"norm": cfg.threat.norm, "eps": cfg.threat.eps},
                     "dense": {name: d["metrics"] for name, d in dense.items()}, "points": records})
    result["plots"] = [p.relative_to(out).as_posix() for p in sweep_plots(result, out / "plots")]  # portable
    write_json(out / "sweep.json", result)
    write_text(out / "sweep.md", render_sweep(result, out))
    return result


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


def _pretrained(cfg: Config, name: str, data, out: Path, quiet: bool, log: Log) -> dict:
    path = out / f"pretrained-{name}.safetensors"
    if path.is_file():
        log(f"pre-trained with {name}: {path.name}, done before, reused")
        return {"checkpoint": path, "metrics": read_metadata(path)["metrics"]}
    run_cfg = dataclasses.replace(cfg, objective=cfg.objective.renamed(name))
    generator = start(cfg)
    model = pipeline.new_model(run_cfg, data).to(resolve_device(cfg.device))
    started = time.perf_counter()
    pipeline.pretrain(model, run_cfg, data, pipeline.build_objective(run_cfg.objective, cfg.threat),
                      FitOptions(generator=generator, quiet=quiet))
    metrics = finite(pipeline.measure(model, run_cfg, data))
    metrics["time_s"] = round(time.perf_counter() - started, 2)
    save(model, path, stage="pretrained", config=run_cfg.to_dict(), metrics=metrics)
    log(f"pre-trained with {name}: benign {metrics['benign_acc']:.3f}"
        + ("" if metrics.get("pgd_acc") is None else f"  PGD {metrics['pgd_acc']:.3f}")
        + f"  ({metrics['time_s']:.1f} s)")
    return {"checkpoint": path, "metrics": metrics}


def _run_point(cfg: Config, point: Point, checkpoint: Path, data, quiet: bool) -> dict:
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

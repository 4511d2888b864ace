"""The three steps — pre-train, prune, fine-tune — with evaluation after each, checkpoints and the report.

Each step is also a function of its own (``pretrain``, ``prune_model``, ``finetune``) so the CLI's stage commands
run exactly the code the pipeline runs.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from pathlib import Path
from typing import Callable

import torch
import yaml
from torch import nn

from robustprune.infra import distributed, outdir
from robustprune.infra.version import __version__
from robustprune.bounds import build_graph
from robustprune.config import Config, ObjectiveConfig, ThreatConfig, load_stored
from robustprune.data import Dataset, hold_out, load_dataset
from robustprune.infra.errors import UserError
from robustprune.evaluate import evaluate
from robustprune.export import load, read_metadata, save
from robustprune.infra.fileio import write_json, write_text
from robustprune.models import create_model
from robustprune.objectives import OBJECTIVES, Objective
from robustprune.objectives.base import Penalised
from robustprune.pruning import (
    PRUNERS, PruningPlan, attach_learned_scores, finalize_learned, kept_per_layer, learned_allocation, learned_penalty,
    masks, prune, slim, sparsity_report,
)
from robustprune.pruning.structured import count_macs_params
from robustprune.report import build_report, layer_rows, stage_table, write_report
from robustprune.infra.resume import STAGES, Journal, remove_stale_temporaries, truncate_lines
from robustprune.infra.runtime import resolve_device, start
from robustprune.train import fit

Log = Callable[[str], None]


def check_names(cfg: Config) -> None:
    """What the config could not check when it was read: the device exists here, and each objective trains for
    the threat's norm (a one-line error before anything runs)."""
    resolve_device(cfg.device)
    for section in (cfg.objective, cfg.finetune_objective):
        if section is not None:
            build_objective(section, cfg.threat)


def check_prunable(cfg: Config, data: Dataset) -> None:
    """Dry-run the pruning budget on a fresh model, so an unreachable request fails before anything is written."""
    p = cfg.prune
    if PRUNERS.get(p.rule).learned:
        attach_learned_scores(new_model(cfg, data), p.target_compression, p.scope, rule=p.rule,
                              **p.budget_options())
    else:
        prune(new_model(cfg, data), p.rule, p.target_compression, p.scope, seed=cfg.seed, **p.budget_options())


def check_boundable(cfg: Config, data: Dataset) -> None:
    """A model the verifiers or a certified objective must bound has a bound class for every layer (else exit 2)."""
    certified = any(OBJECTIVES.get(o.name).certified for o in (cfg.objective, cfg.finetune_objective) if o is not None)
    if certified or (cfg.evaluate.verifiers and cfg.threat.norm == "linf"):
        build_graph(new_model(cfg, data))


def build_objective(cfg: ObjectiveConfig, threat: ThreatConfig) -> Objective:
    """The objective named by ``cfg`` with its own settings, at ``cfg.eps`` (default: the threat's radius)."""
    return OBJECTIVES.get(cfg.name)(threat.eps if cfg.eps is None else cfg.eps, threat.norm, cfg.settings)


def load_data(cfg: Config) -> Dataset:
    """The dataset, with ``data.val_fraction`` of the training images held out of training; evaluation then reports
    on them instead of the test images when ``evaluate.split`` is ``val`` (choosing settings never sees the test)."""
    data = load_dataset(cfg.data.name, cfg.data.root, cfg.data.path)
    if cfg.data.val_fraction == 0:
        return data
    train, val = hold_out(data.train, cfg.data.val_fraction)
    if len(train) == 0 or len(val) == 0:
        raise UserError(f"data.val_fraction {cfg.data.val_fraction:g} of {len(data.train)} training images leaves "
                        "an empty training or validation split")
    return Dataset(data.name, train, val if cfg.evaluate.split == "val" else data.test, data.num_classes)


def new_model(cfg: Config, data: Dataset) -> nn.Module:
    mean, std = data.channel_stats()
    return create_model(cfg.model.name, data.input_shape, data.num_classes, mean, std)


def training(cfg: Config) -> dict:
    """The run-level training settings every ``fit`` of a stage takes (so stage commands and sweeps honour them)."""
    return {"precision": cfg.precision, "channels_last": cfg.channels_last, "compile": cfg.compile}


def pretrain(model: nn.Module, cfg: Config, data: Dataset, objective: Objective, **fit_options) -> list[dict]:
    return fit(model, objective, data.train, cfg.pretrain, batch_size=cfg.data.batch_size, stage="pretrain",
               **training(cfg), **fit_options)


def prune_model(model: nn.Module, cfg: Config, data: Dataset, objective: Objective, **fit_options) -> PruningPlan:
    """One-shot, or iterative: geometric steps to the target with ``round_epochs`` of fine-tuning between rounds."""
    targets = cfg.prune.round_targets()
    for round_index, target in enumerate(targets, start=1):
        plan = prune_round(model, cfg, target, data, objective, **fit_options)
        if round_index < len(targets) and cfg.prune.round_epochs > 0:
            fit(model, objective, data.train, dataclasses.replace(cfg.finetune, epochs=cfg.prune.round_epochs),
                batch_size=cfg.data.batch_size, stage=f"prune-round-{round_index}", **training(cfg), **fit_options)
    return plan


def prune_round(model: nn.Module, cfg: Config, target: float, data: Dataset, objective: Objective,
                **fit_options) -> PruningPlan:
    """Prune to ``target``; a learned rule (HYDRA) first trains its scores with the same objective."""
    p = cfg.prune
    options = p.budget_options()
    if not PRUNERS.get(p.rule).learned:
        return prune(model, p.rule, target, p.scope, seed=cfg.seed, **options)
    attach_learned_scores(model, target, p.scope, rule=p.rule, **options)
    penalty = learned_penalty(model, target, p.rate_penalty)  # HARP's budget term joins the run's own objective
    if penalty is not None:
        objective = Penalised(objective, penalty)
    fit(model, objective, data.train, p.score_training, batch_size=cfg.data.batch_size, stage=f"{p.rule}-scores",
        **training(cfg), **fit_options)
    learned = learned_allocation(model)
    finalize_learned(model, target, **options)
    return PruningPlan(rule=p.rule, scope=p.scope, target_compression=target, masks=masks(model),
                       options={**options, **learned})


def finetune(model: nn.Module, cfg: Config, data: Dataset, objective: Objective, **fit_options) -> list[dict]:
    return fit(model, objective, data.train, cfg.finetune, batch_size=cfg.data.batch_size, stage="finetune",
               **training(cfg), **fit_options)


def measure(model: nn.Module, cfg: Config, data: Dataset) -> dict:
    """The report.json stage record: accuracies plus the sparsity counts."""
    metrics = evaluate(model, data.test, cfg.threat, cfg.evaluate, batch_size=cfg.data.eval_batch_size, seed=cfg.seed)
    return {**metrics, **sparsity_report(model)}


def structure(model: nn.Module) -> dict:
    """Params and MACs (per example) of the masked-but-dense model and of its slim cut (structured rules)."""
    dense_macs, dense_params = count_macs_params(model)
    slim_macs, slim_params = count_macs_params(slim(model))
    return {"dense": {"params": dense_params, "macs": dense_macs}, "slim": {"params": slim_params, "macs": slim_macs}}


def prepare_out_dir(out: Path, force: bool, config_name: str) -> outdir.Lock:
    """Create and lock the run folder ``out`` (``outdir.claim_folder``): a non-empty folder is refused unless
    ``force``, and ``force`` replaces only a folder robustprune marked as a run. Returns the held lock."""
    return outdir.claim_folder(out, outdir.RUN, config_name, force=force)


STAGE_FILES = {"pretrain": "pretrained", "prune": "pruned", "finetune": "finetuned"}


def open_for_resume(out: Path, cfg: Config) -> None:
    """A run folder to continue: it exists, holds this very config and is not finished."""
    if not (out / "config.yaml").is_file():
        raise UserError(f"--resume: {out} is not a run folder (no config.yaml)")
    stored = load_stored(out / "config.yaml")
    if stored.to_dict() != cfg.to_dict():
        changed = sorted(k for k, v in cfg.to_dict().items() if stored.to_dict().get(k) != v)
        raise UserError(f"--resume: the config differs from {out / 'config.yaml'} in {', '.join(changed)} "
                        "(a resumed run continues with its own config; drop -c/--set or start a new run)")


def resume_point(journal: Journal, out: Path) -> tuple[list[str], Path | None]:
    """The stages already finished and the stage checkpoint to restart from (None: a fresh model)."""
    saved = journal.saved
    if saved is None:
        return [], None
    done = list(STAGES[:STAGES.index(saved.stage) + (1 if saved.fit is None else 0)])
    return done, (out / f"{STAGE_FILES[done[-1]]}.safetensors") if done else None


def run(cfg: Config, out: str | Path, *, force: bool = False, resume: bool = False, quiet: bool = False,
        log: Log = print) -> dict:
    """The whole pipeline into the run folder ``out``; returns the report (also written as report.json/.md).

    After every epoch and stage a journal (``resume.py``) is written; ``resume=True`` continues an interrupted run
    in ``out`` from it and ends with the metrics an uninterrupted run would have had. The folder is locked for the
    whole run (``outdir``): a second writer is refused at once.
    """
    out = Path(out)
    check_names(cfg)
    outdir.check_folder(out, outdir.RUN, force=force, resume=resume)  # before any work: a bad --out fails at once
    data = load_data(cfg)  # before the folder exists: missing data leaves nothing behind
    check_prunable(cfg, data)
    check_boundable(cfg, data)
    build_objective(cfg.objective, cfg.threat)
    if cfg.tensorboard:
        from robustprune.report.tensorboard import summary_writer_class
        summary_writer_class()  # a missing extra fails (exit 2) before anything is written
    device = distributed.local_device(resolve_device(cfg.device))
    distributed.setup(device)  # under torchrun: every rank computes, rank 0 alone writes (and locks)
    main = distributed.is_main()
    log = log if main else (lambda _: None)
    if resume:
        open_for_resume(out, cfg)
    with contextlib.ExitStack() as held:
        if main and resume:
            held.enter_context(outdir.claim_folder(out, outdir.RUN, cfg.name, resume=True))
        elif main:
            held.enter_context(prepare_out_dir(out, force, cfg.name))
            write_text(out / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        if resume and (out / "report.json").is_file():
            log(f"{out} is a finished run (report.json exists): nothing to resume")
            return json.loads((out / "report.json").read_text())
        return _run_stages(cfg, out, data, device, main=main, resume=resume, quiet=quiet, log=log)


def _run_stages(cfg: Config, out: Path, data: Dataset, device: torch.device, *, main: bool, resume: bool,
                quiet: bool, log: Log) -> dict:
    """The stages of ``run`` in the claimed folder ``out`` (continued from its journal when ``resume``)."""
    journal = Journal(out, resume=resume, enabled=main)
    distributed.barrier()  # every rank has read the journal before rank 0 writes a new one
    if main:
        remove_stale_temporaries(out)
        journal.metrics_path = out / "metrics.jsonl"
        truncate_lines(journal.metrics_path, journal.metrics_lines if resume else 0)
    scalars = None
    if cfg.tensorboard and main:
        from robustprune.report.tensorboard import Scalars
        scalars = Scalars(out / "tensorboard")

    generator = start(cfg)
    model = new_model(cfg, data).to(device)
    objective = build_objective(cfg.objective, cfg.threat)
    ft_objective = objective if cfg.finetune_objective is None else build_objective(cfg.finetune_objective, cfg.threat)
    options = {"generator": generator, "metrics_path": out / "metrics.jsonl" if main else None, "journal": journal,
               "quiet": quiet or not main}
    if scalars is not None:
        options["on_epoch"] = scalars.epoch
    stages, timing, meta = {}, journal.timing, {"config": cfg.to_dict()}
    carried = sum(v for k, v in timing.items() if k != "total")
    t_start = time.perf_counter()

    def timed(key: str, step: Callable[[], object]) -> object:
        t0 = time.perf_counter()
        result = step()
        timing[key] = timing.get(key, 0.0) + time.perf_counter() - t0
        return result

    def checkpoint(stage: str, **extra) -> None:
        stages[stage] = timed("evaluate", lambda: measure(model, cfg, data))
        if main:
            save(model, out / f"{stage}.safetensors", stage=stage, metrics=stages[stage], **meta, **extra)
        if scalars is not None:
            scalars.stage(stage, stages[stage])
        s = stages[stage]
        robust, pgd, verified = ("—" if s[k] is None else f"{s[k]:.3f}" for k in ("robust_acc", "pgd_acc",
                                                                                  "verified_acc"))
        log(f"{stage:>10}: compression {s['compression']:.2f}×  robust {robust}  benign {s['benign_acc']:.3f}  "
            f"PGD {pgd}  verified {verified}"
            + ("" if s["autoattack_acc"] is None else f"  AutoAttack {s['autoattack_acc']:.3f}"))
        for warning in s["warnings"]:
            log(f"warning: {stage}: {warning}")

    done, restart_from = resume_point(journal, out)
    for stage in done:
        stages[STAGE_FILES[stage]] = read_metadata(out / f"{STAGE_FILES[stage]}.safetensors")["metrics"]
    if restart_from is not None:
        model = load(restart_from, device)
    if journal.saved is not None and journal.saved.fit is None:
        journal.restore_boundary(generator)
    plan = PruningPlan.from_json(json.loads((out / "plan.json").read_text())) if "prune" in done else None
    log(f"robustprune {__version__}: {cfg.data.name} / {cfg.model.name} / {objective.name} on {device}"
        + (f" (resumed after {', '.join(done)})" if done else " (resumed)" if resume else ""))
    if "pretrain" not in done:
        journal.begin("pretrain")
        timed("pretrain", lambda: pretrain(model, cfg, data, objective, **options))
        checkpoint("pretrained")
        journal.save_boundary("pretrain", generator)
    if "prune" not in done:
        journal.begin("prune")
        plan = timed("prune", lambda: prune_model(model, cfg, data, objective, **options))
        if main:
            write_json(out / "plan.json", plan.to_json())
        checkpoint("pruned", plan=plan.summary())
        journal.save_boundary("prune", generator)
    if "finetune" not in done:
        journal.begin("finetune")
        timed("finetune", lambda: finetune(model, cfg, data, ft_objective, **options))
        checkpoint("finetuned", plan=plan.summary())
        journal.save_boundary("finetune", generator)
    timing["total"] = carried + time.perf_counter() - t_start
    if not main:
        distributed.barrier()  # rank 0 writes the artefacts and the report
        return build_report(__version__, cfg.to_dict(), stages, timing, {})

    structured = PRUNERS.get(cfg.prune.rule).structured
    artifacts = {"checkpoint": str(out / "finetuned.safetensors"), "sparse": None, "slim": None, "onnx": None,
                 "plan": str(out / "plan.json"), "report_md": str(out / "report.md"), "plots": []}
    for kind in ("sparse", "slim") if structured else ("sparse",):  # the fine-tuned model, really compressed
        artifacts[kind] = str(save(model, out / f"finetuned.{kind}.safetensors", format=kind, stage="finetuned",
                                   metrics=stages["finetuned"], plan=plan.summary(), **meta))
    layers = layer_rows(kept_per_layer(model), plan.options.get("learned_densities"))
    report = build_report(__version__, cfg.to_dict(), stages, timing, artifacts, layers)
    if structured:
        report["structure"] = structure(model)
    write_report(out, report)
    journal.finish()
    distributed.barrier()
    if scalars is not None:
        scalars.close()
    log("")
    log(stage_table(report))
    return report

"""One run as a table of stages — pre-train, prune, fine-tune — with an evaluation and a checkpoint after each,
then the compressed exports and the report.

Each stage is also a function of its own (``pretrain``, ``prune_model``, ``finetune``, ``measure``), so the CLI's
stage commands and the sweep's points run exactly the code a run runs. ``run`` checks everything it can before it
writes anything, builds the model and the objectives once, and hands them from stage to stage (``Run``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import yaml
from torch import nn

from robustprune.config import Config, load_config, load_stored
from robustprune.data import Dataset, Split
from robustprune.evaluate import evaluate
from robustprune.export import load, read_metadata, save
from robustprune.infra import distributed, outdir
from robustprune.infra.errors import UserError
from robustprune.infra.fileio import write_json, write_text
from robustprune.infra.resume import Journal, remove_stale_temporaries, truncate_lines
from robustprune.infra.runtime import resolve_device, start
from robustprune.infra.version import __version__
from robustprune.objectives import Objective
from robustprune.objectives.base import Penalised
from robustprune.prepare import (  # noqa: F401  (check_names, build_objective, given_model: also used via pipeline)
    build_objective, build_objectives, check_boundable, check_names, check_prunable, given_model, load_data, new_model,
)
from robustprune.pruning import (
    PRUNERS, PruningPlan, attach_learned_scores, finalize_learned, kept_per_layer, learned_allocation, learned_penalty,
    masks, prune, slim, sparsity_report,
)
from robustprune.pruning.structured import count_macs_params
from robustprune.report import build_report, layer_rows, stage_table, write_report
from robustprune.train import FitOptions, fit

Log = Callable[[str], None]


# --- the stages as functions (run, stage commands, sweep points) -------------------------------------------------

def fit_options(cfg: Config, options: FitOptions | None = None, **changes) -> FitOptions:
    """``options`` (or the defaults) with the run-level training settings of ``cfg`` and ``changes``."""
    return dataclasses.replace(options or FitOptions(), batch_size=cfg.data.batch_size, precision=cfg.precision,
                               channels_last=cfg.channels_last, compile=cfg.compile, **changes)


def pretrain(model: nn.Module, cfg: Config, data: Dataset, objective: Objective,
             options: FitOptions | None = None) -> list[dict]:
    return fit(model, objective, data.train, cfg.pretrain, fit_options(cfg, options, stage="pretrain"))


def prune_model(model: nn.Module, cfg: Config, data: Dataset, objective: Objective,
                options: FitOptions | None = None) -> PruningPlan:
    """One-shot, or iterative: geometric steps to the target with ``round_epochs`` of fine-tuning between rounds."""
    targets = cfg.prune.round_targets()
    for round_index, target in enumerate(targets, start=1):
        plan = prune_round(model, cfg, target, data, objective, options)
        if round_index < len(targets) and cfg.prune.round_epochs > 0:
            fit(model, objective, data.train, dataclasses.replace(cfg.finetune, epochs=cfg.prune.round_epochs),
                fit_options(cfg, options, stage=f"prune-round-{round_index}"))
    return plan


def prune_round(model: nn.Module, cfg: Config, target: float, data: Dataset, objective: Objective,
                options: FitOptions | None = None) -> PruningPlan:
    """Prune to ``target``; a learned rule (HYDRA, HARP) first trains its scores with the same objective."""
    p = cfg.prune
    budget = p.budget_options()
    if not PRUNERS.get(p.rule).learned:
        return prune(model, p.rule, target, p.scope, seed=cfg.seed, **budget)
    attach_learned_scores(model, target, p.scope, rule=p.rule, **budget)
    penalty = learned_penalty(model, target, p.rate_penalty)  # HARP's budget term joins the run's own objective
    if penalty is not None:
        objective = Penalised(objective, penalty)
    fit(model, objective, data.train, p.score_training, fit_options(cfg, options, stage=f"{p.rule}-scores"))
    learned = learned_allocation(model)
    finalize_learned(model, target, **budget)
    return PruningPlan(rule=p.rule, scope=p.scope, target_compression=target, masks=masks(model),
                       options={**budget, **learned})


def finetune(model: nn.Module, cfg: Config, data: Dataset, objective: Objective,
             options: FitOptions | None = None) -> list[dict]:
    return fit(model, objective, data.train, cfg.finetune, fit_options(cfg, options, stage="finetune"))


def measure(model: nn.Module, cfg: Config, data: Dataset) -> dict:
    """The report.json stage record: accuracies plus the sparsity counts."""
    metrics = evaluate(model, data.test, cfg.threat, cfg.evaluate, batch_size=cfg.data.eval_batch_size, seed=cfg.seed)
    return {**metrics, **sparsity_report(model)}


def structure(model: nn.Module) -> dict:
    """Params and MACs (per example) of the masked-but-dense model and of its slim cut (structured rules)."""
    dense_macs, dense_params = count_macs_params(model)
    slim_macs, slim_params = count_macs_params(slim(model))
    return {"dense": {"params": dense_params, "macs": dense_macs}, "slim": {"params": slim_params, "macs": slim_macs}}


# --- one run: the stage table ---------------------------------------------------------------------------------

@dataclass
class Run:
    """What the stages of one run share: built once in ``run`` and handed from stage to stage."""

    cfg: Config
    out: Path
    data: Dataset
    model: nn.Module
    objective: Objective
    finetune_objective: Objective
    options: FitOptions  # generator, journal, metrics file, console: the same for every fit of the run
    main: bool  # rank 0 (or the only process): the one that writes
    log: Log
    records: dict[str, dict] = field(default_factory=dict)  # report.json stage records, by record name
    plan: PruningPlan | None = None
    scalars: object | None = None  # TensorBoard writer (tensorboard: true)

    @property
    def journal(self) -> Journal:
        return self.options.journal  # type: ignore[return-value]


@dataclass(frozen=True)
class Stage:
    name: str  # the journal's, timing's and stage command's name
    record: str  # the report.json stage record and the checkpoint file: RUN/<record>.safetensors
    step: Callable[[Run], None]


def _pretrain_stage(r: Run) -> None:
    pretrain(r.model, r.cfg, r.data, r.objective, r.options)


def _prune_stage(r: Run) -> None:
    r.plan = prune_model(r.model, r.cfg, r.data, r.objective, r.options)
    if r.main:  # right after pruning: a resume after this stage reads it back
        write_json(r.out / "plan.json", r.plan.to_json())


def _finetune_stage(r: Run) -> None:
    finetune(r.model, r.cfg, r.data, r.finetune_objective, r.options)


#: The one stage list: a run, its resume journal and its report follow this order.
STAGES: tuple[Stage, ...] = (Stage("pretrain", "pretrained", _pretrain_stage), Stage("prune", "pruned", _prune_stage),
                             Stage("finetune", "finetuned", _finetune_stage))


def run(cfg: Config, out: str | Path | None = None, *, force: bool = False, resume: bool = False,
        quiet: bool = False, log: Log = print, model: nn.Module | None = None, data: Dataset | None = None) -> dict:
    """The whole pipeline into the run folder ``out`` (default ``runs/<config name>-<time>``); returns the report
    (also written as report.json/.md).

    ``model``: the user's network instead of ``cfg.model`` (a copy is compressed; the argument is left as it is);
    ``data``: a ``Dataset`` instead of ``cfg.data``'s. The compressed model is ``load(out / report["artifacts"]
    ["checkpoint"])``.

    After every epoch and stage a journal (``infra/resume.py``) is written; ``resume=True`` continues an interrupted
    run in ``out`` from it and ends with the metrics an uninterrupted run would have had. The folder is locked for
    the whole run (``outdir``): a second writer is refused at once.
    """
    out = Path(out) if out is not None else outdir.default_run_folder(cfg.name)
    device = resolve_device(cfg.device)
    outdir.check_folder(out, outdir.RUN, force=force, resume=resume)  # before any work: a bad --out fails at once
    data = load_data(cfg) if data is None else data  # before the folder exists: missing data leaves nothing behind
    objective, finetune_objective = build_objectives(cfg)
    generator = start(cfg)  # seeded before the model is built: the same initial weights on every rerun
    model = new_model(cfg, data) if model is None else given_model(model, data)
    check_prunable(cfg, model)
    check_boundable(cfg, model)
    if cfg.tensorboard:
        from robustprune.report.tensorboard import summary_writer_class
        summary_writer_class()  # a missing extra fails (exit 2) before anything is written
    device = distributed.local_device(device)
    distributed.setup(device)  # under torchrun: every rank computes, rank 0 alone writes (and locks)
    main = distributed.is_main()
    if resume:
        open_for_resume(out, cfg)
    options = FitOptions(generator=generator, metrics_path=out / "metrics.jsonl" if main else None,
                         quiet=quiet or not main)
    state = Run(cfg, out, data, model.to(device), objective, finetune_objective, options, main,
                log if main else (lambda _: None))
    with contextlib.ExitStack() as held:
        if main:
            held.enter_context(prepare_out_dir(out, force, cfg.name, resume=resume))
        if main and not resume:
            write_text(out / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        if resume and (out / "report.json").is_file():
            state.log(f"{out} is a finished run (report.json exists): nothing to resume")
            return json.loads((out / "report.json").read_text())
        return _run_stages(state, resume)


def prepare_out_dir(out: Path, force: bool, config_name: str, *, resume: bool = False) -> outdir.Lock:
    """Create (or reopen, to resume) and lock the run folder ``out`` (``outdir.claim_folder``): a non-empty folder
    is refused unless ``force``, and ``force`` replaces only a folder robustprune marked as a run."""
    return outdir.claim_folder(out, outdir.RUN, config_name, force=force, resume=resume)


def open_for_resume(out: Path, cfg: Config) -> None:
    """A run folder to continue: it exists, holds this very config and is not finished."""
    if not (out / "config.yaml").is_file():
        raise UserError(f"--resume: {out} is not a run folder (no config.yaml)")
    stored = load_stored(out / "config.yaml")
    if stored.to_dict() != cfg.to_dict():
        changed = sorted(k for k, v in cfg.to_dict().items() if stored.to_dict().get(k) != v)
        raise UserError(f"--resume: the config differs from {out / 'config.yaml'} in {', '.join(changed)} "
                        "(a resumed run continues with its own config; drop -c/--set or start a new run)")


def _run_stages(r: Run, resume: bool) -> dict:
    """Every stage not finished yet, each followed by its evaluation, checkpoint and journal boundary."""
    r.options = dataclasses.replace(r.options, journal=Journal(r.out, resume=resume, enabled=r.main))
    distributed.barrier()  # every rank has read the journal before rank 0 writes a new one
    done = _restore(r, resume)
    timing = r.journal.timing
    carried, started = sum(v for k, v in timing.items() if k != "total"), time.perf_counter()
    r.log(f"robustprune {__version__}: {r.cfg.data.name} / {r.cfg.model.name} / {r.objective.name} on "
          f"{next(r.model.parameters()).device}"
          + (f" (resumed after {', '.join(done)})" if done else " (resumed)" if resume else ""))
    for stage in STAGES:
        if stage.name in done:
            continue
        r.journal.begin(stage.name)
        _timed(timing, stage.name, lambda: stage.step(r))
        _checkpoint(r, stage, timing)
        r.journal.save_boundary(stage.name, r.options.generator)
    timing["total"] = carried + time.perf_counter() - started
    return _finish(r, timing)


def _restore(r: Run, resume: bool) -> list[str]:
    """Prepare the folder and, when resuming, the state after the last finished stage; returns the finished
    stages' names."""
    if r.main:
        remove_stale_temporaries(r.out)
        r.journal.metrics_path = r.out / "metrics.jsonl"
        truncate_lines(r.out / "metrics.jsonl", r.journal.metrics_lines if resume else 0)
    if r.cfg.tensorboard and r.main:
        from robustprune.report.tensorboard import Scalars
        r.scalars = Scalars(r.out / "tensorboard")
        r.options = dataclasses.replace(r.options, on_epoch=r.scalars.epoch)
    saved = r.journal.saved
    if saved is None:
        return []
    names = [s.name for s in STAGES]
    finished = STAGES[:names.index(saved.stage) + (1 if saved.fit is None else 0)]
    for stage in finished:
        r.records[stage.record] = read_metadata(r.out / f"{stage.record}.safetensors")["metrics"]
    if finished:
        r.model = load(r.out / f"{finished[-1].record}.safetensors", next(r.model.parameters()).device)
    if saved.fit is None:
        r.journal.restore_boundary(r.options.generator)
    if any(s.name == "prune" for s in finished):
        r.plan = PruningPlan.from_json(json.loads((r.out / "plan.json").read_text()))
    return [s.name for s in finished]


def _timed(timing: dict[str, float], key: str, step: Callable[[], object]) -> None:
    t0 = time.perf_counter()
    step()
    timing[key] = timing.get(key, 0.0) + time.perf_counter() - t0


def _checkpoint(r: Run, stage: Stage, timing: dict[str, float]) -> None:
    """Evaluate after ``stage``, save RUN/<record>.safetensors with the record and print its line."""
    _timed(timing, "evaluate", lambda: r.records.__setitem__(stage.record, measure(r.model, r.cfg, r.data)))
    s = r.records[stage.record]
    if r.main:
        save(r.model, r.out / f"{stage.record}.safetensors", stage=stage.record, metrics=s, **_metadata(r))
    if r.scalars is not None:
        r.scalars.stage(stage.record, s)
    robust, pgd, verified = ("—" if s[k] is None else f"{s[k]:.3f}" for k in ("robust_acc", "pgd_acc",
                                                                              "verified_acc"))
    r.log(f"{stage.record:>10}: compression {s['compression']:.2f}×  robust {robust}  benign {s['benign_acc']:.3f}  "
          f"PGD {pgd}  verified {verified}"
          + ("" if s["autoattack_acc"] is None else f"  AutoAttack {s['autoattack_acc']:.3f}"))
    for warning in s["warnings"]:
        r.log(f"warning: {stage.record}: {warning}")


def _metadata(r: Run) -> dict:
    """Checkpoint metadata every stage file carries: the config, and the plan once there is one."""
    return {"config": r.cfg.to_dict(), **({"plan": r.plan.summary()} if r.plan is not None else {})}


def _finish(r: Run, timing: dict[str, float]) -> dict:
    """The compressed exports, report.json / report.md / plots (rank 0), the journal closed; returns the report."""
    if not r.main:
        distributed.barrier()  # rank 0 writes the artefacts and the report
        return build_report(__version__, r.cfg.to_dict(), r.records, timing, {})
    structured = PRUNERS.get(r.cfg.prune.rule).structured
    # Paths relative to the run folder: a folder that is moved, copied or read from elsewhere still points at them.
    artifacts = {"checkpoint": "finetuned.safetensors", "sparse": None, "slim": None, "onnx": None,
                 "plan": "plan.json", "report_md": "report.md", "plots": []}
    for kind in ("sparse", "slim") if structured else ("sparse",):  # the fine-tuned model, really compressed
        path = save(r.model, r.out / f"finetuned.{kind}.safetensors", format=kind, stage="finetuned",
                    metrics=r.records["finetuned"], **_metadata(r))
        artifacts[kind] = Path(path).name
    layers = layer_rows(kept_per_layer(r.model), r.plan.options.get("learned_densities"))
    report = build_report(__version__, r.cfg.to_dict(), r.records, timing, artifacts, layers)
    if structured:
        report["structure"] = structure(r.model)
    write_report(r.out, report)
    r.journal.finish()
    distributed.barrier()
    if r.scalars is not None:
        r.scalars.close()
    r.log("")
    r.log(stage_table(report))
    return report


def compress(net: nn.Module, train: Split | tuple, test: Split | tuple, *, objective: str = "pgd", eps: float,
             compression: float = 10.0, norm: str = "linf", settings: dict | None = None, out: str | Path | None = None,
             quiet: bool = True, log: Log = lambda _: None) -> tuple[nn.Module, dict]:
    """The common case in one call: ``net`` (already trained: no pre-training) pruned ``compression``× and
    fine-tuned with ``objective`` at radius ``eps``, evaluated as the command line does; returns the compressed
    model (a copy of ``net`` with its masks) and the report. ``train`` / ``test``: ``Split`` or ``(x, y)`` with x
    in [0, 1]. Every other option is the CLI's default; ``settings`` takes dotted keys as ``--set`` does
    (``{"finetune.epochs": 5, "prune.rule": "harp"}``). The run folder ``out`` defaults to
    ``runs/compress-<time>``."""
    splits = [s if isinstance(s, Split) else Split(*s) for s in (train, test)]
    data = Dataset("custom", splits[0], splits[1], max(int(s.y.max()) for s in splits) + 1)
    overrides = [f"objective.name={objective}", f"threat.eps={eps}", f"threat.norm={norm}",
                 f"prune.compression={compression}", "pretrain.epochs=0", "name=compress", "data.name=given"]
    overrides += [f"{key}={json.dumps(value)}" for key, value in (settings or {}).items()]
    out = Path(out) if out is not None else outdir.default_run_folder("compress")
    report = run(load_config(None, overrides), out, quiet=quiet, log=log, model=net, data=data)
    return load(out / report["artifacts"]["checkpoint"], model=net), report

"""What each ``robustprune`` command does: thin layers over the pipeline, its stage functions, the sweep, export
and the report."""
from __future__ import annotations

import argparse
import contextlib
import difflib
import json
from pathlib import Path
from typing import Iterator

from robustprune.config import Config, load_config, read_yaml
from robustprune.infra import outdir
from robustprune.infra.errors import UserError
from robustprune.train import FitOptions


def cmd_run(args: argparse.Namespace) -> None:
    from robustprune.pipeline import run

    if args.resume:
        if not args.out:
            raise UserError("--resume needs --out RUN_FOLDER (the run to continue)")
        if args.force:
            raise UserError("--resume continues a run; --force would delete it (use one or the other)")
        stored = Path(args.out) / "config.yaml"
        if not stored.is_file():
            raise UserError(f"--resume: {args.out} is not a run folder (no config.yaml)")
        # the folder's own config.yaml is read as stored (settings of other objectives, from before objectives
        # owned their settings, dropped); a -c file given instead is the user's, checked as such
        cfg = load_config(args.config, args.overrides, base=None if args.config else read_yaml(stored))
    else:
        cfg = load_config(args.config, args.overrides)
    out = Path(args.out) if args.out else outdir.default_run_folder(cfg.name)
    from robustprune.infra import distributed

    run(cfg, out, force=args.force, resume=args.resume, quiet=args.quiet)
    if distributed.is_main():
        print(f"\nrun folder: {out}")
    distributed.teardown()


def _checkpoint_config(args: argparse.Namespace, meta: dict) -> Config:
    return load_config(args.config, args.overrides, base=meta.get("config"))


def _check_out_file(out: Path, force: bool) -> None:
    """A stage command's output file can be written: checked before any work (data loading, training)."""
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; give a checkpoint file name like model.safetensors")
    if out.exists() and not force:
        raise UserError(f"--out {out} exists (use --force to replace it)")
    if not out.parent.is_dir():
        raise UserError(f"--out {out}: folder {out.parent} does not exist")
    outdir.check_writable(out.parent, f"--out {out}")


@contextlib.contextmanager
def _out_file(path: str, force: bool) -> Iterator[Path]:
    """The checked output file, locked for the whole command (``.<name>.lock`` beside it, see ``outdir``): a second
    command writing the same file is refused at once."""
    out = Path(path)
    _check_out_file(out, force)
    with outdir.lock_file(out):
        _check_out_file(out, force)  # again under the lock: another command may have written it meanwhile
        yield out


def _stage_setup(cfg: Config):
    from robustprune import pipeline
    from robustprune.infra.runtime import resolve_device, start

    pipeline.check_names(cfg)
    data = pipeline.load_data(cfg)
    generator = start(cfg)
    return pipeline, data, generator, resolve_device(cfg.device)


def cmd_train(args: argparse.Namespace) -> None:
    from robustprune.export import save

    cfg = load_config(args.config, args.overrides)
    with _out_file(args.out, args.force) as out:
        pipeline, data, generator, device = _stage_setup(cfg)
        model = pipeline.new_model(cfg, data).to(device)
        history = pipeline.pretrain(model, cfg, data, pipeline.build_objective(cfg.objective, cfg.threat),
                                    FitOptions(generator=generator, quiet=args.quiet))
        save(model, out, stage="pretrained", config=cfg.to_dict(), history=history)
    print(f"pre-trained model: {out}")


def cmd_prune(args: argparse.Namespace) -> None:
    from robustprune.export import load, read_metadata, save
    from robustprune.pruning import kept_per_layer, sparsity_report
    from robustprune.report import layer_rows, layer_table

    meta = read_metadata(args.checkpoint)
    overrides = list(args.overrides)
    overrides += [f"prune.compression={args.compression}"] if args.compression is not None else []
    overrides += [f"prune.sparsity={args.sparsity}"] if args.sparsity is not None else []
    overrides += [f"prune.scope={args.scope}"] if args.scope else []
    overrides += [f"prune.rule={args.rule}"] if args.rule else []
    cfg = load_config(args.config, overrides, base=meta.get("config"))
    with _out_file(args.out, args.force) as out:
        pipeline, data, generator, device = _stage_setup(cfg)  # data: HYDRA scores and iterative rounds train
        model = load(args.checkpoint, device)
        objective = pipeline.build_objective(cfg.objective, cfg.threat)
        plan = pipeline.prune_model(model, cfg, data, objective, FitOptions(generator=generator, quiet=args.quiet))
        save(model, out, stage="pruned", config=cfg.to_dict(), plan=plan.summary())
    s = sparsity_report(model)
    print(f"pruned model ({s['params_nonzero']}/{s['params_prunable']} weights kept, "
          f"compression {s['compression']:.2f}×): {out}")
    print(layer_table(layer_rows(kept_per_layer(model), plan.options.get("learned_densities"))))


def cmd_finetune(args: argparse.Namespace) -> None:
    from robustprune.export import load, read_metadata, save

    meta = read_metadata(args.checkpoint)
    cfg = _checkpoint_config(args, meta)
    with _out_file(args.out, args.force) as out:
        pipeline, data, generator, device = _stage_setup(cfg)
        model = load(args.checkpoint, device)
        objective_cfg = cfg.finetune_objective or cfg.objective
        history = pipeline.finetune(model, cfg, data, pipeline.build_objective(objective_cfg, cfg.threat),
                                    FitOptions(generator=generator, quiet=args.quiet))
        save(model, out, stage="finetuned", config=cfg.to_dict(), plan=meta.get("plan"), history=history)
    print(f"fine-tuned model: {out}")


def cmd_evaluate(args: argparse.Namespace) -> None:
    from robustprune.export import load, read_metadata
    from robustprune.report import finite, stage_table

    meta = read_metadata(args.checkpoint)
    if args.attacks is not None:
        args.overrides = [*args.overrides, f"evaluate.attacks=[{args.attacks}]"]
    cfg = _checkpoint_config(args, meta)
    pipeline, data, _, device = _stage_setup(cfg)
    model = load(args.checkpoint, device)
    metrics = finite(pipeline.measure(model, cfg, data))
    if args.json:
        print(json.dumps(metrics, indent=2))
    else:
        print(stage_table({"stages": {meta.get("stage", "model"): metrics},
                           "warnings": [f"{meta.get('stage', 'model')}: {w}" for w in metrics["warnings"]]}))


def cmd_verify(args: argparse.Namespace) -> None:
    from robustprune import verification
    from robustprune.bounds import AlphaSettings
    from robustprune.export import load, read_metadata
    from robustprune.infra.fileio import write_json

    if args.method not in verification.METHODS:
        close = difflib.get_close_matches(args.method, verification.METHODS, n=1)
        raise UserError(f"unknown method {args.method!r}" + (f"; did you mean {close[0]!r}?" if close else "")
                        + f" (choose from: {', '.join(verification.METHODS)})")
    if not args.timeout > 0:
        raise UserError(f"--timeout must be > 0 seconds, got {args.timeout}")
    if args.n is not None and args.n < 1:
        raise UserError(f"--n must be >= 1, got {args.n}")
    if args.jobs < 1:
        raise UserError(f"--jobs must be >= 1, got {args.jobs}")
    alpha = AlphaSettings(args.alpha_iterations, args.alpha_lr, args.alpha_intermediate)
    cfg = _checkpoint_config(args, read_metadata(args.checkpoint))
    if cfg.threat.norm != "linf":
        raise UserError(f"the verifiers bound the L∞ ball; threat.norm is {cfg.threat.norm}")
    with contextlib.ExitStack() as held:
        out = held.enter_context(_out_file(args.out, args.force)) if args.out else None
        pipeline, data, _, device = _stage_setup(cfg)
        model = load(args.checkpoint, device).double()
        n = min(len(data.test), args.n or cfg.evaluate.n_samples or len(data.test))
        x, y = data.test.x[:n].to(device).double(), data.test.y[:n].to(device)
        found = verification.verdicts(model, x, y, cfg.threat.eps, args.method, cfg.seed, args.timeout,
                                      progress=True, alpha=alpha, jobs=args.jobs)
        result = verification.summary(found, args.method, cfg.threat.eps)
        if out is not None:
            write_json(out, result)
    print(json.dumps(result, indent=2) if args.json else verification.table(result))


def _names(text: str | None) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()] if text else []


def cmd_sweep(args: argparse.Namespace) -> None:
    from robustprune.sweep import sweep

    try:
        compressions = [float(c) for c in _names(args.compression)]
    except ValueError:
        raise UserError(f"--compression takes numbers separated by commas, got {args.compression!r}") from None
    cfg = load_config(args.config, args.overrides)
    out = Path(args.out) if args.out else Path("sweeps") / outdir.folder_name(cfg.name)
    sweep(cfg, out, compressions, _names(args.pretrain_objectives), _names(args.finetune_objectives),
          _names(args.rules), quiet=args.quiet, backend=_backend(args))
    print(f"\nsweep folder: {out} (sweep.md, sweep.json, plots/)")


def _backend(args: argparse.Namespace):
    from robustprune.sweep import BackendOptions

    slurm = {"slurm_partition": args.slurm_partition, "timeout_min": args.slurm_time,
             "gpus_per_node": args.gpus_per_task or None, "cpus_per_task": args.slurm_cpus,
             "cluster": args.slurm_cluster}
    workers = args.workers if args.workers is not None else 1 if args.backend == "local" else 0
    return BackendOptions(args.backend, workers, args.address, {k: v for k, v in slurm.items() if v is not None},
                          args.gpus_per_task)


def cmd_report(args: argparse.Namespace) -> None:
    from robustprune.report import rerender

    for path in rerender(args.folder):
        print(path)


def cmd_export(args: argparse.Namespace) -> None:
    from robustprune.export import load, read_metadata, save

    source = Path(args.checkpoint)
    meta = read_metadata(source)
    if args.format == "onnx" and args.dtype != "fp32":
        raise UserError("ONNX export writes fp32 weights; --dtype applies to sparse and slim")
    suffix = ".onnx" if args.format == "onnx" else f".{args.format}.safetensors"
    target = args.out or str(source.with_name(source.name.removesuffix(".safetensors") + suffix))
    with _out_file(target, args.force) as out:
        if out.resolve() == source.resolve():
            raise UserError(f"--out {out} is the checkpoint being exported")
        model = load(source)
        kept = {k: v for k, v in meta.items() if k not in ("layout", "dtype", "arch", "sparse")}
        save(model, out, format=args.format, dtype=args.dtype, **({} if args.format == "onnx" else kept))
    dense = 4 * sum(p.numel() for p in model.parameters()) + 4 * sum(b.numel() for n, b in model.named_buffers()
                                                                     if b.is_floating_point() and "mask" not in n)
    print(f"{args.format} export: {out} ({out.stat().st_size / 1e6:.3f} MB; the dense fp32 weights are "
          f"{dense / 1e6:.3f} MB)")


def cmd_inspect(args: argparse.Namespace) -> None:
    from robustprune.export.describe import describe, format_description

    path = Path(args.file)
    if not path.is_file():
        raise UserError(f"file not found: {path}")
    description = describe(path)
    print(json.dumps(description, indent=2) if args.json else format_description(description))


def cmd_import(args: argparse.Namespace) -> None:
    from robustprune.export import save
    from robustprune.export.external import import_weights

    cfg = load_config(args.config, args.overrides)
    with _out_file(args.out, args.force) as out:
        pipeline, data, _, _ = _stage_setup(cfg)
        model = pipeline.new_model(cfg, data)
        import_weights(model, args.weights)
        save(model, out, stage="pretrained", config=cfg.to_dict())
    print(f"imported {args.weights} as a {cfg.model.name} checkpoint: {out}")


def cmd_download(args: argparse.Namespace) -> None:
    from robustprune.data.base import resolve_root
    from robustprune.data.download import download

    folder = download(args.name, resolve_root(args.root), quiet=args.quiet)
    print(f"{args.name}: {folder}")


def cmd_list(args: argparse.Namespace) -> None:
    from robustprune.attacks import ATTACKS
    from robustprune.bounds import VERIFIERS
    from robustprune.data import DATASETS
    from robustprune.models import MODELS
    from robustprune.objectives import OBJECTIVES
    from robustprune.pruning import PRUNERS

    registry = {"models": MODELS, "datasets": DATASETS, "objectives": OBJECTIVES, "pruners": PRUNERS,
                "attacks": ATTACKS, "verifiers": VERIFIERS}[args.kind]
    print("\n".join(registry.names()))

"""The ``robustprune`` command: a thin argparse layer over the pipeline and its stage functions.

Exit codes: 0 success, 2 bad input (one line on stderr), 1 anything else (set ROBUSTPRUNE_DEBUG=1 for a traceback).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Iterator, Sequence

from robustprune.config import Config, load_config
from robustprune.infra import outdir
from robustprune.infra.allocator import keep_freed_memory
from robustprune.infra.errors import TrainingDiverged, UserError, one_line
from robustprune.infra.version import __version__
from robustprune.pruning import SCOPES
from robustprune.train import FitOptions

LIST_KINDS = ("models", "datasets", "objectives", "pruners", "attacks", "verifiers")


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line and exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(f"{message} (see `{self.prog} --help`)")


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", help="YAML config (default: the embedded digits / PGD / 10× default)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one setting, e.g. --set threat.eps=0.1 (repeatable)")


def _add_out_args(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--out", required=what == "checkpoint", help=f"output {what}")
    p.add_argument("--force", action="store_true", help=f"replace an existing {what}")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="robustprune", description="Compress networks, keep their robustness.")
    parser.add_argument("--version", action="version", version=f"robustprune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_pipeline_commands(sub)
    _add_file_commands(sub)
    return parser


def _add_pipeline_commands(sub) -> None:
    """run, the stage commands and sweep: the commands that train or evaluate."""
    p = sub.add_parser("run", help="the whole pipeline: pre-train, prune, fine-tune, evaluate, report")
    _add_config_args(p)
    _add_out_args(p, "run folder")
    p.add_argument("--resume", action="store_true",
                   help="continue the interrupted run in --out from its last finished epoch (same final metrics)")

    p = sub.add_parser("train", help="pre-train a dense model → checkpoint")
    _add_config_args(p)
    _add_out_args(p, "checkpoint")

    p = sub.add_parser("prune", help="prune a checkpoint → checkpoint")
    p.add_argument("checkpoint")
    amount = p.add_mutually_exclusive_group()
    amount.add_argument("--compression", type=float, help="prunable / nonzero prunable weights (>= 1)")
    amount.add_argument("--sparsity", type=float, help="fraction of prunable weights set to 0, in [0, 1)")
    p.add_argument("--scope", choices=SCOPES,
                   help="layer: same rate per layer; global: one threshold; erk: Erdős–Rényi-Kernel rates")
    p.add_argument("--rule", help="pruning rule (robustprune list pruners)")
    _add_config_args(p)
    _add_out_args(p, "checkpoint")

    p = sub.add_parser("finetune", help="fine-tune a (pruned) checkpoint with its masks fixed → checkpoint")
    p.add_argument("checkpoint")
    _add_config_args(p)
    _add_out_args(p, "checkpoint")

    p = sub.add_parser("evaluate", help="benign and PGD accuracy of a checkpoint")
    p.add_argument("checkpoint")
    _add_config_args(p)
    p.add_argument("--attacks", help="comma-separated attacks to run, e.g. pgd,fgsm,autoattack "
                                     "(robustprune list attacks; same as --set evaluate.attacks=[...])")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")

    p = sub.add_parser("sweep", help="accuracy against compression for objective pairs and rules (resumable)")
    _add_config_args(p)
    p.add_argument("--compression", required=True, help="comma-separated compressions, e.g. 1,2,5,10,20,50,100")
    p.add_argument("--pretrain-objectives", help="comma-separated (default: the config's objective)")
    p.add_argument("--finetune-objectives", help="comma-separated (default: the config's fine-tuning objective)")
    p.add_argument("--rules", help="comma-separated pruning rules (default: the config's)")
    p.add_argument("--out", help="sweep folder (default: sweeps/<config name>); run again to resume")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_file_commands(sub) -> None:
    """report, export, inspect, import, download and list: the commands that read or write files only."""
    p = sub.add_parser("report", help="re-render the plots and markdown of a run or sweep folder")
    p.add_argument("folder")

    p = sub.add_parser("export", help="write a checkpoint as a sparse, slim or ONNX artefact")
    p.add_argument("checkpoint")
    p.add_argument("--format", required=True, choices=("sparse", "slim", "onnx"),
                   help="sparse: kept weights + mask encoding; slim: channels cut; onnx: for other runtimes")
    p.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32",
                   help="stored precision of the weights (sparse and slim; loaded back as fp32)")
    p.add_argument("--out", help="output file (default: beside the checkpoint, CKPT.<format>.safetensors / .onnx)")
    p.add_argument("--force", action="store_true", help="replace an existing output file")

    p = sub.add_parser("inspect", help="architecture, layout, per-layer density, size and metrics of a file")
    p.add_argument("file")
    p.add_argument("--json", action="store_true", help="print the description as JSON")

    p = sub.add_parser("import", help="an external PyTorch state dict (.pt, loaded weights-only) → checkpoint")
    p.add_argument("weights", help="a .pt/.pth file holding a state dict of the config's model")
    _add_config_args(p)
    p.add_argument("--out", required=True, help="output checkpoint")
    p.add_argument("--force", action="store_true", help="replace an existing output checkpoint")

    p = sub.add_parser("download", help="fetch a dataset from its publisher (pinned checksums) into the data root")
    p.add_argument("name", help="mnist, fashion-mnist, cifar10 or svhn")
    p.add_argument("--root", help="data root (default: $ROBUSTPRUNE_DATA, else ~/.cache/robustprune)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")

    p = sub.add_parser("list", help="list registered names")
    p.add_argument("kind", choices=LIST_KINDS)


# ------------------------------------------------------------------------------------------------ commands


def _cmd_run(args: argparse.Namespace) -> None:
    from robustprune.pipeline import run

    if args.resume:
        if not args.out:
            raise UserError("--resume needs --out RUN_FOLDER (the run to continue)")
        if args.force:
            raise UserError("--resume continues a run; --force would delete it (use one or the other)")
        stored = Path(args.out) / "config.yaml"
        if not stored.is_file():
            raise UserError(f"--resume: {args.out} is not a run folder (no config.yaml)")
        cfg = load_config(args.config or stored, args.overrides)
    else:
        cfg = load_config(args.config, args.overrides)
    default = Path("runs") / f"{outdir.folder_name(cfg.name)}-{time.strftime('%Y%m%d-%H%M%S')}"
    out = Path(args.out) if args.out else default
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


def _cmd_train(args: argparse.Namespace) -> None:
    from robustprune.export import save

    cfg = load_config(args.config, args.overrides)
    with _out_file(args.out, args.force) as out:
        pipeline, data, generator, device = _stage_setup(cfg)
        model = pipeline.new_model(cfg, data).to(device)
        history = pipeline.pretrain(model, cfg, data, pipeline.build_objective(cfg.objective, cfg.threat),
                                    FitOptions(generator=generator, quiet=args.quiet))
        save(model, out, stage="pretrained", config=cfg.to_dict(), history=history)
    print(f"pre-trained model: {out}")


def _cmd_prune(args: argparse.Namespace) -> None:
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


def _cmd_finetune(args: argparse.Namespace) -> None:
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


def _cmd_evaluate(args: argparse.Namespace) -> None:
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


def _names(text: str | None) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()] if text else []


def _cmd_sweep(args: argparse.Namespace) -> None:
    from robustprune.sweep import sweep

    try:
        compressions = [float(c) for c in _names(args.compression)]
    except ValueError:
        raise UserError(f"--compression takes numbers separated by commas, got {args.compression!r}") from None
    cfg = load_config(args.config, args.overrides)
    out = Path(args.out) if args.out else Path("sweeps") / outdir.folder_name(cfg.name)
    sweep(cfg, out, compressions, _names(args.pretrain_objectives), _names(args.finetune_objectives),
          _names(args.rules), quiet=args.quiet)
    print(f"\nsweep folder: {out} (sweep.md, sweep.json, plots/)")


def _cmd_report(args: argparse.Namespace) -> None:
    from robustprune.report import rerender

    for path in rerender(args.folder):
        print(path)


def _cmd_export(args: argparse.Namespace) -> None:
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


def _cmd_inspect(args: argparse.Namespace) -> None:
    from robustprune.export.describe import describe, format_description

    path = Path(args.file)
    if not path.is_file():
        raise UserError(f"file not found: {path}")
    description = describe(path)
    print(json.dumps(description, indent=2) if args.json else format_description(description))


def _cmd_import(args: argparse.Namespace) -> None:
    from robustprune.export import save
    from robustprune.export.external import import_weights

    cfg = load_config(args.config, args.overrides)
    with _out_file(args.out, args.force) as out:
        pipeline, data, _, _ = _stage_setup(cfg)
        model = pipeline.new_model(cfg, data)
        import_weights(model, args.weights)
        save(model, out, stage="pretrained", config=cfg.to_dict())
    print(f"imported {args.weights} as a {cfg.model.name} checkpoint: {out}")


def _cmd_download(args: argparse.Namespace) -> None:
    from robustprune.data.base import resolve_root
    from robustprune.data.download import download

    folder = download(args.name, resolve_root(args.root), quiet=args.quiet)
    print(f"{args.name}: {folder}")


def _cmd_list(args: argparse.Namespace) -> None:
    from robustprune.attacks import ATTACKS
    from robustprune.bounds import VERIFIERS
    from robustprune.data import DATASETS
    from robustprune.models import MODELS
    from robustprune.objectives import OBJECTIVES
    from robustprune.pruning import PRUNERS

    registry = {"models": MODELS, "datasets": DATASETS, "objectives": OBJECTIVES, "pruners": PRUNERS,
                "attacks": ATTACKS, "verifiers": VERIFIERS}[args.kind]
    print("\n".join(registry.names()))


COMMANDS = {"run": _cmd_run, "train": _cmd_train, "prune": _cmd_prune, "finetune": _cmd_finetune,
            "evaluate": _cmd_evaluate, "export": _cmd_export, "inspect": _cmd_inspect,
            "sweep": _cmd_sweep, "report": _cmd_report, "import": _cmd_import, "download": _cmd_download,
            "list": _cmd_list}


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        keep_freed_memory()
        COMMANDS[args.command](args)
        return 0
    except UserError as err:
        print(f"robustprune: error: {one_line(err)}", file=sys.stderr)
        return 2
    except TrainingDiverged as err:  # not the input, not a bug: the run itself failed (its last journal is kept)
        print(f"robustprune: error: {one_line(err)}", file=sys.stderr)
        return 1
    except OSError as err:  # unwritable folder, disk full, ...: the system's reason, on one line
        where = f": {err.filename}" if err.filename else ""
        print(f"robustprune: error: {err.strerror or err}{where}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("robustprune: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # a bug: say so in one line unless asked for the traceback
        if os.environ.get("ROBUSTPRUNE_DEBUG"):
            raise
        print(f"robustprune: internal error: {type(err).__name__}: {err} "
              "(set ROBUSTPRUNE_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1

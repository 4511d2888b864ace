"""The ``robustprune`` command line's grammar: every command, its arguments and their help."""
from __future__ import annotations

import argparse

from robustprune.infra.errors import UserError
from robustprune.infra.version import __version__
from robustprune.pruning import SCOPES

LIST_KINDS = ("models", "datasets", "objectives", "pruners", "attacks", "verifiers")


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line and exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(f"{message} (see `{self.prog} --help`)")


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", help="YAML config (default: the embedded digits / PGD / 10× default)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one setting, e.g. --set threat.eps=0.1 (repeatable)")
    _add_trust_arg(p)


def _add_trust_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trust-factory", dest="trusted", action="append", default=[], metavar="PACKAGE.MODULE:FUNCTION",
                   help="let checkpoints that name this model factory (your own code) call it (repeatable)")


def _add_init_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--init", metavar="WEIGHTS", help="start from these weights (.safetensors, or a weights-only .pt "
                   "state dict) with no pre-training: --set model.init=WEIGHTS --set pretrain.epochs=0")


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
    _add_init_arg(p)
    _add_out_args(p, "run folder")
    p.add_argument("--resume", action="store_true",
                   help="continue the interrupted run in --out from its last finished epoch (same final metrics)")

    p = sub.add_parser("train", help="pre-train a dense model → checkpoint")
    _add_config_args(p)
    _add_init_arg(p)
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

    p = sub.add_parser("verify", help="per image: verified, falsified (a checked counter-example) or unknown")
    p.add_argument("checkpoint")
    _add_config_args(p)
    p.add_argument("--method", default="crown", help="ibp, crown-ibp, crown, alpha-crown or bab (default crown)")
    p.add_argument("--timeout", type=float, default=30.0, help="bab: seconds per image before it is unknown")
    p.add_argument("--alpha-iterations", type=int, default=20, help="alpha-crown (and bab's first bound): "
                                                                     "gradient steps on the ReLU slopes (default 20)")
    p.add_argument("--alpha-lr", type=float, default=0.1, help="alpha-crown: Adam's step on the slopes (default 0.1)")
    p.add_argument("--alpha-intermediate", action="store_true",
                   help="alpha-crown: also optimise the intermediate bounds (tighter, ~20x slower)")
    p.add_argument("--n", type=int, help="the first n evaluated images (default evaluate.n_samples, else all)")
    p.add_argument("--jobs", type=int, default=1, help="images verified at once, in worker processes on the CPU, "
                                                      "each with an equal share of the cores (default 1)")
    p.add_argument("--json", action="store_true", help="print the summary and the per-image verdicts as JSON")
    p.add_argument("--out", help="also write the JSON here")
    p.add_argument("--force", action="store_true", help="replace an existing --out file")

    _add_sweep_command(sub)


def _add_sweep_command(sub) -> None:
    p = sub.add_parser("sweep", help="accuracy against compression for objective pairs and rules (resumable)")
    _add_config_args(p)
    p.add_argument("--compression", required=True, help="comma-separated compressions, e.g. 1,2,5,10,20,50,100")
    p.add_argument("--pretrain-objectives", help="comma-separated (default: the config's objective)")
    p.add_argument("--finetune-objectives", help="comma-separated (default: the config's fine-tuning objective)")
    p.add_argument("--rules", help="comma-separated pruning rules (default: the config's)")
    p.add_argument("--out", help="sweep folder (default: sweeps/<config name>); run again to resume")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--workers", type=int,
                   help="local: worker processes, each with its share of the cores (default 1: this process); "
                        "ray / slurm: tasks at once (default 0: no cap)")
    p.add_argument("--backend", default="local", help="local (default), ray or slurm (through submitit)")
    p.add_argument("--address", help="ray: the cluster's address HOST:PORT (default: start a local one)")
    p.add_argument("--slurm-partition", help="slurm: the partition")
    p.add_argument("--slurm-time", type=int, help="slurm: minutes per task (default 60)")
    p.add_argument("--gpus-per-task", type=int, default=0,
                   help="ray / slurm: GPUs each task asks for (default 0); local workers take the GPUs in turn")
    p.add_argument("--slurm-cpus", type=int, default=1, help="slurm: CPU cores (and threads) per task (default 1)")
    p.add_argument("--slurm-cluster", default=None, help=argparse.SUPPRESS)  # submitit's "local" for tests


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
    _add_trust_arg(p)

    p = sub.add_parser("inspect", help="architecture, layout, per-layer density, size and metrics of a file")
    p.add_argument("file")
    _add_trust_arg(p)
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

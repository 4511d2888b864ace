"""The ``robustprune`` command: a thin argparse layer over the pipeline and its stage functions.

Exit codes: 0 success, 2 bad input (one line on stderr), 1 anything else (set ROBUSTPRUNE_DEBUG=1 for a traceback).
"""
from __future__ import annotations

import os
import sys
from typing import Sequence

from robustprune.cli.commands import (
    cmd_download, cmd_evaluate, cmd_export, cmd_finetune, cmd_import, cmd_inspect, cmd_list, cmd_prune,
    cmd_report, cmd_run, cmd_sweep, cmd_train, cmd_verify,
)
from robustprune.cli.parser import LIST_KINDS, build_parser
from robustprune.infra.allocator import keep_freed_memory
from robustprune.infra.errors import TrainingDiverged, UserError, one_line
from robustprune.models import trust_factory

COMMANDS = {"run": cmd_run, "train": cmd_train, "prune": cmd_prune, "finetune": cmd_finetune,
            "evaluate": cmd_evaluate, "export": cmd_export, "inspect": cmd_inspect,
            "sweep": cmd_sweep, "report": cmd_report, "import": cmd_import, "download": cmd_download,
            "list": cmd_list, "verify": cmd_verify}


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        keep_freed_memory()
        for name in getattr(args, "trusted", []):
            trust_factory(name)
        if getattr(args, "init", None):  # before the user's --set: an explicit pretrain.epochs still wins
            args.overrides = [f"model.init={args.init}", "pretrain.epochs=0", *args.overrides]
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


__all__ = ["LIST_KINDS", "build_parser", "main"]

"""Exact resume: a journal of the run's last safe point, rewritten atomically after every epoch and every stage.

One file, ``RUN/resume.safetensors`` (safetensors: no pickle is ever loaded), with a SHA-256 checksum of its tensors
and metadata (``export/digest.py``) that is verified before anything is restored. Tensors: the model's whole state
dict (weights, masks, HYDRA scores) under ``model.``, the optimiser's tensors under ``optim.``, and the torch RNG
states under ``rng.``. JSON metadata: the position — pipeline stage, index of the ``fit`` call within that stage,
epochs done (the ε / κ / β schedules are functions of it) — the optimiser's other state and parameter groups, the
learning-rate scheduler, Python's and NumPy's RNG, the stage's history so far, the number of complete lines of
``metrics.jsonl`` and the timing so far.

A resumed run replays the pipeline from the last stage checkpoint: ``fit`` calls before the saved one are skipped,
the saved one restores its state and continues with the next epoch, and everything after runs as in an
uninterrupted run. With the RNG states restored too, a resumed run ends with the same weights and metrics.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from robustprune.infra.errors import UserError
from robustprune.infra import digest
from robustprune.infra.fileio import atomic_path

JOURNAL = "resume.safetensors"
_DELETE_IT = "; delete it to restart the run from its last stage checkpoint"
SKIP = "skip"


@dataclass(frozen=True)
class Position:
    """Where a journal was written: after ``epoch`` epochs of fit call ``fit`` of ``stage``, or after the stage
    (``fit`` is None) once its checkpoint and evaluation were written."""

    stage: str
    fit: int | None
    epoch: int = 0


def rng_state(generator: torch.Generator | None) -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"rng.torch": torch.get_rng_state()}
    if generator is not None:
        tensors["rng.data"] = generator.get_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors.update({f"rng.cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    py_version, py_state, py_gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    plain = {"python": [py_version, list(py_state), py_gauss],
             "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]}
    return tensors, plain


def set_rng_state(tensors: dict[str, torch.Tensor], plain: dict, generator: torch.Generator | None) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    if generator is not None and "rng.data" in tensors:
        generator.set_state(tensors["rng.data"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("rng.cuda.")), key=lambda k: int(k[9:]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, state, gauss = plain["python"]
    random.setstate((version, tuple(state), gauss))
    kind, keys, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


def optimizer_parts(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """The optimiser's state dict split into tensors (``optim.<param>.<name>``) and JSON."""
    state = optimizer.state_dict()
    tensors, other = {}, {}
    for index, entries in state["state"].items():
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                other.setdefault(str(index), {})[name] = value
    return tensors, {"param_groups": state["param_groups"], "other": other}


def load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], plain: dict) -> None:
    state: dict[int, dict[str, Any]] = {int(i): dict(v) for i, v in plain["other"].items()}
    for key, value in tensors.items():
        if key.startswith("optim."):
            index, name = key[6:].split(".", 1)
            state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": plain["param_groups"]})


class Journal:
    """Writes the journal during a run and, on resume, tells each ``fit`` call to skip, restore or run."""

    def __init__(self, folder: str | Path, *, resume: bool = False, enabled: bool = True) -> None:
        self.path = Path(folder) / JOURNAL
        self.enabled = enabled  # False on the ranks of a distributed run that do not write files
        self.stage: str | None = None
        self.index = -1
        self.timing: dict[str, float] = {}
        self.metrics_path: Path | None = None
        self.saved: Position | None = None
        self._tensors: dict[str, torch.Tensor] = {}
        self._meta: dict = {}
        if resume and self.path.is_file():
            self._read()

    # ------------------------------------------------------------------------------------------------ reading

    def _read(self) -> None:
        try:
            self._tensors = load_file(str(self.path))
            with safe_open(str(self.path), "pt") as handle:
                metadata = handle.metadata() or {}
        except (OSError, SafetensorError, ValueError, KeyError, TypeError) as err:
            raise self._unreadable(f"{type(err).__name__}: {err}") from None
        digest.check(self._tensors, metadata, f"{self.path}: the resume journal", _DELETE_IT)
        try:
            self._meta = json.loads(metadata["journal"])
            self.saved = Position(**self._meta["position"])
        except (ValueError, KeyError, TypeError) as err:
            raise self._unreadable(f"{type(err).__name__}: {err}") from None
        self.timing = dict(self._meta.get("timing", {}))

    def _unreadable(self, reason: str) -> UserError:
        return UserError(f"{self.path}: unreadable resume journal ({reason}){_DELETE_IT}")

    @property
    def metrics_lines(self) -> int:
        return int(self._meta.get("metrics_lines", 0))

    # ------------------------------------------------------------------------------------------- fit protocol

    def begin(self, stage: str) -> None:
        """A pipeline stage starts: fit calls are counted from 0 within it."""
        self.stage, self.index = stage, -1

    def next_fit(self) -> int:
        self.index += 1
        return self.index

    def restore(self, index: int, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                generator: torch.Generator | None) -> tuple[int, list[dict]] | str | None:
        """For fit call ``index`` of the current stage: SKIP (done before the journal was written), the epochs done
        and the history after restoring the saved state, or None (run it from the start)."""
        saved = self.saved
        if saved is None or saved.fit is None or saved.stage != self.stage:
            return None
        if index < saved.fit:
            return SKIP
        if index > saved.fit:
            return None
        model.load_state_dict({k[6:]: v for k, v in self._tensors.items() if k.startswith("model.")})
        load_optimizer(optimizer, self._tensors, self._meta["optimizer"])
        scheduler.load_state_dict(self._meta["scheduler"])
        set_rng_state(self._tensors, self._meta["rng"], generator)
        self.saved = None  # from here on the run is ahead of the journal
        return saved.epoch, list(self._meta["history"])

    def restore_boundary(self, generator: torch.Generator | None) -> None:
        """Resuming right after a finished stage: restore the RNG as it was when that stage ended."""
        set_rng_state(self._tensors, self._meta["rng"], generator)
        self.saved = None

    # ------------------------------------------------------------------------------------------------ writing

    def save_epoch(self, index: int, epoch: int, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                   generator: torch.Generator | None, history: list[dict]) -> None:
        if not self.enabled:
            return
        tensors = {f"model.{k}": v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
        optim_tensors, optim_plain = optimizer_parts(optimizer)
        self._write(Position(self.stage or "", index, epoch), {**tensors, **optim_tensors}, generator,
                    optimizer=optim_plain, scheduler=scheduler.state_dict(), history=history)

    def save_boundary(self, stage: str, generator: torch.Generator | None) -> None:
        if self.enabled:
            self._write(Position(stage, None), {}, generator)

    def _write(self, position: Position, tensors: dict[str, torch.Tensor], generator: torch.Generator | None,
               **plain: Any) -> None:
        rng_tensors, rng_plain = rng_state(generator)
        lines = _count_lines(self.metrics_path) if self.metrics_path is not None else 0
        meta = {"position": position.__dict__, "rng": rng_plain, "timing": self.timing, "metrics_lines": lines,
                **plain}
        tensors = {**tensors, **rng_tensors}
        with atomic_path(self.path) as tmp:
            save_file(tensors, str(tmp), metadata=digest.sign(tensors, {"journal": json.dumps(meta)}))

    def finish(self) -> None:
        """The run is complete: the journal is no longer needed."""
        if self.enabled:
            self.path.unlink(missing_ok=True)


def _count_lines(path: Path) -> int:
    try:
        with open(path, "rb") as handle:
            return handle.read().count(b"\n")
    except FileNotFoundError:
        return 0


def truncate_lines(path: Path, keep: int) -> None:
    """Keep the first ``keep`` complete lines of ``path`` (the epochs a resumed run will not repeat)."""
    if not path.is_file():
        return
    lines = path.read_bytes().split(b"\n")[:keep]
    with atomic_path(path) as tmp:
        tmp.write_bytes(b"".join(line + b"\n" for line in lines))


def remove_stale_temporaries(folder: Path) -> None:
    """Temporary files of writes a kill interrupted (``.<name>.<random>.tmp``, see ``fileio.atomic_path``)."""
    for tmp in folder.glob(".*.tmp"):
        if tmp.is_file():
            tmp.unlink()

"""Checkpoints: safetensors tensors + JSON metadata (architecture spec, config, pruning plan, metrics). No pickle.

Masked layers are stored in plain form (``<layer>.weight`` with its zeros, ``<layer>.weight_mask``), so a loaded
model has the same masks — pruned weights stay exactly 0 through saving and loading.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from robustprune.errors import UserError
from robustprune.fileio import atomic_path
from robustprune.models import model_from_spec
from robustprune.pruning import load_plain_state_dict, plain_state_dict

FORMAT = "robustprune-checkpoint"
FORMAT_VERSION = "1"


def save(model: nn.Module, path: str | os.PathLike, **metadata: Any) -> Path:
    """Write ``model`` (with its masks) and JSON-able ``metadata`` (config, plan, metrics, ...) atomically."""
    path = Path(path)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in plain_state_dict(model).items()}
    header = {"format": FORMAT, "format_version": FORMAT_VERSION, "arch": json.dumps(model.arch)}
    header.update({key: json.dumps(value) for key, value in metadata.items()})
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=header)
    return path


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON metadata of a checkpoint, checked for our format and version."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        with open(path, "rb") as handle:
            size = int.from_bytes(handle.read(8), "little")
            if size <= 0 or size > min(os.path.getsize(path) - 8, 100_000_000):
                raise ValueError("bad header size")
            header = json.loads(handle.read(size))
        raw = header.get("__metadata__") or {}
        if raw.get("format") != FORMAT:
            raise ValueError("not a robustprune checkpoint")
        if raw.get("format_version") != FORMAT_VERSION:
            raise UserError(f"{path}: unsupported checkpoint format version {raw.get('format_version')!r} "
                            f"(this robustprune reads version {FORMAT_VERSION})")
        return {k: json.loads(v) for k, v in raw.items() if k not in ("format", "format_version")}
    except UserError:
        raise
    except (ValueError, UnicodeDecodeError, AttributeError) as err:
        raise UserError(f"{path}: not a valid robustprune safetensors checkpoint ({err})") from None


def load(path: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the model of a checkpoint, masks included, in eval mode (its metadata: :func:`read_metadata`)."""
    meta = read_metadata(path)
    try:
        model = model_from_spec(meta["arch"])
        tensors = load_file(str(path))
        load_plain_state_dict(model, tensors)
    except UserError:
        raise
    except (SafetensorError, KeyError, RuntimeError, ValueError, TypeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{path}: checkpoint does not match its architecture ({first})") from None
    return model.to(device).eval()

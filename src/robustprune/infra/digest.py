"""The content checksum of a safetensors file we write (checkpoints of every layout, the resume journal).

Stored in the file's own metadata under ``sha256``: SHA-256 over every tensor in sorted name order — its name,
dtype, shape and raw bytes as written — and over every other metadata entry (sorted keys, the raw JSON strings), so
a flipped bit anywhere in the weights, the architecture (normalisation included), the layout or the config is
detected when the file is read. It guards against corruption and accidental edits, not against a forger, who can
recompute it: every file is also checked for what it holds (``checkpoint.py``).
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping

import torch

from robustprune.infra.errors import UserError

KEY = "sha256"


def digest(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> str:
    """Hex SHA-256 of ``tensors`` and ``metadata`` (without the ``sha256`` entry itself)."""
    sha = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        raw = tensor.reshape(-1).view(torch.uint8).numpy()  # the bytes as safetensors writes them (little-endian)
        # one JSON line per entry: names and strings are escaped, and the byte count delimits the data that follows
        sha.update(_line("tensor", name, str(tensor.dtype).removeprefix("torch."), list(tensor.shape), raw.nbytes))
        sha.update(raw)
    for key in sorted(metadata):
        if key != KEY:
            sha.update(_line("metadata", key, metadata[key]))
    return sha.hexdigest()


def sign(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> dict[str, str]:
    """``metadata`` with the checksum of ``tensors`` and ``metadata`` added, ready for ``save_file``."""
    return {**metadata, KEY: digest(tensors, metadata)}


def check(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], what: str, advice: str = "") -> None:
    """UserError unless ``metadata`` holds the checksum of exactly these tensors and metadata; ``what`` names the
    file in the message (``"PATH: the checkpoint"``), ``advice`` ends it."""
    stored = metadata.get(KEY)
    if stored is None:
        raise UserError(f"{what} has no {KEY} checksum{advice}")
    try:
        actual = digest(tensors, metadata)
    except (RuntimeError, TypeError) as err:  # a dtype torch cannot view as bytes: not a file we wrote
        raise UserError(f"{what} holds tensors of an unexpected kind ({type(err).__name__}){advice}") from None
    if stored != actual:
        raise UserError(f"{what} is corrupted or was modified ({KEY} checksum mismatch){advice}")


def _line(*fields: object) -> bytes:
    return json.dumps(fields).encode() + b"\n"

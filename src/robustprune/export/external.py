"""External PyTorch weights → a robustprune model (``robustprune import WEIGHTS.pt -c CONFIG --out X.safetensors``).

A ``.safetensors`` file is read as tensors; any other file only with ``torch.load(weights_only=True)`` (DESIGN.md §3): tensors and plain containers, never
arbitrary pickled objects, so a malicious pickle is refused instead of run. Accepted layouts:
- a plain state dict of the config's model (``Sequential(Normalize, body)``: ``0.mean``, ``0.std``, ``1.…``);
- the same nested under ``state_dict``, ``model_state_dict`` or ``model`` (training-loop checkpoints; other entries
  such as the optimizer state are ignored);
- keys prefixed by ``module.`` (DataParallel / DDP) or ``_orig_mod.`` (``torch.compile``);
- masks in our plain form (``<param>_mask`` beside ``<param>``) or in ``torch.nn.utils.prune``'s form
  (``<param>_orig`` and ``<param>_mask``): the masks are attached, so pruned weights stay exactly 0.
Any mismatch (missing / unexpected keys, shapes, non-tensor or non-finite values) raises one-line
:class:`~robustprune.infra.errors.UserError` naming a few offending keys.
"""
from __future__ import annotations

import os
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from robustprune.infra.errors import UserError
from robustprune.pruning import load_plain_state_dict, plain_state_dict
from robustprune.pruning.masks import MASK_SUFFIX

NESTED_KEYS = ("state_dict", "model_state_dict", "model")
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_ORIG_SUFFIX = "_orig"  # torch.nn.utils.prune stores <param>_orig and <param>_mask
_SHOWN = 3  # offending keys named in a message


def import_weights(model: nn.Module, path: str | os.PathLike) -> None:
    """Load the state dict in ``path`` (weights-only) into ``model`` strictly, or raise a one-line UserError."""
    path = Path(path)
    state = _strip_prefixes(_unwrap(_read(path), path))
    state = _from_torch_prune(state)
    check_values(state, path)
    _check_matches(model, state, path)
    try:
        load_plain_state_dict(model, state)
    except (RuntimeError, KeyError, ValueError) as err:  # checked above; kept so a surprise stays one line
        raise UserError(f"{path}: does not fit the model ({_first_line(err)})") from None


def _read(path: Path) -> Any:
    if not path.is_file():
        raise UserError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":  # tensors only, by construction (a robustprune checkpoint's weights and masks)
        try:
            return load_file(str(path))
        except Exception as err:
            raise UserError(f"{path}: not a readable safetensors file ({_load_reason(err)})") from None
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the error below is the message
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # refused globals, corrupt zip, truncated file, a safetensors file: all one answer
        raise UserError(f"{path}: not a weights-only PyTorch state dict ({_load_reason(err)})") from None


def _load_reason(err: Exception) -> str:
    """torch's refusal is a multi-line essay that suggests loading unsafely; keep only the unpickler's reason."""
    text = " ".join(str(err).replace("\x1b[1m", "").replace("\x1b[0m", "").split())
    if "WeightsUnpickler error:" in text:
        reason = re.split(r"\s*(?:Please use|Check the documentation)", text.partition("WeightsUnpickler error:")[2])[0]
    else:  # e.g. KeyError '101' on a text file, EOFError on an empty one: the type says more than the text
        reason = f"{type(err).__name__}: {text.split('. ')[0]}" if text else type(err).__name__
    reason = reason.strip() or type(err).__name__
    return reason if len(reason) <= 160 else reason[:157] + "..."


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _unwrap(loaded: Any, path: Path) -> dict[str, Any]:
    if not isinstance(loaded, Mapping):
        raise UserError(f"{path}: holds a {type(loaded).__name__}, not a state dict (a mapping of names to tensors)")
    for key in NESTED_KEYS:
        if isinstance(loaded.get(key), Mapping):
            loaded = loaded[key]
            break
    bad = [k for k in loaded if not isinstance(k, str)]
    if bad:
        raise UserError(f"{path}: state dict keys must be strings, got {_few(bad)}")
    if not loaded:
        raise UserError(f"{path}: the state dict is empty")
    return dict(loaded)


def _strip_prefixes(state: dict[str, Any]) -> dict[str, Any]:
    """Drop wrapper prefixes shared by every key (``module.`` of DDP, ``_orig_mod.`` of torch.compile)."""
    stripped = True
    while stripped:
        stripped = False
        for prefix in WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix):]: v for k, v in state.items()}
                stripped = True
    return state


def _from_torch_prune(state: dict[str, Any]) -> dict[str, Any]:
    """``<p>_orig`` + ``<p>_mask`` (torch.nn.utils.prune) → our plain ``<p>`` (masked value) + ``<p>_mask``."""
    state = dict(state)
    for key in [k for k in state if k.endswith(_ORIG_SUFFIX)]:
        base = key[: -len(_ORIG_SUFFIX)]
        orig, mask = state[key], state.get(base + MASK_SUFFIX)
        if base in state or not (isinstance(orig, torch.Tensor) and isinstance(mask, torch.Tensor)):
            continue
        if orig.shape == mask.shape and orig.is_floating_point():
            state[base] = orig * mask.to(orig.dtype)
            del state[key]
    return state


def check_values(state: dict[str, Any], path: Path) -> None:
    not_tensors = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        kinds = ", ".join(f"{k!r} ({type(state[k]).__name__})" for k in not_tensors[:_SHOWN])
        raise UserError(f"{path}: values must be tensors; not tensors: {kinds}{_more(not_tensors)}")
    odd = [k for k, v in state.items() if v.layout != torch.strided or v.is_complex() or v.is_quantized]
    if odd:
        raise UserError(f"{path}: only dense real tensors can be imported; not so: {_few(odd)}")
    non_finite = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if non_finite:
        raise UserError(f"{path}: tensors with NaN or infinite values: {_few(non_finite)}")
    bad_masks = [k for k, v in state.items() if k.endswith(MASK_SUFFIX) and k[: -len(MASK_SUFFIX)] in state
                 and not bool(((v == 0) | (v == 1)).all())]
    if bad_masks:
        raise UserError(f"{path}: masks must hold only 0 and 1: {_few(bad_masks)}")


def _check_matches(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """Same keys as the model's plain state dict (masks optional), same shapes, floats where floats belong."""
    expected = plain_state_dict(model)
    params = {n.replace(".parametrizations.", ".").removesuffix(".original") for n, _ in model.named_parameters()}
    masks = {k for k in state if k.endswith(MASK_SUFFIX) and k[: -len(MASK_SUFFIX)] in state
             and k[: -len(MASK_SUFFIX)] in params}
    name = getattr(model, "arch", {}).get("name", type(model).__name__)
    missing = sorted(k for k in expected if k not in state)
    unexpected = sorted(k for k in state if k not in expected and k not in masks)
    if missing or unexpected:
        parts = ([f"missing {_few(missing)}"] if missing else []) + ([f"unexpected {_few(unexpected)}"]
                                                                    if unexpected else [])
        raise UserError(f"{path}: not a state dict of the config's model {name!r}: {'; '.join(parts)}")
    shapes = [k for k in state if tuple(state[k].shape) != _expected_shape(k, expected)]
    if shapes:
        shown = ", ".join(f"{k!r} {tuple(state[k].shape)} (model {_expected_shape(k, expected)})"
                          for k in shapes[:_SHOWN])
        raise UserError(f"{path}: shapes differ from the model {name!r}: {shown}{_more(shapes)}")
    kinds = [k for k in expected if expected[k].is_floating_point() != state[k].is_floating_point()]
    if kinds:
        shown = ", ".join(f"{k!r} is {state[k].dtype} (model {expected[k].dtype})" for k in kinds[:_SHOWN])
        raise UserError(f"{path}: wrong tensor types: {shown}{_more(kinds)}")


def _expected_shape(key: str, expected: dict[str, torch.Tensor]) -> tuple:
    """The model's shape for ``key``; a mask has the shape of the parameter it masks."""
    return tuple(expected[key].shape if key in expected else expected[key[: -len(MASK_SUFFIX)]].shape)


def _few(keys: list) -> str:
    return ", ".join(repr(k) for k in keys[:_SHOWN]) + _more(keys)


def _more(keys: list) -> str:
    return f" (+{len(keys) - _SHOWN} more)" if len(keys) > _SHOWN else ""

"""Checkpoints: safetensors tensors + JSON metadata (architecture spec, config, pruning plan, metrics). No pickle.

One file format, three layouts (metadata ``layout``):
- ``dense`` (what every stage reads and writes): masked parameters in plain form — ``<layer>.weight`` with its zeros
  and ``<layer>.weight_mask`` — so a loaded model has the same masks and pruned weights stay exactly 0.
- ``sparse``: each masked parameter as its kept values (``<name>:values``, in mask order) plus the cheaper encoding
  of the mask (``<name>:bitmask`` or ``<name>:delta``, see ``sparse.py``); unmasked tensors as they are. The
  metadata ``sparse`` maps each name to its shape, encoding and count. Really smaller on disk: 0.125× the dense file
  at 10× compression with fp32 values.
- ``slim``: a structurally cut model (``robustprune.pruning.slim``) stored plainly; its ``arch`` lists the kept
  layer shapes (``slim.py``) so ``load`` rebuilds it with no reference to the dense model.
Floating-point tensors are stored in ``dtype`` (fp32, or fp16 / bf16 on request) and loaded back as fp32.

Every file read is checked before a model is built (:func:`read`): the checksum of format version 2 (``digest.py``;
version 1 files have none and still load), the type of every metadata field used, every tensor's name, shape and
kind against the architecture built on the meta device (so a crafted shape allocates nothing), finite floats, 0/1
masks and weights that are 0 where masked. Anything else is refused with a one-line UserError.
"""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from robustprune.infra.errors import UserError
from robustprune.infra import digest
from robustprune.export import slim as slim_spec
from robustprune.export import sparse
from robustprune.export.external import check_values  # finite floats, 0/1 masks (as `import` checks)
from robustprune.infra.fileio import atomic_path
from robustprune.pruning import load_plain_state_dict, plain_state_dict
from robustprune.pruning.masks import MASK_SUFFIX

FORMAT = "robustprune-checkpoint"
FORMAT_VERSION = "2"  # 2: sha256 checksum required; 1: no checksum
READABLE_VERSIONS = ("1", "2")
FORMATS = {"safetensors": "dense", "sparse": "sparse", "slim": "slim", "onnx": None}
LAYOUTS = ("dense", "sparse", "slim")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_SEPARATOR = ":"  # between a parameter's name and its part in a sparse file (never inside module names)
_PLAIN_KEYS = ("format", "format_version", digest.KEY)  # metadata entries that are not JSON values
_MAX_HEADER = 100_000_000


def save(model: nn.Module, path: str | os.PathLike, format: str = "safetensors", dtype: str = "fp32",
         **metadata: Any) -> Path:
    """Write ``model`` in ``format`` (safetensors, sparse, slim or onnx) with JSON-able ``metadata`` (config, plan,
    metrics, ...), atomically: a reader never sees a half-written file, and a failure leaves an old file intact."""
    if format not in FORMATS:
        raise UserError(f"unknown export format {format!r} (choose from {', '.join(FORMATS)})")
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r} (choose from {', '.join(DTYPES)})")
    if format == "onnx":
        from robustprune.export.onnx import save_onnx
        return save_onnx(model, path)
    layout = FORMATS[format]
    if layout == "slim":
        from robustprune.pruning import slim
        model = slim(model)
    state = {k: v.detach().cpu().contiguous().clone() for k, v in plain_state_dict(model).items()}
    tensors, parts = _sparse_tensors(state) if layout == "sparse" else (state, {})
    tensors = {k: v.to(DTYPES[dtype]) if v.is_floating_point() and not k.endswith(MASK_SUFFIX) else v
               for k, v in tensors.items()}
    header = {"format": FORMAT, "format_version": FORMAT_VERSION, "layout": json.dumps(layout),
              "dtype": json.dumps(dtype), "arch": json.dumps(slim_spec.spec(model))}
    if parts:
        header["sparse"] = json.dumps(parts)
    header.update({key: json.dumps(value) for key, value in metadata.items()})
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=digest.sign(tensors, header))
    return path


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON metadata of a checkpoint, checked for our format and version and for the types of the fields
    robustprune uses (the checksum covers the tensors too, so :func:`load` verifies it)."""
    path = Path(path)
    return _parse(path, _raw_metadata(path))


def read(path: str | os.PathLike, model: nn.Module | None = None) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The metadata and the checked tensors of a checkpoint of any layout, in plain form (``<param>`` with its zeros
    and ``<param>_mask``), floats as fp32 — without building the model (only its shapes, on the meta device; or
    the shapes of ``model``, a network the caller gives). UserError for a file that fails any check of the module
    docstring."""
    path = Path(path)
    raw = _raw_metadata(path)
    tensors = _read_tensors(path)
    if raw["format_version"] != "1" or digest.KEY in raw:
        digest.check(tensors, raw, f"{path}: the checkpoint")
    meta = _parse(path, raw)
    try:
        skeleton = slim_spec.skeleton(meta["arch"]) if model is None else model
    except UserError as err:
        raise UserError(f"{path}: {err}") from None
    expected = plain_state_dict(skeleton)  # meta tensors: the shapes the file must hold
    params = {name for name, _ in skeleton.named_parameters()}
    if meta["layout"] == "sparse":
        tensors = _dense_tensors(path, tensors, meta.get("sparse") or {}, params, expected)
    tensors = {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}
    _check_state(path, tensors, params, expected)
    return meta, tensors


def load(path: str | os.PathLike, device: str | torch.device = "cpu", *, model: nn.Module | None = None) -> nn.Module:
    """Rebuild the model of a checkpoint of any layout, masks included, in fp32 and eval mode (its metadata:
    :func:`read_metadata`). ``model``: load into a copy of this network instead of rebuilding the file's
    architecture (the user's own class: no code the file names is run)."""
    meta, state = read(path, model)
    model = slim_spec.build(meta["arch"]) if model is None else copy.deepcopy(model)
    try:
        load_plain_state_dict(model, state)
    except (KeyError, RuntimeError, ValueError) as err:  # checked in read(); kept so a surprise stays one line
        raise UserError(f"{path}: checkpoint does not match its architecture ({_first_line(err)})") from None
    return model.to(device).eval()


# ------------------------------------------------------------------------------------------------- the sparse layout

def _sparse_tensors(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    tensors, parts = {}, {}
    for name, value in state.items():
        mask = state.get(name + MASK_SUFFIX)
        if name.endswith(MASK_SUFFIX) and name[: -len(MASK_SUFFIX)] in state:
            continue
        if mask is None:
            tensors[name] = value
            continue
        keep = mask.flatten() != 0
        encoding, data = sparse.encode(keep.numpy())
        tensors[f"{name}{_SEPARATOR}values"] = value.flatten()[keep].contiguous()
        tensors[f"{name}{_SEPARATOR}{encoding}"] = torch.from_numpy(data)
        parts[name] = {"shape": list(value.shape), "encoding": encoding, "count": int(keep.sum())}
    return tensors, parts


def _dense_tensors(path: Path, tensors: dict[str, torch.Tensor], parts: dict[str, dict], params: set[str],
                   expected: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`_sparse_tensors`: plain weights with their zeros and float 0/1 masks. Each part's shape is
    checked against the architecture before its weight is allocated."""
    state = {k: v for k, v in tensors.items() if _SEPARATOR not in k}
    try:
        for name, part in parts.items():
            shape, encoding, count = part["shape"], part["encoding"], part["count"]
            if name not in params or shape != list(expected[name].shape):
                raise ValueError(f"sparse part {name!r} {shape} is not a parameter of the architecture")
            if name in state or name + MASK_SUFFIX in state:
                raise ValueError(f"{name!r} is stored both plainly and as a sparse part")
            values = tensors[f"{name}{_SEPARATOR}values"]
            data = tensors[f"{name}{_SEPARATOR}{encoding}"]
            if data.dtype != torch.uint8 or data.dim() != 1:
                raise ValueError(f"{name}: mask positions must be bytes, got {data.dtype} {tuple(data.shape)}")
            if values.shape != (count,) or not values.is_floating_point():
                raise ValueError(f"{name} stores {values.dtype} {tuple(values.shape)} values for {count} kept weights")
            numel = int(np.prod(shape))
            keep = torch.from_numpy(sparse.decode(encoding, data.numpy(), numel, count))
            weight = torch.zeros(numel, dtype=values.dtype)
            weight[keep] = values
            state[name] = weight.view(shape)
            state[name + MASK_SUFFIX] = keep.to(torch.float32).view(shape)
        described = {f"{name}{_SEPARATOR}{part}" for name in parts for part in ("values", parts[name]["encoding"])}
        leftover = sorted(k for k in tensors if _SEPARATOR in k and k not in described)
        if leftover:
            raise ValueError(f"tensor {leftover[0]!r} is not described by the sparse metadata")
    except (KeyError, ValueError) as err:
        raise UserError(f"{path}: checkpoint does not match its architecture ({_first_line(err)})") from None
    return state


# ---------------------------------------------------------------------------------------------- reading and checks

def _raw_metadata(path: Path) -> dict[str, str]:
    """The header's metadata strings, checked for our format and a version this robustprune reads."""
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        with open(path, "rb") as handle:
            size = int.from_bytes(handle.read(8), "little")
            if size <= 0 or size > min(os.path.getsize(path) - 8, _MAX_HEADER):
                raise ValueError("bad header size")
            header = json.loads(handle.read(size))
        raw = header.get("__metadata__") or {}
        if not isinstance(raw, dict) or not all(isinstance(v, str) for v in raw.values()):
            raise ValueError("metadata values must be strings")
        if raw.get("format") != FORMAT:
            raise ValueError("not a robustprune checkpoint")
    except (ValueError, UnicodeDecodeError, AttributeError, TypeError, RecursionError) as err:
        raise UserError(f"{path}: not a valid robustprune safetensors checkpoint ({_first_line(err)})") from None
    if raw.get("format_version") not in READABLE_VERSIONS:
        raise UserError(f"{path}: unsupported checkpoint format version {raw.get('format_version')!r:.40} "
                        f"(this robustprune reads versions {', '.join(READABLE_VERSIONS)})")
    return raw


def _parse(path: Path, raw: dict[str, str]) -> dict[str, Any]:
    """The JSON values of the metadata, with the types of every field robustprune uses checked."""
    try:
        meta = {k: json.loads(v) for k, v in raw.items() if k not in _PLAIN_KEYS}
    except (ValueError, RecursionError) as err:
        raise UserError(f"{path}: not a valid robustprune safetensors checkpoint ({_first_line(err)})") from None
    meta.setdefault("layout", "dense")
    meta.setdefault("dtype", "fp32")
    if meta["layout"] not in LAYOUTS or not isinstance(meta["dtype"], str) or meta["dtype"] not in DTYPES:
        raise UserError(f"{path}: unknown layout {meta['layout']!r:.40} or dtype {meta['dtype']!r:.40} "
                        f"(this robustprune reads {', '.join(LAYOUTS)}; {', '.join(DTYPES)})")
    try:
        if "arch" not in meta:
            raise UserError("no architecture in the metadata")
        slim_spec.check(meta["arch"])
        _check_parts(meta.get("sparse", {}))
        for key, kind in (("stage", str), ("metrics", dict)):  # the config is checked where it is used
            if meta.get(key) is not None and not isinstance(meta[key], kind):
                raise UserError(f"metadata {key} must be a {kind.__name__}, got {type(meta[key]).__name__}")
    except UserError as err:
        raise UserError(f"{path}: {err}") from None
    return meta


def _check_parts(parts: Any) -> None:
    """Types of the sparse metadata: ``{name: {shape: [n, ...], encoding, count}}`` (values checked in
    :func:`_dense_tensors` against the architecture)."""
    def natural(n: Any) -> bool:
        return isinstance(n, int) and not isinstance(n, bool) and n >= 0

    if not isinstance(parts, dict):
        raise UserError(f"sparse metadata must be a mapping, got {type(parts).__name__}")
    for name, part in parts.items():
        if not (isinstance(part, dict) and isinstance(part.get("shape"), list)
                and all(natural(n) for n in part["shape"]) and part.get("encoding") in sparse.ENCODINGS
                and natural(part.get("count"))):
            raise UserError(f"sparse metadata of {name!r:.80} must hold a shape (non-negative integers), an encoding "
                            f"({', '.join(sparse.ENCODINGS)}) and a count (a non-negative integer)")


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, ValueError, RuntimeError, TypeError, OverflowError) as err:
        raise UserError(f"{path}: unreadable tensors ({_first_line(err)})") from None


def _check_state(path: Path, state: dict[str, torch.Tensor], params: set[str],
                 expected: dict[str, torch.Tensor]) -> None:
    """The plain state holds exactly the architecture's tensors (plus masks of its parameters) in their shapes and
    kinds, and numbers a model can hold (see :func:`_check_numbers`)."""
    masks = {k for k in state if k.endswith(MASK_SUFFIX) and k[: -len(MASK_SUFFIX)] in params}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected) - masks)
    if missing or unexpected:
        found = ([f"missing {_few(missing)}"] if missing else []) + ([f"unexpected {_few(unexpected)}"]
                                                                     if unexpected else [])
        raise UserError(f"{path}: checkpoint does not match its architecture ({'; '.join(found)})")
    model_of = {k: expected[k.removesuffix(MASK_SUFFIX) if k in masks else k] for k in state}
    wrong = [k for k, v in state.items() if tuple(v.shape) != tuple(model_of[k].shape)
             or v.is_floating_point() != model_of[k].is_floating_point() or v.is_complex()]
    if wrong:
        shown = ", ".join(f"{k!r} {state[k].dtype} {tuple(state[k].shape)} (architecture: {model_of[k].dtype} "
                          f"{tuple(model_of[k].shape)})" for k in wrong[:3])
        raise UserError(f"{path}: checkpoint does not match its architecture ({shown}{_more(wrong)})")
    check_values(state, path)
    _check_numbers(path, state, masks)


def _check_numbers(path: Path, state: dict[str, torch.Tensor], masks: set[str]) -> None:
    """Beyond finite floats and 0/1 masks: a pruned weight is stored as exactly 0 (our invariant), and the
    normalisation's std / BatchNorm's running variances (divided by, square-rooted) are positive / non-negative."""
    unmasked = [k.removesuffix(MASK_SUFFIX) for k in sorted(masks)
                if bool((state[k.removesuffix(MASK_SUFFIX)][state[k] == 0] != 0).any())]
    if unmasked:
        raise UserError(f"{path}: pruned weights must be stored as 0; not so in {_few(unmasked)}")
    negative = [k for k, v in state.items() if (k.endswith(".running_var") and bool((v < 0).any()))
                or (k.endswith(".std") and bool((v <= 0).any()))]
    if negative:
        raise UserError(f"{path}: variances must be non-negative and std positive; not so in {_few(negative)}")


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:300] if text else type(err).__name__


def _few(keys: list[str]) -> str:
    return ", ".join(repr(k[:100]) for k in keys[:3]) + _more(keys)


def _more(keys: list) -> str:
    return f" (+{len(keys) - 3} more)" if len(keys) > 3 else ""

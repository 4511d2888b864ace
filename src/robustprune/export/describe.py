"""What a robustprune file holds, without building the model: architecture, layout, per-layer density of the
prunable weights (Conv / Linear), size on disk and the metrics stored with it. A checkpoint first passes the checks
of loading (``checkpoint.read``: checksum, metadata types, tensor shapes against the architecture, values). ONNX
files (optional extra) get their size, opset, input and the density of their weight initializers."""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from robustprune.infra.errors import UserError
from robustprune.export.checkpoint import read
from robustprune.pruning.masks import MASK_SUFFIX

_METRICS = ("benign_acc", "pgd_acc", "autoattack_acc", "verified_acc", "compression")


def describe(path: str | os.PathLike) -> dict[str, Any]:
    """What ``path`` holds; a checkpoint is read with every check of :func:`checkpoint.read` (UserError)."""
    path = Path(path)
    if path.suffix == ".onnx":
        return _describe_onnx(path)
    meta, state = read(path)
    parts = (meta.get("sparse") or {}) if meta["layout"] == "sparse" else {}
    layers = []
    for name in sorted(state):
        if not name.endswith(".weight") or state[name].dim() not in (2, 4):  # Conv2d / Linear; norms are 1-D
            continue
        mask = state.get(name + MASK_SUFFIX)
        nonzero = int((mask if mask is not None else state[name]).count_nonzero())
        layers.append(_layer(name, list(state[name].shape), nonzero, parts[name]["encoding"] if name in parts
                             else "dense"))
    total, kept = sum(layer["numel"] for layer in layers), sum(layer["nonzero"] for layer in layers)
    metrics = meta.get("metrics") or {}
    return {"file": str(path), "size_bytes": path.stat().st_size, "layout": meta["layout"], "dtype": meta["dtype"],
            "arch": meta["arch"], "stage": meta.get("stage"), "layers": layers, "weights": total,
            "nonzero": kept, "compression": total / kept if kept else None,
            "metrics": {k: metrics.get(k) for k in _METRICS if k in metrics}}


def _layer(name: str, shape: list[int], nonzero: int, stored: str) -> dict[str, Any]:
    numel = math.prod(shape)
    return {"name": name, "shape": shape, "numel": numel, "nonzero": nonzero,
            "density": nonzero / numel if numel else 0.0, "stored": stored}


def _describe_onnx(path: Path) -> dict[str, Any]:
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:
        raise UserError("inspecting ONNX files needs the optional extra: pip install 'robustprune[onnx]'") from None
    try:
        model = onnx.load(str(path))
    except Exception as err:  # the protobuf parser raises its own DecodeError
        raise UserError(f"{path}: not a readable ONNX file ({str(err).splitlines()[0] if str(err) else err})") \
            from None
    layers = []
    for init in model.graph.initializer:
        if len(init.dims) in (2, 4):
            array = numpy_helper.to_array(init)
            layers.append(_layer(init.name, list(init.dims), int((array != 0).sum()), "dense"))
    total, kept = sum(layer["numel"] for layer in layers), sum(layer["nonzero"] for layer in layers)
    inputs = [[d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input]
    return {"file": str(path), "size_bytes": path.stat().st_size, "layout": "onnx", "dtype": None,
            "arch": {"opset": [o.version for o in model.opset_import], "inputs": inputs}, "stage": None,
            "layers": layers, "weights": total, "nonzero": kept, "compression": total / kept if kept else None,
            "metrics": {}}


def format_description(d: dict[str, Any]) -> str:
    """The description as the ``inspect`` command prints it."""
    arch = d["arch"] or {}
    lines = [f"file: {d['file']} ({d['size_bytes'] / 1e6:.3f} MB, {d['layout']} layout"
             + (f", {d['dtype']} values)" if d["dtype"] else ")")]
    if "name" in arch or "factory" in arch:
        name = arch.get("name") or f"{arch['factory']} (factory)"
        lines.append(f"architecture: {name}, input {tuple(arch['input_shape'])}, {arch['num_classes']} classes"
                     + (" (slim: channels cut)" if arch.get("slim") else ""))
    elif arch:
        lines.append(f"ONNX opset {arch['opset']}, inputs {arch['inputs']}")
    if d["stage"]:
        lines.append(f"stage: {d['stage']}")
    width = max([len("layer")] + [len(layer["name"]) for layer in d["layers"]])
    lines.append(f"{'layer':<{width}}  {'shape':<16} {'density':>8}  stored as")
    for layer in d["layers"]:
        shape = "×".join(str(s) for s in layer["shape"])
        lines.append(f"{layer['name']:<{width}}  {shape:<16} {layer['density']:>8.1%}  {layer['stored']}")
    ratio = f"compression {d['compression']:.2f}×" if d["compression"] else "no weight kept"
    lines.append(f"prunable weights: {d['nonzero']:,} of {d['weights']:,} nonzero ({ratio})")
    if d["metrics"]:
        lines.append("metrics: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, (int, float)) else f"{k} —"
                                             for k, v in d["metrics"].items()))
    return "\n".join(lines)

"""What a robustprune file holds, without building the model: architecture, layout, per-layer density of the
prunable weights (Conv / Linear), size on disk and the metrics stored with it. ONNX files (optional extra) get their
size, opset, input and the density of their weight initializers."""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open

from robustprune.errors import UserError
from robustprune.export.checkpoint import read_metadata
from robustprune.pruning.masks import MASK_SUFFIX

_METRICS = ("benign_acc", "pgd_acc", "autoattack_acc", "verified_acc", "compression")


def describe(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if path.suffix == ".onnx":
        return _describe_onnx(path)
    meta = read_metadata(path)
    layers = []
    try:
        with safe_open(str(path), "pt") as handle:
            names = set(handle.keys())
            for name, part in (meta.get("sparse") or {}).items():
                layers.append(_layer(name, part["shape"], int(part["count"]), part["encoding"]))
            for name in sorted(names):
                if not name.endswith(".weight") or name in (meta.get("sparse") or {}):
                    continue
                shape = list(handle.get_slice(name).get_shape())
                if len(shape) not in (2, 4):  # Conv2d / Linear weights; norms are 1-D
                    continue
                mask = name + MASK_SUFFIX
                counted = handle.get_tensor(mask if mask in names else name)
                layers.append(_layer(name, shape, int(counted.count_nonzero()), "dense"))
    except (OSError, ValueError, RuntimeError, SafetensorError) as err:
        raise UserError(f"{path}: unreadable tensors ({str(err).splitlines()[0]})") from None
    layers.sort(key=lambda layer: layer["name"])
    total, kept = sum(layer["numel"] for layer in layers), sum(layer["nonzero"] for layer in layers)
    metrics = meta.get("metrics") or {}
    return {"file": str(path), "size_bytes": path.stat().st_size, "layout": meta["layout"], "dtype": meta["dtype"],
            "arch": meta.get("arch"), "stage": meta.get("stage"), "layers": layers, "weights": total,
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
    if "name" in arch:
        lines.append(f"architecture: {arch['name']}, input {tuple(arch['input_shape'])}, {arch['num_classes']} "
                     f"classes" + (" (slim: channels cut)" if arch.get("slim") else ""))
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

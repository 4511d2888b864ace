"""Artefacts of a model: checkpoints (safetensors + JSON metadata, no pickle) in three layouts, and ONNX.

- ``checkpoint.py``: ``save(model, path, format=safetensors|sparse|slim|onnx, dtype=fp32|fp16|bf16)``, ``load``
  (every layout but ONNX) and ``read_metadata``;
- ``sparse.py``: the per-tensor encodings of which weights a pruned tensor keeps (bitmask or varint gaps);
- ``slim.py``: the architecture spec of a structurally cut model, and its rebuild;
- ``onnx.py``: ONNX export (optional extra ``robustprune[onnx]``);
- ``describe.py``: what a file holds, for ``robustprune inspect`` (architecture, layout, per-layer density, size,
  stored metrics).
"""
from __future__ import annotations

from robustprune.export.checkpoint import DTYPES, FORMAT, FORMAT_VERSION, FORMATS, load, read_metadata, save

__all__ = ["DTYPES", "FORMAT", "FORMATS", "FORMAT_VERSION", "load", "read_metadata", "save"]

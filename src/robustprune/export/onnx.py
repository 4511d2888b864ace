"""ONNX export of dense, masked (pruned) and slim models, for inference outside PyTorch (onnxruntime, TensorRT, ...).

The exporter is torch's TorchScript-based one (``dynamo=False``). With torch 2.13 both exporters reproduce the logits
of every registered model, but the ``torch.export`` one is 3–100× slower here (2–7 s a model), prints progress and
torchvision warnings, and by default puts the weights in a separate ``.data`` file; the TorchScript one needs only
``onnx`` (not ``onnxscript``), and its chatter (a deprecation warning, an IR dump on failure) is silenced below.

Masks are baked into a copy (the file holds plain weights with exact zeros); the caller's model is not touched. The
graph is exported into memory and then written atomically: a failed export or write never leaves a partial or
temporary file, and with no path the exporter cannot put external-data files beside it (one self-contained file;
protobuf's 2 GiB limit is far above these models).
"""
from __future__ import annotations

import contextlib
import inspect
import io
import os
import sys
import warnings
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from robustprune.infra.errors import UserError
from robustprune.infra.fileio import atomic_path
from robustprune.pruning.groups import baked_copy

INPUT_NAME, OUTPUT_NAME = "input", "logits"

__all__ = ["INPUT_NAME", "OUTPUT_NAME", "save_onnx"]


def save_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    input_shape: tuple[int, ...] | None = None,
    opset: int | None = None,
) -> Path:
    """Write ``model`` as ONNX to ``path`` (input ``"input"`` of shape (batch, *input_shape), output ``"logits"``).

    The batch dimension is dynamic. ``input_shape`` (C, H, W) defaults to ``model.arch["input_shape"]``; ``opset``
    defaults to the exporter's. The graph is that of eval mode (BatchNorm uses its running statistics) whatever the
    mode of ``model``. Returns ``Path(path)``.
    """
    try:
        import onnx  # noqa: F401  (the TorchScript exporter serialises through it)
    except ImportError:
        raise UserError("ONNX export needs the optional extra: pip install 'robustprune[onnx]'") from None
    shape = input_shape if input_shape is not None else getattr(model, "arch", {}).get("input_shape")
    if shape is None:
        raise UserError("ONNX export needs the input shape: pass input_shape=(C, H, W); the model has no arch")
    name = getattr(model, "arch", {}).get("name", type(model).__name__)
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            tmp.write_bytes(_export(model, tuple(int(s) for s in shape), opset))
    except UserError:
        raise
    except OSError as error:
        raise UserError(f"cannot write ONNX file {path}: {error.strerror or error}") from error
    except Exception as error:
        first = next(iter(str(error).strip().splitlines()), "") or type(error).__name__
        raise UserError(f"ONNX export of model {name!r} failed: {first}") from error
    return path


def _export(model: nn.Module, shape: tuple[int, ...], opset: int | None) -> bytes:
    """The serialised ONNX model of an eval-mode CPU copy of ``model`` with its masks baked in."""
    baked = baked_copy(model).cpu().eval()
    example = torch.zeros(2, *shape)  # only traced: values and batch size do not matter (the axis is dynamic)
    options = {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad(), _silent_stdout():
        warnings.simplefilter("ignore", DeprecationWarning)  # "legacy exporter": our choice, nothing to act on
        torch.onnx.export(
            baked, (example,), buffer, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], opset_version=opset,
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}, **options,
        )
    return buffer.getvalue()


@contextlib.contextmanager
def _silent_stdout() -> Iterator[None]:
    """Point file descriptor 1 at /dev/null: on a failed op the exporter dumps its whole IR graph to C++'s stdout.

    (Its ONNX log cannot be switched off: ``setup_onnx_logging`` tests a function, not its result, for truth.) The
    exporter writes nothing else there; warnings go to stderr and stay visible.
    """
    sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:  # no file descriptor 1 (a detached process): nothing to silence
        saved = -1
    try:
        if saved >= 0:
            with open(os.devnull, "wb") as sink:
                os.dup2(sink.fileno(), 1)
        yield
    finally:
        if saved >= 0:
            os.dup2(saved, 1)
            os.close(saved)

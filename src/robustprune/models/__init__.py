"""Models: a registry of architectures, each wrapped as ``Sequential(Normalize, body)`` so inputs stay in [0, 1]."""
from __future__ import annotations

import math
from typing import Any, Sequence

from torch import nn

from robustprune.infra.errors import UserError
from robustprune.models import factory
from robustprune.models.base import MODELS, Normalize
from robustprune.models.factory import is_factory, trust_factory
from robustprune.models import mlp, cnn, vgg, resnet, wrn  # noqa: F401  (registration)

MAX_INPUT_SIDE = 65_536  # per input dimension (channels, height, width): far beyond any image benchmark
MAX_CLASSES = 100_000  # a label or class count beyond this is a corrupted file, not a dataset


def create_model(
    name: str,
    input_shape: Sequence[int],
    num_classes: int,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    kwargs: dict[str, Any] | None = None,
) -> nn.Module:
    """Build a registered architecture for inputs of ``input_shape`` (C, H, W) with normalisation inside, or the
    user's network when ``name`` is a factory path ``package.module:function`` (called with ``kwargs``; it
    normalises inside itself, so ``mean``/``std`` are not used).

    ``mean``/``std`` are per-channel statistics of the training inputs (defaults: 0 and 1). The returned module
    carries ``model.arch``: a JSON-able spec from which :func:`model_from_spec` rebuilds the same architecture.
    """
    if is_factory(name):
        return factory.build(name, dict(kwargs or {}), input_shape, num_classes)
    shape = tuple(int(s) for s in input_shape)
    channels = shape[0]
    mean = list(mean) if mean is not None else [0.0] * channels
    std = list(std) if std is not None else [1.0] * channels
    body = MODELS.get(name)(shape, int(num_classes))
    model = nn.Sequential(Normalize(mean, std), body)
    model.arch = {"name": name, "input_shape": list(shape), "num_classes": int(num_classes), "mean": mean, "std": std}
    return model


def check_spec(spec: Any) -> None:
    """Refuse (UserError) a ``model.arch`` spec read from a file whose fields have the wrong types or sizes."""
    if not isinstance(spec, dict):
        raise UserError(f"architecture must be a mapping, got {type(spec).__name__}")
    if "factory" in spec:
        return _check_factory_spec(spec)
    name = spec.get("name")
    if not isinstance(name, str):
        raise UserError(f"architecture name must be a string, got {_short(name)}")
    if name not in MODELS:
        raise UserError(MODELS.unknown_message(name[:80]))
    shape = spec.get("input_shape")
    if not (isinstance(shape, list) and len(shape) == 3 and all(_int_in(s, 1, MAX_INPUT_SIDE) for s in shape)):
        raise UserError(f"architecture input_shape must be 3 integers (C, H, W) in 1..{MAX_INPUT_SIDE}, got "
                        f"{_short(shape)}")
    if not _int_in(spec.get("num_classes"), 1, MAX_CLASSES):
        raise UserError(f"architecture num_classes must be an integer in 1..{MAX_CLASSES}, got "
                        f"{_short(spec.get('num_classes'))}")
    for key in ("mean", "std"):
        values = spec.get(key)
        if not (isinstance(values, list) and len(values) == shape[0] and all(_finite(v) for v in values)):
            raise UserError(f"architecture {key} must be {shape[0]} finite numbers (one per channel), got "
                            f"{_short(values)}")
    if not all(v > 0 for v in spec["std"]):
        raise UserError(f"architecture std must be positive, got {_short(spec['std'])}")


def _check_factory_spec(spec: dict[str, Any]) -> None:
    name = spec["factory"]
    if not isinstance(name, str):
        raise UserError(f"architecture factory must be a string, got {_short(name)}")
    factory.check_factory_name(name)
    if not isinstance(spec.get("kwargs"), dict):
        raise UserError(f"architecture kwargs must be a mapping, got {_short(spec.get('kwargs'))}")
    shape = spec.get("input_shape")
    if not (isinstance(shape, list) and 1 <= len(shape) <= 4 and all(_int_in(s, 1, MAX_INPUT_SIDE) for s in shape)):
        raise UserError(f"architecture input_shape must be 1 to 4 integers in 1..{MAX_INPUT_SIDE}, got {_short(shape)}")
    if not _int_in(spec.get("num_classes"), 1, MAX_CLASSES):
        raise UserError(f"architecture num_classes must be an integer in 1..{MAX_CLASSES}, got "
                        f"{_short(spec.get('num_classes'))}")


def model_from_spec(spec: dict[str, Any]) -> nn.Module:
    """Rebuild the architecture described by ``model.arch`` (weights are loaded separately); UserError if the spec
    is malformed (see :func:`check_spec`), or names a factory the user has not trusted (``factory.py``)."""
    check_spec(spec)
    if "factory" in spec:
        name = spec["factory"]
        if not factory.trusted(name):
            raise UserError(f"the model is built by calling {name}, code the file names: run it only if you trust "
                            f"it (command line: --trust-factory {name}; Python: "
                            f"robustprune.models.trust_factory({name!r}))")
        return factory.build(name, spec["kwargs"], spec["input_shape"], spec["num_classes"], check_output=False)
    return create_model(spec["name"], spec["input_shape"], spec["num_classes"], spec["mean"], spec["std"])


def _int_in(value: Any, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _short(value: Any) -> str:
    """A value for a message, cut short (a crafted file may hold a huge list)."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


__all__ = ["MAX_CLASSES", "MAX_INPUT_SIDE", "MODELS", "Normalize", "check_spec", "create_model", "is_factory",
           "model_from_spec", "trust_factory"]

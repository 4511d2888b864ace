"""Models: a registry of architectures, each wrapped as ``Sequential(Normalize, body)`` so inputs stay in [0, 1]."""
from __future__ import annotations

from typing import Any, Sequence

from torch import nn

from robustprune.models.base import MODELS, Normalize
from robustprune.models import mlp, cnn, vgg, resnet, wrn  # noqa: F401  (registration)


def create_model(
    name: str,
    input_shape: Sequence[int],
    num_classes: int,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> nn.Sequential:
    """Build a registered architecture for inputs of ``input_shape`` (C, H, W) with normalisation inside.

    ``mean``/``std`` are per-channel statistics of the training inputs (defaults: 0 and 1). The returned module
    carries ``model.arch``: a JSON-able spec from which :func:`model_from_spec` rebuilds the same architecture.
    """
    shape = tuple(int(s) for s in input_shape)
    channels = shape[0]
    mean = list(mean) if mean is not None else [0.0] * channels
    std = list(std) if std is not None else [1.0] * channels
    body = MODELS.get(name)(shape, int(num_classes))
    model = nn.Sequential(Normalize(mean, std), body)
    model.arch = {"name": name, "input_shape": list(shape), "num_classes": int(num_classes), "mean": mean, "std": std}
    return model


def model_from_spec(spec: dict[str, Any]) -> nn.Sequential:
    """Rebuild the architecture described by ``model.arch`` (weights are loaded separately)."""
    return create_model(spec["name"], spec["input_shape"], spec["num_classes"], spec["mean"], spec["std"])


__all__ = ["MODELS", "Normalize", "create_model", "model_from_spec"]

"""A user's own network: ``model: {name: "my_package.nets:build", kwargs: {...}}`` names an importable callable
that returns an ``nn.Module`` (the user's code, run as such). The module takes inputs in [0, 1] — a network that
normalises its inputs does so inside itself, like robustprune's own models.

A checkpoint records the factory and its arguments so that it can be rebuilt. Loading such a file would run code the
*file* names, so a factory runs only when the user trusts it: named by the user's own config (``run``, ``sweep``,
``train``), passed on the command line (``--trust-factory NAME``), or trusted in Python (:func:`trust_factory`).
"""
from __future__ import annotations

import importlib
import re
from typing import Any, Sequence

import torch
from torch import nn

from robustprune.infra.errors import UserError, one_line

#: ``package.module:attribute`` — dotted identifiers, a colon, a (dotted) attribute.
FACTORY_PATTERN = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$")

_trusted: set[str] = set()


def is_factory(name: str) -> bool:
    """Whether a model name is a factory path (registered names have no colon)."""
    return ":" in name


def check_factory_name(name: str) -> None:
    if not FACTORY_PATTERN.match(name):
        raise UserError(f"model factory {name!r:.100} must look like package.module:function")


def trust_factory(name: str) -> None:
    """Allow checkpoints that name the factory ``name`` to call it when they are loaded."""
    check_factory_name(name)
    _trusted.add(name)


def trusted(name: str) -> bool:
    return name in _trusted


def resolve(name: str) -> Any:
    """The callable ``name`` points at (UserError naming what did not import)."""
    check_factory_name(name)
    module_name, _, attribute = name.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
    except Exception as err:  # ImportError, or any error the module's own code raises on import
        raise UserError(f"model factory {name}: cannot import {module_name} ({type(err).__name__}: "
                        f"{one_line(str(err))})") from None
    for part in attribute.split("."):
        target = getattr(target, part, None)
        if target is None:
            raise UserError(f"model factory {name}: {module_name} has no attribute {attribute}")
    if not callable(target):
        raise UserError(f"model factory {name} is not callable")
    return target


def build(name: str, kwargs: dict[str, Any], input_shape: Sequence[int], num_classes: int,
          check_output: bool = True) -> nn.Module:
    """Call the factory with ``kwargs``; the module gets ``arch`` (factory, kwargs, input shape, classes) so a
    checkpoint can rebuild it. ``check_output`` runs one zero input through it: the output must be (1, classes)."""
    try:
        model = resolve(name)(**kwargs)
    except UserError:
        raise
    except Exception as err:
        raise UserError(f"model factory {name} raised {type(err).__name__}: {one_line(str(err))}") from None
    if not isinstance(model, nn.Module):
        raise UserError(f"model factory {name} returned a {type(model).__name__}, not a torch.nn.Module")
    shape = [int(s) for s in input_shape]
    if check_output:
        _check_output(model, name, shape, int(num_classes))
    model.arch = {"factory": name, "kwargs": kwargs, "input_shape": shape, "num_classes": int(num_classes)}
    return model


def _check_output(model: nn.Module, name: str, shape: list[int], num_classes: int) -> None:
    was_training = model.training
    try:
        with torch.no_grad():
            out = model.eval()(torch.zeros(1, *shape))
    except Exception as err:
        raise UserError(f"model of {name} fails on an input of shape {tuple([1, *shape])} ({type(err).__name__}: "
                        f"{one_line(str(err))})") from None
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (1, num_classes):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise UserError(f"model of {name} returns {got} for one input; the data has {num_classes} classes, so "
                        f"(1, {num_classes}) is needed")

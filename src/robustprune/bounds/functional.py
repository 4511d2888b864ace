"""The functions and tensor methods a traced ``forward`` may call between its layers, and their bound classes.

Each supported ``call_function`` / ``call_method`` of the fx graph maps to one bound class built from the call's
arguments, to a value only used for shapes (``x.size(0)``, ``x.shape``), or to its input (identities):

- ReLU: ``F.relu``, ``torch.relu``, ``x.relu()`` (and their in-place forms) → ``ReLUBound``;
- ``torch.flatten(x, 1)``, ``x.flatten(1)`` → ``FlattenBound``; ``x.view(...)``, ``x.reshape(...)``,
  ``torch.reshape(x, ...)`` to a shape that keeps the batch first (sizes: numbers, ``x.size(0)``, ``x.shape[0]``,
  the reshaped tensor's own sizes) → ``ReshapeBound``;
- ``a + b``, ``torch.add(a, b)``, ``a.add(b)`` of two traced tensors → ``AddBound``; ``torch.cat`` along a dimension
  after the batch → ``CatBound``;
- ``F.linear`` and ``F.conv2d`` (``torch.conv2d``) whose weight and bias are tensors of the model → ``LinearBound``,
  ``Conv2dBound`` reading them at call time (:class:`FunctionalLayer`);
- ``F.max_pool2d``, ``F.avg_pool2d``, ``F.adaptive_avg_pool2d`` → ``MaxPoolBound``, ``AvgPoolBound``;
- ``F.dropout`` (any form), ``x.contiguous()``: the identity (dropout as at test time, as ``nn.Dropout``).

Anything else raises :class:`Unsupported` with the reason; the graph builder names the node and its source line.
"""
from __future__ import annotations

import operator
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from robustprune.bounds.maxpool import MaxPoolBound
from robustprune.bounds.ops import AvgPoolBound, BoundOp, Conv2dBound, LinearBound, pair
from robustprune.bounds.relu import ReLUBound
from robustprune.bounds.shape import AddBound, CatBound, FlattenBound, InputSize, ReshapeBound

SUPPORTED = ("relu, flatten(x, 1), view/reshape keeping the batch first, a + b of two traced tensors, torch.cat "
             "after the batch dimension, F.linear / F.conv2d on the model's tensors, F.max_pool2d, F.avg_pool2d, "
             "F.adaptive_avg_pool2d, dropout, x.size() / x.shape for view sizes")


class Unsupported(Exception):
    """A traced call the bounds cannot handle; the message says why."""


@dataclass(frozen=True)
class Traced:
    """A traced tensor: the output of graph node ``index``."""

    index: int


@dataclass(frozen=True)
class Attr:
    """A tensor of the model read by ``forward`` (``self.weight``): attribute ``name`` of module ``owner``."""

    owner: nn.Module
    name: str


@dataclass(frozen=True)
class Size:
    """``x.size(dim)`` / ``x.shape[dim]`` of traced tensor ``source`` (``dim`` None: the whole ``torch.Size``)."""

    source: int
    dim: int | None


#: What a call becomes: a new node (its bound op and input indices) or a value (an alias, a size).
Converted = tuple[BoundOp, list[int]] | Traced | Size


class FunctionalLayer:
    """The layer a functional call stands for, as its bound class reads it: the call's settings as attributes and
    its tensors (``weight``, ``bias``) read from their modules at every access — the current (masked, trained)
    values, never a copy. Modules are held by weak reference: the graph cache must not keep a model alive."""

    def __init__(self, tensors: dict[str, Attr | None], **settings: Any) -> None:
        self._tensors = {name: None if attr is None else (weakref.ref(attr.owner), attr.name)
                         for name, attr in tensors.items()}
        self.__dict__.update(settings)

    def __getattr__(self, name: str) -> Any:
        tensors = self.__dict__.get("_tensors", {})
        if name not in tensors:
            raise AttributeError(name)
        ref = tensors[name]
        return None if ref is None else getattr(ref[0](), ref[1])


def convert_call(kind: str, target: Any, args: tuple, kwargs: dict) -> Converted:
    """The bound op (and input indices), alias or size of one ``call_function`` / ``call_method`` node."""
    handler = (METHODS if kind == "call_method" else FUNCTIONS).get(target)
    if handler is None:
        raise Unsupported(f"no bound class for it (supported: {SUPPORTED})")
    try:
        return handler(args, kwargs)
    except ValueError as err:  # a bound class refusing the call's settings
        raise Unsupported(str(err)) from None


def bind(args: tuple, kwargs: dict, names: Sequence[str], **defaults: Any) -> dict[str, Any]:
    """The call's arguments by parameter name (``names`` in positional order)."""
    if len(args) > len(names):
        raise Unsupported(f"it is called with {len(args)} positional arguments, at most {len(names)} expected")
    unknown = sorted(set(kwargs) - set(names))
    if unknown:
        raise Unsupported(f"it is called with unsupported keyword arguments {unknown}")
    bound = {**defaults, **dict(zip(names, args)), **kwargs}
    missing = [name for name in names if name not in bound]
    if missing:
        raise Unsupported(f"it is called without {missing}")
    return bound


def tensor(value: Any, what: str = "input") -> int:
    """The node index of a traced tensor argument."""
    if not isinstance(value, Traced):
        raise Unsupported(f"its {what} is not a tensor computed from the model's input (a constant or a model "
                          f"tensor used as data is not supported)")
    return value.index


def constant(value: Any, what: str) -> Any:
    """A setting that must be known when tracing (not computed from the input)."""
    if isinstance(value, (Traced, Size, Attr)):
        raise Unsupported(f"its {what} is computed from traced values; it must be a constant")
    return value


def _relu(args, kwargs):
    b = bind(args, kwargs, ("input", "inplace"), inplace=False)
    return ReLUBound(), [tensor(b["input"])]


def _flatten(args, kwargs):
    b = bind(args, kwargs, ("input", "start_dim", "end_dim"), start_dim=0, end_dim=-1)
    return FlattenBound(constant(b["start_dim"], "start_dim"), constant(b["end_dim"], "end_dim")), [tensor(b["input"])]


def _reshape_to(source: int, sizes: Any) -> Converted:
    entries = []
    for size in sizes:
        if isinstance(size, Size) and size.dim is not None and (size.dim == 0 or size.source == source):
            entries.append(InputSize(size.dim))
        elif isinstance(size, int) and not isinstance(size, bool):
            entries.append(size)
        else:
            raise Unsupported("its sizes must be numbers, x.size(0) / x.shape[0] (the batch) or sizes of the "
                              "reshaped tensor itself")
    return ReshapeBound(entries), [source]


def _view_method(args, kwargs):
    if kwargs or len(args) < 2:
        raise Unsupported("it must be called as x.view(*sizes) or x.view(sizes)")
    sizes = args[1] if len(args) == 2 and isinstance(args[1], (tuple, list)) else args[1:]
    return _reshape_to(tensor(args[0]), sizes)


def _reshape_function(args, kwargs):
    b = bind(args, kwargs, ("input", "shape"))
    if not isinstance(b["shape"], (tuple, list)):
        raise Unsupported("its shape must be a tuple or list")
    return _reshape_to(tensor(b["input"]), b["shape"])


def _shape(args, kwargs):
    b = bind(args, kwargs, ("input", "dim"), dim=None)
    return Size(tensor(b["input"]), constant(b["dim"], "dim"))


def _getattr(args, kwargs):
    if kwargs or len(args) != 2 or args[1] != "shape":
        raise Unsupported("of a tensor's attributes only .shape is supported (for view sizes)")
    return Size(tensor(args[0]), None)


def _getitem(args, kwargs):
    source, index = args
    if isinstance(source, Size) and source.dim is None and isinstance(index, int):
        return Size(source.source, index)
    raise Unsupported("indexing or slicing a tensor is not supported (only x.shape[k] for view sizes)")


def _add(args, kwargs):
    b = bind(args, kwargs, ("input", "other", "alpha"), alpha=1)
    if not (isinstance(b["input"], Traced) and isinstance(b["other"], Traced)):
        raise Unsupported("it adds a constant; only the sum of two tensors computed from the input is bounded")
    if b["alpha"] != 1:
        raise Unsupported("torch.add with alpha ≠ 1 is not supported")
    return AddBound(), [b["input"].index, b["other"].index]


def _cat(args, kwargs):
    b = bind(args, kwargs, ("tensors", "dim"), dim=0)
    dim = constant(b["dim"], "dim")
    if not isinstance(b["tensors"], (tuple, list)) or not b["tensors"]:
        raise Unsupported("it must be called on a list or tuple of tensors")
    if dim == 0:
        raise Unsupported("it concatenates along the batch dimension (only dimensions after it are supported)")
    return CatBound(dim), [tensor(t, "concatenated tensor") for t in b["tensors"]]


def _identity(args, kwargs):
    return Traced(tensor(args[0] if args else kwargs.get("input")))


def _model_tensors(b: dict[str, Any], function: str) -> dict[str, Attr | None]:
    if not isinstance(b["weight"], Attr) or not (b["bias"] is None or isinstance(b["bias"], Attr)):
        raise Unsupported(f"{function}'s weight and bias must be tensors of the model (parameters or buffers)")
    return {"weight": b["weight"], "bias": b["bias"]}


def _linear(args, kwargs):
    b = bind(args, kwargs, ("input", "weight", "bias"), bias=None)
    return LinearBound(FunctionalLayer(_model_tensors(b, "F.linear"))), [tensor(b["input"])]


def _conv2d(args, kwargs):
    b = bind(args, kwargs, ("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
             bias=None, stride=1, padding=0, dilation=1, groups=1)
    settings = {key: constant(b[key], key) for key in ("stride", "padding", "dilation", "groups")}
    padding = settings["padding"]
    layer = FunctionalLayer(_model_tensors(b, "F.conv2d"), stride=pair(settings["stride"]),
                            padding=padding if isinstance(padding, str) else pair(padding),
                            dilation=pair(settings["dilation"]), groups=settings["groups"], padding_mode="zeros")
    return Conv2dBound(layer), [tensor(b["input"])]


def _max_pool2d(args, kwargs):
    names = ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")
    b = bind(args, kwargs, names, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False)
    if constant(b["return_indices"], "return_indices"):
        raise Unsupported("max pooling with return_indices=True is not supported")
    settings = [constant(b[key], key) for key in names[1:6]]
    return MaxPoolBound(*settings), [tensor(b["input"])]


def _avg_pool2d(args, kwargs):
    names = ("input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override")
    b = bind(args, kwargs, names, stride=None, padding=0, ceil_mode=False, count_include_pad=True,
             divisor_override=None)
    settings = {key: constant(b[key], key) for key in names[1:]}
    return AvgPoolBound(**settings, kind="avg_pool2d"), [tensor(b["input"])]


def _adaptive_avg_pool2d(args, kwargs):
    b = bind(args, kwargs, ("input", "output_size"))
    op = AvgPoolBound(output_size=constant(b["output_size"], "output_size"), kind="adaptive_avg_pool2d")
    return op, [tensor(b["input"])]


Handler = Callable[[tuple, dict], Converted]

FUNCTIONS: dict[Any, Handler] = {
    **dict.fromkeys([F.relu, F.relu_, torch.relu, torch.relu_], _relu),
    torch.flatten: _flatten, torch.reshape: _reshape_function, getattr: _getattr, operator.getitem: _getitem,
    **dict.fromkeys([operator.add, operator.iadd, torch.add], _add),
    **dict.fromkeys([torch.cat, torch.concat], _cat),
    **dict.fromkeys([F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, torch.dropout], _identity),
    F.linear: _linear, F.conv2d: _conv2d,
    **dict.fromkeys([F.max_pool2d, torch.max_pool2d], _max_pool2d),
    F.avg_pool2d: _avg_pool2d, F.adaptive_avg_pool2d: _adaptive_avg_pool2d,
}

METHODS: dict[str, Handler] = {
    "relu": _relu, "relu_": _relu, "flatten": _flatten, "view": _view_method, "reshape": _view_method,
    "size": _shape, "add": _add, "add_": _add, "contiguous": _identity,
}

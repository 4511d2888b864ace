"""Sound bounds of a network's outputs over the L∞ ball ∩ [0, 1], and verification of robustness from them.

Four bound methods, registered in ``VERIFIERS``: ``ibp`` (interval propagation), ``crown-ibp`` (CROWN's backward
bounds on the output with IBP intermediate bounds), ``crown`` (CROWN everywhere) and ``alpha-crown`` (CROWN with
optimised lower ReLU slopes, ``alpha.py``); and ``bab``, a verifier that gives no bounds: α-CROWN, then an exact
search per open margin under a time limit (``bab.py``, ``milp.py``). Any model whose ``forward`` traces
(``torch.fx``) into layers and functions with bound classes is bounded (``trace.py``). Pruning masks are honoured:
bound classes read ``module.weight``, the masked weight.
"""
from __future__ import annotations

import time
from typing import Sequence

import torch
from torch import nn

from robustprune.bounds import maxpool, relu, shape  # noqa: F401  (register their bound classes)
from robustprune.bounds.alpha import AlphaSettings, alpha_lower_bounds
from robustprune.bounds.graph import Graph
from robustprune.bounds.ops import BOUND_OPS, BoundOp, Interval
from robustprune.bounds.propagate import backward_bound, concretize, crown_bounds, input_box, interval_pass
from robustprune.bounds.trace import build_graph, clear_graph_cache
from robustprune.infra.errors import UserError
from robustprune.registry import Registry

VERIFIERS: Registry[str] = Registry("verifier")
for _name, _intermediate in (("ibp", None), ("crown-ibp", "ibp"), ("crown", "crown"), ("alpha-crown", "alpha"),
                             ("bab", "search")):
    VERIFIERS.register(_name)(_intermediate)


def spec_lower_bounds(graph: Graph, box: Interval, spec: torch.Tensor, method: str,
                      intervals: dict[int, Interval] | None = None, alpha: AlphaSettings | None = None
                      ) -> torch.Tensor:
    """Lower bounds (B, S) of ``spec @ logits`` for spec (B, S, classes) over the input box.

    ``intervals``: the IBP intervals of the nodes for this box when already computed (``ibp`` and ``crown-ibp`` use
    them as they are). For ``ibp`` the specification is merged into a final affine layer before the interval is
    applied (Gowal et al. 2018's elision of the last layer): exact for that layer, tighter than subtracting logit
    intervals. ``alpha``: α-CROWN's settings (iterations, learning rate, intermediate bounds; defaults when None).
    """
    intermediate = VERIFIERS.get(method)
    if intermediate == "search":
        raise UserError("bab decides margins, it gives no bounds: use alpha-crown for bounds")
    if intermediate == "alpha":
        return alpha_lower_bounds(graph, box, spec, alpha or AlphaSettings())
    last = graph.nodes[graph.output]
    if intermediate == "crown":
        bounds = crown_bounds(graph, box, "crown", stop=graph.output - 1)
    else:
        bounds = dict(intervals) if intervals is not None else interval_pass(graph, box, stop=graph.output - 1)
    if intermediate is None:
        if last.op.nonlinear or len(last.inputs) != 1:
            return concretize(spec, last.op.interval(*(bounds[i] for i in last.inputs)))
        (A_in,), bias = last.op.backward(spec, bounds[last.inputs[0]])
        return bias + concretize(A_in, bounds[last.inputs[0]])
    bounds[graph.output] = last.op.interval(*(bounds[i] for i in last.inputs))
    return backward_bound(graph, graph.output, spec, bounds)


def margin_spec(y: torch.Tensor, num_classes: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(B, classes − 1, classes): row j is e_y − e_j for every other class j, so ``spec @ z`` are the margins."""
    eye = torch.eye(num_classes, dtype=dtype, device=y.device)
    classes = torch.arange(num_classes, device=y.device).expand(len(y), -1)
    others = classes[classes != y.unsqueeze(1)].view(len(y), num_classes - 1)
    return eye[y].unsqueeze(1) - eye[others]


def margin_bounds(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float,
                  methods: Sequence[str], alpha: AlphaSettings | None = None) -> dict[str, torch.Tensor]:
    """Per method, lower bounds (B, classes − 1) of the margins z_y − z_j over the L∞ ball ∩ [0, 1], differentiable.

    The margins are the specification CROWN propagates backward (tighter than subtracting logit bounds). The
    methods share one graph and one interval pass (CROWN-IBP training needs both IBP and CROWN-IBP bounds).
    """
    graph = build_graph(model)
    box = input_box(x, eps)
    intervals = interval_pass(graph, box)
    spec = margin_spec(y, _class_count(intervals[graph.output]), x.dtype)
    return {method: spec_lower_bounds(graph, box, spec, method, intervals, alpha) for method in methods}


def margin_lower_bounds(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, method: str,
                        alpha: AlphaSettings | None = None) -> torch.Tensor:
    """Lower bounds (B, classes − 1) of the margins z_y − z_j by one method (see :func:`margin_bounds`)."""
    return margin_bounds(model, x, y, eps, (method,), alpha)[method]


def compute_bounds(model: nn.Module, x: torch.Tensor, eps: float, method: str = "crown",
                   alpha: AlphaSettings | None = None) -> Interval:
    """Sound (lower, upper) bounds (B, classes) of the logits over the L∞ ball of radius ``eps`` ∩ [0, 1]."""
    graph = build_graph(model)
    box = input_box(x, eps)
    intervals = interval_pass(graph, box)
    num_classes = _class_count(intervals[graph.output])
    if VERIFIERS.get(method) is None:
        return intervals[graph.output]
    eye = torch.eye(num_classes, dtype=x.dtype, device=x.device).expand(len(x), -1, -1)
    both = spec_lower_bounds(graph, box, torch.cat([eye, -eye], 1), method, intervals, alpha)
    return both[:, :num_classes], -both[:, num_classes:]


@torch.no_grad()
def verify(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, method: str = "crown",
           dtype: torch.dtype = torch.float64, timeout: float = 30.0, alpha: AlphaSettings | None = None
           ) -> torch.Tensor:
    """BoolTensor (B,): True where every margin z_y − z_j has a positive lower bound over the whole ball (``bab``:
    where its search proves it within ``timeout`` seconds per image; ``bab.decide`` tells falsified from unknown).

    Runs in eval mode and, by default, in float64 so rounding cannot turn a barely negative margin positive.
    """
    was_training = model.training
    model.eval()
    try:
        if VERIFIERS.get(method) == "search":
            return _decided(model, x.to(dtype), y, eps, timeout, alpha)
        lower = margin_lower_bounds(model, x.to(dtype), y, eps, method, alpha)
    finally:
        model.train(was_training)
    return (lower > 0).all(dim=1)


def _decided(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, timeout: float,
             alpha: AlphaSettings | None) -> torch.Tensor:
    from robustprune.bounds import bab, milp  # scipy's solver, only when asked for

    chain = milp.chain_of(build_graph(model), x)
    return torch.tensor([bab.decide(model, x[i:i + 1], y[i:i + 1], eps, time.perf_counter() + timeout,
                                    chain, alpha=alpha).verdict == "verified" for i in range(len(x))],
                        device=x.device)


def _class_count(logits: Interval) -> int:
    if logits[0].dim() != 2:
        raise UserError(f"bounds need a model with logits of shape (B, classes), got {tuple(logits[0].shape)}")
    return logits[0].shape[1]


__all__ = ["AlphaSettings", "BOUND_OPS", "BoundOp", "Graph", "VERIFIERS", "build_graph", "clear_graph_cache", "compute_bounds",
           "margin_bounds", "margin_lower_bounds", "margin_spec", "spec_lower_bounds", "verify"]

"""Sound bounds of a network's outputs over the L∞ ball ∩ [0, 1], and verification of robustness from them.

Three methods, registered in ``VERIFIERS``: ``ibp`` (interval propagation), ``crown-ibp`` (CROWN's backward bounds
on the output with IBP intermediate bounds) and ``crown`` (CROWN everywhere). Pruning masks are honoured: bound
classes read ``module.weight``, the masked weight.
"""
from __future__ import annotations

import torch
from torch import nn

from robustprune.bounds import maxpool, relu  # noqa: F401  (register the nonlinear bound classes)
from robustprune.bounds.graph import Graph, build_graph
from robustprune.bounds.ops import BOUND_OPS, BoundOp, Interval
from robustprune.bounds.propagate import backward_bound, concretize, crown_bounds, input_box, interval_pass
from robustprune.errors import UserError
from robustprune.registry import Registry

VERIFIERS: Registry[str] = Registry("verifier")
for _name, _intermediate in (("ibp", None), ("crown-ibp", "ibp"), ("crown", "crown")):
    VERIFIERS.register(_name)(_intermediate)


def spec_lower_bounds(graph: Graph, box: Interval, spec: torch.Tensor, method: str) -> torch.Tensor:
    """Lower bounds (B, S) of ``spec @ logits`` for spec (B, S, classes) over the input box.

    For ``ibp`` the specification is merged into a final affine layer before the interval is applied (Gowal et al.
    2018's elision of the last layer): exact for that layer, tighter than subtracting logit intervals.
    """
    intermediate = VERIFIERS.get(method)
    last = graph.nodes[graph.output]
    if intermediate is None:
        bounds = interval_pass(graph, box, stop=graph.output - 1)
        if last.op.nonlinear or len(last.inputs) != 1:
            return concretize(spec, last.op.interval(*(bounds[i] for i in last.inputs)))
        (A_in,), bias = last.op.backward(spec, bounds[last.inputs[0]])
        return bias + concretize(A_in, bounds[last.inputs[0]])
    bounds = crown_bounds(graph, box, intermediate, stop=graph.output - 1)
    bounds[graph.output] = last.op.interval(*(bounds[i] for i in last.inputs))
    return backward_bound(graph, graph.output, spec, bounds)


def margin_spec(y: torch.Tensor, num_classes: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(B, classes − 1, classes): row j is e_y − e_j for every other class j, so ``spec @ z`` are the margins."""
    eye = torch.eye(num_classes, dtype=dtype, device=y.device)
    classes = torch.arange(num_classes, device=y.device).expand(len(y), -1)
    others = classes[classes != y.unsqueeze(1)].view(len(y), num_classes - 1)
    return eye[y].unsqueeze(1) - eye[others]


def margin_lower_bounds(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, method: str,
                        graph: Graph | None = None) -> torch.Tensor:
    """Lower bounds (B, classes − 1) of the margins z_y − z_j over the L∞ ball ∩ [0, 1], differentiable.

    The margins are the specification CROWN propagates backward (tighter than subtracting logit bounds).
    """
    graph = graph or build_graph(model)
    num_classes = _num_classes(graph, x)
    return spec_lower_bounds(graph, input_box(x, eps), margin_spec(y, num_classes, x.dtype), method)


def compute_bounds(model: nn.Module, x: torch.Tensor, eps: float, method: str = "crown") -> Interval:
    """Sound (lower, upper) bounds (B, classes) of the logits over the L∞ ball of radius ``eps`` ∩ [0, 1]."""
    graph = build_graph(model)
    box = input_box(x, eps)
    if VERIFIERS.get(method) is None:
        return interval_pass(graph, box)[graph.output]
    num_classes = _num_classes(graph, x)
    eye = torch.eye(num_classes, dtype=x.dtype, device=x.device).expand(len(x), -1, -1)
    both = spec_lower_bounds(graph, box, torch.cat([eye, -eye], 1), method)
    return both[:, :num_classes], -both[:, num_classes:]


@torch.no_grad()
def verify(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, method: str = "crown",
           dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """BoolTensor (B,): True where every margin z_y − z_j has a positive lower bound over the whole ball.

    Runs in eval mode and, by default, in float64 so rounding cannot turn a barely negative margin positive.
    """
    was_training = model.training
    model.eval()
    try:
        lower = margin_lower_bounds(model, x.to(dtype), y, eps, method)
    finally:
        model.train(was_training)
    return (lower > 0).all(dim=1)


def _num_classes(graph: Graph, x: torch.Tensor) -> int:
    with torch.no_grad():
        out = interval_pass(graph, (x[:1], x[:1]))[graph.output][0]
    if out.dim() != 2:
        raise UserError(f"bounds need a model with logits of shape (B, classes), got {tuple(out.shape)}")
    return out.shape[1]


__all__ = ["BOUND_OPS", "BoundOp", "Graph", "VERIFIERS", "build_graph", "compute_bounds", "margin_lower_bounds",
           "margin_spec", "spec_lower_bounds", "verify"]

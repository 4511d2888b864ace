"""A model as a graph of bound classes: nodes in topological order, each with the nodes it reads.

``nn.Sequential`` becomes a chain, robustprune's ``ResidualBlock`` two branches joined by an Add node; every other
module must have a registered bound class. A layer without one is refused with an error naming it — a verifier
that skipped a layer would report bounds of a different network.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from torch import nn

from robustprune.bounds.ops import BOUND_OPS, AddBound, BoundOp
from robustprune.infra.errors import UserError
from robustprune.models.resnet import ResidualBlock


@dataclass
class Node:
    name: str
    op: BoundOp | None  # None for the input node
    inputs: list[int] = field(default_factory=list)
    mixing_depth: float = 0  # mixing ops between the input and here; inf once a ReLU is passed


@dataclass
class Graph:
    nodes: list[Node]

    @property
    def output(self) -> int:
        return len(self.nodes) - 1

    def needs_crown(self, index: int) -> bool:
        """False where the node is an affine map of a box with one mixing op: its interval is already exact."""
        return self.nodes[index].mixing_depth > 1

    def relu_inputs(self) -> set[int]:
        """Nodes whose bounds the ReLU relaxations need (the pre-activations)."""
        return {node.inputs[0] for node in self.nodes if node.op is not None and node.op.nonlinear}


def bound_op_for(module: nn.Module, name: str) -> BoundOp:
    for entry in BOUND_OPS.names():
        op_class = BOUND_OPS.get(entry)
        if op_class.module_types and isinstance(module, op_class.module_types):
            try:
                op = op_class(module)
                op.name = name
                return op
            except ValueError as err:
                raise UserError(f"cannot bound layer {name!r} ({type(module).__name__}): {err}") from None
    supported = ", ".join(BOUND_OPS.names())
    raise UserError(f"cannot bound layer {name!r} ({type(module).__name__}): no bound class for it "
                    f"(supported: {supported}, residual blocks, nn.Sequential)")


def build_graph(model: nn.Module) -> Graph:
    """The bound graph of ``model`` (``UserError`` naming the first unsupported layer)."""
    nodes = [Node("input", None)]

    def append(name: str, op: BoundOp, inputs: list[int]) -> int:
        depth = max(nodes[i].mixing_depth for i in inputs)
        if op.nonlinear:
            depth = math.inf
        elif op.mixing:
            depth += 1
        nodes.append(Node(name, op, inputs, depth))
        return len(nodes) - 1

    def add(module: nn.Module, name: str, source: int) -> int:
        if isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward:
            for child_name, child in module.named_children():
                source = add(child, f"{name}.{child_name}" if name else child_name, source)
            return source
        if isinstance(module, ResidualBlock):
            residual = add(module.residual, f"{name}.residual", source)
            shortcut = add(module.shortcut, f"{name}.shortcut", source)
            joined = append(f"{name}.add", AddBound(), [residual, shortcut])
            return add(module.post, f"{name}.post", joined)
        return append(name or type(module).__name__, bound_op_for(module, name or "model"), [source])

    add(model, "", 0)
    return Graph(nodes)

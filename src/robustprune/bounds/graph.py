"""A model as a graph of bound classes: nodes in topological order, each with the nodes it reads.

The graph is built by tracing the model's ``forward`` (``trace.build_graph``): every module with a bound class is
one node named by its qualified name (``features.3``), every supported function or tensor method between them
(``F.relu``, ``x.view(x.size(0), -1)``, ``a + b``, ``torch.cat``) one node named after the module whose
``forward`` calls it (``layer1.0.add``). Node 0 is the input, the last node the output.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from torch import nn

from robustprune.bounds.ops import BOUND_OPS, BoundOp
from robustprune.infra.errors import UserError


@dataclass
class Node:
    name: str
    op: BoundOp | None  # None for the input node
    inputs: list[int] = field(default_factory=list)
    mixing_depth: float = 0  # mixing ops between the input and here; inf once a ReLU is passed


@dataclass
class Graph:
    nodes: list[Node] = field(default_factory=lambda: [Node("input", None)])

    @property
    def output(self) -> int:
        return len(self.nodes) - 1

    def append(self, name: str, op: BoundOp, inputs: list[int]) -> int:
        """Add a node reading ``inputs`` (earlier nodes); returns its index."""
        depth = max(self.nodes[i].mixing_depth for i in inputs)
        if op.nonlinear:
            depth = math.inf
        elif op.mixing:
            depth += 1
        self.nodes.append(Node(name, op, inputs, depth))
        return len(self.nodes) - 1

    def needs_crown(self, index: int) -> bool:
        """False where the node is an affine map of a box with one mixing op: its interval is already exact."""
        return self.nodes[index].mixing_depth > 1

    def relu_inputs(self) -> set[int]:
        """Nodes whose bounds the ReLU relaxations need (the pre-activations)."""
        return {node.inputs[0] for node in self.nodes if node.op is not None and node.op.nonlinear}


def bound_class_of(module: nn.Module) -> type[BoundOp] | None:
    """The registered bound class of ``module``: one covering a class of the module whose ``forward`` it keeps (a
    subclass that replaces ``forward`` computes something else; it is traced through instead)."""
    for entry in BOUND_OPS.names():
        op_class = BOUND_OPS.get(entry)
        if any(isinstance(module, t) and type(module).forward is t.forward for t in op_class.module_types):
            return op_class
    return None


def bound_op_for(module: nn.Module, name: str, where: str = "") -> BoundOp:
    """The bound op of layer ``name``; ``UserError`` naming it (and ``where``: its source line) if it has none."""
    op_class = bound_class_of(module)
    if op_class is None:
        supported = ", ".join(BOUND_OPS.names())
        raise UserError(f"cannot bound layer {name!r} ({type(module).__name__}){where}: no bound class for it "
                        f"(supported: {supported}, and modules whose forward uses only these and supported "
                        f"functions)")
    try:
        op = op_class.from_module(module)
    except ValueError as err:
        raise UserError(f"cannot bound layer {name!r} ({type(module).__name__}){where}: {err}") from None
    op.name = name
    return op

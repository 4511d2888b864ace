"""``alpha-crown`` (Xu et al., ICLR 2021, "Fast and Complete"): CROWN with optimised lower ReLU slopes.

For an unstable ReLU on [l, u] every line α·x with α ∈ [0, 1] lies below relu(x) there, so a backward bound computed
with *any* such α is sound; CROWN fixes α ∈ {0, 1} by the area heuristic. α-CROWN keeps one α per specification and
neuron, starts from CROWN's choice and ascends the specifications' lower bounds by projected gradient steps (Adam,
α clipped to [0, 1] after each step). The result is, per specification, the best bound any iterate gave — never
looser than CROWN's, which is iterate 0 — and sound whatever the optimiser did.

The intermediate (pre-activation) bounds are full CROWN's and stay fixed: only the final specification's slopes are
optimised here (α-CROWN also optimises the intermediate layers' slopes; not built yet).
"""
from __future__ import annotations

import torch

from robustprune.bounds.graph import Graph
from robustprune.bounds.ops import Interval
from robustprune.bounds.propagate import backward_pass, crown_bounds
from robustprune.bounds.relu import ReLUBound

ITERATIONS = 20  # projected gradient steps on the slopes
LEARNING_RATE = 0.1  # Adam's step on the slopes (α lives in [0, 1])


def alpha_lower_bounds(graph: Graph, box: Interval, spec: torch.Tensor, iterations: int = ITERATIONS,
                       lr: float = LEARNING_RATE) -> torch.Tensor:
    """Lower bounds (B, S) of ``spec @ output`` (spec (B, S, classes)) over the input box, by α-CROWN."""
    bounds = crown_bounds(graph, box, "crown", stop=graph.output - 1)
    last = graph.nodes[graph.output]
    bounds[graph.output] = last.op.interval(*(bounds[i] for i in last.inputs))
    bounds = {index: (low.detach(), high.detach()) for index, (low, high) in bounds.items()}
    spec = spec.detach()
    with torch.enable_grad():
        alphas = _initial_slopes(graph, bounds, spec.shape[1])
        optimizer = torch.optim.Adam(list(alphas.values()), lr=lr) if alphas else None
        best = None
        for step in range(iterations + 1):
            lower = _pass(graph, bounds, spec, alphas)
            best = lower.detach() if best is None else torch.maximum(best, lower.detach())
            if optimizer is None or step == iterations:
                break
            grads = torch.autograd.grad(-lower.sum(), list(alphas.values()))  # the slopes only, not the weights
            for alpha, grad in zip(alphas.values(), grads):
                alpha.grad = grad
            optimizer.step()
            with torch.no_grad():
                for alpha in alphas.values():
                    alpha.clamp_(0, 1)
    return best


def _initial_slopes(graph: Graph, bounds: dict[int, Interval], specs: int) -> dict[int, torch.Tensor]:
    """CROWN's lower slope (1 where u > −l, else 0) per specification and neuron of every ReLU node."""
    alphas = {}
    for index, node in enumerate(graph.nodes):
        if isinstance(node.op, ReLUBound):
            low, high = bounds[node.inputs[0]]
            start = (high > -low).to(low.dtype).unsqueeze(1)
            alphas[index] = start.expand(-1, specs, *start.shape[2:]).clone().requires_grad_(True)
    return alphas


def _pass(graph: Graph, bounds: dict[int, Interval], spec: torch.Tensor,
          alphas: dict[int, torch.Tensor]) -> torch.Tensor:
    """One backward pass of ``spec`` with the ReLU nodes' lower slopes set to ``alphas``."""
    for index, alpha in alphas.items():
        graph.nodes[index].op.alpha = alpha
    try:
        constant = spec.new_zeros(spec.shape[:2])
        return backward_pass(graph, {graph.output: spec}, constant, bounds, graph.output)[0]
    finally:
        for index in alphas:
            graph.nodes[index].op.alpha = None

"""``alpha-crown`` (Xu et al., ICLR 2021, "Fast and Complete"): CROWN with optimised lower ReLU slopes.

For an unstable ReLU on [l, u] every line α·x with α ∈ [0, 1] lies below relu(x) there, so a backward bound computed
with *any* such α is sound; CROWN fixes α ∈ {0, 1} by the area heuristic. α-CROWN keeps one α per specification and
neuron, starts from CROWN's choice and ascends the specifications' lower bounds by projected gradient steps (Adam,
α clipped to [0, 1] after each step). The result is, per specification, the best bound any iterate gave — never
looser than CROWN's, which is iterate 0 — and sound whatever the optimiser did.

With ``intermediate=True`` the pre-activation bounds are optimised too, as α-CROWN does: each pre-activation that
full CROWN tightens gets its own slopes (one per bound of its unstable neurons and per earlier ReLU neuron), and the
final bound's gradient reaches them through the relaxations those bounds shape. Each iterate's intermediate bounds
are sound, so the element-wise tightest over the iterates are returned for later use (branch and bound encodes
fewer unstable neurons with them). A pre-activation whose coefficients would exceed ``MAX_ELEMENTS`` keeps its CROWN
bounds (the optimisation holds every coefficient at once).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from robustprune.bounds.graph import Graph
from robustprune.bounds.ops import Interval
from robustprune.bounds.propagate import MAX_ELEMENTS, backward_pass, crown_bounds
from robustprune.bounds.relu import ReLUBound
from robustprune.infra.errors import UserError


@dataclass(frozen=True)
class AlphaSettings:
    iterations: int = 20  # projected gradient steps on the slopes
    lr: float = 0.1  # Adam's step on the slopes (α lives in [0, 1])
    intermediate: bool = False  # also optimise the pre-activation bounds (tighter, slower)

    def __post_init__(self) -> None:
        if not (isinstance(self.iterations, int) and self.iterations >= 0):
            raise UserError(f"alpha-crown iterations must be an integer >= 0, got {self.iterations!r}")
        if not self.lr > 0:
            raise UserError(f"alpha-crown learning rate must be > 0, got {self.lr!r}")


def alpha_lower_bounds(graph: Graph, box: Interval, spec: torch.Tensor,
                       settings: AlphaSettings = AlphaSettings()) -> torch.Tensor:
    """Lower bounds (B, S) of ``spec @ output`` (spec (B, S, classes)) over the input box, by α-CROWN."""
    return alpha_bounds(graph, box, spec, settings)[0]


def alpha_bounds(graph: Graph, box: Interval, spec: torch.Tensor, settings: AlphaSettings = AlphaSettings()
                 ) -> tuple[torch.Tensor, dict[int, Interval]]:
    """(lower bounds (B, S) of ``spec @ output``, the node bounds they rest on: the tightest of every iterate)."""
    crown = crown_bounds(graph, box, "crown", stop=graph.output - 1)
    crown = {index: (low.detach(), high.detach()) for index, (low, high) in crown.items()}
    spec = spec.detach()
    with torch.enable_grad():
        slopes = _Slopes(graph, crown, spec.shape[1], settings.intermediate)
        optimizer = torch.optim.Adam(slopes.parameters(), lr=settings.lr) if slopes.parameters() else None
        best, tightest = None, dict(crown)
        for step in range(settings.iterations + 1):
            bounds = slopes.intermediate_bounds(box) if settings.intermediate else crown
            lower = slopes.final(bounds, spec)
            best = lower.detach() if best is None else torch.maximum(best, lower.detach())
            tightest = {i: (torch.maximum(tightest[i][0], low.detach()), torch.minimum(tightest[i][1], high.detach()))
                        for i, (low, high) in bounds.items() if i in tightest}
            if optimizer is None or step == settings.iterations:
                break
            optimizer.zero_grad()
            (-lower.sum()).backward(inputs=slopes.parameters())  # the slopes only, not the weights
            optimizer.step()
            slopes.clip()
    return best, tightest


class _Slopes:
    """The lower slopes being optimised: per bounded node (a pre-activation, or the output), per earlier ReLU."""

    def __init__(self, graph: Graph, crown: dict[int, Interval], specs: int, intermediate: bool):
        self.graph, self.crown = graph, crown
        self.relus = [i for i, node in enumerate(graph.nodes) if isinstance(node.op, ReLUBound)]
        self.alphas: dict[int, dict[int, torch.Tensor]] = {graph.output: self._start(graph.output, specs)}
        self.positions: dict[int, torch.Tensor] = {}  # per optimised pre-activation: its unstable neurons (B, W)
        if intermediate:
            for index in sorted(graph.relu_inputs()):
                positions = _unstable_positions(crown[index])
                width = 2 * positions.shape[1]
                if graph.needs_crown(index) and positions.shape[1] and \
                        positions.shape[0] * width * _widest(crown, index) <= MAX_ELEMENTS:
                    self.positions[index] = positions
                    self.alphas[index] = self._start(index, width)

    def _start(self, index: int, specs: int) -> dict[int, torch.Tensor]:
        """CROWN's lower slope (1 where u > −l, else 0) for every ReLU before node ``index``, per specification."""
        slopes = {}
        for relu in (r for r in self.relus if r < index):
            low, high = self.crown[self.graph.nodes[relu].inputs[0]]
            start = (high > -low).to(low.dtype).unsqueeze(1)
            slopes[relu] = start.expand(-1, specs, *start.shape[2:]).clone().requires_grad_(True)
        return slopes

    def parameters(self) -> list[torch.Tensor]:
        return [alpha for per_node in self.alphas.values() for alpha in per_node.values()]

    def clip(self) -> None:
        with torch.no_grad():
            for alpha in self.parameters():
                alpha.clamp_(0, 1)

    def intermediate_bounds(self, box: Interval) -> dict[int, Interval]:
        """Every node's bounds with the optimised pre-activations recomputed from their slopes (differentiable)."""
        bounds: dict[int, Interval] = {0: box}
        for index in range(1, self.graph.output):
            node = self.graph.nodes[index]
            low, high = node.op.interval(*(bounds[i] for i in node.inputs))
            bounds[index] = torch.maximum(low, self.crown[index][0]), torch.minimum(high, self.crown[index][1])
            if index in self.positions:
                bounds[index] = self._tighten(index, bounds)
        return bounds

    def _tighten(self, index: int, bounds: dict[int, Interval]) -> Interval:
        """The (CROWN-)unstable neurons' bounds of pre-activation ``index`` by a backward pass with their slopes,
        intersected with what ``bounds`` holds (every bound here is sound, so their intersection is)."""
        low, high = bounds[index]
        positions = self.positions[index]
        flat = low.new_zeros(*positions.shape, low[0].numel()).scatter_(2, positions.unsqueeze(2), 1.0)
        unit = flat.view(*positions.shape, *low.shape[1:])
        both = self._pass(index, torch.cat([unit, -unit], 1), bounds)
        width = positions.shape[1]
        flat_l = low.flatten(1).scatter(1, positions, torch.maximum(low.flatten(1).gather(1, positions),
                                                                    both[:, :width]))
        flat_u = high.flatten(1).scatter(1, positions, torch.minimum(high.flatten(1).gather(1, positions),
                                                                     -both[:, width:]))
        return flat_l.view_as(low), flat_u.view_as(high)

    def final(self, bounds: dict[int, Interval], spec: torch.Tensor) -> torch.Tensor:
        last = self.graph.nodes[self.graph.output]
        bounds = dict(bounds)
        bounds[self.graph.output] = last.op.interval(*(bounds[i] for i in last.inputs))
        return self._pass(self.graph.output, spec, bounds)

    def _pass(self, index: int, A: torch.Tensor, bounds: dict[int, Interval]) -> torch.Tensor:
        """One backward pass of ``A`` from node ``index`` with the ReLUs' lower slopes set to this node's."""
        for relu, alpha in self.alphas[index].items():
            self.graph.nodes[relu].op.alpha = alpha
        try:
            return backward_pass(self.graph, {index: A}, A.new_zeros(A.shape[:2]), bounds, index)[0]
        finally:
            for relu in self.alphas[index]:
                self.graph.nodes[relu].op.alpha = None


def _unstable_positions(bounds: Interval) -> torch.Tensor:
    """(B, W): per sample, the flat positions of its unstable neurons first (padded with stable ones)."""
    flat_l, flat_u = bounds[0].flatten(1), bounds[1].flatten(1)
    unstable = (flat_l < 0) & (flat_u > 0)
    width = int(unstable.sum(1).max()) if len(unstable) else 0
    return unstable.to(torch.int8).argsort(dim=1, descending=True, stable=True)[:, :width]


def _widest(bounds: dict[int, Interval], index: int) -> int:
    return max(b[0][0].numel() for i, b in bounds.items() if i <= index)

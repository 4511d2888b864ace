"""The two bound algorithms over a :class:`Graph`: interval propagation (IBP) and backward linear bounds (CROWN).

- IBP (Gowal et al. 2018): one forward pass of intervals.
- CROWN (Zhang et al. 2018): a linear function ``A · out`` of a node is pushed backward to the input, relaxing each
  ReLU with the bounds of its pre-activation, and then minimised over the input box in closed form. With
  ``intermediate="crown"`` every pre-activation's bounds come from CROWN itself (full CROWN); with
  ``intermediate="ibp"`` they come from IBP (CROWN-IBP, Zhang et al. 2020).

Full CROWN computes the bounds of a pre-activation only for its neurons that are still unstable under the interval
propagated from the (already tightened) earlier bounds: a stable neuron's relaxation is exact whatever its bounds,
so this gives the same final bounds as running CROWN on every neuron, at a fraction of the cost. Every bound is the
intersection of its interval and CROWN bound — both sound, so the intersection is too. The coefficient tensors are
processed in chunks of specifications so their size stays under ``max_elements``.
"""
from __future__ import annotations

import torch

from robustprune.bounds.graph import Graph
from robustprune.bounds.ops import Interval, dot, sum_rest
from robustprune.bounds.patches import Patches, add

#: Largest coefficient tensor (elements) one backward pass holds; bigger requests run in chunks of specifications.
MAX_ELEMENTS = 2 ** 24


def input_box(x: torch.Tensor, eps: float) -> Interval:
    """The L∞ ball of radius ``eps`` around ``x`` intersected with the input domain [0, 1]."""
    return (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)


def interval_pass(graph: Graph, box: Interval, known: dict[int, Interval] | None = None,
                  stop: int | None = None) -> dict[int, Interval]:
    """Intervals of every node up to ``stop`` (IBP); entries of ``known`` are used as they are."""
    bounds: dict[int, Interval] = {0: box}
    for index in range(1, (graph.output if stop is None else stop) + 1):
        if known and index in known:
            bounds[index] = known[index]
            continue
        node = graph.nodes[index]
        bounds[index] = node.op.interval(*(bounds[i] for i in node.inputs))
    return bounds


def backward_bound(graph: Graph, start: int, A: torch.Tensor, bounds: dict[int, Interval]) -> torch.Tensor:
    """Lower bounds (B, S) of ``A · node[start]`` over the input box ``bounds[0]``, for A of shape (B, S, *shape)."""
    chunk = _chunk(A.shape[0], bounds, start)
    if A.shape[1] > chunk:
        return torch.cat([backward_bound(graph, start, part, bounds) for part in A.split(chunk, dim=1)], dim=1)
    return backward_pass(graph, {start: A}, A.new_zeros(A.shape[:2]), bounds, start)[0]


def _chunk(batch: int, bounds: dict[int, Interval], start: int) -> int:
    """Specifications per pass so the widest coefficient tensor stays under MAX_ELEMENTS."""
    return max(1, MAX_ELEMENTS // max(1, batch * _widest(bounds, start)))


def _widest(bounds: dict[int, Interval], start: int) -> int:
    """Elements of the largest node map up to ``start``: the size of dense coefficients per specification."""
    return max(b[0][0].numel() for i, b in bounds.items() if i <= start)


def backward_pass(graph: Graph, pending: dict[int, torch.Tensor | Patches], constant: torch.Tensor,
              bounds: dict[int, Interval], start: int) -> tuple[torch.Tensor, int]:
    """The lower bounds of the pending coefficients' sum, and the widest coefficients per specification held."""
    width = 0
    for index in range(start, 0, -1):
        coefficients = pending.pop(index, None)
        if coefficients is None:
            continue
        width = max(width, _width(coefficients))
        node = graph.nodes[index]
        inputs = [bounds[i] for i in node.inputs]
        inputs_A = None
        if isinstance(coefficients, Patches):
            shape = bounds[index][0].shape[1:]
            if coefficients.worth_keeping(shape):
                try:
                    inputs_A, bias = node.op.patch_backward(coefficients, *inputs)
                except NotImplementedError:
                    pass
            coefficients = coefficients.dense(shape) if inputs_A is None else coefficients
        if inputs_A is None:
            inputs_A, bias = node.op.backward(coefficients, *inputs)
        constant = constant + bias
        for source, A_in in zip(node.inputs, inputs_A):
            pending[source] = add(pending[source], A_in, bounds[source][0].shape[1:]) if source in pending else A_in
    return constant + concretize(pending[0], bounds[0]), max(width, _width(pending[0]))


def _width(A: torch.Tensor | Patches) -> int:
    """Elements per specification."""
    values = A.values if isinstance(A, Patches) else A
    return max(1, values[0, 0].numel())


def concretize(A: torch.Tensor | Patches, box: Interval) -> torch.Tensor:
    """min over v in the box of A · v = A · center − |A| · radius, (B, S, *shape) → (B, S)."""
    low, high = box
    center, radius = (high + low) / 2, (high - low) / 2
    if isinstance(A, Patches):
        return sum_rest(A.values * A.gather(center)) - sum_rest(A.values.abs() * A.gather(radius))
    return dot(A, center) - dot(A.abs(), radius)


def unit_lower_bounds(graph: Graph, index: int, positions: torch.Tensor, bounds: dict[int, Interval]
                      ) -> torch.Tensor:
    """Lower bounds (B, 2S) of ``+out[positions]`` then ``−out[positions]`` of node ``index`` (positions (B, S)).

    Runs in chunks of specifications: the first sized for dense coefficients, the next ones for the widest
    coefficients the first pass actually held (patches are far narrower than their maps).
    """
    batch = positions.shape[0]
    chunk = max(1, _chunk(batch, bounds, index) // 2)
    lowers, uppers, done = [], [], 0
    while done < positions.shape[1]:
        part = positions[:, done:done + chunk]
        both, width = _unit_pass(graph, index, part, bounds)
        lowers.append(both[:, :part.shape[1]])
        uppers.append(both[:, part.shape[1]:])
        done += part.shape[1]
        chunk = max(1, MAX_ELEMENTS // (batch * width) // 2)
    return torch.cat(lowers + uppers, 1)


def _unit_pass(graph: Graph, index: int, positions: torch.Tensor, bounds: dict[int, Interval]
               ) -> tuple[torch.Tensor, int]:
    node = graph.nodes[index]
    source = bounds[node.inputs[0]]
    try:
        windows, bias = node.op.unit_patches(positions, source)
        A_in = windows.negated_too()
    except NotImplementedError:
        try:
            A_in, bias = node.op.unit_backward(positions, source)
            A_in = torch.cat([A_in, -A_in], 1)
        except NotImplementedError:
            lower = bounds[index][0]
            spec = lower.new_zeros(*positions.shape, lower[0].numel())
            spec.scatter_(2, positions.unsqueeze(2), 1.0)
            spec = spec.view(*positions.shape, *lower.shape[1:])
            return backward_bound(graph, index, torch.cat([spec, -spec], 1), bounds), _widest(bounds, index)
    return backward_pass(graph, {node.inputs[0]: A_in}, torch.cat([bias, -bias], 1), bounds, index - 1)


def crown_tighten(graph: Graph, index: int, bounds: dict[int, Interval]) -> Interval:
    """CROWN bounds of node ``index``'s unstable neurons, intersected with its interval."""
    lower, upper = bounds[index]
    flat_l, flat_u = lower.flatten(1), upper.flatten(1)
    unstable = (flat_l < 0) & (flat_u > 0)
    counts = unstable.sum(1)
    width = int(counts.max()) if len(counts) else 0
    if width == 0:
        return lower, upper
    # per sample, the positions of its unstable neurons first (padded with stable ones, masked by `valid`)
    positions = unstable.to(torch.int8).argsort(dim=1, descending=True, stable=True)[:, :width]
    valid = torch.arange(width, device=lower.device).unsqueeze(0) < counts.unsqueeze(1)
    both = unit_lower_bounds(graph, index, positions, bounds)
    old_l, old_u = flat_l.gather(1, positions), flat_u.gather(1, positions)
    new_l = torch.where(valid, torch.maximum(old_l, both[:, :width]), old_l)
    new_u = torch.where(valid, torch.minimum(old_u, -both[:, width:]), old_u)
    return flat_l.scatter(1, positions, new_l).view_as(lower), flat_u.scatter(1, positions, new_u).view_as(upper)


def crown_bounds(graph: Graph, box: Interval, intermediate: str = "crown", stop: int | None = None,
                 splits: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None) -> dict[int, Interval]:
    """Intervals of every node up to ``stop``, the ReLU pre-activations tightened by CROWN (``intermediate="crown"``)
    or left as IBP gives them (``"ibp"``: the intermediate bounds of CROWN-IBP).

    ``splits`` (branch and bound): per pre-activation node, boolean maps (active, inactive) of shape (B, *shape);
    batch element b then bounds only the inputs where those neurons are ≥ 0 / ≤ 0, so their intervals are clipped at
    0 (the ReLU there becomes exact) before anything later is bounded."""
    stop = graph.output if stop is None else stop
    if intermediate == "ibp" and not splits:
        return interval_pass(graph, box, stop=stop)
    needed = graph.relu_inputs()
    bounds: dict[int, Interval] = {0: box}
    for index in range(1, stop + 1):
        node = graph.nodes[index]
        bounds[index] = node.op.interval(*(bounds[i] for i in node.inputs))
        if intermediate == "crown" and index in needed and graph.needs_crown(index):
            bounds[index] = crown_tighten(graph, index, bounds)
        if splits and index in splits:
            active, inactive = splits[index]
            lower, upper = bounds[index]
            bounds[index] = (torch.where(active, lower.clamp(min=0), lower),
                             torch.where(inactive, upper.clamp(max=0), upper))
    return bounds

"""``bab``: branch and bound over ReLU splits, with CROWN bounds on every sub-domain.

A sub-domain fixes some unstable ReLUs active (pre-activation ≥ 0) or inactive (≤ 0). Its bounds are CROWN's with
those neurons' intervals clipped at 0 (``propagate.crown_bounds(splits=)``): on the inputs of the sub-domain the
split ReLU is exactly linear, so the backward bound is a sound lower bound there, and the two children of a split
cover their parent. A sub-domain whose every margin has a positive lower bound is done; one whose clipped interval
is empty (lower > upper somewhere) holds no input and is done too. The others split their most promising unstable
neuron (the largest triangle relaxation, −l·u / (u − l), BaBSR's intercept score without the coefficient) until
none is left or the time limit passes.

The result is **verified** (every sub-domain done) or **unknown** (time up, or a sub-domain with no unstable neuron
left whose bound is still not positive: the split constraints are kept as clipped intervals, not as β-CROWN's
multipliers, so such a domain can stay loose).

:func:`decide` is the ``bab`` verifier of one image: α-CROWN on the whole ball, then for each margin still open (the
lowest bound first) an exact search — on a network that is a chain of affine layers and ReLUs the mixed-integer
program of ``milp.py`` (HiGHS branches on the unstable ReLUs with LP bounds, which are tighter than CROWN's, over a
program holding only the unpruned weights and the unstable neurons), on any other network the ReLU splits above.
It ends **verified**, **falsified** (the program's point, clipped into the box and misclassified by a forward pass)
or **unknown** (time up, or a program's point the network does not misclassify: solver tolerance).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from robustprune.bounds import milp
from robustprune.bounds.alpha import AlphaSettings, alpha_bounds
from robustprune.bounds.graph import Graph
from robustprune.bounds.propagate import backward_bound, crown_bounds, input_box, interval_pass
from robustprune.bounds.relu import ReLUBound
from robustprune.bounds.trace import build_graph

Split = tuple[int, int, bool]  # (pre-activation node, flat neuron position, active)
DOMAINS_PER_PASS = 32


@dataclass(frozen=True)
class BaBResult:
    verified: bool
    domains: int  # sub-domains bounded
    seconds: float
    timed_out: bool


Found = tuple[int, torch.Tensor]  # a counter-example: the class the model gives it, the point (1, *shape)


@dataclass(frozen=True)
class Decision:
    verdict: str  # verified | falsified | unknown
    found: Found | None  # falsified: a point of the ball ∩ [0, 1] the model misclassifies, and its class
    step: str | None  # what decided: "alpha-crown", "attack", "milp" or "branches"


def decide(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, deadline: float,
           chain: list[milp.Segment] | None, alpha: AlphaSettings | None = None,
           attack: Callable[[], Found | None] | None = None) -> Decision:
    """The verdict of one image ``x`` (1, *shape): α-CROWN; ``attack`` (a counter-example search, cheaper than the
    exact one on a non-robust image) when given; then the exact search margin by margin until ``deadline`` (a
    ``time.perf_counter()`` value). ``chain``: the model's :func:`milp.affine_chain` (None: ReLU splits)."""
    from robustprune.bounds import margin_spec  # the package root's (no cycle at import time)

    graph, box = build_graph(model), input_box(x, eps)
    with torch.no_grad():
        spec = margin_spec(y, interval_pass(graph, box)[graph.output][0].shape[1], x.dtype)
        lower, bounds = alpha_bounds(graph, box, spec, alpha or AlphaSettings())
    lower = lower[0]
    if bool((lower > 0).all()):
        return Decision("verified", None, "alpha-crown")
    found = attack() if attack is not None else None
    if found is not None:
        return Decision("falsified", found, "attack")
    specs = spec[0, [int(r) for r in lower.argsort() if lower[r] <= 0]]  # the open margins, the lowest bound first
    if chain is None:
        left = max(deadline - time.perf_counter(), 0.0)
        proved = branch_and_bound(model, x, y, eps, left, spec=specs.unsqueeze(0)).verified
        return Decision("verified", None, "branches") if proved else Decision("unknown", None, None)
    encoding = milp.encode(chain, bounds)  # α-CROWN's pre-activation bounds (full CROWN's, or tighter)
    for row in specs:
        search = milp.search(encoding, row.cpu().numpy(), deadline - time.perf_counter())
        if search.verdict == "candidate":
            found = misclassified(model, x, y, eps, torch.from_numpy(search.point).to(x).view_as(x))
            return Decision("falsified", found, "milp") if found is not None else Decision("unknown", None, None)
        if search.verdict == "unknown":
            return Decision("unknown", None, None)
    return Decision("verified", None, "milp")


def misclassified(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, point: torch.Tensor) -> Found | None:
    """(the class the model gives it, ``point``) with the point clipped into the ball ∩ [0, 1] (a solver's point may
    sit a hair outside), if a plain forward pass there misclassifies it — the check every counter-example passes —
    else None."""
    low, high = input_box(x, eps)
    point = torch.maximum(torch.minimum(point, high), low).to(model_dtype(model, point.dtype))
    inside = bool((point - x).abs().max() <= eps + 1e-7) and bool(point.min() >= 0) and bool(point.max() <= 1)
    with torch.no_grad():
        predicted = int(model(point).argmax(1)[0])
    return (predicted, point) if inside and predicted != int(y[0]) else None


def model_dtype(model: nn.Module, default: torch.dtype = torch.float32) -> torch.dtype:
    """The precision the model computes in (its first parameter's)."""
    return next((p.dtype for p in model.parameters()), default)


def branch_and_bound(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, timeout: float = 30.0,
                     spec: torch.Tensor | None = None) -> BaBResult:
    """Prove every margin z_y − z_j > 0 for one image ``x`` (1, *shape) over the L∞ ball ∩ [0, 1]."""
    from robustprune.bounds import margin_spec  # the package root's helper (no cycle at import time)

    started = time.perf_counter()
    graph = build_graph(model)
    box = input_box(x, eps)
    with torch.no_grad():
        shapes = {index: low.shape[1:] for index, (low, _) in interval_pass(graph, box).items()}
        spec = margin_spec(y, shapes[graph.output][0], x.dtype) if spec is None else spec
        pre_activations = [node.inputs[0] for node in graph.nodes if isinstance(node.op, ReLUBound)]
        pending: list[tuple[Split, ...]] = [()]
        bounded = 0
        while pending:
            if time.perf_counter() - started > timeout:
                return BaBResult(False, bounded, time.perf_counter() - started, True)
            batch, pending = pending[:DOMAINS_PER_PASS], pending[DOMAINS_PER_PASS:]
            bounded += len(batch)
            children = _bound_and_split(graph, box, spec, batch, pre_activations, shapes)
            if children is None:
                return BaBResult(False, bounded, time.perf_counter() - started, False)
            pending = children + pending
    return BaBResult(True, bounded, time.perf_counter() - started, False)


def _bound_and_split(graph: Graph, box, spec: torch.Tensor, domains: list[tuple[Split, ...]],
                     pre_activations: list[int], shapes: dict[int, torch.Size]) -> list[tuple[Split, ...]] | None:
    """The children of every domain not proved yet (None: one cannot be split further and is not proved)."""
    n = len(domains)
    boxes = (box[0].repeat(n, *[1] * (box[0].dim() - 1)), box[1].repeat(n, *[1] * (box[1].dim() - 1)))
    bounds = crown_bounds(graph, boxes, "crown", stop=graph.output - 1, splits=_masks(domains, shapes, box))
    last = graph.nodes[graph.output]
    bounds[graph.output] = last.op.interval(*(bounds[i] for i in last.inputs))
    lower = backward_bound(graph, graph.output, spec.repeat(n, 1, 1), bounds)
    empty = torch.zeros(n, dtype=torch.bool)
    for low, high in bounds.values():
        empty |= (low > high).flatten(1).any(1).cpu()
    children = []
    for i, domain in enumerate(domains):
        if empty[i] or bool((lower[i] > 0).all()):
            continue
        split = _choose(bounds, pre_activations, i, domain)
        if split is None:
            return None
        children += [domain + ((*split, True),), domain + ((*split, False),)]
    return children


def _masks(domains: list[tuple[Split, ...]], shapes: dict[int, torch.Size],
           box) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Per split node, the (active, inactive) maps of every domain of the pass (flat positions, then shaped)."""
    masks: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for b, domain in enumerate(domains):
        for node, position, active in domain:
            if node not in masks:
                flat = torch.zeros(len(domains), shapes[node].numel(), dtype=torch.bool, device=box[0].device)
                masks[node] = (flat, flat.clone())
            masks[node][0 if active else 1][b, position] = True
    return {node: (a.view(len(domains), *shapes[node]), i.view(len(domains), *shapes[node]))
            for node, (a, i) in masks.items()}


def _choose(bounds, pre_activations: list[int], i: int, domain: tuple[Split, ...]) -> tuple[int, int] | None:
    """The unstable, not yet split neuron with the largest triangle relaxation (−l·u / (u − l)), or None."""
    taken = {(node, position) for node, position, _ in domain}
    best, best_score = None, 0.0
    for node in pre_activations:
        low, high = (t[i].flatten() for t in bounds[node])
        unstable = (low < 0) & (high > 0)
        score = torch.where(unstable, -low * high / (high - low).clamp(min=1e-12), torch.zeros_like(low))
        for position in score.argsort(descending=True)[:len(taken) + 1].tolist():
            if (node, position) not in taken and float(score[position]) > best_score:
                best, best_score = (node, position), float(score[position])
                break
    return best

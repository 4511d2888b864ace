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

import torch
from torch import nn

from robustprune.bounds import milp
from robustprune.bounds.alpha import AlphaSettings
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


@dataclass(frozen=True)
class Decision:
    verdict: str  # verified | falsified | unknown
    point: torch.Tensor | None  # falsified: a point of the ball ∩ [0, 1] (1, *shape) the model misclassifies
    step: str | None  # what decided: "alpha-crown", "milp" or "branches"


def decide(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, deadline: float,
           chain: list[milp.Segment] | None, lower: torch.Tensor | None = None,
           alpha: AlphaSettings | None = None) -> Decision:
    """The verdict of one image ``x`` (1, *shape): α-CROWN (its margin bounds ``lower`` (classes − 1,) when the caller
    has them), then the exact search margin by margin until ``deadline`` (a ``time.perf_counter()`` value).
    ``chain``: the model's :func:`milp.affine_chain` (None: ReLU splits)."""
    from robustprune.bounds import margin_lower_bounds, margin_spec  # the package root's (no cycle at import time)

    with torch.no_grad():
        lower = margin_lower_bounds(model, x, y, eps, "alpha-crown", alpha)[0] if lower is None else lower
    if bool((lower > 0).all()):
        return Decision("verified", None, "alpha-crown")
    spec = margin_spec(y, lower.numel() + 1, x.dtype)[0]
    specs = spec[[int(r) for r in lower.argsort() if lower[r] <= 0]]  # the open margins, the lowest bound first
    if chain is None:
        left = max(deadline - time.perf_counter(), 0.0)
        proved = branch_and_bound(model, x, y, eps, left, spec=specs.unsqueeze(0)).verified
        return Decision("verified", None, "branches") if proved else Decision("unknown", None, None)
    graph = build_graph(model)
    with torch.no_grad():
        encoding = milp.encode(chain, crown_bounds(graph, input_box(x, eps), "crown", stop=graph.output - 1))
    for row in specs:
        search = milp.search(encoding, row.cpu().numpy(), deadline - time.perf_counter())
        if search.verdict == "candidate":
            point = misclassified(model, x, y, eps, torch.from_numpy(search.point).to(x).view_as(x))
            return Decision("falsified", point, "milp") if point is not None else Decision("unknown", None, None)
        if search.verdict == "unknown":
            return Decision("unknown", None, None)
    return Decision("verified", None, "milp")


def misclassified(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float,
                  point: torch.Tensor) -> torch.Tensor | None:
    """``point`` clipped into the ball ∩ [0, 1] (a solver's point may sit a hair outside) if the model misclassifies
    it there by a plain forward pass — the check every counter-example passes — else None."""
    low, high = input_box(x, eps)
    point = torch.maximum(torch.minimum(point, high), low).to(model_dtype(model, point.dtype))
    inside = bool((point - x).abs().max() <= eps + 1e-7) and bool(point.min() >= 0) and bool(point.max() <= 1)
    with torch.no_grad():
        wrong = int(model(point).argmax(1)[0]) != int(y[0])
    return point if inside and wrong else None


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
        spec = margin_spec(y, interval_pass(graph, box)[graph.output][0].shape[1], x.dtype) if spec is None else spec
        pre_activations = [node.inputs[0] for node in graph.nodes if isinstance(node.op, ReLUBound)]
        shapes = {index: low.shape[1:] for index, (low, _) in interval_pass(graph, box).items()}
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

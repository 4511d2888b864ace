"""The exact margin question as a mixed-integer linear program (Tjeng et al., ICLR 2019), solved by HiGHS (scipy).

A network that is a chain of affine segments joined by ReLUs (any layers between two ReLUs, as long as they are
affine and read nothing from before the last ReLU) is encoded with:
- the input pixels as variables bounded by the box (the ε-ball ∩ [0, 1]);
- each segment as a sparse matrix of its nonzero weights only, so a pruned network gives a smaller program;
- per ReLU neuron, from the pre-activation bounds [l, u] of full CROWN: stable inactive (u ≤ 0) — no variable, its
  column dropped; stable active (l ≥ 0) — one variable equal to its pre-activation; unstable — one variable ``a``
  and one binary ``d`` with ``a ≥ 0, a ≥ z, a ≤ u·d, a ≤ z − l·(1 − d)`` (exact for z ∈ [l, u]).

For a margin c·z + c₀ (z_y − z_j) the program asks for an input with margin ≤ ``TOLERANCE``: infeasible means the
margin is positive over the whole box (**verified**); a solution is a candidate counter-example, which the caller
checks by a forward pass (HiGHS satisfies constraints up to its feasibility tolerance, ~1e-7, so a candidate is a
counter-example only once the network itself misclassifies it). HiGHS stops at the first such solution.
"""
from __future__ import annotations

import contextlib
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch
from scipy.optimize import Bounds, LinearConstraint, milp

from robustprune.bounds.graph import Graph
from robustprune.bounds.ops import Interval
from robustprune.bounds.propagate import interval_pass

MAX_NEURONS = 50_000  # larger networks are not encoded: a program of that size would not finish
TOLERANCE = 1e-5  # a margin ≤ this is searched for: HiGHS' tolerances never turn a true counter-example infeasible
BASIS_CHUNK = 1024  # unit vectors pushed through a segment at once to read its matrix


@dataclass(frozen=True)
class Segment:
    weight: sp.csr_matrix  # (outputs, inputs), the nonzero weights only
    bias: np.ndarray
    output: int  # the graph node it computes: a ReLU's pre-activation, or the logits


@dataclass(frozen=True)
class Encoding:
    rows: sp.csr_matrix  # the linear constraints low ≤ rows · v ≤ high
    low: np.ndarray
    high: np.ndarray
    var_low: np.ndarray
    var_high: np.ndarray
    integrality: np.ndarray  # 1 for the binaries
    logits: sp.csr_matrix  # logits = logits · v + logit_bias
    logit_bias: np.ndarray
    inputs: int  # v[:inputs] are the input pixels

    @property
    def binaries(self) -> int:
        return int(self.integrality.sum())


@dataclass(frozen=True)
class Search:
    verdict: str  # "verified" (no input reaches the margin), "candidate" (a point to check) or "unknown"
    point: np.ndarray | None  # the flat input point of a candidate
    seconds: float


def chain_of(graph: Graph, x: torch.Tensor) -> list[Segment] | None:
    """:func:`affine_chain` of the traced model for inputs like ``x`` (None also above MAX_NEURONS ReLUs)."""
    with torch.no_grad():
        shapes = {i: low.shape[1:] for i, (low, _) in interval_pass(graph, (x[:1], x[:1])).items()}
    hidden = sum(shapes[node.inputs[0]].numel() for node in graph.nodes[1:] if node.op.nonlinear)
    return affine_chain(graph, shapes, x.dtype) if hidden <= MAX_NEURONS else None


def affine_chain(graph: Graph, shapes: dict[int, torch.Size], dtype: torch.dtype) -> list[Segment] | None:
    """The network as affine segments between its ReLUs, or None if it is not such a chain (a skip connection
    across a ReLU, max pooling)."""
    start, segments = 0, []
    for index, node in enumerate(graph.nodes[1:], start=1):
        if any(i < start for i in node.inputs):
            return None
        if node.op.nonlinear:
            if type(node.op).__name__ != "ReLUBound" or node.inputs[0] != index - 1:
                return None
            segments.append(_segment(graph, start, index - 1, shapes, dtype))
            start = index
    if start == graph.output:
        return None
    return segments + [_segment(graph, start, graph.output, shapes, dtype)]


def _segment(graph: Graph, start: int, end: int, shapes: dict[int, torch.Size], dtype: torch.dtype) -> Segment:
    """Nodes start+1 … end as one sparse affine map, read by pushing the zero vector and unit vectors through."""
    width = int(np.prod(shapes[start]))
    bias = _run(graph, start, end, torch.zeros(1, *shapes[start], dtype=dtype))[0]
    columns = []
    for first in range(0, width, BASIS_CHUNK):
        basis = torch.eye(width, dtype=dtype)[first:first + BASIS_CHUNK]
        columns.append(sp.csr_matrix((_run(graph, start, end, basis.view(-1, *shapes[start])) - bias).numpy()))
    weight = sp.vstack(columns).T.tocsr()
    weight.eliminate_zeros()
    return Segment(weight, bias.numpy(), end)


def _run(graph: Graph, start: int, end: int, value: torch.Tensor) -> torch.Tensor:
    """Nodes start+1 … end on ``value`` at node ``start`` (their interval maps on a point), flattened."""
    values = {start: (value, value)}
    with torch.no_grad():
        for index in range(start + 1, end + 1):
            node = graph.nodes[index]
            values[index] = node.op.interval(*(values[i] for i in node.inputs))
    return values[end][0].flatten(1).detach()


class _Program:
    """Variables and constraint rows, added block by block."""

    def __init__(self, low: np.ndarray, high: np.ndarray):
        self.var_low, self.var_high, self.integer = [low], [high], [np.zeros(len(low))]
        self.size = len(low)
        self.blocks: list[tuple[sp.csr_matrix, np.ndarray, np.ndarray]] = []

    def variables(self, low: np.ndarray, high: np.ndarray, integer: bool) -> np.ndarray:
        self.var_low.append(low)
        self.var_high.append(high)
        self.integer.append(np.full(len(low), float(integer)))
        self.size += len(low)
        return np.arange(self.size - len(low), self.size)

    def rows(self, matrix: sp.spmatrix, low: np.ndarray, high: np.ndarray) -> None:
        self.blocks.append((sp.csr_matrix(matrix), low, high))

    def selection(self, columns: np.ndarray) -> sp.csr_matrix:
        """(len(columns), size): row i picks variable columns[i] (−1: the constant 0)."""
        live = np.flatnonzero(columns >= 0)
        return sp.csr_matrix((np.ones(len(live)), (live, columns[live])), shape=(len(columns), self.size))

    def constraints(self) -> tuple[sp.csr_matrix, np.ndarray, np.ndarray]:
        rows = sp.vstack([sp.hstack([m, sp.csr_matrix((m.shape[0], self.size - m.shape[1]))]) if m.shape[1] < self.size
                          else m for m, _, _ in self.blocks]).tocsr()
        return rows, np.concatenate([b[1] for b in self.blocks]), np.concatenate([b[2] for b in self.blocks])


def encode(chain: list[Segment], bounds: dict[int, Interval]) -> Encoding:
    """The program of one image: ``bounds`` are its node bounds (batch of 1; bounds[0] the input box)."""
    low, high = (t[0].flatten().detach().cpu().double().numpy() for t in bounds[0])
    program = _Program(low, high)
    columns = np.arange(len(low))  # the variable of each neuron of the current layer (−1: the constant 0)
    for segment in chain[:-1]:
        pre = segment.weight @ program.selection(columns)
        l, u = (t[0].flatten().detach().cpu().double().numpy() for t in bounds[segment.output])
        columns = _relu(program, pre, segment.bias, l, u)
    rows, row_low, row_high = program.constraints()
    last = chain[-1]
    return Encoding(rows, row_low, row_high, np.concatenate(program.var_low), np.concatenate(program.var_high),
                    np.concatenate(program.integer), (last.weight @ program.selection(columns)).tocsr(), last.bias,
                    len(low))


def _relu(program: _Program, pre: sp.csr_matrix, bias: np.ndarray, l: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Encode relu(pre · v + bias) on [l, u]; returns each neuron's variable (−1 for the stable inactive)."""
    active, unstable = l >= 0, (l < 0) & (u > 0)
    columns = np.full(len(l), -1)
    live = active | unstable
    columns[live] = program.variables(np.zeros(int(live.sum())), np.maximum(u[live], 0), integer=False)
    binary = np.full(len(l), -1)
    binary[unstable] = program.variables(np.zeros(int(unstable.sum())), np.ones(int(unstable.sum())), integer=True)
    a, d = program.selection(columns), program.selection(binary)
    pre = sp.hstack([pre, sp.csr_matrix((pre.shape[0], program.size - pre.shape[1]))]).tocsr()
    program.rows((a - pre)[active], bias[active], bias[active])  # a = z
    program.rows((a - pre)[unstable], bias[unstable], np.full(int(unstable.sum()), np.inf))  # a ≥ z
    program.rows((a - sp.diags(u) @ d)[unstable], np.full(int(unstable.sum()), -np.inf),
                 np.zeros(int(unstable.sum())))  # a ≤ u·d
    program.rows((a - pre - sp.diags(l) @ d)[unstable], np.full(int(unstable.sum()), -np.inf),
                 bias[unstable] - l[unstable])  # a ≤ z − l·(1 − d)
    return columns


def search(encoding: Encoding, spec: np.ndarray, time_limit: float) -> Search:
    """Look for an input whose ``spec · logits`` is ≤ TOLERANCE (spec: one row over the classes)."""
    started = time.perf_counter()
    objective = np.asarray(spec @ encoding.logits).ravel()
    offset = float(spec @ encoding.logit_bias)
    constraints = [LinearConstraint(encoding.rows, encoding.low, encoding.high),
                   LinearConstraint(sp.csr_matrix(objective), -np.inf, TOLERANCE - offset)]
    # the margin as objective steers the search towards counter-examples; the huge gap stops at the first one
    with _quiet():
        result = milp(objective, constraints=constraints, integrality=encoding.integrality,
                      bounds=Bounds(encoding.var_low, encoding.var_high),
                      options={"time_limit": max(time_limit, 1e-3), "mip_rel_gap": 1e12})
    seconds = time.perf_counter() - started
    if result.status == 2:  # infeasible
        return Search("verified", None, seconds)
    if result.x is not None:
        return Search("candidate", result.x[:encoding.inputs], seconds)
    return Search("unknown", None, seconds)


def minimum(encoding: Encoding, spec: np.ndarray, time_limit: float = 60.0) -> float | None:
    """The exact minimum of ``spec · logits`` over the box (None if HiGHS does not finish in time)."""
    objective = np.asarray(spec @ encoding.logits).ravel()
    with _quiet():
        result = milp(objective, constraints=[LinearConstraint(encoding.rows, encoding.low, encoding.high)],
                      integrality=encoding.integrality, bounds=Bounds(encoding.var_low, encoding.var_high),
                      options={"time_limit": time_limit, "mip_rel_gap": 0.0})
    return None if result.status != 0 else float(result.fun + spec @ encoding.logit_bias)


@contextlib.contextmanager
def _quiet():
    """HiGHS prints some solver events to the process's stdout whatever its options; keep them off ours."""
    sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:  # no file descriptor 1
        yield
        return
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 1)
        try:
            yield
        finally:
            os.dup2(saved, 1)
            os.close(saved)

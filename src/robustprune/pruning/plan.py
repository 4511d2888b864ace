"""Selection — which weights to keep given scores, a target compression, a scope and per-layer floors — and the
PruningPlan record (JSON-serialisable, replayable on a fresh copy of the architecture).
"""
from __future__ import annotations

import base64
import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from robustprune.infra.errors import UserError
from robustprune.pruning.masks import apply_masks


@dataclass
class PruningPlan:
    """What a pruning step decided: masks by parameter path plus how they were chosen."""

    rule: str
    scope: str
    target_compression: float
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    options: dict = field(default_factory=dict)

    def summary(self) -> dict:
        """Per-parameter kept/total counts (no mask bits): for report metadata."""
        params = {path: {"kept": int(m.sum()), "total": m.numel()} for path, m in self.masks.items()}
        weights = [v for p, v in params.items() if p.endswith(".weight")]
        kept, total = sum(v["kept"] for v in weights), sum(v["total"] for v in weights)
        return {"rule": self.rule, "scope": self.scope, "target_compression": self.target_compression,
                "options": self.options, "masked_compression": total / kept if kept else None, "params": params}

    def to_json(self) -> dict:
        """The whole plan, masks as packed bits (base64) with their shapes."""
        return {"rule": self.rule, "scope": self.scope, "target_compression": self.target_compression,
                "options": self.options, "masks": {p: _encode(m) for p, m in self.masks.items()}}

    @classmethod
    def from_json(cls, data: dict) -> "PruningPlan":
        try:
            masks = {p: _decode(m) for p, m in data["masks"].items()}
            return cls(data["rule"], data["scope"], float(data["target_compression"]), masks, data.get("options", {}))
        except (KeyError, TypeError, ValueError) as err:
            raise UserError(f"malformed pruning plan ({type(err).__name__}: {err})") from None

    def apply(self, model: nn.Module) -> None:
        """Replay the plan: attach its masks to ``model`` (a fresh copy of the same architecture)."""
        try:
            apply_masks(model, self.masks)
        except (KeyError, ValueError) as err:
            raise UserError(f"pruning plan does not fit this model: {err}") from None


def _encode(mask: torch.Tensor) -> dict:
    bits = np.packbits(mask.detach().cpu().numpy().astype(bool).ravel())
    return {"shape": list(mask.shape), "bits": base64.b64encode(bits.tobytes()).decode("ascii")}


def _decode(data: dict) -> torch.Tensor:
    shape = [int(s) for s in data["shape"]]
    count = math.prod(shape)
    raw = np.frombuffer(base64.b64decode(data["bits"], validate=True), dtype=np.uint8)
    if raw.size != (count + 7) // 8:
        raise ValueError(f"mask of shape {shape} needs {(count + 7) // 8} bytes, got {raw.size}")
    bits = np.unpackbits(raw)[:count].astype(np.float32)
    return torch.from_numpy(bits).reshape(shape)


# ------------------------------------------------------------------------------------------------- selection


def _top_mask(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """0/1 mask keeping exactly ``keep`` of the highest scores (ties broken by position, deterministically)."""
    flat = scores.flatten()
    mask = torch.zeros_like(flat, dtype=torch.float32)
    if keep > 0:
        mask[torch.topk(flat, keep, sorted=False).indices] = 1.0
    return mask.view_as(scores)


def floors(sizes: dict[str, int], dense: set[str], min_density: float) -> dict[str, int]:
    """The fewest weights each layer keeps: all of a dense layer, else ceil(min_density · n), at least one."""
    return {n: size if n in dense else max(1, math.ceil(min_density * size)) for n, size in sizes.items()}


def keep_budget(sizes: dict[str, int], compression: float, low: dict[str, int]) -> int:
    """Total weights to keep; refuses a request the floors (dense layers, minimum density) make unreachable."""
    total = sum(sizes.values())
    budget = max(len(sizes), round(total / compression))
    if sum(low.values()) > budget:
        best = total / sum(low.values())
        raise UserError(f"compression {compression:g} is unreachable: the dense layers and minimum density keep "
                        f"{sum(low.values())} of {total} weights (at most {best:.2f}×)")
    return budget


def layer_counts(sizes: dict[str, int], compression: float, dense: set[str] = frozenset(),
                 min_density: float = 0.0) -> dict[str, int]:
    """Weights kept per layer for scope ``layer``: one rate r for every non-dense layer, floors respected.

    Without dense layers or binding floors r = 1/compression exactly; otherwise r is found by bisection so the total
    meets the budget (to within one weight per layer).
    """
    low = floors(sizes, dense, min_density)
    budget = keep_budget(sizes, compression, low)

    def counts(rate: float) -> dict[str, int]:
        return {n: s if n in dense else min(s, max(low[n], round(rate * s))) for n, s in sizes.items()}

    rest = sum(s for n, s in sizes.items() if n not in dense)
    rate = 1.0 / compression if not dense else (budget - sum(sizes[n] for n in dense)) / rest if rest else 1.0
    if abs(sum(counts(rate).values()) - budget) <= len(sizes):
        return counts(rate)
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if sum(counts(mid).values()) < budget else (lo, mid)
    return counts(hi)


def select_layerwise(scores: dict[str, torch.Tensor], compression: float, dense: set[str] = frozenset(),
                     min_density: float = 0.0) -> dict[str, torch.Tensor]:
    """The same rate in every (non-dense) layer, each layer keeping its own highest scores."""
    counts = layer_counts({n: s.numel() for n, s in scores.items()}, compression, dense, min_density)
    return {name: _top_mask(s, counts[name]) for name, s in scores.items()}


def select_global(scores: dict[str, torch.Tensor], compression: float, dense: set[str] = frozenset(),
                  min_density: float = 0.0) -> dict[str, torch.Tensor]:
    """One threshold over all layers, after each layer's floor (its own top weights) is reserved."""
    sizes = {n: s.numel() for n, s in scores.items()}
    low = floors(sizes, dense, min_density)
    budget = keep_budget(sizes, compression, low)
    reserved = {n: _top_mask(s, low[n]) for n, s in scores.items()}
    names = list(scores)
    flat = torch.cat([torch.where(reserved[n].bool(), -math.inf, scores[n].float()).flatten() for n in names])
    extra = _top_mask(flat, budget - sum(low.values()))
    out, start = {}, 0
    for name in names:
        n = sizes[name]
        out[name] = torch.clamp(reserved[name] + extra[start:start + n].view_as(scores[name]), max=1.0)
        start += n
    return out


def erk_counts(shapes: dict[str, tuple[int, ...]], compression: float, dense: set[str] = frozenset(),
               min_density: float = 0.0) -> dict[str, int]:
    """Weights kept per layer for scope ``erk``: Erdős–Rényi-Kernel (Evci et al. 2020, "Rigging the Lottery").

    A layer of shape (n_out, n_in, kh, kw) gets density ε·(n_out + n_in + kh + kw) / (n_out·n_in·kh·kw) (Linear:
    ε·(n_out + n_in) / (n_out·n_in)), i.e. it keeps ε·sum(shape) weights: small layers stay denser than large ones.
    One factor ε for all layers meets the budget, each layer clamped between its floor (dense layers, min_density)
    and dense; the integer counts then add up to the budget exactly.
    """
    sizes = {n: math.prod(shape) for n, shape in shapes.items()}
    low = floors(sizes, dense, min_density)
    budget = keep_budget(sizes, compression, low)
    return proportional_counts({n: float(sum(shape)) for n, shape in shapes.items()}, sizes, low, budget)


def proportional_counts(weight: dict[str, float], sizes: dict[str, int], low: dict[str, int],
                        budget: int) -> dict[str, int]:
    """Whole counts ∝ ``weight`` adding up to ``budget``: one factor for every layer, each layer clamped between
    its floor ``low`` and its size (ERK's weights are sum(shape); HARP's are its learned density · size)."""
    scale = _scale_to_budget(weight, low, sizes, budget)
    share = {n: min(sizes[n], max(low[n], scale * weight[n])) for n in sizes}
    return _round_to_total(share, sizes, budget)


def _scale_to_budget(weight: dict[str, float], low: dict[str, int], high: dict[str, int], budget: int) -> float:
    """The factor ε with Σ clamp(ε·weight, low, high) = budget.

    RigL's code finds ε by a loop: make the layer whose density would exceed 1 dense, recompute ε over the rest,
    repeat. With floors a layer can also be held up at its floor, and fixing one side can undo the other, so instead:
    the sum is continuous, non-decreasing and linear between the points where some layer reaches its floor or turns
    dense, hence ε is exact by interpolation between the two such points around the budget (RigL's fixed point when
    no floor binds).
    """
    def kept(scale: float) -> float:
        return sum(min(high[n], max(low[n], scale * weight[n])) for n in weight)

    below = 0.0
    for point in sorted({bound / weight[n] for n in weight if weight[n] > 0 for bound in (low[n], high[n])}):
        if kept(point) >= budget:
            gain = kept(point) - kept(below)
            return below + (budget - kept(below)) / gain * (point - below) if gain > 0 else point
        below = point
    return below  # not reached: at the last point every layer is dense, and keep_budget never asks for more


def _round_to_total(share: dict[str, float], sizes: dict[str, int], budget: int) -> dict[str, int]:
    """Whole counts from fractional shares summing to ``budget``: round down, then the largest remainders get +1."""
    counts = {n: math.floor(v) for n, v in share.items()}
    room = sorted((n for n in share if counts[n] < sizes[n]), key=lambda n: share[n] - counts[n], reverse=True)
    for name in room[:budget - sum(counts.values())]:
        counts[name] += 1
    return counts


def select_erk(scores: dict[str, torch.Tensor], compression: float, dense: set[str] = frozenset(),
               min_density: float = 0.0) -> dict[str, torch.Tensor]:
    """Erdős–Rényi-Kernel counts per layer (:func:`erk_counts`; score shapes are the weight shapes), each layer
    keeping its own highest scores."""
    counts = erk_counts({n: tuple(s.shape) for n, s in scores.items()}, compression, dense, min_density)
    return {name: _top_mask(s, counts[name]) for name, s in scores.items()}


SELECTORS = {"layer": select_layerwise, "global": select_global, "erk": select_erk}

#: Every scope name, in the selector table's order: the one list config and the command line offer.
SCOPES: tuple[str, ...] = tuple(SELECTORS)

#: The scopes that are a plain ranking — within each layer, or one across all layers. ERK also allots each layer a
#: count from its weight shape, which only single weights can follow: channel rules and HYDRA's top-k take these.
RANKED_SCOPES: tuple[str, ...] = ("layer", "global")

"""HARP: per-layer densities learned together with the importance scores (a non-uniform budget that trains).

Q. Zhao, C. Wressnegger, "Holistic Adversarially Robust Pruning", ICLR 2023. Like HYDRA (``pruning.hydra``) every
Conv/Linear weight gets a trainable score and the forward pass uses ``weight * topk(|score|)`` with the weights
frozen; unlike HYDRA each layer's keep count is not fixed but follows a trainable density

    density_l = floor_l + (1 - floor_l) · sigmoid(rate_l),    k_l = round(density_l · n_l),

with ``floor_l`` the layer's floor (``min_density``, at least one weight). The run's own objective trains both, plus
HARP's penalty on the network's total, ``penalty · max(0, D / d* - 1)`` where D is the kept fraction of all
prunable weights at the current densities and d* = 1 / compression: a layer's density grows while the objective
gains more from its pruned weights than the penalty charges for their share of the network.

The density gradient (HARP's ``GetSubnet`` passes the straight-through gradient on to the rate): raising density_l
by δ adds δ·n_l of the layer's pruned weights, so dL/d density_l is read as n_l times the mean straight-through
gradient over the pruned (selectable) entries — the first-order loss change of restoring them. HARP's code sums over
every entry; the kept entries do not change with the rate, so we leave them out.

:func:`finalize_rates` makes the total exact whatever the training did: the learned densities become shares
``density_l · n_l`` scaled by one factor to the requested budget, each layer clamped between its floor and dense
(``plan.proportional_counts``, the same rounding as ERK), and each layer keeps its highest |score|.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils import parametrize

from robustprune.pruning.hydra import ScoreMask, _key, _remove_score_mask, _same_key, _top_k, score_masks
from robustprune.pruning.masks import apply_masks, get_mask, prunable_layers
from robustprune.pruning.plan import proportional_counts

# Initial densities are clipped this far inside (floor, 1): sigmoid's inverse is infinite at the ends (HARP clips too).
_INIT_MARGIN = 1e-4


class _DensityStraightThrough(torch.autograd.Function):
    """Forward: the given 0/1 top-k mask. Backward: identity to |scores| (HYDRA's straight-through) and, to the
    density, n times the mean incoming gradient over the pruned selectable entries (see the module docstring)."""

    @staticmethod
    def forward(ctx, magnitudes: torch.Tensor, density: torch.Tensor, mask: torch.Tensor,  # noqa: ANN001
                allowed: torch.Tensor) -> torch.Tensor:
        pruned = (allowed & ~mask).to(magnitudes.dtype)
        # n / n_pruned per pruned entry, as a tensor: no host sync or boolean indexing on this per-step path
        ctx.save_for_backward(pruned * (pruned.numel() / pruned.sum().clamp(min=1)))
        return mask.to(magnitudes.dtype, copy=True)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN205
        (restore,) = ctx.saved_tensors
        return grad, (grad * restore).sum(), None, None


class RateMask(ScoreMask):
    """Parametrization ``weight → weight * topk_{k(density)}(|scores|)`` with trainable ``scores`` and ``rate``.

    ``floor`` is the lowest density the rate can reach (``min_density``, and at least one weight); ``density`` is
    the starting density. ``allowed`` marks positions a previous fixed mask left alive (never selected otherwise).
    """

    def __init__(self, weight: torch.Tensor, density: float, floor: float,
                 allowed: torch.Tensor | None = None) -> None:
        super().__init__(weight, k=None, allowed=allowed)
        self.floor = min(max(float(floor), 1.0 / weight.numel()), 1.0)
        start = (density - self.floor) / (1.0 - self.floor) if self.floor < 1 else 0.5
        start = min(max(start, _INIT_MARGIN), 1.0 - _INIT_MARGIN)
        self.rate = nn.Parameter(torch.tensor(math.log(start / (1.0 - start)), device=weight.device))

    def density(self) -> torch.Tensor:
        """The current density, differentiable in ``rate``."""
        return self.floor + (1.0 - self.floor) * torch.sigmoid(self.rate)

    def keep_count(self) -> int:
        n = self.scores.numel()
        return min(max(1, round(float(self.density().detach()) * n)), int(self.allowed.sum()))

    def keep_mask(self) -> torch.Tensor:
        key = (_key(self.scores), _key(self.rate))
        if self._cache is None or not all(map(_same_key, self._cache[0], key)):
            with torch.no_grad():
                self._cache = (key, _top_k(self.candidates(), self.keep_count()))
        return self._cache[1]

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        mask = _DensityStraightThrough.apply(self.scores.abs(), self.density(), self.keep_mask(), self.allowed)
        return weight * mask.to(weight.dtype)

    def extra_repr(self) -> str:
        return f"shape={tuple(self.scores.shape)}, density={float(self.density().detach()):.4f}, floor={self.floor:.4f}"


def rate_masks(model: nn.Module) -> dict[str, RateMask]:
    """Every attached :class:`RateMask` by parameter path (``"features.0.weight"``)."""
    return {path: m for path, m in score_masks(model).items() if isinstance(m, RateMask)}


def attach_rates(model: nn.Module, layers: dict[str, nn.Module], densities: dict[str, float],
                 floors: dict[str, float]) -> list[nn.Parameter]:
    """Start HARP's joint phase on ``layers`` (name → Conv/Linear), each from its starting density and floor.

    Every other parameter gets ``requires_grad=False``; returns the scores and rates (the trainable parameters).
    Existing fixed masks are respected: their pruned positions stay pruned.
    """
    if rate_masks(model):
        raise ValueError("HARP rates are already attached; call finalize_rates first")
    for p in model.parameters():
        p.requires_grad_(False)
    trained = []
    for name, module in layers.items():
        existing = get_mask(module)
        rate_mask = RateMask(module.weight, densities[name], floors[name], None if existing is None else existing != 0)
        parametrize.register_parametrization(module, "weight", rate_mask)
        trained += [rate_mask.scores, rate_mask.rate]
    return trained


def total_density(model: nn.Module) -> torch.Tensor:
    """Kept fraction of all prunable weights at the current (continuous) densities; differentiable in the rates.

    Layers without a rate count as dense (the layers kept dense by ``keep_first_dense`` / ``keep_last_dense``)."""
    rated = rate_masks(model)
    sizes = {f"{name}.weight": module.weight.numel() for name, module in prunable_layers(model)}
    dense = sum(n for path, n in sizes.items() if path not in rated)
    kept = sum(rm.density() * sizes[path] for path, rm in rated.items())
    return (kept + dense) / sum(sizes.values())


def budget_penalty(model: nn.Module, compression: float, weight: float) -> torch.Tensor:
    """HARP's penalty on the network's total: ``weight · max(0, D · compression - 1)`` (zero at or under budget)."""
    return weight * torch.relu(total_density(model) * compression - 1.0)


def learned_densities(model: nn.Module) -> dict[str, float]:
    """The current density of every rated layer, by layer name (what the plan records as HARP's choice)."""
    return {path.rpartition(".")[0]: float(rm.density().detach()) for path, rm in rate_masks(model).items()}


def finalize_rates(model: nn.Module, budget: int, sizes: dict[str, int],
                   low: dict[str, int]) -> dict[str, torch.Tensor]:
    """End HARP's phase: keep exactly ``budget`` prunable weights, shared by the learned densities.

    ``sizes`` and ``low`` (floors) cover every prunable layer by name; layers without a rate keep all their weights.
    The rate parametrizations are removed (the frozen weights restored), every parameter is trainable again and
    the masks are attached; returns them keyed ``"layer.weight"``.
    """
    rated = {path.rpartition(".")[0]: rm for path, rm in rate_masks(model).items()}
    if not rated:
        raise ValueError("no HARP rates attached to this model")
    shares = {n: (float(rated[n].density().detach()) * sizes[n] if n in rated else float(sizes[n])) for n in sizes}
    fixed = {n: sizes[n] for n in sizes if n not in rated}
    counts = proportional_counts(shares, sizes, {**low, **fixed}, budget)
    final = {f"{n}.weight": _top_k(rm.candidates(), min(counts[n], int(rm.allowed.sum()))).to(torch.float32)
             for n, rm in rated.items()}
    modules = dict(model.named_modules())
    for name in rated:
        _remove_score_mask(modules[name], "weight")  # a RateMask is a ScoreMask
    for p in model.parameters():
        p.requires_grad_(True)
    apply_masks(model, final)
    return final


__all__ = ["RateMask", "attach_rates", "budget_penalty", "finalize_rates", "learned_densities", "rate_masks",
           "total_density"]

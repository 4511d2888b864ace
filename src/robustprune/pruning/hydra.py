"""HYDRA learned importance scores: the one pruning rule that trains.

V. Sehwag, S. Wang, P. Mittal, S. Jana, "HYDRA: Pruning Adversarially Robust Neural Networks", NeurIPS 2020.
After pre-training, every Conv/Linear weight gets a real-valued score. The forward pass uses
``weight * topk(|score|)``; the backward pass treats the top-k as the identity (straight-through, HYDRA's
``GetSubnet``), so the *same robust objective* as pre-training trains the scores while weights, biases and norm
parameters stay frozen. Afterwards the mask is fixed from the final scores and the weights are fine-tuned.

This module only makes the scores trainable; the pipeline runs ``fit`` (``pruning`` never imports ``train``)::

    attach_scores(model, compression=10.0, scope="layer")   # weights frozen, only the scores have requires_grad
    fit(model, objective, train_split, score_cfg, ...)     # score phase: same objective object as pre-training
    finalize_scores(model)                                  # fixed masks (masks.ParamMask), all parameters trainable
    fit(model, objective, train_split, finetune_cfg, ...)  # fine-tune

Counts (exact, like ``plan.select_layerwise`` / ``select_global``): layer scope keeps
``max(1, round(n_l / compression))`` weights of each layer; global scope keeps ``max(1, round(N / compression))``
over all scored layers with one ranking of |score|. Ties are resolved by ``torch.topk`` on the flattened |score|
(deterministic for a given input and device, not necessarily the lowest index); the count stays exact.

Already-pruned weights (a ``ParamMask`` on the layer) get score 0 and are excluded from the top-k, so they are never
revived; if a layer (or the model, in global scope) has fewer survivors than the requested count, all survivors are
kept. The requested count is relative to *all* weights of the layer, as for ``prune``.

Masks are cached per step and recomputed when a score tensor changes (identity, storage and autograd version
counter). Every in-place update through the Parameter (optimisers, ``copy_`` under ``no_grad``, ``load_state_dict``)
or assignment to ``.data`` is seen; an in-place write *through* ``.data`` (``p.data.copy_(...)``) bypasses the
version counter — call :meth:`ScoreMask.clear_cache` after one.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize

from robustprune.infra.errors import UserError
from robustprune.pruning.masks import apply_masks, get_mask, prunable_layers
from robustprune.pruning.plan import RANKED_SCOPES

# (tensor, data_ptr, _version): the tensor itself is kept so its memory cannot be reused by another tensor while the
# key is alive (a bare pointer could match a different tensor after the first is freed).
_Key = tuple[torch.Tensor, int, int]


def keep_count(n: int, compression: float) -> int:
    """How many of ``n`` weights to keep at ``compression`` (= total / kept): max(1, round(n / compression))."""
    return max(1, round(n / compression))


def scaled_score_init(weight: torch.Tensor) -> torch.Tensor:
    """HYDRA's scaled score init: ``sqrt(6 / fan_in) * w / max|w|`` for one layer.

    Per layer it is a positive rescaling of ``w``, so at initialisation the layer-wise top-k of |score| is the
    magnitude top-k (HYDRA starts from magnitude pruning); the ``sqrt(6 / fan_in)`` factor sets the score scale (and,
    in global scope, the initial cross-layer allocation). ``fan_in`` is torch's: in_channels / groups · kh · kw for
    Conv2d (= in_channels · kh · kw without groups), in_features for Linear.
    """
    w = weight.detach()
    fan_in = w[0].numel()
    peak = w.abs().max()
    if peak == 0:  # an all-zero layer has no order to preserve
        return torch.zeros_like(w)
    return math.sqrt(6.0 / fan_in) * w / peak


def _top_k(magnitudes: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of exactly ``k`` largest entries (``torch.topk`` on the flattened tensor)."""
    flat = magnitudes.flatten()
    mask = torch.zeros(flat.shape, dtype=torch.bool, device=flat.device)
    if k > 0:
        mask[torch.topk(flat, k, sorted=False).indices] = True
    return mask.view_as(magnitudes)


def _key(t: torch.Tensor) -> _Key:
    return (t, t.data_ptr(), t._version)


def _same_key(a: _Key, b: _Key) -> bool:
    return a[0] is b[0] and a[1:] == b[1:]


class _StraightThroughMask(torch.autograd.Function):
    """HYDRA's ``GetSubnet``: forward = the given 0/1 top-k mask of |scores|; backward = identity (d mask/d|s| = 1)."""

    @staticmethod
    def forward(ctx, magnitudes: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        # A fresh tensor: returning the cached mask itself would let autograd rewrite the cache's grad_fn.
        return mask.to(magnitudes.dtype, copy=True)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # noqa: ANN001
        return grad, None


class ScoreMask(nn.Module):
    """Parametrization ``weight → weight * topk_mask(|scores|)`` with trainable ``scores`` (HYDRA, NeurIPS 2020).

    ``scores`` has the weight's shape and starts from :func:`scaled_score_init`. ``k`` is the layer's keep count
    (layer scope); in global scope ``k`` is None and the mask comes from the shared :class:`GlobalTopK`. ``allowed``
    marks the positions a previous fixed mask left alive; the others are never selected.
    """

    def __init__(self, weight: torch.Tensor, k: int | None, allowed: torch.Tensor | None = None) -> None:
        super().__init__()
        weight = weight.detach()
        if allowed is None:
            allowed = torch.ones_like(weight, dtype=torch.bool)
        self.register_buffer("allowed", allowed.to(device=weight.device, dtype=torch.bool).clone())
        self.scores = nn.Parameter(scaled_score_init(weight) * self.allowed)
        self.k = None if k is None else min(int(k), int(self.allowed.sum()))
        self.group: GlobalTopK | None = None  # plain attribute, not a submodule: see GlobalTopK
        self.group_index = -1
        self._cache: tuple[_Key, torch.Tensor] | None = None

    def candidates(self) -> torch.Tensor:
        """|score| where selectable, -inf where a previous mask pruned (so top-k never picks those)."""
        return self.scores.detach().abs().masked_fill(~self.allowed, float("-inf"))

    def keep_mask(self) -> torch.Tensor:
        """The current bool keep-mask (no gradient), recomputed only when the scores changed."""
        if self.group is not None:
            return self.group.mask_for(self)
        key = _key(self.scores)
        if self._cache is None or not _same_key(self._cache[0], key):
            with torch.no_grad():
                self._cache = (key, _top_k(self.candidates(), self.k))
        return self._cache[1]

    def clear_cache(self) -> None:
        """Forget the cached mask (needed only after writing the scores through ``.data``)."""
        self._cache = None
        if self.group is not None:
            self.group.clear_cache()

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        # abs() before the straight-through mask, as HYDRA: the score gradient is grad·w·sign(score).
        mask = _StraightThroughMask.apply(self.scores.abs(), self.keep_mask())
        return weight * mask.to(weight.dtype)

    def extra_repr(self) -> str:
        return f"shape={tuple(self.scores.shape)}, k={self.k if self.group is None else 'global'}"


class GlobalTopK:
    """One ranking of |score| over several :class:`ScoreMask` layers: exactly ``keep`` kept in total (global scope).

    The ranking is computed once per change of any member's scores (i.e. once per optimiser step, however many
    forward passes — attack steps included — happen in between) and each layer's forward takes its slice.
    Deliberately not an ``nn.Module``: as a submodule of each member it would make every layer own every other
    layer's scores (duplicated state-dict entries, recursion in ``named_modules``). ``copy.deepcopy`` of the model
    copies it consistently (its members are the copied layers).
    """

    def __init__(self, members: Sequence[ScoreMask], keep: int) -> None:
        self.members = list(members)
        self.keep = min(int(keep), sum(int(m.allowed.sum()) for m in self.members))
        for index, member in enumerate(self.members):
            member.group, member.group_index = self, index
        self._keys: list[_Key] | None = None
        self._masks: list[torch.Tensor] = []

    def mask_for(self, member: ScoreMask) -> torch.Tensor:
        keys = [_key(m.scores) for m in self.members]
        if self._keys is None or not all(map(_same_key, self._keys, keys)):
            self._refresh()
            self._keys = keys
        return self._masks[member.group_index]

    def clear_cache(self) -> None:
        self._keys = None

    @torch.no_grad()
    def _refresh(self) -> None:
        candidates = [m.candidates() for m in self.members]
        device = candidates[0].device
        chosen = _top_k(torch.cat([c.flatten().to(device) for c in candidates]), self.keep)
        parts = chosen.split([c.numel() for c in candidates])
        self._masks = [part.view_as(c).to(c.device) for part, c in zip(parts, candidates)]


def score_masks(model: nn.Module) -> dict[str, ScoreMask]:
    """Every attached :class:`ScoreMask` by parameter path (``"features.0.weight"``)."""
    found = {}
    for name, module in model.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        for param, chain in module.parametrizations.items():
            for p in chain:
                if isinstance(p, ScoreMask):
                    found[f"{name}.{param}" if name else param] = p
    return found


def _chosen_layers(model: nn.Module, layers: Sequence[str] | None) -> dict[str, nn.Module]:
    available = dict(prunable_layers(model))
    if layers is None:
        return available
    unknown = [name for name in layers if name not in available]
    if unknown:
        raise UserError(f"not prunable layers: {', '.join(unknown)} (choose from: {', '.join(available)})")
    return {name: available[name] for name in layers}


def _check_args(model: nn.Module, compression: float, scope: str) -> None:
    if not compression >= 1:
        raise UserError(f"compression must be >= 1, got {compression}")
    if scope not in RANKED_SCOPES:  # ERK's per-layer counts are set by the caller (attach_learned_scores)
        raise UserError(f"unknown scope {scope!r} (choose from: {', '.join(RANKED_SCOPES)})")
    if score_masks(model):
        raise ValueError("HYDRA scores are already attached; call finalize_scores first")


def attach_scores(
    model: nn.Module, compression: float, scope: str = "layer", layers: Sequence[str] | None = None
) -> list[nn.Parameter]:
    """Start HYDRA's score phase: attach a :class:`ScoreMask` to each chosen Conv/Linear weight, freeze the rest.

    Scores start from :func:`scaled_score_init`; every parameter of the model except the scores gets
    ``requires_grad=False`` (weights, biases, norm layers), so ``fit`` trains only the scores. ``layers`` names
    modules (default: all prunable layers). Existing fixed masks are respected: their pruned positions stay pruned.
    Returns the score parameters.
    """
    _check_args(model, compression, scope)
    chosen = _chosen_layers(model, layers)
    for p in model.parameters():  # before creating the scores, which must stay trainable
        p.requires_grad_(False)
    created = {}
    for name, module in chosen.items():
        existing = get_mask(module)
        allowed = None if existing is None else existing != 0
        k = keep_count(module.weight.numel(), compression) if scope == "layer" else None
        created[name] = ScoreMask(module.weight, k, allowed)
    if scope == "global":  # the group must be complete before registration evaluates the first forward
        total = sum(module.weight.numel() for module in chosen.values())
        GlobalTopK(list(created.values()), keep_count(total, compression))
    for name, score_mask in created.items():
        parametrize.register_parametrization(chosen[name], "weight", score_mask)
    return [score_mask.scores for score_mask in created.values()]


def _remove_score_mask(module: nn.Module, param: str) -> None:
    """Drop the ScoreMask from ``module.<param>``'s chain, keeping any other parametrization (a ParamMask)."""
    chain = getattr(module.parametrizations, param)
    if len(chain) == 1:
        parametrize.remove_parametrizations(module, param, leave_parametrized=False)  # back to the plain weight
        return
    index = next(i for i, p in enumerate(chain) if isinstance(p, ScoreMask))
    del chain[index]


def finalize_scores(model: nn.Module) -> dict[str, torch.Tensor]:
    """End HYDRA's score phase: fix the current top-k as masks and make every parameter trainable again.

    Removes the ScoreMask parametrizations (the frozen weights are restored unchanged), sets ``requires_grad=True``
    on *all* parameters, attaches the masks with :func:`masks.apply_masks` and returns them as float 0/1 tensors
    keyed ``"layer.weight"``. The model's outputs are exactly those of the score-masked model before the call.
    """
    attached = score_masks(model)
    if not attached:
        raise ValueError("no HYDRA scores attached to this model (call attach_scores first)")
    # All masks before any removal: in global scope each mask depends on every layer's scores.
    final = {path: sm.keep_mask().to(torch.float32).clone() for path, sm in attached.items()}
    modules = dict(model.named_modules())
    for path in attached:
        module_name, _, param = path.rpartition(".")
        _remove_score_mask(modules[module_name], param)
    for p in model.parameters():
        p.requires_grad_(True)
    apply_masks(model, final)
    return final


__all__ = ["GlobalTopK", "ScoreMask", "attach_scores", "finalize_scores", "keep_count", "scaled_score_init",
           "score_masks"]

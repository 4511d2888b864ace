"""Selection — which weights to keep given scores, a target compression and a scope — and the PruningPlan record."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class PruningPlan:
    """What a pruning step decided: per-layer masks plus how they were chosen (JSON summary via ``summary``)."""

    rule: str
    scope: str
    target_compression: float
    masks: dict[str, torch.Tensor] = field(default_factory=dict)

    def summary(self) -> dict:
        layers = {name: {"kept": int(m.sum()), "total": m.numel()} for name, m in self.masks.items()}
        kept = sum(v["kept"] for v in layers.values())
        total = sum(v["total"] for v in layers.values())
        return {"rule": self.rule, "scope": self.scope, "target_compression": self.target_compression,
                "achieved_compression": total / kept if kept else float("inf"), "layers": layers}


def _top_mask(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """0/1 mask keeping exactly ``keep`` of the highest scores (ties broken by position, deterministically)."""
    flat = scores.flatten()
    mask = torch.zeros_like(flat, dtype=torch.float32)
    if keep > 0:
        mask[torch.topk(flat, keep, sorted=False).indices] = 1.0
    return mask.view_as(scores)


def select_layerwise(scores: dict[str, torch.Tensor], compression: float) -> dict[str, torch.Tensor]:
    """The same rate in every layer: layer l keeps round(n_l / compression) weights, at least one."""
    return {name: _top_mask(s, max(1, round(s.numel() / compression))) for name, s in scores.items()}


def select_global(scores: dict[str, torch.Tensor], compression: float) -> dict[str, torch.Tensor]:
    """One threshold over all layers: keep the round(N / compression) highest scores of the whole network."""
    names = list(scores)
    flat = torch.cat([scores[n].flatten() for n in names])
    keep = max(1, round(flat.numel() / compression))
    mask = _top_mask(flat, keep)
    out, start = {}, 0
    for name in names:
        n = scores[name].numel()
        out[name] = mask[start:start + n].view_as(scores[name])
        start += n
    return out


SELECTORS = {"layer": select_layerwise, "global": select_global}

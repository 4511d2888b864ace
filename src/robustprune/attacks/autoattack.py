"""AutoAttack (Croce & Hein, 2020) through the ``pyautoattack`` package — used, not re-implemented.

The standard version runs APGD-CE, APGD-T (9 target classes), FAB-T and Square (5,000 queries) in sequence, each on
the points the earlier ones did not break; its parameters are the published ones. ``attacks`` picks a subset of
them in that order (e.g. the two APGD attacks on a CPU budget) while keeping the standard parameters. The package's
own checks (randomised or non-deterministic models, softmax outputs, Square breaking more than the gradient
attacks: signs of gradient masking) stay on and warn through Python's warnings. Optional extra:
``pip install 'robustprune[autoattack]'``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize

from robustprune.attacks.base import Attack, AttackSettings, Threat
from robustprune.infra.errors import UserError

STANDARD = ("apgd-ce", "apgd-t", "fab-t", "square")
_NORMS = {"linf": "Linf", "l2": "L2"}


def autoattack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, norm: str = "linf",
               attacks: Sequence[str] | None = None, seed: int = 0, batch_size: int = 500) -> torch.Tensor:
    """Adversarial points of standard AutoAttack (or the ``attacks`` subset of it); the model's mode is the
    caller's (evaluation sets eval mode)."""
    try:
        from pyautoattack import AutoAttack
    except ImportError:
        raise UserError("AutoAttack needs the optional extra: pip install 'robustprune[autoattack]'") from None
    if norm not in _NORMS:
        raise UserError(f"AutoAttack supports the threat norms {', '.join(_NORMS)}, not {norm!r}")
    chosen = list(STANDARD if not attacks else attacks)
    unknown = [a for a in chosen if a not in STANDARD]
    if unknown:
        raise UserError(f"unknown AutoAttack attack {unknown[0]!r} (standard ones: {', '.join(STANDARD)})")
    if eps == 0 or len(x) == 0:
        return x.detach().clone()
    runner = AutoAttack(model, eps=eps, norm=_NORMS[norm], device=x.device, seed=seed, version="standard")
    runner.verbose = False
    with torch.no_grad():
        classes = model(x[:1]).shape[1]
    if classes < 4 and "apgd-t" in chosen:
        raise UserError(f"AutoAttack's apgd-t (targeted DLR loss) needs at least 4 classes, the model has {classes}: "
                        "choose evaluate.autoattack_attacks without it")
    targets = max(1, min(9, classes - 1))  # the standard 9 target classes need 10 or more classes
    runner.apgd_targeted.n_target_classes = runner.fab.n_target_classes = targets
    runner.attacks_to_run = [a for a in STANDARD if a in chosen]
    logging.getLogger("auto-attack").setLevel(logging.WARNING)
    with parametrize.cached():  # fixed weights: the masked weights once, not at every pass
        x_adv, _ = runner.run_standard_evaluation(x, y, batch_size=batch_size)
    return x_adv.detach()


@dataclass(frozen=True)
class AutoAttackSettings(AttackSettings):
    attacks: tuple[str, ...] = ()  # a subset of apgd-ce, apgd-t, fab-t, square, in that order (empty: all, standard)

    def __post_init__(self) -> None:
        super().__post_init__()
        unknown = [a for a in self.attacks if a not in STANDARD]
        if unknown:
            raise UserError(f"attacks: unknown AutoAttack attack {unknown[0]!r} (standard ones: {', '.join(STANDARD)})")


class AutoAttackAttack(Attack):
    """``autoattack`` in evaluation: standard AutoAttack (or the ``attacks`` subset). It ends with Square, which needs
    no gradient, so it is also the gradient-masking check."""

    Settings = AutoAttackSettings
    gradient_free = True

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: Threat,
                 settings: AutoAttackSettings, *, seed: int = 0) -> torch.Tensor:
        return autoattack(model, x, y, threat.eps, threat.norm, settings.attacks, seed=seed)

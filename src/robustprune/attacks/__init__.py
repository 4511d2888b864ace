"""Attacks: threat-model geometry (``geometry``) apart from the attack loops (``pgd``: PGD and FGSM; ``autoattack``:
the pyautoattack adapter; ``square``: the gradient-free Square attack through pyautoattack). The loops are plain
functions, ``(model, x, y, eps, norm, ...)`` → points of the ε-ball ∩ [0, 1]; evaluation calls every attack through
one interface (``base.Attack``: ``attack(model, x, y, threat, settings, seed=)``) found in ``ATTACKS``.
"""
from robustprune.attacks.autoattack import AutoAttackAttack, autoattack
from robustprune.attacks.base import Attack, AttackSettings, Threat
from robustprune.attacks.geometry import BALLS, Ball, L2Ball, LinfBall
from robustprune.attacks.pgd import FGSM, LOSSES, PGD, attack_loss, default_step_size, fgsm, pgd, succeeded
from robustprune.attacks.square import Square, square
from robustprune.registry import Registry

#: Attack classes by name, for ``evaluate.attacks`` and ``robustprune list attacks``: one line per attack.
ATTACKS: Registry[type[Attack]] = Registry("attack")
ATTACKS.register("pgd")(PGD)
ATTACKS.register("fgsm")(FGSM)
ATTACKS.register("autoattack")(AutoAttackAttack)
ATTACKS.register("square")(Square)

__all__ = ["ATTACKS", "Attack", "AttackSettings", "BALLS", "Ball", "L2Ball", "LOSSES", "LinfBall", "Threat",
           "attack_loss", "autoattack", "default_step_size", "fgsm", "pgd", "square", "succeeded"]

"""Attacks: threat-model geometry (``geometry``) apart from the attack loops (``pgd``: PGD and FGSM; ``autoattack``:
the pyautoattack adapter; ``square``: the gradient-free Square attack through pyautoattack). Every attack takes
(model, x, y, eps, norm, ...) and returns points of the ε-ball ∩ [0, 1].
"""
from robustprune.attacks.autoattack import autoattack
from robustprune.attacks.geometry import BALLS, Ball, L2Ball, LinfBall
from robustprune.attacks.pgd import LOSSES, attack_loss, default_step_size, fgsm, pgd, succeeded
from robustprune.attacks.square import square
from robustprune.registry import Registry

#: Attacks by name, for ``robustprune list attacks`` and ``evaluate.attacks``.
ATTACKS: Registry = Registry("attack")
ATTACKS.register("pgd")(pgd)
ATTACKS.register("fgsm")(fgsm)
ATTACKS.register("autoattack")(autoattack)
ATTACKS.register("square")(square)

__all__ = ["ATTACKS", "BALLS", "Ball", "L2Ball", "LOSSES", "LinfBall", "attack_loss", "autoattack",
           "default_step_size", "fgsm", "pgd", "square", "succeeded"]

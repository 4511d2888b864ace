"""Attacks: threat-model geometry (``geometry``) apart from the attack loops (``pgd``)."""
from robustprune.attacks.geometry import BALLS, Ball, L2Ball, LinfBall
from robustprune.attacks.pgd import default_step_size, pgd

__all__ = ["BALLS", "Ball", "L2Ball", "LinfBall", "default_step_size", "pgd"]

from robustprune.registry import Registry

#: Attacks by name, for ``robustprune list attacks`` and evaluation settings.
ATTACKS: Registry = Registry("attack")
ATTACKS.register("pgd")(pgd)
__all__ += ["ATTACKS"]

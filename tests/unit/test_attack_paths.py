"""The optimised attack paths give the very adversarial examples of the straightforward loop (same seed).

``robustprune.attacks.pgd`` asks autograd for the input gradient only, computes masked weights once per attack
(``parametrize.cached``), precomputes the L∞ box, skips the selection pass of a single restart and never syncs with
the host. The reference below is the textbook loop: ``loss.backward()`` (weight gradients too), ``.item()`` every
step, the projection written out, a selection pass after every restart. Results must be equal bit for bit.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from robustprune.attacks import pgd
from robustprune.attacks.geometry import LinfBall
from robustprune.attacks.pgd import attack_loss, default_step_size, succeeded
from robustprune.models import create_model
from robustprune.objectives import create
from robustprune.pruning.masks import prunable_layers, set_mask


def reference_pgd(model, x, y, eps, steps, restarts=1, norm="linf", loss="ce", random_start=True):
    """The straightforward PGD loop, with the same random draws in the same order as the library's."""
    step_size = default_step_size(eps, steps)
    best_adv, best_value, best_done = None, None, None
    for _ in range(restarts):
        if norm == "linf":
            x_adv = x + torch.empty_like(x).uniform_(-eps, eps) if random_start else x.clone()
        else:
            direction = torch.randn_like(x)
            norms = direction.flatten(1).norm(dim=1).clamp_min(1e-12)
            radius = eps * torch.rand(x.shape[0], dtype=x.dtype) ** (1.0 / x[0].numel())
            x_adv = x + direction * (radius / norms).view(-1, 1, 1, 1) if random_start else x.clone()
        x_adv = project(x_adv, x, eps, norm)
        for _ in range(steps):
            x_adv = x_adv.detach().requires_grad_(True)
            value = attack_loss(model(x_adv), y, loss).sum()
            model.zero_grad()
            value.backward()  # weight gradients too: wasted, but the textbook loop does it
            value.item()  # a host sync, as progress printing would do
            grad = x_adv.grad
            if norm == "linf":
                moved = x_adv.detach() + step_size * grad.sign()
            else:
                length = grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
                moved = x_adv.detach() + step_size * grad / length
            x_adv = project(moved, x, eps, norm)
        x_adv = x_adv.detach()
        with torch.no_grad():
            logits = model(x_adv)
            value, done = attack_loss(logits, y, loss), succeeded(logits, y)
        if best_adv is None:
            best_adv, best_value, best_done = x_adv, value, done
            continue
        better = (done & ~best_done) | ((done == best_done) & (value > best_value))
        best_adv = torch.where(better.view(-1, 1, 1, 1), x_adv, best_adv)
        best_value = torch.where(better, value, best_value)
        best_done = best_done | done
    model.zero_grad()
    return best_adv


def project(x_adv, x, eps, norm):
    if norm == "linf":
        return torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0, 1)
    delta = x_adv - x
    factor = torch.clamp(eps / delta.flatten(1).norm(dim=1).clamp_min(1e-12), max=1.0)
    return (x + delta * factor.view(-1, 1, 1, 1)).clamp(0, 1)


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(3)
    return torch.rand(24, 1, 12, 12, generator=g), torch.randint(0, 10, (24,), generator=g)


def network(masked: bool):
    torch.manual_seed(0)
    model = create_model("cnn-small", (1, 12, 12), 10).eval()
    if masked:
        for _, module in prunable_layers(model):
            set_mask(module, (torch.rand_like(module.weight) > 0.7).float())
    return model


@pytest.mark.parametrize("masked", [False, True], ids=["dense", "masked"])
@pytest.mark.parametrize("norm,eps", [("linf", 0.3), ("l2", 1.5)])
@pytest.mark.parametrize("restarts", [1, 3])
@pytest.mark.parametrize("loss", ["ce", "margin"])
def test_pgd_equals_the_straightforward_loop(batch, masked, norm, eps, restarts, loss):
    x, y = batch
    model = network(masked)
    torch.manual_seed(7)
    fast = pgd(model, x, y, eps, steps=7, restarts=restarts, norm=norm, loss=loss)
    torch.manual_seed(7)
    slow = reference_pgd(model, x, y, eps, steps=7, restarts=restarts, norm=norm, loss=loss)
    assert torch.equal(fast, slow)
    assert not torch.equal(fast, x)  # the attack moved: the comparison is not of two clean copies


def test_pgd_training_points_equal_the_straightforward_loop(batch):
    x, y = batch
    model = network(masked=True).train()
    objective = create("pgd", eps=0.3, steps=10)
    torch.manual_seed(11)
    fast = objective.adversarial(model, x, y)
    assert model.training  # the caller's mode is restored
    torch.manual_seed(11)
    slow = reference_pgd(model.eval(), x, y, 0.3, steps=10)
    assert torch.equal(fast, slow)


def test_cached_masked_weights_are_released_after_the_attack(batch):
    """The attack's weight cache must not outlive it: a training step after it sees the updated weights."""
    x, y = batch
    model = network(masked=True)
    pgd(model, x, y, 0.3, steps=2)
    layer = next(module for _, module in prunable_layers(model))
    with torch.no_grad():
        layer.parametrizations.weight.original.mul_(2.0)
    assert torch.equal(layer.weight, layer.parametrizations.weight.original * layer.parametrizations.weight[0].mask)


def test_linf_projector_equals_project_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(64, 3, 8, 8, generator=g)
    x[:, 0] = 0.0  # at the domain's edges the box is cut by [0, 1]
    x[:, 1, :4] = 1.0
    candidate = x + (torch.rand(x.shape, generator=g) - 0.5)
    ball = LinfBall()
    for eps in (0.0, 1e-3, 0.03, 0.3, 2.0):
        assert torch.equal(ball.projector(x, eps)(candidate), ball.project(candidate, x, eps))


def test_pgd_works_inside_no_grad(batch):
    """Evaluation code may call the attack under ``torch.no_grad()``: the attack turns gradients back on."""
    x, y = batch
    model = network(masked=False)
    torch.manual_seed(5)
    expected = pgd(model, x, y, 0.3, steps=3)
    torch.manual_seed(5)
    with torch.no_grad():
        got = pgd(model, x, y, 0.3, steps=3)
    assert torch.equal(got, expected)
    assert F.cross_entropy(model(got), y) > F.cross_entropy(model(x), y)

import pytest
import torch
import torch.nn.functional as F

from robustprune.attacks import BALLS, pgd

from conftest import fit_full_batch


@pytest.fixture
def trained(tiny_data, tiny_mlp):
    return fit_full_batch(tiny_mlp, tiny_data)


@pytest.mark.parametrize("norm", BALLS.names())
def test_pgd_points_stay_in_the_ball_and_the_domain(trained, tiny_data, norm):
    x, y = tiny_data.test.x, tiny_data.test.y
    eps = 0.3 if norm == "linf" else 1.0
    x_adv = pgd(trained, x, y, eps=eps, steps=10, restarts=2, norm=norm)
    assert x_adv.shape == x.shape
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    delta = (x_adv - x).flatten(1)
    size = delta.abs().max(1).values if norm == "linf" else delta.norm(dim=1)
    assert torch.all(size <= eps + 1e-5)


def test_pgd_increases_the_loss_and_breaks_an_undefended_model(trained, tiny_data):
    x, y = tiny_data.test.x, tiny_data.test.y
    clean_loss = F.cross_entropy(trained(x), y, reduction="none")
    x_adv = pgd(trained, x, y, eps=0.5, steps=20, random_start=False)
    adv_loss = F.cross_entropy(trained(x_adv), y, reduction="none")
    assert torch.all(adv_loss >= clean_loss - 1e-6)
    clean_acc = (trained(x).argmax(1) == y).float().mean()
    adv_acc = (trained(x_adv).argmax(1) == y).float().mean()
    assert clean_acc > 0.9 and adv_acc < 0.2


def test_restarts_never_weaken_the_attack(trained, tiny_data):
    x, y = tiny_data.test.x, tiny_data.test.y
    torch.manual_seed(1)
    one = pgd(trained, x, y, eps=0.1, steps=3, restarts=1)
    torch.manual_seed(1)
    many = pgd(trained, x, y, eps=0.1, steps=3, restarts=4)  # its first restart is the same run as `one`
    fooled_one = trained(one).argmax(1) != y
    fooled_many = trained(many).argmax(1) != y
    assert torch.all(fooled_many | ~fooled_one)
    loss_one = F.cross_entropy(trained(one), y, reduction="none")
    loss_many = F.cross_entropy(trained(many), y, reduction="none")
    assert torch.all((loss_many >= loss_one - 1e-6) | fooled_many)


def test_zero_radius_or_zero_steps_returns_the_clean_input(trained, tiny_data):
    x, y = tiny_data.test.x, tiny_data.test.y
    assert torch.equal(pgd(trained, x, y, eps=0.0, steps=5), x)
    assert torch.equal(pgd(trained, x, y, eps=0.3, steps=0), x)


def test_attack_leaves_weight_gradients_untouched(trained, tiny_data):
    for p in trained.parameters():
        p.grad = None
    pgd(trained, tiny_data.test.x, tiny_data.test.y, eps=0.3, steps=3)
    assert all(p.grad is None for p in trained.parameters())

"""TRADES, MART and fast (FGSM + random start) adversarial training: contracts, geometry, formulas, and that each
one actually buys robustness on the embedded digits data."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

import robustprune.objectives.fast as fast_module
import robustprune.objectives.mart as mart_module
import robustprune.objectives.pgd as pgd_objective_module
import robustprune.objectives.trades as trades_module
from robustprune.attacks import default_step_size, pgd
from robustprune.config import TrainConfig
from robustprune.data import load_dataset
from robustprune.infra.errors import UserError
from robustprune.models import create_model
from robustprune.objectives import OBJECTIVES, create
from robustprune.train import FitOptions, fit

pytestmark = pytest.mark.usefixtures("one_thread")

NAMES = ["trades", "mart", "fast"]

# The radius and norm every objective takes, and 3 attack steps for the objectives that attack (fast tests).
COMMON = dict(eps=0.1, norm="linf")


def settings(name: str, **changes) -> dict:
    """``create`` keywords for ``name``: the common ones, 3 steps where it declares steps, then ``changes``."""
    own = {f.name for f in dataclasses.fields(OBJECTIVES.get(name).Settings)}
    return {**COMMON, **({"steps": 3} if "steps" in own else {}), **changes}


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture
def batch(digits):
    return digits.train.x[:32], digits.train.y[:32]


@pytest.fixture
def model():
    torch.manual_seed(0)
    return create_model("mlp", (1, 8, 8), 10)


def record_inputs(model) -> list[tuple[torch.Tensor, bool]]:
    """Every input the model sees from now on, with the mode it was in."""
    seen: list[tuple[torch.Tensor, bool]] = []
    model.register_forward_pre_hook(lambda module, args: seen.append((args[0].detach().clone(), module.training)))
    return seen


def distances(points: torch.Tensor, x: torch.Tensor, norm: str) -> torch.Tensor:
    delta = (points - x).flatten(1)
    return delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)


# --- construction -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_registered_and_built_from_its_own_settings(name):
    assert name in OBJECTIVES
    objective = create(name, **settings(name))
    assert objective.name == name and objective.eps == 0.1 and objective.norm == "linf"
    described = objective.describe()
    assert json.loads(json.dumps(described)) == described and described["name"] == name


def test_settings_reach_the_objectives():
    trades = create("trades", **settings("trades", trades_beta=2.5, steps=7, step_size=0.02))
    assert (trades.trades_beta, trades.steps, trades.step_size) == (2.5, 7, 0.02)
    assert trades.describe()["trades_beta"] == 2.5
    mart = create("mart", **settings("mart", mart_lambda=3.0, random_start=False, norm="l2"))
    assert (mart.mart_lambda, mart.random_start, mart.norm) == (3.0, False, "l2")
    assert create("fast", **settings("fast", step_size=0.2)).step_size == 0.2


@pytest.mark.parametrize("name, foreign", [("trades", "mart_lambda"), ("mart", "trades_beta"), ("fast", "steps")])
def test_a_setting_of_another_objective_is_refused_with_a_hint(name, foreign):
    with pytest.raises(UserError, match=f"objective {name} has no setting '{foreign}'"):
        create(name, **settings(name, **{foreign: 1}))
    with pytest.raises(UserError, match="did you mean 'steps'"):
        create("pgd", stepz=3)


@pytest.mark.parametrize("name,key", [("trades", "trades_beta"), ("mart", "mart_lambda")])
def test_negative_weights_are_rejected(name, key):
    with pytest.raises(ValueError, match=key):
        create(name, **settings(name, **{key: -1.0}))


@pytest.mark.parametrize("name", NAMES)
def test_unknown_norm_is_rejected_at_construction(name):
    with pytest.raises(UserError):
        create(name, **settings(name, norm="l3"))


# --- ε = 0 and the degenerate weights ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_at_eps_zero_each_is_plain_cross_entropy(name, model, batch):
    x, y = batch
    expected = F.cross_entropy(model(x), y)
    seen = record_inputs(model)
    loss, logits = create(name, **settings(name, eps=0.0)).forward(model, x, y)
    assert len(seen) == 1  # no attack pass
    assert torch.equal(loss, expected) and torch.equal(logits, model(x))
    warming = create(name, **settings(name, eps=0.3))
    warming.set_eps_scale(0.0)  # the start of an ε ramp
    assert torch.equal(warming.loss(model, x, y), expected)


def test_trades_with_beta_zero_is_cross_entropy(model, batch):
    x, y = batch
    assert torch.equal(create("trades", **settings("trades", eps=0.2, trades_beta=0.0)).loss(model, x, y),
                       F.cross_entropy(model(x), y))


def test_trades_adds_a_nonnegative_kl_and_returns_clean_logits(model, batch):
    x, y = batch
    loss, logits = create("trades", **settings("trades", eps=0.2)).forward(model, x, y)
    assert torch.equal(logits, model(x))
    assert loss > F.cross_entropy(logits, y)
    p = F.softmax(torch.randn(16, 10), dim=1)
    assert trades_module.kl_batchmean(torch.randn(16, 10), p) >= 0
    assert trades_module.kl_batchmean(p.log(), p).abs() < 1e-6


def test_trades_attack_increases_the_kl(model, batch):
    x, _ = batch
    model.eval()
    torch.manual_seed(0)
    with torch.no_grad():
        p = F.softmax(model(x), dim=1)
        start_kl = trades_module.kl_batchmean(model(x + trades_module.START_SD * torch.randn_like(x)), p)
        random_kl = trades_module.kl_batchmean(model((x + torch.empty_like(x).uniform_(-0.2, 0.2)).clamp(0, 1)), p)
    x_adv = trades_module.trades_adversary(model, x, eps=0.2, steps=5, step_size=default_step_size(0.2, 5))
    with torch.no_grad():
        attacked_kl = trades_module.kl_batchmean(model(x_adv), p)
    assert attacked_kl > 5 * random_kl and random_kl > start_kl > -1e-6


def reference_mart_loss(logits_clean, logits_adv, y, beta):
    """The loss of github.com/YisenWang/MART ``mart.py``, verbatim apart from names."""
    adv_probs = F.softmax(logits_adv, dim=1)
    tmp1 = torch.argsort(adv_probs, dim=1)[:, -2:]
    new_y = torch.where(tmp1[:, -1] == y, tmp1[:, -2], tmp1[:, -1])
    loss_adv = F.cross_entropy(logits_adv, y) + F.nll_loss(torch.log(1.0001 - adv_probs + 1e-12), new_y)
    nat_probs = F.softmax(logits_clean, dim=1)
    true_probs = torch.gather(nat_probs, 1, y.unsqueeze(1).long()).squeeze()
    kl = torch.nn.KLDivLoss(reduction="none")
    loss_robust = (1.0 / len(y)) * torch.sum(
        torch.sum(kl(torch.log(adv_probs + 1e-12), nat_probs), dim=1) * (1.0000001 - true_probs))
    return loss_adv + float(beta) * loss_robust


@pytest.mark.parametrize("mart_lambda", [0.0, 5.0])
def test_mart_matches_the_reference_loss_on_its_pgd_point(model, batch, mart_lambda):
    x, y = batch
    objective = create("mart", **settings("mart", eps=0.2, random_start=False, mart_lambda=mart_lambda))
    loss, logits = objective.forward(model, x, y)
    x_adv = pgd(model.eval(), x, y, 0.2, 3, default_step_size(0.2, 3), random_start=False)
    model.train()
    logits_adv = model(x_adv)
    assert torch.allclose(logits, logits_adv)
    assert torch.allclose(loss, reference_mart_loss(model(x), logits_adv, y, mart_lambda), atol=1e-6)
    if mart_lambda == 0:  # the boosted CE alone: CE − log(1 − max_{k≠y} p_k(x'))
        probs = F.softmax(logits_adv, dim=1)
        runner_up = probs.scatter(1, y.unsqueeze(1), 0.0).amax(1)
        assert torch.allclose(loss, F.cross_entropy(logits_adv, y) - torch.log1p(-runner_up).mean(), atol=1e-4)


def test_mart_is_finite_on_confident_logits():
    y = torch.tensor([0, 1])
    huge = torch.tensor([[0.0, 80.0, 0.0], [0.0, 80.0, 0.0]], requires_grad=True)
    loss = mart_module.boosted_cross_entropy(huge, y) + mart_module.mart_regulariser(huge * 0.5, huge, y)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(huge.grad).all()


def test_fast_step_size_defaults_to_one_and_a_quarter_eps_and_follows_the_warmup():
    objective = create("fast", **settings("fast", eps=0.2))
    assert objective.current_step_size == pytest.approx(0.25) and objective.describe()["step_size"] == 0.25
    objective.set_eps_scale(0.5)
    assert objective.current_step_size == pytest.approx(0.125)
    explicit = create("fast", **settings("fast", eps=0.2, step_size=0.1))
    explicit.set_eps_scale(0.5)
    assert explicit.current_step_size == pytest.approx(0.05)


# (objective, attack function it calls, positions of ε and of the step size in that call)
ATTACK_CALLS = [("trades", "trades_adversary", 2, 4), ("mart", "pgd", 3, 5), ("fast", "fgsm_random_start", 3, 4)]


@pytest.mark.parametrize("name,attribute,eps_at,step_at", ATTACK_CALLS)
@pytest.mark.parametrize("step_size", [None, 0.04])
def test_the_step_size_is_scaled_with_the_eps_warmup(monkeypatch, model, batch, name, attribute, eps_at, step_at,
                                                     step_size):
    module = {"trades": trades_module, "mart": pgd_objective_module, "fast": fast_module}[name]  # mart: PGD's attack
    calls = []
    original = getattr(module, attribute)

    def spy(*args, **kwargs):
        calls.append((args[eps_at], args[step_at]))
        return original(*args, **kwargs)

    monkeypatch.setattr(module, attribute, spy)
    objective = create(name, **settings(name, eps=0.2, step_size=step_size))
    objective.set_eps_scale(0.5)
    objective.forward(model, *batch)
    default = 1.25 * 0.1 if name == "fast" else default_step_size(0.1, 3)
    assert calls == [(pytest.approx(0.1), pytest.approx(default if step_size is None else 0.02))]


# --- geometry, modes, gradients ----------------------------------------------------------------------------------

@pytest.mark.parametrize("norm,eps", [("linf", 0.15), ("l2", 1.0)])
@pytest.mark.parametrize("name", NAMES)
def test_every_point_the_model_sees_is_in_the_ball_and_the_domain(name, norm, eps, model, batch):
    x, y = batch
    seen = record_inputs(model)
    torch.manual_seed(0)
    create(name, **settings(name, eps=eps, norm=norm)).forward(model, x, y)
    assert len(seen) >= 2
    for points, _ in seen:
        assert points.min() >= 0 and points.max() <= 1
        assert torch.all(distances(points, x, norm) <= eps * (1 + 1e-5))
    # the attacks do move: the point trained on is well away from x for most samples
    trained_on = seen[-2][0] if name == "mart" else seen[-1][0]  # mart's outer pass: f(x'), then f(x)
    assert (distances(trained_on, x, norm) > 0.5 * eps).float().mean() > 0.5


@pytest.mark.parametrize("norm,eps", [("linf", 0.15), ("l2", 1.0)])
def test_the_attack_helpers_stay_in_the_ball_and_the_domain(norm, eps, model, batch):
    x, y = batch
    model.eval()
    for x_adv in (trades_module.trades_adversary(model, x, eps, 3, default_step_size(eps, 3), norm),
                  fast_module.fgsm_random_start(model, x, y, eps, 1.25 * eps, norm)):
        assert x_adv.shape == x.shape and not x_adv.requires_grad
        assert x_adv.min() >= 0 and x_adv.max() <= 1
        assert torch.all(distances(x_adv, x, norm) <= eps * (1 + 1e-5))


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("name", NAMES)
def test_attack_in_eval_mode_and_the_mode_is_restored(name, training, model, batch):
    x, y = batch
    model.train(training)
    seen = record_inputs(model)
    create(name, **settings(name, eps=0.1)).forward(model, x, y)
    assert model.training is training
    modes = [mode for _, mode in seen]
    outer = 2 if name in ("trades", "mart") else 1  # trades: f(x), f(x'); mart: f(x'), f(x); fast: f(x')
    assert not any(modes[:-outer]) and all(mode is training for mode in modes[-outer:])


@pytest.mark.parametrize("name", NAMES)
def test_gradients_reach_every_weight_and_not_the_input(name, model, batch):
    x, y = batch
    x_before = x.clone()
    loss, logits = create(name, **settings(name, eps=0.1)).forward(model.train(), x, y)
    assert loss.ndim == 0 and torch.isfinite(loss) and logits.shape == (32, 10)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    assert torch.equal(x, x_before) and x.grad is None


# --- they buy robustness -----------------------------------------------------------------------------------------

def test_each_objective_beats_benign_training_under_pgd(digits):
    """4 epochs on digits at L∞ ε = 0.15: benign MLPs keep ~20 % PGD accuracy, robust objectives > 50 %."""
    eps = 0.15

    def pgd_accuracy(name: str) -> float:
        torch.manual_seed(0)
        net = create_model("mlp", (1, 8, 8), 10)
        objective = create(name) if name == "benign" else create(name, **settings(name, eps=eps))
        fit(net, objective, digits.train, TrainConfig(epochs=4, lr=3e-3), FitOptions(batch_size=64, quiet=True,
            generator=torch.Generator().manual_seed(0)))
        net.eval()
        torch.manual_seed(1)
        x_adv = pgd(net, digits.test.x, digits.test.y, eps, steps=10)
        with torch.no_grad():
            return (net(x_adv).argmax(1) == digits.test.y).float().mean().item()

    benign = pgd_accuracy("benign")
    robust = {name: pgd_accuracy(name) for name in NAMES}
    print(f"PGD-10 accuracy at eps={eps}: benign {benign:.3f}, " + ", ".join(f"{k} {v:.3f}" for k, v in robust.items()))
    assert benign < 0.35
    for name, accuracy in robust.items():
        assert accuracy > benign + 0.2, (name, accuracy, benign)

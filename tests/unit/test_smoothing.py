"""Randomized smoothing (Cohen et al. 2019): CERTIFY / PREDICT on models whose smoothed classifier is known exactly,
and the ``smooth`` (Gaussian noise augmentation) objective."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from scipy.stats import binom, norm
from torch import nn

import robustprune.objectives.smooth  # noqa: F401  (registers "smooth")
from robustprune.infra.errors import UserError
from robustprune.objectives import OBJECTIVES, create
from robustprune.smoothing import (SmoothingResult, certified_accuracy, certify, lower_confidence_bound,
                                   predict)

W = torch.tensor([0.6, 0.8])  # unit normal of the decision boundary w·x = B
B = 0.3


class HalfPlane(nn.Module):
    """f(x) = 1[w·x > b] on 2-D inputs, ‖w‖ = 1. Its smoothed classifier is the same half-plane, with
    p_A(x) = Φ(|w·x − b| / σ) exactly, so g's true L2 robustness radius at x is the distance |w·x − b|."""

    def __init__(self) -> None:
        super().__init__()
        self.modes: list[tuple[bool, bool]] = []  # (training, grad enabled) seen by each forward
        self.rows: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.modes.append((self.training, torch.is_grad_enabled()))
        self.rows.append(len(x))
        s = x @ W - B
        return torch.stack([-s, s], 1)


def at_distance(d: float, along: float = 0.0) -> torch.Tensor:
    """The point at signed distance d from the boundary (positive: class 1 side), shifted ``along`` it."""
    foot = W * B + along * torch.tensor([-0.8, 0.6])
    return foot + d * W


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def radius_for(k: int, n: int, alpha: float, sigma: float) -> float:
    p = lower_confidence_bound(k, n, alpha)
    return sigma * norm.ppf(p) if p >= 0.5 else 0.0


@pytest.mark.parametrize("d", [0.1, 0.25, 0.5, -0.3])
def test_certify_is_sound_and_matches_the_exact_probability(d):
    sigma, n, alpha = 0.25, 1000, 0.001
    result = certify(HalfPlane(), at_distance(d)[None], sigma, n0=100, n=n, alpha=alpha, generator=seeded())
    assert result.prediction.tolist() == [1 if d > 0 else 0]
    radius = float(result.radius[0])
    assert 0 < radius <= abs(d)  # soundness: never beyond g's true radius
    # k ~ Binomial(n, Φ(|d|/σ)): the radius lies between those of its 1e-6 and 1 − 1e-6 quantiles
    p = norm.cdf(abs(d) / sigma)
    low, high = (radius_for(int(binom.ppf(q, n, p)), n, alpha, sigma) for q in (1e-6, 1 - 1e-6))
    assert low <= radius <= high
    # the Clopper–Pearson slack at this n is small: the certificate is close to the true radius
    assert radius >= abs(d) - 0.1


def test_certified_radius_never_exceeds_the_true_distance_on_many_points():
    g = seeded(1)
    d = torch.rand(40, generator=g) * 1.2 - 0.6
    x = torch.stack([at_distance(float(di), float(a)) for di, a in zip(d, torch.randn(40, generator=g))])
    result = certify(HalfPlane(), x, 0.25, n0=50, n=500, alpha=0.001, generator=seeded(2))
    certified = result.prediction >= 0
    assert certified.sum() >= 30
    assert torch.all(result.prediction[certified] == (d[certified] > 0).long())
    assert torch.all(result.radius <= d.abs())
    assert torch.all(result.radius[~certified] == 0)


def test_radius_grows_away_from_the_boundary_and_abstains_on_it():
    distances = [0.0, 0.1, 0.2, 0.4, 1.5]
    x = torch.stack([at_distance(d) for d in distances])
    result = certify(HalfPlane(), x, 0.25, n0=100, n=1000, alpha=0.001, generator=seeded())
    assert result.prediction[0] == -1 and result.radius[0] == 0
    radii = result.radius[1:].tolist()
    assert result.prediction[1:].tolist() == [1] * 4 and radii == sorted(radii) and radii[0] < radii[-1]
    # far away every sample agrees: radius = σ Φ⁻¹(α^(1/n)), the largest n samples can certify
    assert radii[-1] == pytest.approx(0.25 * norm.ppf(0.001 ** (1 / 1000)), rel=1e-5)


def test_points_on_the_boundary_abstain():
    x = torch.stack([at_distance(0.0, along) for along in (-1.0, -0.3, 0.0, 0.4, 2.0)])
    result = certify(HalfPlane(), x, 0.5, n0=100, n=1000, alpha=0.001, generator=seeded())
    assert result.prediction.tolist() == [-1] * 5 and result.radius.tolist() == [0.0] * 5
    assert predict(HalfPlane(), x, 0.5, n=1000, alpha=0.001, generator=seeded()).tolist() == [-1] * 5


class RandomLogits(nn.Module):
    """Ignores its input: a uniformly random class among 10, so p_A ≈ 0.1 and CERTIFY must abstain."""

    def __init__(self) -> None:
        super().__init__()
        self.g = seeded(7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.randn(len(x), 10, generator=self.g)


def test_abstains_when_the_lower_bound_is_below_one_half():
    x = torch.rand(5, 1, 4, 4, generator=seeded())
    result = certify(RandomLogits(), x, 0.25, n0=100, n=1000, alpha=0.001, generator=seeded())
    assert result.prediction.tolist() == [-1] * 5 and result.radius.tolist() == [0.0] * 5
    assert predict(RandomLogits(), x, 0.25, n=1000, alpha=0.001, generator=seeded()).tolist() == [-1] * 5


class Alternating(nn.Module):
    """Class 0 / 1 for even / odd rows of each batch: an exact tie between the two top classes."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        odd = torch.arange(len(x)) % 2
        return F.one_hot(odd, 3).float()


def test_predict_abstains_on_a_tie_and_answers_when_confident():
    x = torch.zeros(3, 2)
    assert predict(Alternating(), x, 0.25, n=200, batch_size=50, generator=seeded()).tolist() == [-1] * 3
    far = torch.stack([at_distance(1.0), at_distance(-1.0)])
    assert predict(HalfPlane(), far, 0.25, n=100, alpha=0.001, generator=seeded()).tolist() == [1, 0]
    # p = Φ(0.4) ≈ 0.66: n = 1000 samples separate the classes at α = 0.001, n = 20 do not
    near = at_distance(0.1)[None]
    assert predict(HalfPlane(), near, 0.25, n=1000, alpha=0.001, generator=seeded()).tolist() == [1]
    assert predict(HalfPlane(), near, 0.25, n=20, alpha=0.001, generator=seeded()).tolist() == [-1]


def test_seeded_generator_reproduces_results():
    x = torch.stack([at_distance(0.1), at_distance(-0.2), at_distance(0.02)])

    def run(seed):
        return certify(HalfPlane(), x, 0.25, n0=20, n=300, alpha=0.01, batch_size=64, generator=seeded(seed))

    a, b = run(3), run(3)
    assert torch.equal(a.prediction, b.prediction) and torch.equal(a.radius, b.radius)
    assert a.radius.dtype.is_floating_point and a.prediction.dtype == torch.long
    assert torch.equal(predict(HalfPlane(), x, 0.25, n=300, generator=seeded(4)),
                       predict(HalfPlane(), x, 0.25, n=300, generator=seeded(4)))


@pytest.mark.parametrize("training", [True, False])
def test_model_sampled_in_eval_mode_without_grad_and_mode_restored(training):
    model = HalfPlane().train(training)
    certify(model, at_distance(0.3)[None], 0.25, n0=10, n=50, generator=seeded())
    predict(model, at_distance(0.3)[None], 0.25, n=50, generator=seeded())
    assert model.training is training
    assert set(model.modes) == {(False, False)}


def test_samples_in_batches_of_at_most_batch_size():
    model = HalfPlane()
    certify(model, torch.stack([at_distance(0.3), at_distance(0.4)]), 0.25, n0=10, n=100, batch_size=32,
            generator=seeded())
    assert max(model.rows) == 32 and sum(model.rows) == 2 * (10 + 100)


def test_noise_is_gaussian_with_sd_sigma_and_not_clipped():
    seen = []

    class Recorder(nn.Module):
        def forward(self, x):
            seen.append(x.clone())
            return torch.zeros(len(x), 2)

    x = torch.full((1, 1, 8, 8), 0.5)
    certify(Recorder(), x, 0.5, n0=1, n=200, generator=seeded())
    noise = torch.cat(seen) - 0.5
    assert noise.std().item() == pytest.approx(0.5, rel=0.05) and abs(noise.mean().item()) < 0.02
    assert noise.min() < -0.5 and noise.max() > 0.5  # inputs leave [0, 1]: no clipping


def test_certified_accuracy_counts_correct_predictions_with_radius_at_least_r():
    result = SmoothingResult(torch.tensor([0, 1, -1, 2, 3]), torch.tensor([0.5, 0.1, 0.0, 0.3, 0.9]))
    y = torch.tensor([0, 1, 2, 1, 3])
    assert certified_accuracy(result, y, 0.0) == pytest.approx(3 / 5)  # abstention (radius 0) does not count
    assert certified_accuracy(result, y, 0.1) == pytest.approx(3 / 5)  # radius >= r
    assert certified_accuracy(result, y, 0.2) == pytest.approx(2 / 5)
    assert certified_accuracy(result, y, 0.9) == pytest.approx(1 / 5)
    assert certified_accuracy(result, y, 1.0) == 0.0
    assert certified_accuracy(SmoothingResult(torch.zeros(0, dtype=torch.long), torch.zeros(0)),
                              torch.zeros(0, dtype=torch.long), 0.0) == 0.0
    with pytest.raises(UserError):
        certified_accuracy(result, y[:3], 0.0)


@pytest.mark.parametrize("kwargs", [{"sigma": 0.0}, {"sigma": -0.1}, {"n0": 0}, {"n": 0}, {"alpha": 0.0},
                                    {"alpha": 1.0}, {"alpha": 1.5}, {"batch_size": 0}])
def test_bad_arguments_raise_user_error(kwargs):
    args = {"sigma": 0.25, "n0": 10, "n": 10, "alpha": 0.01, "batch_size": 10} | kwargs
    with pytest.raises(UserError) as info:
        certify(HalfPlane(), at_distance(0.3)[None], **args)
    assert "\n" not in str(info.value)
    if "n0" not in kwargs:
        args.pop("n0")
        with pytest.raises(UserError):
            predict(HalfPlane(), at_distance(0.3)[None], **args)


def test_lower_confidence_bound_is_one_sided_clopper_pearson():
    assert lower_confidence_bound(0, 100, 0.05) == 0.0
    assert lower_confidence_bound(100, 100, 0.05) == pytest.approx(0.05 ** (1 / 100))  # k = n: α^(1/n)
    for k, n, alpha in [(50, 100, 0.05), (900, 1000, 0.001), (3, 10, 0.01)]:
        p = lower_confidence_bound(k, n, alpha)
        assert p < k / n and binom.sf(k - 1, n, p) == pytest.approx(alpha)  # P(Binomial(n, p) >= k) = α


# ---- the ``smooth`` objective ----------------------------------------------------------------------------------


def test_smooth_objective_is_registered_and_takes_only_its_own_settings():
    assert "smooth" in OBJECTIVES.names()
    with pytest.raises(UserError, match="objective smooth has no setting 'steps'"):
        create("smooth", eps=0.1, noise_sd=0.5, steps=10)
    objective = create("smooth", eps=0.1, noise_sd=0.5, norm="linf")
    assert objective.noise_sd == 0.5 and objective.eps == 0.1
    assert objective.describe() == {"name": "smooth", "eps": 0.1, "noise_sd": 0.5}
    assert create("smooth").noise_sd == 0.25


@pytest.mark.parametrize("noise_sd", [0.0, -0.5])
def test_smooth_objective_rejects_a_non_positive_noise_sd(noise_sd):
    with pytest.raises(UserError):
        create("smooth", noise_sd=noise_sd)


def test_smooth_objective_loss_is_noisy_finite_differentiable_and_seedable(tiny_mlp, tiny_data):
    x, y = tiny_data.train.x[:16], tiny_data.train.y[:16]
    objective = create("smooth", eps=0.1, noise_sd=0.5)
    clean = F.cross_entropy(tiny_mlp(x), y)
    loss, logits = objective.forward(tiny_mlp.train(), x, y)
    assert loss.ndim == 0 and torch.isfinite(loss) and logits.shape == (16, 3)
    assert not torch.isclose(loss, clean)
    assert torch.equal(loss, F.cross_entropy(logits, y))
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in tiny_mlp.parameters())

    def seeded_loss():
        objective.generator = seeded(5)
        return objective.loss(tiny_mlp, x, y)

    assert torch.equal(seeded_loss(), seeded_loss())


def test_smooth_objective_uses_the_full_sigma_whatever_the_eps_warmup():
    objective = create("smooth", eps=0.1, noise_sd=0.3)
    objective.set_eps_scale(0.0)
    objective.generator = seeded()
    x = torch.full((200, 1, 8, 8), 0.5)
    noise = objective.noisy(x) - x
    assert noise.std().item() == pytest.approx(0.3, rel=0.05)
    assert noise.min() < -0.5  # not clipped to [0, 1]


@pytest.fixture(scope="module")
def digits_models():
    """A benign- and a smooth-trained (σ = 0.5) digits MLP, same seed and schedule."""
    from robustprune.config import TrainConfig
    from robustprune.data import load_dataset
    from robustprune.models import create_model
    from robustprune.train import FitOptions, fit

    data = load_dataset("digits")
    models = {}
    for name in ("benign", "smooth"):
        torch.manual_seed(0)
        model = create_model("mlp", data.input_shape, data.num_classes, *data.channel_stats())
        objective = create(name, **({"noise_sd": 0.5} if name == "smooth" else {}))
        if name == "smooth":
            objective.generator = seeded(0)
        fit(model, objective, data.train, TrainConfig(epochs=8, optimizer="adam", lr=3e-3, schedule="constant"),
            FitOptions(batch_size=128, quiet=True, generator=seeded(0)))
        models[name] = model
    return data, models


def test_smooth_training_raises_smoothed_certified_accuracy_on_digits(digits_models):
    data, models = digits_models
    x, y = data.test.x[:100], data.test.y[:100]
    accuracy = {}
    for name, model in models.items():
        result = certify(model, x, 0.5, n0=50, n=200, alpha=0.01, generator=seeded(0))
        accuracy[name] = {r: certified_accuracy(result, y, r) for r in (0.0, 0.25, 0.5)}
    print("smoothed certified accuracy (σ = 0.5, n = 200, α = 0.01):", accuracy)
    assert accuracy["smooth"][0.25] >= accuracy["benign"][0.25] + 0.1
    assert accuracy["smooth"][0.5] > accuracy["benign"][0.5]
    assert accuracy["smooth"][0.0] >= accuracy["benign"][0.0]

"""Randomized-smoothing certification (Cohen, Rosenfeld & Kolter, ICML 2019), as HYDRA reports it.

J. Cohen, E. Rosenfeld, J. Z. Kolter, "Certified Adversarial Robustness via Randomized Smoothing", ICML 2019.

The *smoothed* classifier of a base network f is g(x) = argmax_c P(f(x + ε) = c), ε ~ N(0, σ² I). If the top class
c_A has probability p_A ≥ p̲_A > 1/2, then g(x + δ) = c_A for every ‖δ‖₂ < σ · Φ⁻¹(p̲_A) (Theorem 1, with the
runner-up bound p̄_B = 1 − p̲_A, as in the paper's CERTIFY). Monte-Carlo procedures (the paper's Algorithm):

* CERTIFY(f, σ, x, n₀, n, α): draw n₀ noisy copies and take ĉ_A = the most frequent class (selection); draw n *fresh*
  copies and count k = #{f(x + ε) = ĉ_A} (estimation); p̲_A = the one-sided (1 − α) Clopper–Pearson lower bound
  ``beta.ppf(α, k, n − k + 1)`` (the reference code's ``proportion_confint(k, n, alpha=2α, method="beta")[0]``).
  If p̲_A < 1/2 abstain, else return ĉ_A with radius R = σ · Φ⁻¹(p̲_A).
  Guarantee: with probability at least 1 − α over the sampling, when CERTIFY returns (ĉ_A, R) the smoothed classifier
  g predicts ĉ_A everywhere in the L2 ball of radius R around x. The certificate is for g, **not** for the base
  network f (f itself may be fooled by a far smaller perturbation).
* PREDICT(f, σ, x, n, α): draw n noisy copies, take the two most frequent classes with counts n_A ≥ n_B and return
  the top one unless the two-sided binomial test ``binomtest(n_A, n_A + n_B, 0.5).pvalue > α`` (then abstain); the
  probability of returning a class other than g(x) is at most α.

Choices, as in the reference code (github.com/locuslab/smoothing): the noise is added to inputs in [0, 1] *without*
clipping back to [0, 1]; the model is put in eval mode during sampling (its mode is restored afterwards); abstain is
encoded as class −1 with radius 0. Inputs are certified one at a time, with ``batch_size`` noisy copies per forward
pass; all noise comes from ``generator`` (when given), so a seeded generator makes the result reproducible.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from scipy.stats import beta, binomtest, norm
from torch import nn

from robustprune.infra.errors import UserError

ABSTAIN = -1


@dataclass(frozen=True)
class SmoothingResult:
    """CERTIFY's answer per input: the smoothed prediction (−1 = abstain) and its certified L2 radius (0 if −1)."""

    prediction: torch.Tensor  # (B,) long
    radius: torch.Tensor  # (B,) float


def _check_args(sigma: float, n: int, alpha: float, batch_size: int, n0: int | None = None) -> None:
    if not sigma > 0:
        raise UserError(f"smoothing sigma must be > 0, got {sigma}")
    if n0 is not None and int(n0) < 1:
        raise UserError(f"smoothing n0 (selection samples) must be >= 1, got {n0}")
    if int(n) < 1:
        raise UserError(f"smoothing n (estimation samples) must be >= 1, got {n}")
    if not 0 < alpha < 1:
        raise UserError(f"smoothing alpha must be in (0, 1), got {alpha}")
    if int(batch_size) < 1:
        raise UserError(f"smoothing batch_size must be >= 1, got {batch_size}")


def _sample_counts(model: nn.Module, x: torch.Tensor, sigma: float, num: int, batch_size: int,
                   generator: torch.Generator | None) -> torch.Tensor:
    """Class counts (classes,) of the base model's argmax on ``num`` copies of one input ``x`` plus N(0, σ²I)."""
    noise_device = generator.device if generator is not None else x.device
    counts: torch.Tensor | None = None
    remaining = num
    while remaining > 0:
        size = min(batch_size, remaining)
        remaining -= size
        noise = torch.randn((size, *x.shape), generator=generator, device=noise_device, dtype=x.dtype)
        logits = model(x.unsqueeze(0) + sigma * noise.to(x.device))
        found = torch.bincount(logits.argmax(1), minlength=logits.shape[1])
        counts = found if counts is None else counts + found
    assert counts is not None
    return counts.cpu()


def lower_confidence_bound(k: int, n: int, alpha: float) -> float:
    """One-sided (1 − α) Clopper–Pearson lower bound on a binomial proportion from k successes in n trials."""
    return 0.0 if k == 0 else float(beta.ppf(alpha, k, n - k + 1))


class _EvalMode:
    """Context manager: the model in eval mode under ``torch.no_grad()``, its previous mode restored on exit."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.no_grad = torch.no_grad()

    def __enter__(self) -> None:
        self.was_training = self.model.training
        self.model.eval()
        self.no_grad.__enter__()

    def __exit__(self, *exc: object) -> None:
        self.no_grad.__exit__(*exc)
        self.model.train(self.was_training)


def certify(model: nn.Module, x: torch.Tensor, sigma: float, n0: int = 100, n: int = 1000, alpha: float = 0.001,
            batch_size: int = 1000, generator: torch.Generator | None = None) -> SmoothingResult:
    """CERTIFY of Cohen et al. (2019) for each input of the batch ``x`` (B, ...), inputs in [0, 1].

    n₀ noisy samples select ĉ_A, n fresh ones bound p_A from below (Clopper–Pearson, level 1 − α); abstain (−1,
    radius 0) when p̲_A < 1/2, else radius σ · Φ⁻¹(p̲_A). With probability ≥ 1 − α (per input) the *smoothed*
    classifier g is constant within that L2 radius (not the base model). Returns CPU tensors.
    """
    _check_args(sigma, n, alpha, batch_size, n0)
    n0, n, batch_size = int(n0), int(n), int(batch_size)
    predictions, radii = [], []
    with _EvalMode(model):
        for xi in x:
            c_hat = int(_sample_counts(model, xi, sigma, n0, batch_size, generator).argmax())
            k = int(_sample_counts(model, xi, sigma, n, batch_size, generator)[c_hat])
            p_lower = lower_confidence_bound(k, n, alpha)
            if p_lower < 0.5:
                predictions.append(ABSTAIN)
                radii.append(0.0)
            else:
                predictions.append(c_hat)
                radii.append(sigma * float(norm.ppf(p_lower)))
    return SmoothingResult(torch.tensor(predictions, dtype=torch.long),
                           torch.tensor(radii, dtype=torch.float32).reshape(len(radii)))


def predict(model: nn.Module, x: torch.Tensor, sigma: float, n: int = 1000, alpha: float = 0.001,
            batch_size: int = 1000, generator: torch.Generator | None = None) -> torch.Tensor:
    """PREDICT of Cohen et al. (2019) for each input of ``x``: g's class, or −1 where the top two classes' counts
    do not differ significantly (two-sided binomial test p-value > α). Returns a CPU (B,) long tensor."""
    _check_args(sigma, n, alpha, batch_size)
    n, batch_size = int(n), int(batch_size)
    predictions = []
    with _EvalMode(model):
        for xi in x:
            counts = _sample_counts(model, xi, sigma, n, batch_size, generator)
            top2 = torch.topk(counts, k=min(2, counts.numel())).indices.tolist()
            n_a = int(counts[top2[0]])
            n_b = int(counts[top2[1]]) if len(top2) > 1 else 0
            abstain = binomtest(n_a, n_a + n_b, 0.5).pvalue > alpha
            predictions.append(ABSTAIN if abstain else top2[0])
    return torch.tensor(predictions, dtype=torch.long)


def certified_accuracy(result: SmoothingResult, y: torch.Tensor, radius: float) -> float:
    """Fraction of inputs certified correct at L2 radius ``radius``: prediction == y and certified radius >= radius
    (the ``>=`` of the reference analysis code). Abstentions never count; an empty batch gives 0.0."""
    y = y.reshape(-1).cpu()
    if y.numel() != result.prediction.numel():
        raise UserError(f"certified_accuracy: {y.numel()} labels for {result.prediction.numel()} certified inputs")
    if y.numel() == 0:
        return 0.0
    certified = (result.prediction == y) & (result.radius >= radius)
    return float(certified.float().mean())


__all__ = ["ABSTAIN", "SmoothingResult", "certified_accuracy", "certify", "lower_confidence_bound", "predict"]

"""Certified training objectives (ibp, crown-ibp), their schedules, and verified accuracy in evaluation."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import importlib
from robustprune.bounds import margin_lower_bounds
from robustprune.config import eval_config, ThreatConfig, TrainConfig, load_config
from robustprune.infra.errors import UserError
from robustprune.evaluate import SoundnessError, evaluate
from robustprune.objectives import create
from robustprune.objectives.certified import worst_case_logits
from robustprune.objectives.ramps import interpolate, linear_ramp
from robustprune.pipeline import build_objective
from robustprune.train import FitOptions, fit


def test_worst_case_logits_put_zero_at_the_label_and_minus_margins_elsewhere():
    margins = torch.tensor([[1.0, 2.0], [3.0, -4.0]])
    logits = worst_case_logits(margins, torch.tensor([0, 2]))
    assert torch.equal(logits, torch.tensor([[0.0, -1.0, -2.0], [-3.0, 4.0, 0.0]]))


def test_ramp_waits_for_the_clean_epochs_then_grows_linearly():
    assert linear_ramp(0.5, 4, start=1) == 0.0
    assert linear_ramp(3.0, 4, start=1) == 0.5
    assert linear_ramp(9.0, 4, start=1) == 1.0
    assert linear_ramp(0.5, 0, start=1) == 0.0 and linear_ramp(1.0, 0, start=1) == 1.0
    assert interpolate(1.0, 0.5, 0.5) == 0.75 and interpolate(1.0, 0.0, 2.0) == 0.0


def test_ibp_loss_is_the_kappa_mix_of_clean_and_worst_case_cross_entropy(tiny_mlp, tiny_data):
    x, y = tiny_data.train.x[:16], tiny_data.train.y[:16]
    objective = create("ibp", eps=0.1, kappa_start=1.0, kappa_end=0.5)
    objective.set_eps_scale(0.5)  # half-way: ε = 0.05, κ = 0.75
    assert objective.current_eps == pytest.approx(0.05) and objective.kappa == pytest.approx(0.75)
    loss, logits = objective.forward(tiny_mlp, x, y)
    worst = worst_case_logits(margin_lower_bounds(tiny_mlp, x, y, 0.05, "ibp"), y)
    expected = 0.75 * F.cross_entropy(tiny_mlp(x), y) + 0.25 * F.cross_entropy(worst, y)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert loss.item() > F.cross_entropy(logits, y).item()  # the worst case costs more than the clean loss


def test_at_zero_eps_certified_objectives_are_plain_cross_entropy(tiny_mlp, tiny_data):
    x, y = tiny_data.train.x[:16], tiny_data.train.y[:16]
    for name in ("ibp", "crown-ibp"):
        objective = create(name, eps=0.1)
        objective.set_eps_scale(0.0)
        loss, logits = objective.forward(tiny_mlp, x, y)
        assert loss.item() == pytest.approx(F.cross_entropy(logits, y).item())


def test_crown_ibp_mixes_bounds_with_beta_and_equals_ibp_at_beta_zero(tiny_mlp, tiny_data):
    x, y = tiny_data.train.x[:16], tiny_data.train.y[:16]
    ibp = create("ibp", eps=0.1, kappa_end=0.0)
    at_end = create("crown-ibp", eps=0.1, kappa_end=0.0, beta_start=1.0, beta_end=0.0)
    assert at_end.beta == 0.0  # ε scale 1 = end of the ramp
    assert at_end.loss(tiny_mlp, x, y).item() == pytest.approx(ibp.loss(tiny_mlp, x, y).item())
    mixed = create("crown-ibp", eps=0.1, kappa_end=0.0, beta_start=1.0, beta_end=1.0)
    crown = margin_lower_bounds(tiny_mlp, x, y, 0.1, "crown-ibp")
    assert mixed.margin_bounds(tiny_mlp, x, y).detach().equal(crown.detach())
    assert mixed.loss(tiny_mlp, x, y).item() < ibp.loss(tiny_mlp, x, y).item()  # tighter bounds, smaller loss


def test_certified_objectives_refuse_the_l2_threat():
    with pytest.raises(UserError, match="objective ibp trains for the threat norms linf; threat.norm is 'l2'"):
        build_objective(load_config(None, ["objective.name=ibp"]).objective, ThreatConfig(norm="l2", eps=0.5))


def test_build_objective_passes_each_objective_only_its_settings():
    cfg = load_config(None, ["objective.name=crown-ibp", "objective.kappa_end=0.2", "objective.beta_start=0.5"])
    objective = build_objective(cfg.objective, cfg.threat)
    assert (objective.kappa_end, objective.beta_start, objective.eps) == (0.2, 0.5, cfg.threat.eps)
    assert build_objective(load_config(None).objective, cfg.threat).name == "pgd"


def test_ibp_training_raises_verified_accuracy(tiny_data):
    from robustprune.models import create_model

    torch.manual_seed(0)
    model = create_model("mlp", (1, 6, 6), 3)
    threat, cfg = ThreatConfig(eps=0.1), eval_config(pgd_steps=10, verifiers=("ibp", "crown"))
    before = evaluate(model, tiny_data.test, threat, cfg)
    fit(model, create("ibp", eps=0.1, kappa_end=0.0), tiny_data.train,
        TrainConfig(epochs=15, lr=3e-3, clean_epochs=2, eps_warmup_epochs=5), FitOptions(batch_size=16, quiet=True))
    after = evaluate(model, tiny_data.test, threat, cfg)
    assert after["verified_acc"] >= 0.8 > before["verified_acc"]
    assert after["verified_acc"] <= after["pgd_acc"] <= after["benign_acc"]
    assert after["verified_acc"] == max(after["verified_by"].values()) or after["verified_acc"] > 0
    assert set(after["verified_by"]) == {"ibp", "crown"} and after["n_verified_eval"] == len(tiny_data.test)


def test_verification_is_capped_and_skipped_for_l2(tiny_mlp, tiny_data):
    capped = evaluate(tiny_mlp, tiny_data.test, ThreatConfig(eps=0.01), eval_config(pgd_steps=2, verify_n_samples=5))
    assert capped["n_verified_eval"] == 5 and capped["n_eval"] == len(tiny_data.test)
    l2 = evaluate(tiny_mlp, tiny_data.test, ThreatConfig(norm="l2", eps=0.1), eval_config(pgd_steps=2))
    assert l2["verified_acc"] is None and l2["verified_by"] == {}
    none = evaluate(tiny_mlp, tiny_data.test, ThreatConfig(eps=0.01), eval_config(pgd_steps=2, verifiers=()))
    assert none["verified_acc"] is None


def test_a_verified_sample_broken_by_the_attack_is_a_soundness_error(tiny_mlp, tiny_data, monkeypatch):
    """The invariant check itself: a (deliberately wrong) verifier claiming every sample must be caught."""
    evaluation = importlib.import_module("robustprune.evaluate")
    monkeypatch.setattr(evaluation, "verify", lambda model, x, y, eps, method: torch.ones(len(x), dtype=torch.bool))
    with pytest.raises(SoundnessError, match="verified by ibp but"):
        evaluate(tiny_mlp, tiny_data.test, ThreatConfig(eps=0.5), eval_config(pgd_steps=5, verifiers=("ibp",)))


def test_unknown_verifier_is_refused_before_anything_runs():
    from robustprune.pipeline import check_names

    with pytest.raises(UserError, match="did you mean 'crown'"):
        check_names(load_config(None, ["evaluate.verifiers=[crwn]"]))


def test_partial_section_override_keeps_the_config_defaults_of_that_section():
    cfg = load_config(None, ["pretrain.clean_epochs=2"])
    assert (cfg.pretrain.epochs, cfg.pretrain.lr, cfg.pretrain.clean_epochs) == (60, 3e-3, 2.0)
    assert load_config(None, ["prune.score_training.lr=0.5"]).prune.score_training.epochs == 5
    ibp = ["objective.name=ibp"]
    assert math.isclose(load_config(None, [*ibp, "objective.kappa_end=0"]).objective.settings.kappa_start, 1.0)
    with pytest.raises(UserError, match="objective.kappa_end must be in"):
        load_config(None, [*ibp, "objective.kappa_end=2"])


def test_create_refuses_settings_the_objective_does_not_declare():
    assert create("ibp", eps=0.3, kappa_end=0.1).eps == 0.3
    with pytest.raises(UserError, match="objective benign has no setting 'steps'"):
        create("benign", eps=0.3, steps=5)
    with pytest.raises(UserError, match="objective ibp has no setting 'beta_start'"):
        create("ibp", eps=0.3, beta_start=0.5)  # β weighs CROWN-IBP against IBP: crown-ibp's alone
    with pytest.raises(UserError, match="did you mean 'steps'"):
        create("pgd", eps=0.3, stepz=5)

"""Every registered attack (PGD with CE and margin losses, targeted; FGSM; AutoAttack and Square through
pyautoattack): points in the ε-ball ∩ [0, 1], success on an undefended model, restarts and stronger attacks never weaker; and the evaluation
that runs them: per-attack accuracies, ε monotonicity, consistency warnings, smoothing figures, the verified
invariant against every attack."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from robustprune.attacks import ATTACKS, Attack, Threat, attack_loss, autoattack, fgsm, pgd, square, succeeded
from robustprune.config import eval_config, ThreatConfig
from robustprune.infra.errors import UserError
from robustprune.models import create_model
from robustprune.evaluate import SoundnessError, consistency_warnings, evaluate
from robustprune.report import build_report, stage_table

from conftest import fit_full_batch, make_tiny_dataset

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def tiny_data():
    return make_tiny_dataset(n_train=128, n_test=96, shape=(1, 8, 8), classes=4)  # targeted DLR needs 4 classes


@pytest.fixture
def trained(tiny_data):
    torch.manual_seed(0)
    return fit_full_batch(create_model("mlp", (1, 8, 8), 4), tiny_data)


#: Settings that keep each registered attack fast here (every other setting: the attack's defaults).
FAST = {"pgd": {"steps": 20, "restarts": 2}, "square": {"queries": 300},
        "autoattack": {"attacks": ("apgd-ce", "apgd-t")}}


def run(name: str, model, x, y, eps: float, norm: str = "linf"):
    """Any registered attack, called the one way every attack is called."""
    cls = ATTACKS.get(name)
    return cls()(model, x, y, Threat(norm, eps), cls.Settings(**FAST.get(name, {})), seed=0)


@pytest.mark.parametrize("name", ATTACKS.names())
def test_every_registered_attack_has_the_one_interface(name):
    """Each entry is an Attack class whose settings dataclass builds from its defaults and round-trips through the
    config's ``<attack>_<setting>`` keys."""
    cls = ATTACKS.get(name)
    assert issubclass(cls, Attack) and dataclasses.is_dataclass(cls.Settings)
    flat = {f"{name}_{k}": v for k, v in dataclasses.asdict(cls.Settings()).items()}
    assert eval_config(**flat).settings(name) == cls.Settings()


@pytest.mark.parametrize("name", ATTACKS.names())
@pytest.mark.parametrize("norm, eps", [("linf", 0.3), ("l2", 1.0)])
def test_points_stay_in_the_ball_and_the_domain(trained, tiny_data, name, norm, eps):
    x, y = tiny_data.test.x[:40], tiny_data.test.y[:40]
    x_adv = run(name, trained, x, y, eps, norm)
    assert x_adv.shape == x.shape and x_adv.min() >= 0 and x_adv.max() <= 1
    delta = (x_adv - x).flatten(1)
    size = delta.abs().max(1).values if norm == "linf" else delta.norm(dim=1)
    assert torch.all(size <= eps + 1e-5)


@pytest.mark.parametrize("name", ATTACKS.names())
def test_attacks_break_an_undefended_model(trained, tiny_data, name):
    x, y = tiny_data.test.x[:60], tiny_data.test.y[:60]
    clean = (trained(x).argmax(1) == y).float().mean()
    robust = (trained(run(name, trained, x, y, 0.5)).argmax(1) == y).float().mean()
    assert clean > 0.9 and robust < 0.5 * clean


@pytest.mark.parametrize("loss", ["ce", "margin"])
def test_pgd_never_decreases_its_loss_from_the_clean_point(trained, tiny_data, loss):
    x, y = tiny_data.test.x, tiny_data.test.y
    x_adv = pgd(trained, x, y, 0.2, steps=10, random_start=False, loss=loss)
    with torch.no_grad():
        before, after = attack_loss(trained(x), y, loss), attack_loss(trained(x_adv), y, loss)
    assert torch.all(after >= before - 1e-5)


def test_margin_loss_is_the_carlini_wagner_margin_and_positive_exactly_when_fooled():
    logits = torch.tensor([[3.0, 1.0, 2.5], [0.0, 4.0, 1.0]])
    y = torch.tensor([0, 0])
    assert torch.allclose(attack_loss(logits, y, "margin"), torch.tensor([-0.5, 4.0]))
    assert torch.equal(attack_loss(logits, y, "margin") > 0, succeeded(logits, y))
    target = torch.tensor([2, 2])
    assert torch.allclose(attack_loss(logits, y, "margin", target), torch.tensor([-0.5, -3.0]))


@pytest.mark.parametrize("loss", ["ce", "margin"])
def test_targeted_pgd_reaches_the_target_class(trained, tiny_data, loss):
    x, y = tiny_data.test.x[:40], tiny_data.test.y[:40]
    target = (y + 1) % 4
    x_adv = pgd(trained, x, y, 0.8, steps=30, loss=loss, target=target)
    hit = (trained(x_adv).argmax(1) == target).float().mean()
    assert hit > 0.8


@pytest.mark.parametrize("loss", ["ce", "margin"])
def test_restarts_never_weaken_the_attack(trained, tiny_data, loss):
    x, y = tiny_data.test.x, tiny_data.test.y
    torch.manual_seed(1)
    one = pgd(trained, x, y, 0.1, steps=3, restarts=1, loss=loss)
    torch.manual_seed(1)
    many = pgd(trained, x, y, 0.1, steps=3, restarts=4, loss=loss)  # the first restart is the same run as `one`
    with torch.no_grad():
        fooled_one, fooled_many = succeeded(trained(one), y), succeeded(trained(many), y)
        gain = attack_loss(trained(many), y, loss) - attack_loss(trained(one), y, loss)
    assert torch.all(fooled_many | ~fooled_one)
    assert torch.all((gain >= -1e-6) | fooled_many)


def test_fgsm_is_one_signed_step_of_size_eps(trained, tiny_data):
    x, y = tiny_data.test.x[:10], tiny_data.test.y[:10]
    x = x.clamp(0.3, 0.7)  # away from the domain's edges, so no clipping
    x_adv = fgsm(trained, x, y, 0.1)
    x_req = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(F.cross_entropy(trained(x_req), y, reduction="sum"), x_req)
    assert torch.allclose(x_adv, x + 0.1 * grad.sign(), atol=1e-6)


def test_autoattack_is_at_least_as_strong_as_pgd(trained, tiny_data):
    x, y = tiny_data.test.x[:60], tiny_data.test.y[:60]
    eps = 0.15
    torch.manual_seed(0)
    pgd_acc = (trained(pgd(trained, x, y, eps, steps=20)).argmax(1) == y).float().mean()
    aa_acc = (trained(autoattack(trained, x, y, eps, attacks=("apgd-ce", "apgd-t"))).argmax(1) == y).float().mean()
    assert aa_acc <= pgd_acc + 1e-9


@pytest.mark.parametrize("kwargs, message", [({"attacks": ("apgd-xx",)}, "unknown AutoAttack attack"),
                                             ({"norm": "l1"}, "supports the threat norms")])
def test_autoattack_refuses_unknown_settings(trained, tiny_data, kwargs, message):
    with pytest.raises(UserError, match=message):
        autoattack(trained, tiny_data.test.x[:4], tiny_data.test.y[:4], 0.1, **kwargs)


def test_autoattack_without_the_extra_is_a_one_line_error(trained, tiny_data, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "pyautoattack", None)
    with pytest.raises(UserError, match=r"robustprune\[autoattack\]"):
        autoattack(trained, tiny_data.test.x[:4], tiny_data.test.y[:4], 0.1)


def test_unknown_attack_loss_is_refused(trained, tiny_data):
    with pytest.raises(UserError, match="unknown attack loss"):
        pgd(trained, tiny_data.test.x[:4], tiny_data.test.y[:4], 0.1, steps=2, loss="hinge")


# --------------------------------------------------------------------------------------------------- evaluation

def test_evaluation_reports_every_attack_and_respects_the_orderings(trained, tiny_data):
    cfg = eval_config(pgd_steps=20, pgd_restarts=2, attacks=("pgd", "fgsm", "autoattack"), verifiers=(),
                     autoattack_attacks=("apgd-ce", "apgd-t"), autoattack_n_samples=40, n_samples=80,
                     pgd_eps_fractions=(0.5,))
    metrics = evaluate(trained, tiny_data.test, ThreatConfig(eps=0.15), cfg)
    acc = metrics["attack_acc"]
    assert set(acc) == {"pgd", "fgsm", "autoattack", "pgd@0.5"}
    assert metrics["pgd_acc"] == acc["pgd"] and metrics["autoattack_acc"] == acc["autoattack"]
    assert metrics["n_autoattack_eval"] == 40 and metrics["n_eval"] == 80
    assert acc["pgd"] <= acc["fgsm"] <= metrics["benign_acc"] and acc["pgd"] <= acc["pgd@0.5"]
    assert metrics["warnings"] == []


def test_consistency_warnings_name_each_violated_ordering():
    clean = torch.tensor([True, True, True, True])
    survived = {"pgd": torch.tensor([True, False, False, False]),
                "fgsm": torch.tensor([False, False, False, False]),  # FGSM stronger than PGD
                "autoattack": torch.tensor([True, True]),  # AutoAttack weaker than PGD on its 2 samples
                "pgd@0.5": torch.tensor([False, False, False, False])}  # accuracy rose with ε
    warnings = consistency_warnings(clean, survived, (0.5,))
    assert len(warnings) == 3
    assert any("autoattack accuracy 2/2 exceeds pgd accuracy 1/2" in w for w in warnings)
    assert any("pgd accuracy 1/4 exceeds fgsm accuracy 0/4" in w for w in warnings)
    assert any("rose from 0.5·ε to ε" in w for w in warnings)
    assert consistency_warnings(clean, {"pgd": torch.tensor([True, False, True, False])}, (0.5,)) == []


def test_warnings_reach_report_json_and_the_table():
    stage = {"benign_acc": 1.0, "pgd_acc": 0.5, "warnings": ["fgsm accuracy ... gradient masking"]}
    report = build_report("0", {"threat": {}}, {"finetuned": stage}, {}, {})
    assert report["warnings"] == ["finetuned: fgsm accuracy ... gradient masking"]
    assert report["stages"]["finetuned"]["warnings"] == stage["warnings"]
    assert "Warnings:\n- finetuned: fgsm accuracy" in stage_table(report)


def test_a_verified_sample_broken_by_any_attack_is_a_soundness_error(trained, tiny_data, monkeypatch):
    import sys
    evaluation = sys.modules["robustprune.evaluate"]  # the package's `evaluate` name is the function
    monkeypatch.setattr(evaluation, "verify_all", lambda *a: ({"ibp": torch.ones(20, dtype=torch.bool)}, {}))
    cfg = eval_config(pgd_steps=0, attacks=("fgsm",), n_samples=20)

    class Blank(Attack):  # every point black: breaks the samples whose class is not the black image's
        def __call__(self, model, x, y, threat, settings, *, seed=0):
            return torch.zeros_like(x)

    with ATTACKS.temporarily("fgsm", Blank), pytest.raises(SoundnessError, match="broken by an attack"):
        evaluate(trained, tiny_data.test, ThreatConfig(eps=0.1), cfg)


def test_smoothing_figures_are_reported_when_asked(trained, tiny_data):
    cfg = eval_config(pgd_steps=0, verifiers=(), n_samples=30, smoothing_sigma=0.25, smoothing_n0=20,
                     smoothing_n=100, smoothing_alpha=0.01, smoothing_n_samples=10, smoothing_radii=(0.0, 0.25))
    metrics = evaluate(trained, tiny_data.test, ThreatConfig(eps=0.1), cfg)
    fig = metrics["smoothing"]
    assert fig["n_certified"] == 10 and set(fig["certified_acc"]) == {"0", "0.25"}
    assert 0 <= fig["certified_acc"]["0.25"] <= fig["certified_acc"]["0"] <= 1
    again = evaluate(trained, tiny_data.test, ThreatConfig(eps=0.1), cfg)
    assert again["smoothing"] == fig  # seeded noise: reproducible
    assert evaluate(trained, tiny_data.test, ThreatConfig(eps=0.1), eval_config(pgd_steps=0, verifiers=(),
                                                                             n_samples=5))["smoothing"] is None


def test_autoattack_refuses_targeted_dlr_below_four_classes(tiny_mlp):
    x, y = torch.rand(4, 1, 6, 6), torch.tensor([0, 1, 2, 0])
    with pytest.raises(UserError, match="needs at least 4 classes"):
        autoattack(tiny_mlp.eval(), x, y, 0.1)
    assert autoattack(tiny_mlp, x, y, 0.1, attacks=("apgd-ce",)).shape == x.shape

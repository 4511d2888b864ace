"""Evaluation: benign accuracy, every configured attack (per-sample worst case), verified accuracy and, on request,
randomized-smoothing certificates → one metrics dict. Under torchrun the ranks share the batches and the per-sample
results are gathered (each batch's attack starts then come from ``seed + start``, so they do not depend on the ranks).

A sample counts as robust to an attack only if it is classified correctly both clean and at the attack's point
(the clean input lies in the ball, so robust accuracy can never exceed benign accuracy). A sample counts as verified
by a method when the method's lower bounds of every margin z_y − z_j over the whole L∞ ball ∩ [0, 1] are positive;
``verified_acc`` counts the samples verified by at least one method (each is sound, so their union is too).

``robust_acc`` is the headline: a sample is robust only if it survives *every* attack that ran (per-sample worst
case, on the first ``n_robust_eval`` samples, which all of them covered). Unless AutoAttack runs, a short Square
attack (gradient-free) runs after the gradient attacks by default; ``masking_gap`` is the fraction of samples it
(or AutoAttack) breaks that the gradient attacks left, and a gap above ``masking_threshold`` is a gradient-masking
warning.

Invariants, checked on every evaluation:
- a verified sample is classified correctly and no attack breaks it — a violation means an unsound bound or a broken
  attack and raises ``SoundnessError`` instead of reporting numbers;
- AutoAttack accuracy ≤ PGD accuracy ≤ FGSM accuracy ≤ benign accuracy on the same samples, and PGD accuracy does
  not rise with ε (PGD also runs at ``pgd_eps_fractions`` of ε: a smaller ball lies inside the larger one) — a
  violation is reported in ``warnings``, because it signals gradient masking or a weak attack.
"""
from __future__ import annotations

import torch
from torch import nn

from robustprune.infra import distributed
from robustprune.attacks import autoattack, fgsm, pgd, square
from robustprune.bounds import verify
from robustprune.config import EvalConfig, ThreatConfig
from robustprune.data import Split


class SoundnessError(RuntimeError):
    """A sample counted as verified was misclassified or broken by an attack: a bug, never a result."""


def _run_attack(name: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, threat: ThreatConfig,
                cfg: EvalConfig, seed: int) -> torch.Tensor:
    if name == "pgd":
        return pgd(model, x, y, eps, cfg.pgd_steps, cfg.pgd_step_size, cfg.pgd_restarts, threat.norm,
                   loss=cfg.pgd_loss)
    if name == "fgsm":
        return fgsm(model, x, y, eps, threat.norm, loss=cfg.pgd_loss)
    if name == "square":
        return square(model, x, y, eps, threat.norm, cfg.square_queries, seed=seed)
    return autoattack(model, x, y, eps, threat.norm, cfg.autoattack_attacks, seed=seed)


GRADIENT_ATTACKS = ("pgd", "fgsm")  # what gradient masking fools; Square and AutoAttack's Square do not need gradients


def attack_plan(cfg: EvalConfig, n: int) -> dict[str, int]:
    """Attack name → how many of the first evaluated samples it covers. The gradient-free check (Square) joins the
    configured attacks unless AutoAttack, which ends with Square itself, already runs."""
    attacks = [a for a in cfg.attacks if not (a == "pgd" and cfg.pgd_steps == 0)]
    if cfg.masking_check and attacks and not {"autoattack", "square"} & set(attacks):
        attacks.append("square")
    caps = {"autoattack": cfg.autoattack_n_samples, "square": cfg.square_n_samples}
    return {a: n if caps.get(a) is None else min(n, caps[a]) for a in attacks}


def evaluate(
    model: nn.Module,
    test: Split,
    threat: ThreatConfig,
    cfg: EvalConfig,
    *,
    batch_size: int = 500,
    seed: int = 0,
) -> dict:
    """Benign accuracy, attacks, verification and smoothing on the first ``cfg.n_samples`` test samples.

    The attacks' random starts come from ``seed`` on a forked RNG: identical for every stage and rerun, and the
    caller's random stream is left untouched. AutoAttack covers the first ``autoattack_n_samples``, verification the
    first ``verify_n_samples`` (L∞ only: the bounds' input set), smoothing the first ``smoothing_n_samples``.
    """
    device = next(model.parameters()).device
    n = len(test) if cfg.n_samples is None else min(cfg.n_samples, len(test))
    was_training = model.training
    model.eval()
    counts = attack_plan(cfg, n)
    attacks = list(counts)
    runs = [(a, threat.eps) for a in attacks]
    runs += [(f"pgd@{f:g}", f * threat.eps) for f in cfg.pgd_eps_fractions if "pgd" in attacks]
    clean = torch.zeros(n, dtype=torch.bool)
    survived = {name: torch.zeros(counts.get(name.split("@")[0], n), dtype=torch.bool) for name, _ in runs}
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for start in distributed.my_starts(range(0, n, batch_size)):
            if distributed.active():  # each batch's random starts independent of which rank computes it
                torch.manual_seed(seed + start)
            stop = min(start + batch_size, n)
            x, y = test.x[start:stop].to(device), test.y[start:stop].to(device)
            with torch.inference_mode():
                correct = model(x).argmax(1) == y
            clean[start:stop] = correct.cpu()
            for name, eps in runs:
                end = min(stop, len(survived[name]))
                if end <= start:
                    continue
                x_adv = _run_attack(name.split("@")[0], model, x[:end - start], y[:end - start], eps, threat, cfg,
                                    seed)
                with torch.inference_mode():
                    held = model(x_adv).argmax(1) == y[:end - start]
                survived[name][start:end] = (held & correct[:end - start]).cpu()
    clean = distributed.gather_flags(clean, device)
    survived = {name: distributed.gather_flags(flags, device) for name, flags in survived.items()}
    verified = verify_all(model, test, threat, cfg, n, batch_size)
    smoothing = smoothing_figures(model, test, cfg, n, seed)
    model.train(was_training)

    def accuracy(flags: torch.Tensor | None) -> float | None:
        return int(flags.sum()) / len(flags) if flags is not None and len(flags) else None

    robust, n_robust = worst_case(clean, {a: survived[a] for a in attacks})
    gap, masking = masking_gap(clean, survived, cfg)
    metrics = {
        "robust_acc": accuracy(robust),
        "n_robust_eval": n_robust,
        "masking_gap": gap,
        "benign_acc": accuracy(clean),
        "pgd_acc": accuracy(survived.get("pgd")),
        "autoattack_acc": accuracy(survived.get("autoattack")),
        "attack_acc": {name: accuracy(flags) for name, flags in survived.items()},
        "verified_acc": None,
        "verified_by": {},
        "smoothing": smoothing,
        "n_eval": n,
        "n_autoattack_eval": counts.get("autoattack"),
        "n_verified_eval": None,
        "warnings": masking + consistency_warnings(clean, survived, cfg.pgd_eps_fractions),
    }
    if verified:
        held_all = clean.clone()
        for flags in survived.values():
            held_all[:len(flags)] &= flags  # held against every attack that ran on the sample
        check_invariants(verified, clean, held_all)
        union = torch.stack(list(verified.values())).any(0)
        n_verify = len(union)
        metrics.update(verified_acc=int(union.sum()) / n_verify if n_verify else None, n_verified_eval=n_verify,
                       verified_by={k: int(v.sum()) / n_verify for k, v in verified.items()} if n_verify else {})
    return metrics


def worst_case(clean: torch.Tensor, survived: dict[str, torch.Tensor]) -> tuple[torch.Tensor | None, int | None]:
    """Per sample, robust to every attack that ran at ε — on the first samples all of them covered — and that
    count (None, None when no attack ran). A sample two attacks break in different ways counts once, as broken."""
    if not survived:
        return None, None
    count = min(len(flags) for flags in survived.values())
    held = clean[:count].clone()
    for flags in survived.values():
        held &= flags[:count]
    return held, count


def masking_gap(clean: torch.Tensor, survived: dict[str, torch.Tensor], cfg: EvalConfig) -> tuple[float | None, list]:
    """The fraction of samples a gradient-free attack breaks that every gradient attack left (on the samples all of
    them ran on), and a warning when it exceeds ``masking_threshold``: the gradient attacks were fooled (gradient
    masking) or are too weak, and their figures overstate robustness."""
    gradient = {a: f for a, f in survived.items() if a in GRADIENT_ATTACKS}
    free = next((a for a in ("square", "autoattack") if a in survived), None)
    if not gradient or free is None:
        return None, []
    held, count = worst_case(clean, gradient)
    count = min(count, len(survived[free]))
    if count == 0:
        return None, []
    left = held[:count]
    gap = int((left & ~survived[free][:count]).sum()) / count
    if gap <= cfg.masking_threshold:
        return gap, []
    what = f"Square (gradient-free, {cfg.square_queries} queries)" if free == "square" else "AutoAttack"
    return gap, [f"gradient masking: {what} breaks {100 * gap:.1f}% of the first {count} samples that "
                 f"{' and '.join(gradient)} left (threshold {100 * cfg.masking_threshold:g}%): the gradient "
                 "attacks overstate robustness; robust_acc counts these samples as broken"]


def consistency_warnings(clean: torch.Tensor, survived: dict[str, torch.Tensor], fractions) -> list[str]:
    """Messages for every ordering a correct evaluation must respect and this one does not (compared on the
    samples both attacks ran on)."""
    warnings = []

    def compare(weak: str, strong: str, why: str) -> None:
        if weak not in survived or strong not in survived:
            return
        count = min(len(survived[weak]), len(survived[strong]))
        a, b = int(survived[weak][:count].sum()), int(survived[strong][:count].sum())
        if b > a:
            warnings.append(f"{strong} accuracy {b}/{count} exceeds {weak} accuracy {a}/{count} on the same samples: "
                            f"{why}")

    masking = "a sign of gradient masking or a weak attack"
    compare("pgd", "autoattack", masking)
    compare("fgsm", "pgd", masking)
    for f in fractions:
        compare(f"pgd@{f:g}", "pgd", f"accuracy rose from {f:g}·ε to ε; {masking}")
    for name, flags in survived.items():
        if bool((flags & ~clean[:len(flags)]).any()):  # robust implies clean by construction: a bug if not
            warnings.append(f"{name} counts a misclassified sample as robust")
    return warnings


def smoothing_figures(model: nn.Module, test: Split, cfg: EvalConfig, n: int, seed: int) -> dict | None:
    """Randomized-smoothing certified accuracy at ``smoothing_radii`` (None when ``smoothing_sigma`` is unset)."""
    if cfg.smoothing_sigma is None:
        return None
    from robustprune.smoothing import certified_accuracy, certify

    device = next(model.parameters()).device
    count = n if cfg.smoothing_n_samples is None else min(n, cfg.smoothing_n_samples)
    generator = torch.Generator(device=device).manual_seed(seed)
    x, y = test.x[:count].to(device), test.y[:count].to(device)
    result = certify(model, x, cfg.smoothing_sigma, cfg.smoothing_n0, cfg.smoothing_n, cfg.smoothing_alpha,
                     generator=generator)
    return {"sigma": cfg.smoothing_sigma, "n": cfg.smoothing_n, "alpha": cfg.smoothing_alpha, "n_certified": count,
            "certified_acc": {f"{r:g}": certified_accuracy(result, y, r) for r in cfg.smoothing_radii},
            "abstained": int((result.prediction < 0).sum()) / count if count else None}


def verify_all(model: nn.Module, test: Split, threat: ThreatConfig, cfg: EvalConfig, n: int,
               batch_size: int) -> dict[str, torch.Tensor]:
    """Per verifier, a BoolTensor over the first ``verify_n_samples`` evaluated samples ({} when not applicable)."""
    if not cfg.verifiers or threat.norm != "linf":
        return {}
    device = next(model.parameters()).device
    count = n if cfg.verify_n_samples is None else min(n, cfg.verify_n_samples)
    results = {}
    for method in cfg.verifiers:
        flags = torch.zeros(count, dtype=torch.bool)
        for start in distributed.my_starts(range(0, count, batch_size)):
            stop = min(start + batch_size, count)
            x, y = test.x[start:stop].to(device), test.y[start:stop].to(device)
            flags[start:stop] = verify(model, x, y, threat.eps, method).cpu()
        results[method] = distributed.gather_flags(flags, device)
    return results


def check_invariants(verified: dict[str, torch.Tensor], clean: torch.Tensor, robust: torch.Tensor) -> None:
    for method, flags in verified.items():
        count = len(flags)
        for name, correct in (("misclassified clean", clean[:count]), ("broken by an attack", robust[:count])):
            bad = (flags & ~correct).nonzero().flatten()
            if len(bad):
                raise SoundnessError(f"{len(bad)} sample(s) verified by {method} but {name} (first: test index "
                                     f"{int(bad[0])}): an unsound bound or a broken attack")

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

import dataclasses
import time
from typing import NamedTuple

import torch
from torch import nn

from robustprune.attacks import ATTACKS, Attack, AttackSettings, Threat
from robustprune.bounds import verify
from robustprune.config import EvalConfig
from robustprune.data import Split
from robustprune.infra import distributed

#: Per-sample verification codes gathered over ranks by a sum (each sample is one rank's, the others hold 0).
VERDICT_CODES = {"unknown": 0, "verified": 1, "falsified": 2}
#: The gradient-free check that joins the configured attacks unless a gradient-free one already runs.
MASKING_CHECK = "square"


class SoundnessError(RuntimeError):
    """A sample counted as verified was misclassified or broken by an attack: a bug, never a result."""


class AttackRun(NamedTuple):
    """One attack at one radius: ``label`` is its name, or ``name@f`` at the fraction f of ε."""

    label: str
    attack: Attack
    settings: AttackSettings
    threat: Threat
    count: int  # it covers the first ``count`` evaluated samples


def attack_plan(cfg: EvalConfig, n: int) -> dict[str, int]:
    """Attack name → how many of the first evaluated samples it covers. The gradient-free check (Square) joins the
    configured attacks unless one of them needs no gradient (AutoAttack ends with Square itself)."""
    attacks = [a for a in cfg.attacks if ATTACKS.get(a)().active(cfg.settings(a))]
    if cfg.masking_check and attacks and not any(ATTACKS.get(a).gradient_free for a in attacks):
        attacks.append(MASKING_CHECK)
    caps = {a: cfg.settings(a).n_samples for a in attacks}
    return {a: n if caps[a] is None else min(n, caps[a]) for a in attacks}


def attack_runs(cfg: EvalConfig, threat: Threat, n: int) -> list[AttackRun]:
    """Every attack of the plan at ε, then each at its ``eps_fractions`` of ε (a smaller ball inside the larger)."""
    plan = attack_plan(cfg, n)
    runs = [AttackRun(a, ATTACKS.get(a)(), cfg.settings(a), threat, count) for a, count in plan.items()]
    return runs + [run._replace(label=f"{run.label}@{f:g}", threat=dataclasses.replace(threat, eps=f * threat.eps))
                   for run in list(runs) for f in run.settings.eps_fractions]


def evaluate(
    model: nn.Module,
    test: Split,
    threat: Threat,
    cfg: EvalConfig,
    *,
    batch_size: int = 500,
    seed: int = 0,
) -> dict:
    """Benign accuracy, attacks, verification and smoothing on the first ``cfg.n_samples`` test samples.

    The attacks' random starts come from ``seed`` on a forked RNG: identical for every stage and rerun, and the
    caller's random stream is left untouched. Each attack covers its ``n_samples`` first samples, verification the
    first ``verify_n_samples`` (L∞ only: the bounds' input set), smoothing the first ``smoothing_n_samples``.
    """
    n = len(test) if cfg.n_samples is None else min(cfg.n_samples, len(test))
    was_training = model.training
    model.eval()
    runs = attack_runs(cfg, threat, n)
    clean, survived = attacked_flags(model, test, runs, n, batch_size, seed)
    verified, figures = verify_all(model, test, threat, cfg, n, batch_size)
    smoothing = smoothing_figures(model, test, cfg, n, seed)
    model.train(was_training)
    metrics = attack_metrics(clean, survived, [r.label for r in runs if "@" not in r.label], cfg)
    metrics.update(smoothing=smoothing, n_eval=n)
    metrics.update(verified_metrics(verified, clean, survived), verification=figures or None)
    return metrics


def attacked_flags(model: nn.Module, test: Split, runs: list[AttackRun], n: int, batch_size: int,
                   seed: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per sample: classified correctly, and per attack run, correct at the attack's point (gathered over ranks)."""
    device = next(model.parameters()).device
    clean = torch.zeros(n, dtype=torch.bool)
    survived = {run.label: torch.zeros(run.count, dtype=torch.bool) for run in runs}
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
            for run in runs:
                end = min(stop, run.count)
                if end <= start:
                    continue
                x_adv = run.attack(model, x[:end - start], y[:end - start], run.threat, run.settings, seed=seed)
                with torch.inference_mode():
                    held = model(x_adv).argmax(1) == y[:end - start]
                survived[run.label][start:end] = (held & correct[:end - start]).cpu()
    clean = distributed.gather_flags(clean, device)
    return clean, {label: distributed.gather_flags(flags, device) for label, flags in survived.items()}


def _accuracy(flags: torch.Tensor | None) -> float | None:
    return int(flags.sum()) / len(flags) if flags is not None and len(flags) else None


def attack_metrics(clean: torch.Tensor, survived: dict[str, torch.Tensor], attacks: list[str],
                   cfg: EvalConfig) -> dict:
    """The stage record's attack fields: worst case over the attacks at ε, per-attack accuracies, masking gap and
    the consistency warnings."""
    robust, n_robust = worst_case(clean, {a: survived[a] for a in attacks})
    gap, masking = masking_gap(clean, survived, cfg)
    return {
        "robust_acc": _accuracy(robust),
        "n_robust_eval": n_robust,
        "masking_gap": gap,
        "benign_acc": _accuracy(clean),
        "pgd_acc": _accuracy(survived.get("pgd")),
        "autoattack_acc": _accuracy(survived.get("autoattack")),
        "attack_acc": {name: _accuracy(flags) for name, flags in survived.items()},
        "n_autoattack_eval": len(survived["autoattack"]) if "autoattack" in survived else None,
        "warnings": masking + consistency_warnings(clean, survived, cfg),
    }


def verified_metrics(verified: dict[str, torch.Tensor], clean: torch.Tensor,
                     survived: dict[str, torch.Tensor]) -> dict:
    """Verified accuracy (the union of the sound verifiers), per method, after checking every verified sample is
    classified correctly and survives every attack that ran on it."""
    if not verified:
        return {"verified_acc": None, "verified_by": {}, "n_verified_eval": None}
    held_all = clean.clone()
    for flags in survived.values():
        held_all[:len(flags)] &= flags  # held against every attack that ran on the sample
    check_invariants(verified, clean, held_all)
    union = torch.stack(list(verified.values())).any(0)
    n_verify = len(union)
    return {"verified_acc": int(union.sum()) / n_verify if n_verify else None, "n_verified_eval": n_verify,
            "verified_by": {k: int(v.sum()) / n_verify for k, v in verified.items()} if n_verify else {}}


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
    at_eps = {a: f for a, f in survived.items() if "@" not in a}
    gradient = {a: f for a, f in at_eps.items() if not ATTACKS.get(a).gradient_free}
    free = next((a for a in (MASKING_CHECK, *at_eps) if a in at_eps and ATTACKS.get(a).gradient_free), None)
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
    what = {"square": f"Square (gradient-free, {cfg.settings('square').queries} queries)",
            "autoattack": "AutoAttack"}.get(free, free)
    return gap, [f"gradient masking: {what} breaks {100 * gap:.1f}% of the first {count} samples that "
                 f"{' and '.join(gradient)} left (threshold {100 * cfg.masking_threshold:g}%): the gradient "
                 "attacks overstate robustness; robust_acc counts these samples as broken"]


def consistency_warnings(clean: torch.Tensor, survived: dict[str, torch.Tensor], cfg: EvalConfig) -> list[str]:
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
    for label in survived:
        if "@" in label:
            name, fraction = label.split("@")
            compare(label, name, f"accuracy rose from {fraction}·ε to ε; {masking}")
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


def verify_all(model: nn.Module, test: Split, threat: Threat, cfg: EvalConfig, n: int,
               batch_size: int) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """Per verifier, a BoolTensor over the first ``verify_n_samples`` evaluated samples ({} when not applicable), and
    its figures: the verified count and the time per sample (``bab``: also falsified and unknown counts)."""
    if not cfg.verifiers or threat.norm != "linf":
        return {}, {}
    device = next(model.parameters()).device
    count = n if cfg.verify_n_samples is None else min(n, cfg.verify_n_samples)
    flags, figures = {}, {}
    for method in cfg.verifiers:
        verdicts = torch.zeros(count, dtype=torch.int64)  # per sample: VERDICT_CODES
        seconds = torch.zeros(count, dtype=torch.float64)
        for start in distributed.my_starts(range(0, count, batch_size)):
            stop = min(start + batch_size, count)
            x, y = test.x[start:stop].to(device), test.y[start:stop].to(device)
            verdicts[start:stop], seconds[start:stop] = _verify_batch(model, x, y, threat.eps, method, cfg)
        verdicts = distributed.all_sum(verdicts.to(device)).cpu()  # each sample is one rank's; the others hold 0
        seconds = distributed.all_sum(seconds.to(device)).cpu()
        flags[method] = verdicts == 1
        figures[method] = _figures(method, verdicts, seconds)
        if method == "bab":
            falsified = verdicts == 2
    for method, proved in flags.items():
        if "bab" in flags and bool((proved & falsified).any()):
            raise SoundnessError(f"a sample verified by {method} has a counter-example (bab): an unsound bound")
    return flags, figures


def _verify_batch(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, method: str,
                  cfg: EvalConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(verdict codes, seconds) per sample: ``bab`` gives each image its own verdict and time, a bound method shares
    one batched pass's time out evenly."""
    if method == "bab":
        from robustprune import verification  # scipy's solver, only when asked for

        found = verification.verdicts(model, x, y, eps, "bab", timeout=cfg.verify_timeout)
        codes = torch.tensor([VERDICT_CODES[v.verdict] for v in found], dtype=torch.int64)
        return codes, torch.tensor([v.seconds for v in found], dtype=torch.float64)
    started = time.perf_counter()
    proved = verify(model, x, y, eps, method).cpu()
    return proved.long(), torch.full((len(x),), (time.perf_counter() - started) / len(x), dtype=torch.float64)


def _figures(method: str, verdicts: torch.Tensor, seconds: torch.Tensor) -> dict:
    figures = {"verified": int((verdicts == 1).sum()), "n": len(verdicts)}
    if method == "bab":
        figures.update(falsified=int((verdicts == 2).sum()), unknown=int((verdicts == 0).sum()),
                       median_s=float(seconds.median()) if len(seconds) else None,
                       worst_s=float(seconds.max()) if len(seconds) else None)
    else:
        figures["seconds_per_sample"] = float(seconds.mean()) if len(seconds) else None
    return figures


def check_invariants(verified: dict[str, torch.Tensor], clean: torch.Tensor, robust: torch.Tensor) -> None:
    for method, flags in verified.items():
        count = len(flags)
        for name, correct in (("misclassified clean", clean[:count]), ("broken by an attack", robust[:count])):
            bad = (flags & ~correct).nonzero().flatten()
            if len(bad):
                raise SoundnessError(f"{len(bad)} sample(s) verified by {method} but {name} (first: test index "
                                     f"{int(bad[0])}): an unsound bound or a broken attack")

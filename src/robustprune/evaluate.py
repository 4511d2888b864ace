"""Evaluation: benign, PGD (per-sample worst case over restarts) and verified accuracy → one metrics dict.

A sample counts as robust only if it is classified correctly both clean and at the attack's point (the clean input
lies in the ball, so robust accuracy can never exceed benign accuracy). A sample counts as verified by a method when
the method's lower bounds of every margin z_y − z_j over the whole L∞ ball ∩ [0, 1] are positive; ``verified_acc``
counts the samples verified by at least one method (each is sound, so their union is too). Invariants checked on
every evaluation: a verified sample is classified correctly and no attack breaks it — a violation means an unsound
bound or a broken attack and raises ``SoundnessError`` instead of reporting numbers.
"""
from __future__ import annotations

import torch
from torch import nn

from robustprune.attacks import pgd
from robustprune.bounds import verify
from robustprune.config import EvalConfig, ThreatConfig
from robustprune.data import Split


class SoundnessError(RuntimeError):
    """A sample counted as verified was misclassified or broken by an attack: a bug, never a result."""


def evaluate(
    model: nn.Module,
    test: Split,
    threat: ThreatConfig,
    cfg: EvalConfig,
    *,
    batch_size: int = 500,
    seed: int = 0,
) -> dict:
    """Benign, PGD and verified accuracy on the first ``cfg.n_samples`` test samples (all when None).

    The attacks' random starts come from ``seed`` on a forked RNG: identical for every stage and rerun, and the
    caller's random stream is left untouched. Verification covers the first ``cfg.verify_n_samples`` of them and
    runs only for the L∞ threat (the bounds' input set); otherwise the verified fields stay null.
    """
    device = next(model.parameters()).device
    n = len(test) if cfg.n_samples is None else min(cfg.n_samples, len(test))
    was_training = model.training
    model.eval()
    clean_correct = torch.zeros(n, dtype=torch.bool)
    robust_correct = torch.zeros(n, dtype=torch.bool)
    attack = cfg.pgd_steps > 0
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            x, y = test.x[start:stop].to(device), test.y[start:stop].to(device)
            with torch.inference_mode():
                clean = model(x).argmax(1) == y
            robust = clean.clone()
            if attack:
                x_adv = pgd(model, x, y, threat.eps, cfg.pgd_steps, cfg.pgd_step_size, cfg.pgd_restarts, threat.norm)
                with torch.inference_mode():
                    robust &= model(x_adv).argmax(1) == y
            clean_correct[start:stop] = clean.cpu()
            robust_correct[start:stop] = robust.cpu()
    verified = verify_all(model, test, threat, cfg, n, batch_size)
    model.train(was_training)
    metrics = {
        "benign_acc": int(clean_correct.sum()) / n if n else None,
        "pgd_acc": int(robust_correct.sum()) / n if (n and attack) else None,
        "autoattack_acc": None,
        "verified_acc": None,
        "verified_by": {},
        "n_eval": n,
        "n_verified_eval": None,
    }
    if verified:
        check_invariants(verified, clean_correct, robust_correct)
        union = torch.stack(list(verified.values())).any(0)
        n_verify = len(union)
        metrics.update(verified_acc=int(union.sum()) / n_verify if n_verify else None, n_verified_eval=n_verify,
                       verified_by={k: int(v.sum()) / n_verify for k, v in verified.items()} if n_verify else {})
    return metrics


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
        for start in range(0, count, batch_size):
            stop = min(start + batch_size, count)
            x, y = test.x[start:stop].to(device), test.y[start:stop].to(device)
            flags[start:stop] = verify(model, x, y, threat.eps, method).cpu()
        results[method] = flags
    return results


def check_invariants(verified: dict[str, torch.Tensor], clean: torch.Tensor, robust: torch.Tensor) -> None:
    for method, flags in verified.items():
        count = len(flags)
        for name, correct in (("misclassified clean", clean[:count]), ("broken by PGD", robust[:count])):
            bad = (flags & ~correct).nonzero().flatten()
            if len(bad):
                raise SoundnessError(f"{len(bad)} sample(s) verified by {method} but {name} (first: test index "
                                     f"{int(bad[0])}): an unsound bound or a broken attack")

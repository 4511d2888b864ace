"""Evaluation: benign accuracy and PGD accuracy (per-sample worst case over restarts) → one metrics dict.

A sample counts as robust only if it is classified correctly both clean and at the attack's point (the clean input
lies in the ball, so robust accuracy can never exceed benign accuracy). Fields of later evaluators (AutoAttack,
verifiers) are present and null.
"""
from __future__ import annotations

import torch
from torch import nn

from robustprune.attacks import pgd
from robustprune.config import EvalConfig, ThreatConfig
from robustprune.data import Split


def evaluate(
    model: nn.Module,
    test: Split,
    threat: ThreatConfig,
    cfg: EvalConfig,
    *,
    batch_size: int = 500,
    seed: int = 0,
) -> dict:
    """Benign and PGD accuracy on the first ``cfg.n_samples`` test samples (all when None).

    The attacks' random starts come from ``seed`` on a forked RNG: identical for every stage and rerun, and the
    caller's random stream is left untouched.
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
    model.train(was_training)
    return {
        "benign_acc": int(clean_correct.sum()) / n if n else None,
        "pgd_acc": int(robust_correct.sum()) / n if (n and attack) else None,
        "autoattack_acc": None,
        "verified_acc": None,
        "verified_by": {},
        "n_eval": n,
    }

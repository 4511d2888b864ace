"""Per-image verdicts: **verified** (a sound verifier proves every margin positive over the ball), **falsified** (a
concrete point of the ball ∩ [0, 1] that the model misclassifies, re-checked by a forward pass) or **unknown**
(neither, within the method and the time limit). ``robustprune verify`` prints them as a table and writes JSON.

Incomplete verifiers (IBP, CROWN, α-CROWN) prove or give up; a margin-loss PGD with restarts then looks for a
counter-example. ``bab`` (``bounds/bab.py``) searches first, then branches on ReLU splits until proved or timed out. A falsified image is never also verified: that would be an unsound bound, and raises.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

from robustprune.attacks import pgd
from robustprune.bounds import VERIFIERS, verify
from robustprune.bounds.bab import branch_and_bound

VERDICTS = ("verified", "falsified", "unknown")
FALSIFY_STEPS, FALSIFY_RESTARTS = 100, 5  # the counter-example search on an image no verifier proved


@dataclass(frozen=True)
class Verdict:
    index: int  # position in the evaluated images
    verdict: str  # verified | falsified | unknown
    seconds: float  # wall time of this image (bounds, then the counter-example search)
    label: int
    counterexample_label: int | None = None  # the class the falsifying point is given


#: The registered verifiers, then branch and bound (a search, not a bound of its own).
METHODS = (*VERIFIERS.names(), "bab")


def verdicts(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, method: str, seed: int = 0,
             timeout: float = 30.0) -> list[Verdict]:
    """One verdict per image (one at a time, so each image's time is its own). ``bab`` tries α-CROWN, then looks for a
    counter-example, then branches for at most ``timeout`` seconds; the others bound once, then search."""
    model.eval()
    results = []
    for index in range(len(x)):
        torch.manual_seed(seed + index)
        started = time.perf_counter()
        image, label = x[index:index + 1], y[index:index + 1]
        if method == "bab":  # α-CROWN on the whole ball first; a counter-example; then the branches
            proved, found = bool(verify(model, image, label, eps, "alpha-crown")[0]), None
            if not proved:
                found = _counterexample(model, image, label, eps)
                proved = found is None and branch_and_bound(model, image, label, eps, timeout).verified
        else:
            proved = bool(verify(model, image, label, eps, method)[0])
            found = None if proved else _counterexample(model, image, label, eps)
        verdict = "verified" if proved else "falsified" if found is not None else "unknown"
        results.append(Verdict(index, verdict, time.perf_counter() - started, int(label), found))
    return results


def _counterexample(model: nn.Module, image: torch.Tensor, label: torch.Tensor, eps: float) -> int | None:
    """The predicted class at a point of the ball ∩ [0, 1] the model misclassifies, or None. The point is checked
    again here: inside the ball, inside [0, 1], and misclassified by a plain forward pass."""
    point = pgd(model, image, label, eps, FALSIFY_STEPS, restarts=FALSIFY_RESTARTS, loss="margin")
    inside = bool((point - image).abs().max() <= eps + 1e-7) and bool(point.min() >= 0) and bool(point.max() <= 1)
    with torch.no_grad():
        predicted = int(model(point).argmax(1)[0])
    return predicted if inside and predicted != int(label) else None


def summary(results: list[Verdict], method: str, eps: float) -> dict:
    """Counts per verdict and the time per image (median, worst), for the table and the JSON file."""
    times = [r.seconds for r in results]
    return {"method": method, "eps": eps, "n": len(results),
            **{name: sum(r.verdict == name for r in results) for name in VERDICTS},
            "median_s": statistics.median(times) if times else None, "worst_s": max(times) if times else None,
            "images": [asdict(r) for r in results]}


def table(s: dict) -> str:
    return ("| method | ε | images | verified | falsified | unknown | median time | worst time |\n"
            "|---|---:|---:|---:|---:|---:|---:|---:|\n"
            f"| {s['method']} | {s['eps']:g} | {s['n']} | {s['verified']} | {s['falsified']} | {s['unknown']} | "
            f"{s['median_s']:.3f} s | {s['worst_s']:.3f} s |")

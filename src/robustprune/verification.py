"""Per-image verdicts: **verified** (a sound verifier proves every margin positive over the ball), **falsified** (a
concrete point of the ball ∩ [0, 1] that the model misclassifies, re-checked by a forward pass) or **unknown**
(neither, within the method and the time limit). ``robustprune verify`` prints them as a table and writes JSON.

Incomplete verifiers (IBP, CROWN, α-CROWN) prove or give up; a margin-loss PGD with restarts then looks for a
counter-example. ``bab``, in three steps per image: α-CROWN on the whole ball; the counter-example search; then,
for each margin still open (the lowest bound first), an exact search until the time limit — on a network that is a
chain of affine layers and ReLUs, the mixed-integer program of ``bounds/milp.py`` (complete: HiGHS branches on the
unstable ReLUs with LP bounds, on a program that holds only the unpruned weights and the unstable neurons); on any
other network the ReLU-split branch and bound of ``bounds/bab.py`` (sound, not complete). ``evaluate`` raises if an
image one verifier proves is falsified by ``bab``: that would be an unsound bound.
"""
from __future__ import annotations

import concurrent.futures
import multiprocessing
import pickle
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from robustprune.attacks import pgd
from robustprune.bounds import VERIFIERS, AlphaSettings, bab, build_graph, milp, verify
from robustprune.bounds.bab import Found
from robustprune.infra.errors import UserError
from robustprune.infra.runtime import set_threads, threads_per_worker
from robustprune.pruning.groups import baked_copy

VERDICTS = ("verified", "falsified", "unknown")
FALSIFY_STEPS, FALSIFY_RESTARTS = 100, 5  # the counter-example search on an image no verifier proved


@dataclass(frozen=True)
class Verdict:
    index: int  # position in the evaluated images
    verdict: str  # verified | falsified | unknown
    seconds: float  # wall time of this image (bounds, then the counter-example search)
    label: int
    counterexample_label: int | None = None  # the class the falsifying point is given
    decided_by: str | None = None  # the step that decided: the bound method, "attack", "milp" or "branches"
    counterexample: list | None = None  # the falsifying point (the image's shape, as nested lists)


#: The registered verifiers (the bound methods, then ``bab``).
METHODS = VERIFIERS.names()


def verdicts(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, method: str, seed: int = 0,
             timeout: float = 30.0, progress: bool = False, alpha: AlphaSettings | None = None,
             jobs: int = 1) -> list[Verdict]:
    """One verdict per image (one at a time per process, so each image's time is its own; ``timeout`` bounds
    ``bab``'s exact search per image). ``progress`` draws a bar over the images on stderr (when it is a terminal);
    ``alpha``: α-CROWN's settings (``alpha-crown`` and ``bab``'s first bound); ``jobs``: images decided at once, in
    that many worker processes on the CPU with an equal share of its cores (each image keeps its own seed and time
    limit, so only the wall time changes)."""
    model.eval()
    x = x.to(torch.float64)  # bounds in float64, so rounding cannot turn a barely negative margin positive
    with tqdm(total=len(x), desc=f"verify ({method})", unit="image", disable=None if progress else True,
              leave=False) as bar:
        if jobs > 1 and len(x) > 1:
            return _in_workers(model, x, y, eps, method, seed, timeout, alpha, jobs, bar.update)
        chain = _chain(model, method, x)
        results = []
        for index in range(len(x)):
            results.append(_verdict(model, chain, x[index:index + 1], y[index:index + 1], index, eps, method, seed,
                                    timeout, alpha))
            bar.update()
        return results


def _chain(model: nn.Module, method: str, x: torch.Tensor) -> list[milp.Segment] | None:
    return milp.chain_of(build_graph(model), x) if method == "bab" else None


def _verdict(model: nn.Module, chain, image: torch.Tensor, label: torch.Tensor, index: int, eps: float, method: str,
             seed: int, timeout: float, alpha: AlphaSettings | None) -> Verdict:
    """The verdict of image number ``index`` (1, *shape), seeded by its index wherever it runs."""
    torch.manual_seed(seed + index)
    started = time.perf_counter()
    if method == "bab":
        verdict, found, step = _bab(model, chain, image, label, eps, started + timeout, alpha)
    else:
        verdict, found, step = _bound_then_attack(model, image, label, eps, method, alpha)
    return Verdict(index, verdict, time.perf_counter() - started, int(label), None if found is None else found[0],
                   step, None if found is None else found[1][0].tolist())


# --------------------------------------------------------------------------------------------- worker processes

_WORKER: dict = {}  # a worker process's model and program chain, set once when it starts


def _in_workers(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, method: str, seed: int,
                timeout: float, alpha: AlphaSettings | None, jobs: int, done: Callable[[], object]) -> list[Verdict]:
    """The verdicts from ``jobs`` spawned processes (the model is sent once to each), in the images' order."""
    cpu = baked_copy(model).cpu()  # masks baked into plain weights (a parametrized module does not pickle)
    try:
        pickle.dumps(cpu)
    except Exception as err:  # a user's network holding a lambda, an open file, ...
        raise UserError(f"--jobs > 1 sends the model to worker processes, and it cannot be pickled ({err}); "
                        "use --jobs 1") from None
    x, y = x.cpu(), y.cpu()
    pool = concurrent.futures.ProcessPoolExecutor(
        jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_start_worker,
        initargs=(cpu, method, x[:1], threads_per_worker(jobs)))
    try:
        futures = [pool.submit(_worker_verdict, x[i:i + 1], y[i:i + 1], i, eps, method, seed, timeout, alpha)
                   for i in range(len(x))]
        for _ in concurrent.futures.as_completed(futures):
            done()
        return [future.result() for future in futures]
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _start_worker(model: nn.Module, method: str, example: torch.Tensor, threads: int) -> None:
    set_threads(threads)
    _WORKER.update(model=model, chain=_chain(model, method, example))


def _worker_verdict(image: torch.Tensor, label: torch.Tensor, index: int, eps: float, method: str, seed: int,
                    timeout: float, alpha: AlphaSettings | None) -> Verdict:
    return _verdict(_WORKER["model"], _WORKER["chain"], image, label, index, eps, method, seed, timeout, alpha)


def _bound_then_attack(model: nn.Module, image: torch.Tensor, label: torch.Tensor, eps: float,
                       method: str, alpha: AlphaSettings | None) -> tuple[str, Found | None, str | None]:
    """An incomplete verifier, then (if it fails) the counter-example search."""
    if bool(verify(model, image, label, eps, method, alpha=alpha)[0]):
        return "verified", None, method
    found = _counterexample(model, image, label, eps)
    return ("falsified", found, "attack") if found is not None else ("unknown", None, None)


def _bab(model: nn.Module, chain, image: torch.Tensor, label: torch.Tensor, eps: float,
         deadline: float, alpha: AlphaSettings | None) -> tuple[str, Found | None, str | None]:
    decision = bab.decide(model, image, label, eps, deadline, chain, alpha,
                          attack=lambda: _counterexample(model, image, label, eps))
    return decision.verdict, decision.found, decision.step


def _counterexample(model: nn.Module, image: torch.Tensor, label: torch.Tensor, eps: float) -> Found | None:
    """A point of the ball ∩ [0, 1] the model misclassifies (with its class), or None."""
    start = image.to(bab.model_dtype(model))  # the attack runs the model in its own precision
    return bab.misclassified(model, image, label, eps,
                             pgd(model, start, label, eps, FALSIFY_STEPS, restarts=FALSIFY_RESTARTS, loss="margin"))


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

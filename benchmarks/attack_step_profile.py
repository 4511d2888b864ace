"""Where a PGD attack step's time goes: ``torch.profiler`` self time per operator (and input shape), as a table.

The model is MNIST ``cnn-small`` (or ``--model``), batch 128, in eval mode, attacked by ``robustprune.attacks.pgd``
(PGD-10, ε = 0.3). The table lists the operators by self CPU time per attack step, with their share of the step; the
last line times, without the profiler, attack steps against clean training steps (forward, backward, Adam) in
alternating blocks: 1 + K × (attack step / clean step) is what the adversarial-training overhead would be if the
training pass of a PGD step cost exactly a clean step. The profiler adds a little time to every operator call.

    ROBUSTPRUNE_DATA=../shared/data .venv/bin/python benchmarks/attack_step_profile.py
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.profiler import profile

from at_overhead import _clean, batch
from robustprune.attacks import pgd
from robustprune.models import create_model


def per_step_ms(fn, steps: int) -> float:
    """Wall time of ``fn()`` per step, when one call runs ``steps`` steps."""
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) / steps * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="cnn-small")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--attacks", type=int, default=5, help="profiled attacks")
    parser.add_argument("--rows", type=int, default=14)
    args = parser.parse_args()
    x, y, source = batch(args.batch, torch.device("cpu"))
    torch.manual_seed(0)
    model = create_model(args.model, tuple(x.shape[1:]), 10).eval()
    attack = lambda: pgd(model, x, y, 0.3, args.steps)  # noqa: E731
    for _ in range(3):
        attack()
    with profile(record_shapes=True) as prof:
        for _ in range(args.attacks):
            attack()
    steps = args.attacks * args.steps
    rows = sorted(prof.key_averages(group_by_input_shape=True), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in rows) / 1000 / steps
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.model}, batch {args.batch} ({source}), "
          f"PGD-{args.steps}, {args.attacks} attacks profiled")
    print("| operator | input shapes | calls per step | self ms per step | share |")
    print("|---|---|---:|---:|---:|")
    for e in rows[:args.rows]:
        ms = e.self_cpu_time_total / 1000 / steps
        shapes = ", ".join(str(list(s)) for s in e.input_shapes if s)
        print(f"| {e.key} | {shapes} | {e.count / steps:.0f} | {ms:.2f} | {100 * ms / total:.0f}% |")
    print(f"| (all operators, profiled) | | | {total:.2f} | 100% |")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    clean = lambda: _clean(model, optimizer, x, y)  # noqa: E731  (the at_overhead benchmark's clean step)
    for _ in range(5):
        clean()
    model.eval()
    attack_ms, clean_ms = [], []
    for _ in range(9):  # alternating blocks: the machine's speed drifts by tens of per cent within a minute
        attack_ms.append(per_step_ms(attack, args.steps))
        clean_ms.append(per_step_ms(lambda: [clean() for _ in range(5)], 5))
        model.eval()
    ratio = statistics.median(a / c for a, c in zip(attack_ms, clean_ms))
    print(f"unprofiled, median of 9 alternating blocks: attack step {statistics.median(attack_ms):.2f} ms, clean "
          f"training step {statistics.median(clean_ms):.2f} ms; attack step / clean step = {ratio:.3f}, so "
          f"{args.steps} attack steps + 1 training step ≈ {1 + args.steps * ratio:.2f} clean steps")


if __name__ == "__main__":
    main()

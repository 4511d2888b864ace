"""Adversarial-training overhead: time of one PGD-10 training step / time of one clean training step, as a table.

A PGD-K step costs K attack passes (forward + input-gradient backward) and one training pass (forward + full
backward). Counting a forward as 1 unit and a full backward as 2, the compute limit is (2K+3)/3 ≈ 7.7 clean steps
for K = 10 (an attack backward needs no weight gradients). Rows:

- ``robustprune``: the library's own training step (``train.TrainStep`` with the ``pgd`` / ``benign`` objectives);
- ``straightforward``: the textbook loop — ``loss.backward()`` in every attack step (weight gradients computed and
  thrown away), a ``.item()`` host sync per step, the mask parametrization recomputed at every pass.

Each model runs in its own process (so its peak memory is its own): warm-up steps, then blocks of clean steps and
blocks of PGD steps in alternation (machine noise hits both alike); the overhead is the median over the pairs of
blocks of PGD time / clean time. Peak memory is the process's peak RSS increase over its set-up, training
included (CPU), or ``torch.cuda.max_memory_allocated`` (CUDA). MNIST training images are used when found, else
uniform noise (the timing does not depend on the pixel values). ``--pruned`` also times the models with 90% of
each layer's weights masked (the fine-tuning case).

    .venv/bin/python benchmarks/at_overhead.py
    ROBUSTPRUNE_DATA=../shared/data .venv/bin/python benchmarks/at_overhead.py --models cnn-small,cnn-large --pruned
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from robustprune.config import TrainConfig
from robustprune.infra.errors import UserError
from robustprune.models import create_model
from robustprune.objectives import OBJECTIVES
from robustprune.train import TrainStep, make_optimizer, make_scheduler


def batch(size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, str]:
    try:
        from robustprune.data import load_dataset
        train = load_dataset("mnist").train
        return train.x[:size].to(device), train.y[:size].to(device), "MNIST"
    except UserError:
        gen = torch.Generator().manual_seed(0)
        return (torch.rand(size, 1, 28, 28, generator=gen).to(device),
                torch.randint(0, 10, (size,), generator=gen).to(device), "noise")


def prune_90(model: torch.nn.Module) -> None:
    from robustprune.pruning.masks import prunable_layers, set_mask
    for _, module in prunable_layers(model):
        w = module.weight.detach().abs()
        set_mask(module, (w > w.flatten().kthvalue(int(0.9 * w.numel())).values).float())


def straightforward_step(model, optimizer, x, y, eps: float, steps: int) -> float:
    """The textbook PGD training step (the reference the optimised path is measured against)."""
    alpha = 2.5 * eps / steps
    model.eval()
    x_adv = (x + torch.empty_like(x).uniform_(-eps, eps)).clamp(0, 1)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        loss = F.cross_entropy(model(x_adv), y)
        loss.backward()  # weight gradients too, thrown away below
        loss.item()  # a host sync per step (progress printing)
        x_adv = torch.min(torch.max(x_adv.detach() + alpha * x_adv.grad.sign(), x - eps), x + eps).clamp(0, 1)
    model.train()
    optimizer.zero_grad()
    loss = F.cross_entropy(model(x_adv), y)
    loss.backward()
    optimizer.step()
    return loss.item()


def run_case(args) -> dict:
    """Clean and PGD training steps of one model, timed in alternating blocks (machine noise hits both alike)."""
    torch.manual_seed(0)
    device = torch.device(args.device)
    x, y, source = batch(args.batch, device)
    model = create_model(args.model, (1, 28, 28), 10).to(device)
    if args.pruned:
        prune_90(model)
    cfg = TrainConfig(epochs=1, optimizer="adam", lr=1e-4, schedule="constant")
    optimizer = make_optimizer(model, cfg)
    total = 2 * (args.warmup + args.repeats * args.block)
    scheduler = make_scheduler(optimizer, cfg, total)
    steps = {name: TrainStep(model, optimizer, scheduler, objective, "fp32", device)
             for name, objective in (("clean", OBJECTIVES.get("benign")()),
                                     ("pgd", OBJECTIVES.get("pgd")(eps=0.3, steps=args.steps)))}
    if args.variant == "straightforward":
        work = {"clean": lambda: _clean(model, optimizer, x, y),
                "pgd": lambda: straightforward_step(model, optimizer, x, y, 0.3, args.steps)}
    else:
        work = {name: (lambda step=step: (model.train(), step(x, y, 1.0))) for name, step in steps.items()}

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(args.warmup):
        for one in work.values():
            one()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = {name: [] for name in work}
    for _ in range(args.repeats):
        for name, one in work.items():
            start = time.perf_counter()
            for _ in range(args.block):
                one()
            sync()
            times[name].append((time.perf_counter() - start) / args.block)
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda"
            else (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_rss) / 1024)
    return {"clean_ms": 1000 * statistics.median(times["clean"]), "pgd_ms": 1000 * statistics.median(times["pgd"]),
            "ratios": [p / c for p, c in zip(times["pgd"], times["clean"])], "peak_mib": peak, "source": source}


def _clean(model, optimizer, x, y) -> None:
    model.train()
    optimizer.zero_grad()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()
    loss.item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="cnn-small,cnn-large")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--block", type=int, default=5, help="steps per timed block")
    parser.add_argument("--repeats", type=int, default=7, help="timed blocks (the median is reported)")
    parser.add_argument("--pruned", action="store_true", help="also time models with 90%% of each layer masked")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--variants", default="robustprune,straightforward")
    parser.add_argument("--case", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args)))
        return
    print(f"torch {torch.__version__}, device {args.device}, {torch.get_num_threads()} threads, batch {args.batch}, "
          f"PGD-{args.steps}, median of {args.repeats} blocks of {args.block} steps after {args.warmup} warm-up")
    print("| model | masks | variant | clean step ms | PGD step ms | overhead | limit | peak MiB |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    limit = (2 * args.steps + 3) / 3
    for model in args.models.split(","):
        for pruned in ([False, True] if args.pruned else [False]):
            for variant in args.variants.split(","):
                cmd = [sys.executable, __file__, "--case", "--model", model, "--variant", variant,
                       "--batch", str(args.batch), "--steps", str(args.steps), "--warmup", str(args.warmup),
                       "--block", str(args.block), "--repeats", str(args.repeats), "--device", args.device]
                out = subprocess.run(cmd + (["--pruned"] if pruned else []), check=True, capture_output=True,
                                     text=True).stdout
                r = json.loads(out.strip().splitlines()[-1])
                print(f"| {model} | {'90% masked' if pruned else 'dense'} | {variant} | {r['clean_ms']:.1f} | "
                      f"{r['pgd_ms']:.1f} | {statistics.median(r['ratios']):.2f} | {limit:.1f} | "
                      f"{r['peak_mib']:.0f} |", flush=True)


if __name__ == "__main__":
    main()

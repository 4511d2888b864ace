"""Time of IBP, CROWN-IBP and full CROWN margin bounds on MNIST ``cnn-small`` (batch 128), as a table.

The issue's targets on 2 CPU cores: IBP ≤ 15 ms, full CROWN ≤ 5 s per batch of 128 (auto_LiRPA 0.7.1 measured 5.2 s
on the same network). The network is a checkpoint when given (a certified-trained one is the realistic case: few
unstable neurons), else a fresh initialisation (every neuron unstable: the worst case). Inputs are the first MNIST
test images when the data is found, else uniform noise. Also reports peak memory of the process. The allocator is
set as the robustprune command sets it (``robustprune.infra.allocator``) unless ``--glibc-defaults`` is given.

    .venv/bin/python benchmarks/bounds_speed.py
    ROBUSTPRUNE_DATA=../shared/data .venv/bin/python benchmarks/bounds_speed.py --checkpoint RUN/finetuned.safetensors
"""
from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch

from robustprune.infra.allocator import keep_freed_memory
from robustprune.bounds import margin_lower_bounds
from robustprune.infra.errors import UserError
from robustprune.export import load
from robustprune.models import create_model


def inputs(batch: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    try:
        from robustprune.data import load_dataset
        test = load_dataset("mnist").test
        return test.x[:batch], test.y[:batch], "MNIST test images"
    except UserError:
        torch.manual_seed(0)
        return torch.rand(batch, 1, 28, 28), torch.randint(0, 10, (batch,)), "uniform noise (no MNIST found)"


def time_method(model, x, y, eps, method, repeats) -> tuple[float, float]:
    """(median seconds, fraction of samples verified)."""
    times, lower = [], None
    with torch.no_grad():
        for _ in range(repeats):
            start = time.perf_counter()
            lower = margin_lower_bounds(model, x, y, eps, method)
            times.append(time.perf_counter() - start)
    return statistics.median(times), float((lower > 0).all(1).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="a robustprune checkpoint of cnn-small on MNIST")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--eps", type=float, default=0.1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--glibc-defaults", action="store_true", help="leave the allocator as glibc sets it")
    args = parser.parse_args()
    allocator = "glibc defaults" if args.glibc_defaults or not keep_freed_memory() else "robustprune's allocator"
    if args.checkpoint:
        model, source = load(args.checkpoint), args.checkpoint
    else:
        torch.manual_seed(0)
        model, source = create_model("cnn-small", (1, 28, 28), 10), "fresh cnn-small (all neurons unstable)"
    model.eval()
    x, y, data = inputs(args.batch)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {source}; {data}; batch {args.batch}, "
          f"eps {args.eps}, median of {args.repeats}; {allocator}")
    print("| method | dtype | s / batch | verified |")
    print("|---|---|---:|---:|")
    for method in ("ibp", "crown-ibp", "crown"):
        for dtype in (torch.float32, torch.float64):
            margin_lower_bounds(model, x[:2].to(dtype), y[:2], args.eps, method)  # warm-up
            seconds, verified = time_method(model, x.to(dtype), y, args.eps, method, args.repeats)
            print(f"| {method} | {str(dtype).replace('torch.', '')} | {seconds:.3f} | {verified:.1%} |", flush=True)
    print(f"peak resident memory: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()

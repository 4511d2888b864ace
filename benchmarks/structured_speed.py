"""CPU inference time of dense, masked (structured masks, still dense compute) and slim models, as a table.

Half of the filters of every group are removed by filter-L1 (``channel_masks(..., channel_fraction=0.5)``), the
masks are applied, and :func:`robustprune.pruning.structured.slim` cuts the channels out. Each model is timed at one
batch under ``torch.inference_mode`` (median of repeats after warm-up, torch's default thread count).

    .venv/bin/python benchmarks/structured_speed.py
    .venv/bin/python benchmarks/structured_speed.py --batch 128 --repeats 30 --fraction 0.5
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from torch import nn

from robustprune.models import create_model
from robustprune.pruning.masks import apply_masks
from robustprune.pruning.structured import channel_masks, count_macs_params, slim

CASES = [("vgg16-bn", (3, 32, 32)), ("cnn-large", (1, 28, 28))]


def time_batch(model: nn.Module, x: torch.Tensor, repeats: int, warmup: int) -> float:
    """Median milliseconds of one forward pass of batch ``x``."""
    times = []
    with torch.inference_mode():
        for i in range(warmup + repeats):
            start = time.perf_counter()
            model(x)
            if i >= warmup:
                times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def variants(name: str, shape: tuple[int, ...], fraction: float) -> dict[str, nn.Module]:
    """Dense, masked-but-dense and slim versions of one freshly initialised model (eval mode)."""
    torch.manual_seed(0)
    dense = create_model(name, shape, 10).eval()
    example = torch.rand(2, *shape)
    masked = copy.deepcopy(dense)
    apply_masks(masked, channel_masks(dense, example, channel_fraction=fraction))
    small = slim(masked, example).eval()
    with torch.no_grad():  # the slim model must compute what the masked one does
        assert torch.allclose(small(example), masked(example), atol=1e-5)
    return {"dense": dense, "masked": masked, "slim": small}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--fraction", type=float, default=0.5, help="fraction of filters removed per group")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, "
          f"median of {args.repeats} after {args.warmup} warm-up, {args.fraction:.0%} of filters removed")
    print("| model | variant | params | MACs / example | ms / batch | speed-up vs dense |")
    print("|---|---|---:|---:|---:|---:|")
    for name, shape in CASES:
        x = torch.rand(args.batch, *shape)
        dense_ms = None
        for variant, model in variants(name, shape, args.fraction).items():
            macs, params = count_macs_params(model, x[:1])
            ms = time_batch(model, x, args.repeats, args.warmup)
            dense_ms = dense_ms or ms
            print(f"| {name} {shape[1]}×{shape[2]} | {variant} | {params:,} | {macs:,} | {ms:.1f} | "
                  f"{dense_ms / ms:.2f}× |", flush=True)


if __name__ == "__main__":
    main()

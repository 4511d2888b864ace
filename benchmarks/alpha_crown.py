"""CROWN against α-CROWN on a checkpoint: verified images and time, as a table.

    ROBUSTPRUNE_DATA=../shared/data .venv/bin/python benchmarks/alpha_crown.py runs/mnist-pgd/finetuned.safetensors \\
        [--eps 0.3] [--n 100] [--batch 25]

The first ``n`` MNIST test images, float64, margin lower bounds z_y − z_j over the L∞ ball ∩ [0, 1]; an image is
verified when every margin's lower bound is positive. Both methods are sound; α-CROWN is never looser.
"""
from __future__ import annotations

import argparse
import time

import torch

from robustprune.bounds import margin_lower_bounds
from robustprune.data import load_dataset
from robustprune.export import load


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--eps", type=float, default=0.3)
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--batch", type=int, default=25)
    args = parser.parse_args()
    test = load_dataset("mnist").test
    x, y = test.x[:args.n].double(), test.y[:args.n]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; first {args.n} MNIST test images, "
          f"eps {args.eps}, float64")
    print("| checkpoint | method | verified | mean worst-margin bound | time |")
    print("|---|---|---:|---:|---:|")
    for path in args.checkpoints:
        model = load(path).double().eval()
        for method in ("crown", "alpha-crown"):
            start = time.perf_counter()
            with torch.no_grad():
                lower = torch.cat([margin_lower_bounds(model, x[i:i + args.batch], y[i:i + args.batch], args.eps,
                                                       method) for i in range(0, args.n, args.batch)])
            print(f"| {path} | {method} | {int((lower > 0).all(1).sum())}/{args.n} | "
                  f"{lower.min(1).values.mean():.3f} | {time.perf_counter() - start:.1f} s |", flush=True)


if __name__ == "__main__":
    main()

"""Evaluation throughput (images per second): benign accuracy, PGD-50, and the verifiers, as a table.

What ``robustprune run`` spends in its evaluate stage, one component at a time, on the first ``--n`` MNIST test
images in batches of ``--batch`` (the configs' ``eval_batch_size``): benign under inference mode, PGD-50 (one
restart, ε = 0.3), and the sound verifiers (IBP, CROWN-IBP, full CROWN) at the same ε in float64 as
``evaluate`` runs them. Median of ``--repeats`` after a warm-up; ``--pruned`` also times the model with 90% of
each layer masked (what a pruned run evaluates). With ``--checkpoint`` the network is that checkpoint (a trained
net has fewer unstable neurons: full CROWN is faster), else a fresh ``cnn-small``.

    ROBUSTPRUNE_DATA=../shared/data .venv/bin/python benchmarks/eval_speed.py [--checkpoint CKPT] [--pruned]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from robustprune.attacks import pgd
from robustprune.bounds import verify
from robustprune.data import load_dataset

from common import mnist_cnn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint")
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--eps", type=float, default=0.3)
    parser.add_argument("--crown-n", type=int, default=100, help="images for full CROWN (the slow verifier)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--pruned", action="store_true")
    args = parser.parse_args()
    test = load_dataset("mnist").test
    model = mnist_cnn(args.checkpoint)
    variants = [("as loaded", model)]
    if args.pruned:
        import copy

        from robustprune.pruning import prune
        masked = copy.deepcopy(model)
        prune(masked, "magnitude", 10.0, "layer")
        variants.append(("10× magnitude masks", masked))

    def batches(n: int):
        for i in range(0, n, args.batch):
            yield test.x[i:min(i + args.batch, n)], test.y[i:min(i + args.batch, n)]

    def benign(net, n):
        with torch.inference_mode():
            for x, _ in batches(n):
                net(x).argmax(1)

    def attack(net, n):
        for x, y in batches(n):
            pgd(net, x, y, args.eps, 50)

    def bound(method):
        def run(net, n):
            for x, y in batches(n):
                verify(net, x, y, args.eps, method)
        return run

    work = [("benign", benign, args.n), ("PGD-50", attack, args.n), ("IBP", bound("ibp"), args.n),
            ("CROWN-IBP", bound("crown-ibp"), args.n), ("CROWN", bound("crown"), args.crown_n)]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, MNIST test images, batch {args.batch}, "
          f"ε = {args.eps}, median of {args.repeats}, model {args.checkpoint or 'fresh cnn-small'}")
    print("| model | evaluation | images | images / s |")
    print("|---|---|---:|---:|")
    for label, net in variants:
        for name, fn, n in work:
            fn(net, min(n, args.batch))  # warm-up
            times = []
            for r in range(args.repeats):
                torch.manual_seed(r)
                start = time.perf_counter()
                fn(net, n)
                times.append(time.perf_counter() - start)
            print(f"| {label} | {name} | {n} | {n / statistics.median(times):,.0f} |", flush=True)


if __name__ == "__main__":
    main()

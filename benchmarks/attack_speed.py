"""Attack throughput: ``robustprune.attacks.pgd`` against ``torchattacks.PGD`` on the same work, as a table.

Same model (eval mode), same images, batch, ε, step size (2.5 ε / steps), number of steps, one random start.
Both attacks run on the first ``--n`` MNIST test images in batches; the table gives images per second (median of
``--repeats`` timings, the two libraries interleaved, taking turns at going first, so that machine noise hits both
alike), the speed ratio (median over the interleaved pairs of their time / ours) and the accuracy under each
attack (the work must be the same: equal accuracy within a few samples, the random starts differ).

torchattacks is not a dependency of robustprune; install it in the benchmark environment only, without its
dependencies (a plain install pulls another torch and torchvision)::

    .venv/bin/pip install --no-deps torchattacks==3.5.1
    ROBUSTPRUNE_DATA=../shared/data .venv/bin/python benchmarks/attack_speed.py --checkpoint CKPT.safetensors

Without ``--checkpoint`` a fresh ``cnn-small`` is timed (speed does not depend on the weights; the accuracies are
then meaningless).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from robustprune.attacks import pgd
from robustprune.attacks.pgd import default_step_size
from robustprune.data import load_dataset

from common import mnist_cnn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="a robustprune checkpoint (.safetensors); default: fresh cnn-small")
    parser.add_argument("--n", type=int, default=1000, help="test images attacked per timing")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--eps", type=float, default=0.3)
    parser.add_argument("--steps", default="10,50", help="comma-separated PGD step counts")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    try:
        import torchattacks
    except ImportError:
        raise SystemExit("torchattacks is not installed: .venv/bin/pip install --no-deps torchattacks==3.5.1")
    test = load_dataset("mnist").test
    x_all, y_all = test.x[:args.n], test.y[:args.n]
    model = mnist_cnn(args.checkpoint)
    batches = [(x_all[i:i + args.batch], y_all[i:i + args.batch]) for i in range(0, len(y_all), args.batch)]

    def ours(steps: int) -> torch.Tensor:
        return torch.cat([pgd(model, x, y, args.eps, steps) for x, y in batches])

    def theirs(steps: int) -> torch.Tensor:
        attack = torchattacks.PGD(model, eps=args.eps, alpha=default_step_size(args.eps, steps), steps=steps,
                                  random_start=True)
        return torch.cat([attack(x, y) for x, y in batches])

    def accuracy(x_adv: torch.Tensor) -> float:
        with torch.inference_mode():
            return float((model(x_adv).argmax(1) == y_all).float().mean())

    print(f"torch {torch.__version__}, torchattacks {torchattacks.__version__}, {torch.get_num_threads()} threads, "
          f"{len(y_all)} MNIST test images, batch {args.batch}, ε = {args.eps}, median of {args.repeats}, "
          f"model {args.checkpoint or 'fresh cnn-small'}")
    print("| steps | robustprune img/s | torchattacks img/s | speed ratio | acc. robustprune | acc. torchattacks |")
    print("|---:|---:|---:|---:|---:|---:|")
    for steps in (int(s) for s in args.steps.split(",")):
        times = {"ours": [], "theirs": []}
        acc = {}
        ours(steps)  # warm-up
        theirs(steps)
        for r in range(args.repeats):
            pair = [("ours", ours), ("theirs", theirs)]
            for name, attack in pair if r % 2 == 0 else pair[::-1]:  # alternate which one goes first
                torch.manual_seed(r)
                start = time.perf_counter()
                x_adv = attack(steps)
                times[name].append(time.perf_counter() - start)
                acc.setdefault(name, []).append(accuracy(x_adv))
        ours_rate = len(y_all) / statistics.median(times["ours"])
        theirs_rate = len(y_all) / statistics.median(times["theirs"])
        ratio = statistics.median(t / o for o, t in zip(times["ours"], times["theirs"]))  # per pair, then median
        print(f"| {steps} | {ours_rate:.0f} | {theirs_rate:.0f} | {ratio:.2f}× | "
              f"{statistics.mean(acc['ours']):.3f} | {statistics.mean(acc['theirs']):.3f} |", flush=True)


if __name__ == "__main__":
    main()

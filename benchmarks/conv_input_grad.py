"""Input gradient of a convolution on CPU: oneDNN's backward-data kernel against the direct GEMM + col2im kernel.

The evidence behind ``robustprune.models.layers.InputConv2d``: for image-input layers (1–3 channels) the direct
kernel (``aten::slow_conv_transpose2d``) is the faster one; deeper layers (16+ channels) are faster with oneDNN, so
they keep ``nn.Conv2d``. Median of repeats after warm-up, alternating the two kernels, batch 128 by default.

    .venv/bin/python benchmarks/conv_input_grad.py [--batch 128] [--repeats 30]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

# (name, in channels, out channels, image size, kernel, stride, padding)
LAYERS = [
    ("MNIST cnn-small conv 1", 1, 16, 28, 4, 2, 1),
    ("MNIST cnn-large conv 1", 1, 32, 28, 3, 1, 1),
    ("CIFAR cnn-small conv 1", 3, 16, 32, 4, 2, 1),
    ("CIFAR ResNet/VGG stem", 3, 64, 32, 3, 1, 1),
    ("MNIST cnn-small conv 2", 16, 32, 14, 4, 2, 1),
    ("MNIST cnn-large conv 2", 32, 32, 28, 4, 2, 1),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, "
          f"median of {args.repeats} after 5 warm-up calls")
    print("| layer | in → out, k, s | oneDNN ms | direct ms | speed-up | max rel. difference |")
    print("|---|---|---:|---:|---:|---:|")
    for name, cin, cout, size, k, s, p in LAYERS:
        x = torch.randn(args.batch, cin, size, size)
        w = torch.randn(cout, cin, k, k)
        g = torch.randn_like(F.conv2d(x, w, None, s, p))
        out_pad = size - ((g.shape[-1] - 1) * s - 2 * p + k)
        kernels = {
            "onednn": lambda: torch.ops.aten.convolution_backward(
                g, x, w, [cout], [s, s], [p, p], [1, 1], False, [0, 0], 1, [True, False, False])[0],
            "direct": lambda: torch.ops.aten.slow_conv_transpose2d(
                g, w, [k, k], None, [s, s], [p, p], [out_pad, out_pad], [1, 1]),
        }
        for kernel in kernels.values():
            for _ in range(5):
                kernel()
        times: dict[str, list[float]] = {key: [] for key in kernels}
        for _ in range(args.repeats):
            for key, kernel in kernels.items():
                start = time.perf_counter()
                kernel()
                times[key].append(time.perf_counter() - start)
        ref, direct = kernels["onednn"](), kernels["direct"]()
        diff = ((direct - ref).abs().max() / ref.abs().max()).item()
        onednn_ms, direct_ms = (1000 * statistics.median(times[key]) for key in ("onednn", "direct"))
        print(f"| {name} | {cin} → {cout}, {k}, {s} | {onednn_ms:.2f} | {direct_ms:.2f} | "
              f"{onednn_ms / direct_ms:.2f}× | {diff:.1e} |")


if __name__ == "__main__":
    main()

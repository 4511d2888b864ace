"""Size on disk of sparse checkpoints against the dense fp32 safetensors file, as a table.

The issue's targets: sparse / dense ≤ 0.135 at 10× and ≤ 0.03 at 100× compression (layer-wise magnitude pruning of
``cnn-large`` and ``vgg16-bn`` at the CIFAR-10 input shape), about half of that with fp16 values. Also times
``save`` and ``load`` of each file and reports how far the loaded model's logits move (0 for fp32: exact).

    .venv/bin/python benchmarks/export_size.py [--models cnn-large vgg16-bn] [--compressions 10 100]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from robustprune.export import load, read_metadata, save
from robustprune.models import create_model
from robustprune.pruning import prune


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["cnn-large", "vgg16-bn"])
    parser.add_argument("--compressions", nargs="+", type=float, default=[10.0, 100.0])
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="robustprune-export-"))
    print(f"torch {torch.__version__}; input (3, 32, 32), 10 classes; layer-wise magnitude pruning")
    print("| model | compression | dtype | dense fp32 | sparse | ratio | encodings (delta / bitmask) | save s "
          "| load s | max abs logit change |")
    print("|---|---:|---|---:|---:|---:|---|---:|---:|---|")
    x = torch.rand(4, 3, 32, 32)
    for name in args.models:
        torch.manual_seed(0)
        dense_model = create_model(name, (3, 32, 32), 10).eval()
        dense = save(dense_model, folder / f"{name}.safetensors").stat().st_size
        for compression in args.compressions:
            model = create_model(name, (3, 32, 32), 10).eval()
            model.load_state_dict(dense_model.state_dict())
            prune(model, "magnitude", compression, "layer")
            for dtype in ("fp32", "fp16", "bf16"):
                path = folder / f"{name}-{compression:g}-{dtype}.safetensors"
                start = time.perf_counter()
                save(model, path, format="sparse", dtype=dtype)
                saved = time.perf_counter() - start
                start = time.perf_counter()
                back = load(path)
                loaded = time.perf_counter() - start
                encodings = [part["encoding"] for part in read_metadata(path)["sparse"].values()]
                with torch.no_grad():
                    change = float((back(x) - model(x)).abs().max())
                size = path.stat().st_size
                print(f"| {name} | {compression:g}× | {dtype} | {dense / 1e6:.2f} MB | {size / 1e6:.3f} MB | "
                      f"{size / dense:.4f} | {encodings.count('delta')} / {encodings.count('bitmask')} | "
                      f"{saved:.2f} | {loaded:.2f} | {change:.1e} |", flush=True)


if __name__ == "__main__":
    main()

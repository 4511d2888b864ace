"""The digits objective-matrix sweep in one process against local workers, alternating, as a table.

    .venv/bin/python benchmarks/sweep_workers.py [--compression 1,2,5,10,20,50,100] [--workers 2] [--rounds 2]

Each round runs the README's matrix sweep (embedded digits, the default config, pre-training objectives benign,pgd,
fine-tuning objectives benign,pgd: 2 pre-trainings and 28 points) into a fresh folder twice — in-process with torch's default threads (one per core), then with
``--workers N`` (cores // N threads each) — and prints both wall times and their ratio; the metrics of the two
sweeps are compared too (same seeds: they must agree).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def timed_sweep(folder: Path, compression: str, workers: int | None) -> tuple[float, list]:
    args = [sys.executable, "-m", "robustprune", "sweep", "--out", str(folder), "--compression", compression,
            "--pretrain-objectives", "benign,pgd", "--finetune-objectives", "benign,pgd", "--quiet"]
    if workers:
        args += ["--workers", str(workers)]
    started = time.perf_counter()
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - started
    points = json.loads((folder / "sweep.json").read_text())["points"]
    return seconds, [_without_wall_times(p) for p in points]


def _without_wall_times(value):
    """A record without who computed it and the wall times inside it (time_s, the verifiers' seconds)."""
    if isinstance(value, dict):
        return {k: _without_wall_times(v) for k, v in value.items()
                if k not in ("time_s", "worker", "seconds_per_sample", "median_s", "worst_s")}
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compression", default="1,2,5,10,20,50,100")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    print(f"{os.cpu_count()} cores; digits sweep, compressions {args.compression}, objectives benign,pgd × benign,pgd")
    print(f"| round | in-process | --workers {args.workers} | speed-up | same metrics |")
    print("|---:|---:|---:|---:|---|")
    for round_ in range(1, args.rounds + 1):
        with tempfile.TemporaryDirectory() as tmp:
            alone, metrics_alone = timed_sweep(Path(tmp) / "one", args.compression, None)
            shared, metrics_shared = timed_sweep(Path(tmp) / "workers", args.compression, args.workers)
        print(f"| {round_} | {alone:.1f} s | {shared:.1f} s | {alone / shared:.2f}× | "
              f"{'yes' if metrics_alone == metrics_shared else 'NO'} |", flush=True)


if __name__ == "__main__":
    main()

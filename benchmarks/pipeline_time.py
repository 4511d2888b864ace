"""Wall time of whole pipeline runs, per stage, as a table (median over repeats).

    .venv/bin/python benchmarks/pipeline_time.py                       # the embedded default (make demo's run)
    ROBUSTPRUNE_DATA=../shared/data .venv/bin/python benchmarks/pipeline_time.py -c configs/mnist-pgd.yaml --repeats 1
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from robustprune.config import load_config
from robustprune.pipeline import run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--config")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    cfg = load_config(args.config, args.overrides)
    rows = []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            report = run(cfg, Path(tmp) / "run", quiet=True, log=lambda _: None)
            rows.append({**report["timing_s"], "wall": time.perf_counter() - start,
                         "tuned": report["stages"]["finetuned"]})
    med = {k: statistics.median(r[k] for r in rows) for k in ("pretrain", "prune", "finetune", "evaluate", "wall")}
    tuned = rows[-1]["tuned"]
    print(f"config {cfg.name}: {cfg.data.name} / {cfg.model.name} / {cfg.objective.name}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {args.repeats} repeat(s), median seconds")
    print("| pretrain | prune | finetune | evaluate | run (wall) | fine-tuned benign | fine-tuned PGD |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| {med['pretrain']:.1f} | {med['prune']:.2f} | {med['finetune']:.1f} | {med['evaluate']:.1f} | "
          f"{med['wall']:.1f} | {tuned['benign_acc']:.3f} | {tuned['pgd_acc']:.3f} |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()

"""`robustprune verify` one image at a time against `--jobs N` worker processes, alternating, as a table.

    ROBUSTPRUNE_DATA=../shared/data .venv/bin/python benchmarks/verify_jobs.py runs/mnist-pgd/finetuned.safetensors \\
        [--method bab] [--n 20] [--timeout 20] [--jobs 2] [--rounds 2]

Each round runs the command twice on the same images: one process with one thread (as the complete-verification
study runs), then ``--jobs N`` (cores // N threads each). It prints both wall times (process start to exit), their
ratio, the verdict counts, and how many images got a different verdict (a time limit reached in one run and not in
the other would show here: each image keeps its own seed and time limit, so nothing else can differ).
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


def timed_verify(args: argparse.Namespace, out: Path, jobs: int) -> tuple[float, dict]:
    command = [sys.executable, "-m", "robustprune", "verify", args.checkpoint, "--method", args.method,
               "--n", str(args.n), "--timeout", str(args.timeout), "--jobs", str(jobs), "--out", str(out)]
    env = {**os.environ, **({"OMP_NUM_THREADS": "1"} if jobs == 1 else {})}
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, env=env)
    return time.perf_counter() - started, json.loads(out.read_text())


def counts(result: dict) -> str:
    return f"{result['verified']} / {result['falsified']} / {result['unknown']}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--method", default="bab")
    parser.add_argument("--n", type=int, default=20)
    parser.add_argument("--timeout", type=float, default=20.0)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    print(f"{os.cpu_count()} cores; {args.checkpoint}, {args.method}, first {args.n} test images, "
          f"{args.timeout:g} s per image")
    print(f"| round | one process, 1 thread | --jobs {args.jobs} | speed-up | verified / falsified / unknown "
          f"(1 → {args.jobs}) | verdicts that differ |")
    print("|---:|---:|---:|---:|---|---:|")
    with tempfile.TemporaryDirectory() as folder:
        for round_ in range(1, args.rounds + 1):
            alone, one = timed_verify(args, Path(folder) / f"one{round_}.json", 1)
            shared, many = timed_verify(args, Path(folder) / f"many{round_}.json", args.jobs)
            differ = sum(a["verdict"] != b["verdict"] for a, b in zip(one["images"], many["images"]))
            print(f"| {round_} | {alone:.1f} s | {shared:.1f} s | {alone / shared:.2f}× | {counts(one)} → "
                  f"{counts(many)} | {differ} |", flush=True)


if __name__ == "__main__":
    main()

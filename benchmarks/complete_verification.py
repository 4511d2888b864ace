"""Complete verification (bab) against the incomplete verifiers and AutoAttack, per checkpoint, as a table.

    ROBUSTPRUNE_DATA=../shared/data OMP_NUM_THREADS=1 .venv/bin/python benchmarks/complete_verification.py \\
        runs/mnist-pgd/pretrained.safetensors runs/mnist-pgd/finetuned.safetensors [--eps 0.3] [--n 100] \\
        [--timeout 60] [--folder runs/verify]

On the first ``n`` MNIST test images: IBP, CROWN and α-CROWN verified counts; bab's verified / falsified / unknown
with the median and worst time per image; standard AutoAttack's robust count; the share of the gap between
IBP ∪ CROWN and AutoAttack that bab closes; the exact program's size (binaries = unstable ReLUs, nonzero weights).
Two checks print beside: verified images AutoAttack breaks (must be 0: an unsound verdict) and falsified images
AutoAttack leaves unbroken (real counter-examples the attack missed). bab's verdicts are written to
``FOLDER/<checkpoint>.bab.json`` and read back on a rerun (delete the file to measure again).
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from robustprune import verification
from robustprune.attacks import autoattack
from robustprune.bounds import build_graph, milp, verify
from robustprune.bounds.propagate import crown_bounds, input_box
from robustprune.data import load_dataset
from robustprune.export import load


def bab_verdicts(path: str, x, y, eps: float, timeout: float, folder: Path) -> dict:
    saved = folder / f"{Path(path).stem}.bab.json"
    if saved.exists():
        return json.loads(saved.read_text())
    model = load(path).double().eval()
    found = verification.summary(verification.verdicts(model, x, y, eps, "bab", timeout=timeout, progress=True),
                                 "bab", eps)
    folder.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps(found))
    return found


def program_size(model, x, eps: float) -> tuple[float, int]:
    """Median binaries over the images, and the nonzero weights of the encoded segments."""
    graph = build_graph(model)
    chain = milp.chain_of(graph, x)
    binaries = [milp.encode(chain, crown_bounds(graph, input_box(x[i:i + 1], eps), "crown",
                                                stop=graph.output - 1)).binaries for i in range(len(x))]
    return statistics.median(binaries), sum(s.weight.nnz for s in chain)


def row(path: str, x, y, eps: float, timeout: float, folder: Path) -> str:
    bab = bab_verdicts(path, x, y, eps, timeout, folder)
    model = load(path).double().eval()
    with torch.no_grad():
        flags = {m: verify(model, x, y, eps, m) for m in ("ibp", "crown", "alpha-crown")}
    incomplete = flags["ibp"] | flags["crown"]
    plain = load(path).eval()
    adversarial = autoattack(plain, x.float(), y, eps)
    with torch.no_grad():
        robust = plain(adversarial).argmax(1) == y
    verdict = [i["verdict"] for i in bab["images"]]
    verified = torch.tensor([v == "verified" for v in verdict])
    falsified = torch.tensor([v == "falsified" for v in verdict])
    gap = int(robust.sum()) - int(incomplete.sum())
    closed = (int(verified.sum()) - int(incomplete.sum())) / gap if gap > 0 else float("nan")
    binaries, nonzero = program_size(model, x, eps)
    return (f"| {Path(path).name} | {int(flags['ibp'].sum())} | {int(flags['crown'].sum())} | "
            f"{int(incomplete.sum())} | {int(flags['alpha-crown'].sum())} | **{bab['verified']}** | {bab['falsified']} | "
            f"{bab['unknown']} | {int(robust.sum())} | {closed:.0%} | {bab['median_s']:.1f} s | {bab['worst_s']:.1f} s | "
            f"{binaries:.0f} | {nonzero} | {int((verified & ~robust).sum())} | {int((falsified & robust).sum())} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--eps", type=float, default=0.3)
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--folder", default="runs/verify")
    args = parser.parse_args()
    test = load_dataset("mnist").test
    x, y = test.x[:args.n].double(), test.y[:args.n]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; first {args.n} MNIST test images, "
          f"eps {args.eps}, bab timeout {args.timeout:g} s per image")
    print("| checkpoint | IBP | CROWN | IBP ∪ CROWN | α-CROWN | bab verified | falsified | unknown | AutoAttack robust "
          "| gap closed | median time | worst time | binaries (median) | nonzero weights | verified but broken "
          "| falsified, AA missed |")
    print("|---|" + "---:|" * 15)
    for path in args.checkpoints:
        print(row(path, x, y, args.eps, args.timeout, Path(args.folder)), flush=True)


if __name__ == "__main__":
    main()

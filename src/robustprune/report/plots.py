"""PNG plots of runs and sweeps (matplotlib, object API and the Agg canvas: no global pyplot state, no display).

- sweep: accuracy (robust / benign / PGD / AutoAttack / verified, whichever were measured) against compression on a log
  axis, one line per pre-training → fine-tuning objective pair and rule, the dense model as a dashed reference line;
  and retention (fraction of the dense value kept) against compression.
- run: the accuracies of the three stages as grouped bars, the density each layer kept (the allocation), and the
  training curves (loss, train accuracy per epoch) of ``metrics.jsonl``.
Every file is written atomically.
"""
from __future__ import annotations

import json
from pathlib import Path

from matplotlib.figure import Figure

from robustprune.infra.fileio import atomic_path
from robustprune.report.run import METRICS



def _save(figure: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    return path


def _measured(records: list[dict]) -> list[tuple[str, str]]:
    return [(k, label) for k, label in METRICS if any(r.get(k) is not None for r in records)]


def _series(records: list[dict]) -> dict[tuple[str, str, str], list[dict]]:
    lines: dict[tuple[str, str, str], list[dict]] = {}
    for r in records:
        lines.setdefault((r["pretrain"], r["finetune"], r["rule"]), []).append(r)
    return {k: sorted(v, key=lambda r: r["compression"]) for k, v in lines.items()}


def sweep_plots(result: dict, folder: Path) -> list[Path]:
    """accuracy.png and retention.png of a sweep record (``sweep.sweep``)."""
    records = result["points"]
    measured = _measured(records)
    if not records or not measured:
        return []
    series = _series(records)
    several_rules = len({r["rule"] for r in records}) > 1
    paths = []
    for kind in ("accuracy", "retention"):
        shown = measured if kind == "accuracy" else [  # a retention needs a nonzero dense value to divide by
            (k, label) for k, label in measured if any(d.get(k) for d in result["dense"].values())]
        if not shown:
            continue
        figure = Figure(figsize=(4.2 * len(shown), 3.6), layout="constrained")
        axes = figure.subplots(1, len(shown), squeeze=False)[0]
        for ax, (key, label) in zip(axes, shown):
            for (pre, ft, rule), rows in series.items():
                dense = result["dense"].get(pre, {}).get(key)
                xs = [r["compression"] for r in rows if r.get(key) is not None]
                ys = [r[key] for r in rows if r.get(key) is not None]
                if kind == "retention":
                    xs, ys = ([], []) if not dense else (xs, [y / dense for y in ys])
                name = f"{pre} → {ft}" + (f" ({rule})" if several_rules else "")
                ax.plot(xs, ys, marker="o", label=name)
            if kind == "accuracy":
                for pre in dict.fromkeys(r["pretrain"] for r in records):
                    dense = result["dense"].get(pre, {}).get(key)
                    if dense is not None:
                        ax.axhline(dense, linestyle="--", linewidth=1, color="gray")
                        ax.annotate(f"dense ({pre})", (1, dense), fontsize=7, color="gray",
                                    xytext=(2, 2), textcoords="offset points")
            else:
                ax.axhline(1.0, linestyle="--", linewidth=1, color="gray")
            ax.set_xscale("log")
            ax.set_xlabel("compression (×)")
            ax.set_ylabel(f"{label} accuracy" if kind == "accuracy" else f"{label} kept (fraction of dense)")
            ax.set_title(label)
            ax.grid(True, which="both", alpha=0.3)
        axes[0].legend(fontsize=7)
        figure.suptitle(f"{result['config']['model']['name']} on {result['config']['data']['name']}, "
                        f"{result['threat']['norm']} ε = {result['threat']['eps']:g}")
        paths.append(_save(figure, folder / f"{kind}.png"))
    return paths


def run_plots(report: dict, run_dir: Path) -> list[Path]:
    """stages.png (accuracy per stage), densities.png (per-layer density) and, when metrics.jsonl has epochs,
    training.png, in ``run_dir/plots``."""
    stages = report.get("stages") or {}
    measured = _measured(list(stages.values()))
    paths = []
    if stages and measured:
        figure = Figure(figsize=(6, 3.6))
        ax = figure.subplots()
        width = 0.8 / len(measured)
        for i, (key, label) in enumerate(measured):
            xs = [j + i * width for j in range(len(stages))]
            ax.bar(xs, [s.get(key) or 0 for s in stages.values()], width, label=label)
        ax.set_xticks([j + width * (len(measured) - 1) / 2 for j in range(len(stages))])
        ax.set_xticklabels([f"{name}\n{s.get('compression') or 1:.0f}×" for name, s in stages.items()])
        ax.set_ylim(0, 1)
        ax.set_ylabel("accuracy")
        ax.legend(fontsize=8)
        ax.grid(True, axis="y", alpha=0.3)
        paths.append(_save(figure, run_dir / "plots" / "stages.png"))
    if report.get("layers"):
        paths.append(_save(_density_figure(report), run_dir / "plots" / "densities.png"))
    epochs = _epochs(run_dir / "metrics.jsonl")
    if epochs:
        figure = Figure(figsize=(9, 3.4))
        loss_ax, acc_ax = figure.subplots(1, 2)
        step = 0
        for stage in dict.fromkeys(e["stage"] for e in epochs):
            rows = [e for e in epochs if e["stage"] == stage]
            xs = list(range(step + 1, step + len(rows) + 1))
            loss_ax.plot(xs, [e["loss"] for e in rows], label=stage)
            acc_ax.plot(xs, [e["train_acc"] for e in rows], label=stage)
            step += len(rows)
        loss_ax.set_ylabel("training loss")
        acc_ax.set_ylabel("training accuracy (on the objective's inputs)")
        for ax in (loss_ax, acc_ax):
            ax.set_xlabel("epoch (all stages in order)")
            ax.grid(True, alpha=0.3)
        acc_ax.legend(fontsize=8)
        paths.append(_save(figure, run_dir / "plots" / "training.png"))
    return paths


def _density_figure(report: dict) -> Figure:
    """The density each pruned layer kept (log axis), the uniform rate 1 / compression as a dashed reference and
    HARP's learned densities (before the exact budget) as markers."""
    layers = report["layers"]
    figure = Figure(figsize=(max(4.0, 0.7 * len(layers) + 2), 3.6), layout="constrained")
    ax = figure.subplots()
    xs = list(range(len(layers)))
    ax.bar(xs, [row["density"] for row in layers], 0.6, label="kept")
    learned = [(x, row["learned_density"]) for x, row in zip(xs, layers) if row.get("learned_density") is not None]
    if learned:
        ax.plot(*zip(*learned), linestyle="none", marker="o", color="black", label="learned (HARP)")
    compression = (report["stages"].get("finetuned") or {}).get("compression")
    if compression:
        ax.axhline(1 / compression, linestyle="--", linewidth=1, color="gray", label="uniform 1 / compression")
    ax.set_xticks(xs)
    ax.set_xticklabels([f"{row['layer']}\n{row['weights']:,}" for row in layers], fontsize=7)
    densities = [row["density"] for row in layers] + [d for _, d in learned]
    if max(densities) > 10 * min(densities):  # a log axis only where the allocation spans decades
        ax.set_yscale("log")
    else:
        ax.set_ylim(0, min(1.0, 1.15 * max(densities)))
    ax.set_ylabel("density (kept / weights)")
    prune = report["config"].get("prune", {})
    ax.set_title(f"per-layer density: {prune.get('rule')} ({prune.get('scope')})", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(True, which="both", axis="y", alpha=0.3)
    return figure


def _epochs(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut by an interruption: the rest still plots
            continue
        if {"stage", "loss", "train_acc"} <= set(row):
            rows.append(row)
    return rows

"""report.json (DESIGN.md §5), report.md, and the console table — one table, rendered for both."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from robustprune.infra.fileio import finite, write_json, write_text

STAGE_FIELDS = ("robust_acc", "n_robust_eval", "masking_gap", "benign_acc", "pgd_acc", "autoattack_acc",
                "verified_acc", "verified_by", "attack_acc", "smoothing", "params_prunable", "params_nonzero",
                "compression", "sparsity", "n_eval", "n_autoattack_eval", "n_verified_eval", "verification", "warnings")
#: What runs and sweeps show, headline first: robust = the per-sample worst case over every attack run.
METRICS = (("robust_acc", "robust"), ("benign_acc", "benign"), ("pgd_acc", "PGD"), ("autoattack_acc", "AutoAttack"),
           ("verified_acc", "verified"))
RETAINED = {"robust": "robust_acc", "benign": "benign_acc", "pgd": "pgd_acc", "autoattack": "autoattack_acc",
            "verified": "verified_acc"}


def retention(stages: dict[str, dict]) -> dict[str, float | None]:
    """Fine-tuned / pre-trained value of each accuracy (null when either is missing or the dense one is 0)."""
    before, after = stages.get("pretrained", {}), stages.get("finetuned", {})
    out = {}
    for key, field in RETAINED.items():
        a, b = after.get(field), before.get(field)
        out[key] = a / b if (a is not None and b) else None
    return out


def layer_rows(kept: dict[str, tuple[int, int]], learned: dict[str, float] | None = None) -> list[dict]:
    """report.json ``layers``: each prunable layer's weights, kept count and density (the allocation the rule chose),
    with HARP's learned density before the exact budget was applied."""
    learned = learned or {}
    return [{"layer": layer, "weights": total, "kept": nonzero, "density": nonzero / total,
             "learned_density": learned.get(layer)} for layer, (nonzero, total) in kept.items()]


def build_report(version: str, config: dict, stages: dict[str, dict], timing: dict[str, float],
                 artifacts: dict[str, Any], layers: list[dict] | None = None) -> dict:
    threat = config.get("threat", {})
    return finite({
        "robustprune_version": version,
        "config": config,
        "threat": {"norm": threat.get("norm"), "eps": threat.get("eps")},
        "stages": {name: {f: record.get(f) for f in STAGE_FIELDS} for name, record in stages.items()},  # run order
        "retention": retention(stages),
        "timing_s": {k: round(v, 2) for k, v in timing.items()},
        "layers": layers or [],
        "artifacts": artifacts,
        "warnings": [f"{name}: {w}" for name, record in stages.items() for w in record.get("warnings") or []],
    })


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f}%"


def stage_table(report: dict) -> str:
    """Markdown table of the stages: compression and every accuracy measured (— where not measured)."""
    header = "| stage | compression | sparsity | robust (worst case) | benign | PGD | AutoAttack | verified | n |"
    lines = [header, "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, s in report["stages"].items():
        comp = "—" if s.get("compression") is None else f"{s['compression']:.2f}×"
        lines.append(f"| {name} | {comp} | {_pct(s.get('sparsity'))} | **{_pct(s.get('robust_acc'))}** | "
                     f"{_pct(s.get('benign_acc'))} | "
                     f"{_pct(s.get('pgd_acc'))} | {_pct(s.get('autoattack_acc'))} | {_pct(s.get('verified_acc'))} | "
                     f"{s.get('n_eval')} |")
    robust_counts = {s.get("n_robust_eval") for s in report["stages"].values()} - {None}
    if robust_counts:
        attacks = sorted({a.split("@")[0] for s in report["stages"].values() for a in s.get("attack_acc") or {}})
        lines.append(f"\nRobust = survives every attack run ({', '.join(attacks)}), on the first "
                     f"{', '.join(map(str, sorted(robust_counts)))} samples.")
    by_method = [f"{name}: " + ", ".join(f"{k} {_pct(v)}" for k, v in s["verified_by"].items())
                 for name, s in report["stages"].items() if s.get("verified_by")]
    if by_method:
        counts = {s.get("n_verified_eval") for s in report["stages"].values()} - {None}
        lines.append(f"\nVerified by method (first {', '.join(map(str, sorted(counts)))} samples): "
                     + "; ".join(by_method))
    complete = [(name, s["verification"]["bab"]) for name, s in report["stages"].items()
                if "bab" in (s.get("verification") or {})]
    if complete:
        lines.append("\nComplete verification (bab), verified / falsified / unknown: " + "; ".join(
            f"{name}: {f['verified']} / {f['falsified']} / {f['unknown']} of {f['n']} (median {f['median_s']:.1f} s, "
            f"worst {f['worst_s']:.1f} s per sample)" for name, f in complete))
    aa_counts = {s.get("n_autoattack_eval") for s in report["stages"].values()} - {None}
    if aa_counts and aa_counts != {s.get("n_eval") for s in report["stages"].values()}:
        lines.append(f"\nAutoAttack on the first {', '.join(map(str, sorted(aa_counts)))} samples.")
    smoothing = [(name, s["smoothing"]) for name, s in report["stages"].items() if s.get("smoothing")]
    if smoothing:
        first = smoothing[0][1]
        lines.append(f"\nRandomized smoothing (σ = {first['sigma']:g}, n = {first['n']}, α = {first['alpha']:g}, "
                     f"first {first['n_certified']} samples), certified accuracy at L2 radius: "
                     + "; ".join(f"{name}: " + ", ".join(f"r={r} {_pct(v)}" for r, v in fig["certified_acc"].items())
                                 for name, fig in smoothing))
    if report.get("warnings"):
        lines.append("\nWarnings:\n" + "\n".join(f"- {w}" for w in report["warnings"]))
    r = report.get("retention") or {}
    kept = ", ".join(f"{k} {100 * v:.1f}%" for k, v in r.items() if v is not None)
    if kept:
        lines.append(f"\nRetention (fine-tuned / pre-trained): {kept}")
    if report.get("layers"):
        lines.append("\n" + layer_table(report["layers"]))
    if report.get("structure"):
        d, s = report["structure"]["dense"], report["structure"]["slim"]
        lines.append(f"Slim model: {s['params']:,} of {d['params']:,} parameters, {s['macs']:,} of {d['macs']:,} "
                     f"MACs per example ({d['macs'] / max(s['macs'], 1):.2f}× fewer)")
    return "\n".join(lines)


def layer_table(layers: list[dict]) -> str:
    """Markdown table of the final per-layer allocation."""
    learned = any(row.get("learned_density") is not None for row in layers)
    lines = ["| layer | weights | kept | density |" + (" learned density |" if learned else ""),
             "|---|---:|---:|---:|" + ("---:|" if learned else "")]
    for row in layers:
        extra = f" {100 * row['learned_density']:.2f}% |" if row.get("learned_density") is not None else " — |"
        extra = extra if learned else ""
        lines.append(f"| {row['layer']} | {row['weights']:,} | {row['kept']:,} | {100 * row['density']:.2f}% |{extra}")
    return "\n".join(lines)


def render_markdown(report: dict) -> str:
    cfg = report["config"]
    threat = report["threat"]
    timing = ", ".join(f"{k} {v:.1f} s" for k, v in report["timing_s"].items())
    return (
        f"# robustprune run: {cfg.get('name')}\n\n"
        f"Data `{cfg['data']['name']}`, model `{cfg['model']['name']}`, objective `{cfg['objective']['name']}`, "
        f"pruning `{cfg['prune']['rule']}` ({cfg['prune']['scope']}), threat {threat['norm']} ε = {threat['eps']:g}, "
        f"PGD-{cfg['evaluate']['pgd_steps']} × {cfg['evaluate']['pgd_restarts']} restart(s) for evaluation.\n\n"
        f"{stage_table(report)}\n\nTiming: {timing}.\n"
        + "".join(f"\n![{Path(p).stem}](plots/{Path(p).name})\n"
                  for p in (report.get("artifacts") or {}).get("plots", []))
    )


def write_report(out_dir: str | Path, report: dict) -> None:
    """report.json, the plots (``plots/``) and report.md embedding them."""
    from robustprune.report.plots import run_plots

    out_dir = Path(out_dir)
    artifacts = report.setdefault("artifacts", {})
    artifacts["plots"] = [p.relative_to(out_dir).as_posix() for p in run_plots(report, out_dir)]
    write_json(out_dir / "report.json", report)
    write_text(out_dir / "report.md", render_markdown(report))

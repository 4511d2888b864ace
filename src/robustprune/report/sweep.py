"""sweep.md: the tables of a sweep record (sweep.json), one per pre-training objective and rule."""
from __future__ import annotations

from pathlib import Path

from robustprune.report.run import METRICS


def _pct(value) -> str:
    return "—" if value is None else f"{100 * value:.1f}%"


def render_sweep(result: dict, out: Path | None = None) -> str:
    """sweep.md: one table per pre-training objective and rule (rows: compression; columns: fine-tuning objective ×
    metric), the dense reference, and the plots."""
    cfg, records = result["config"], result["points"]
    lines = [f"# robustprune sweep: {cfg.get('name')}", "",
             f"Data `{cfg['data']['name']}`, model `{cfg['model']['name']}`, threat {result['threat']['norm']} "
             f"ε = {result['threat']['eps']:g}; {len(records)} points.", ""]
    measured = [(k, label) for k, label in METRICS if any(r.get(k) is not None for r in records)]
    for pre in dict.fromkeys(r["pretrain"] for r in records):
        for rule in dict.fromkeys(r["rule"] for r in records if r["pretrain"] == pre):
            rows = [r for r in records if r["pretrain"] == pre and r["rule"] == rule]
            fts = list(dict.fromkeys(r["finetune"] for r in rows))
            dense = result["dense"].get(pre, {})
            lines.append(f"## Pre-trained with `{pre}`, rule `{rule}` (dense: "
                         + ", ".join(f"{label} {_pct(dense.get(k))}" for k, label in measured) + ")")
            lines.append("")
            head = " | ".join(f"{label} (fine-tuned: {ft})" for ft in fts for _, label in measured)
            lines.append(f"| compression | {head} |")
            lines.append("|---:|" + "---:|" * (len(fts) * len(measured)))
            for c in sorted({r["compression"] for r in rows}):
                cells = []
                for ft in fts:
                    match = next((r for r in rows if r["finetune"] == ft and r["compression"] == c), {})
                    cells += [_pct(match.get(k)) for k, _ in measured]
                lines.append(f"| {c:g}× | " + " | ".join(cells) + " |")
            lines.append("")
    total = sum(r.get("time_s") or 0 for r in records) + sum(d.get("time_s") or 0 for d in result["dense"].values())
    lines.append(f"Compute: {total:.0f} s in all (pre-training included).")
    for plot in result.get("plots", []):
        name = Path(plot).name
        lines += ["", f"![{name}](plots/{name})"]
    return "\n".join(lines) + "\n"

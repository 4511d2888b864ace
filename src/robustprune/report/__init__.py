"""What a run or a sweep shows: report.json (docs/design.md §5), report.md and the console table (``run``),
sweep.md (``sweep``), the plots (``plots``), TensorBoard scalars (``tensorboard``), and ``robustprune report``'s
re-rendering (``rerender``). Rendering only: nothing here trains, evaluates or orchestrates."""
from robustprune.report.rerender import rerender, repoint_artifacts
from robustprune.report.run import (
    METRICS, STAGE_FIELDS, build_report, finite, layer_rows, layer_table, render_markdown, retention,
    stage_table, write_report,
)
from robustprune.report.sweep import render_sweep

__all__ = ["METRICS", "STAGE_FIELDS", "build_report", "finite", "layer_rows", "layer_table",
           "render_markdown", "repoint_artifacts", "rerender", "render_sweep", "retention", "stage_table",
           "write_report"]

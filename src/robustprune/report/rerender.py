"""``robustprune report``: a run's or a sweep's plots and markdown written again from its stored JSON."""
from __future__ import annotations

import json
from pathlib import Path

from robustprune.infra import outdir
from robustprune.infra.errors import UserError
from robustprune.infra.fileio import write_json, write_text
from robustprune.report.run import render_markdown, write_report
from robustprune.report.sweep import render_sweep


def rerender(folder: str | Path) -> list[Path]:
    """``robustprune report``: the plots and markdown of a run folder (report.json) or a sweep folder (sweep.json)
    written again from the stored JSON, without running anything. A moved run folder's artifact paths are pointed at
    its new place. The folder is locked meanwhile (``outdir``): a run or sweep still writing it is not disturbed."""
    folder = Path(folder)
    for name in ("sweep.json", "report.json"):
        if (folder / name).is_file():
            data = _read_json(folder / name)
            try:  # markdown first (in memory): a malformed file is refused before anything is rewritten
                with outdir.lock_folder(folder):
                    return _rerender_sweep(data, folder) if name == "sweep.json" else _rerender_run(data, folder)
            except UserError:
                raise
            except (KeyError, TypeError, ValueError, AttributeError, IndexError) as err:
                raise UserError(f"{folder / name}: not a robustprune {name} ({type(err).__name__}: {err})") from None
    raise UserError(f"{folder}: no report.json or sweep.json (give a run or sweep folder)")


def _rerender_sweep(data: dict, folder: Path) -> list[Path]:
    from robustprune.report.plots import sweep_plots  # matplotlib only when plots are drawn: the CLI starts faster

    render_sweep(data, folder)
    data["plots"] = [p.relative_to(folder).as_posix() for p in sweep_plots(data, folder / "plots")]
    write_json(folder / "sweep.json", data)
    write_text(folder / "sweep.md", render_sweep(data, folder))
    return [folder / "sweep.md", *(folder / p for p in data["plots"])]


def _rerender_run(report: dict, folder: Path) -> list[Path]:
    render_markdown(report)
    repoint_artifacts(report, folder)
    write_report(folder, report)
    return [folder / "report.md", *(folder / p for p in report["artifacts"]["plots"])]


def repoint_artifacts(report: dict, folder: Path) -> None:
    """Artifact paths relative to the run folder, as ``run`` writes them since report.json files became portable.
    An older report.json named them as ``<folder where it was written>/<name>`` (report.md's folder): those become
    ``<name>``; paths outside that folder are kept as they are."""
    artifacts = report.get("artifacts")
    anchor = artifacts.get("report_md") if isinstance(artifacts, dict) else None
    if not isinstance(anchor, str):  # nothing to re-point (write_report adds the plots)
        return
    old = Path(anchor).parent
    for key, value in artifacts.items():
        if key != "plots" and isinstance(value, str) and Path(value).is_relative_to(old):
            artifacts[key] = Path(value).relative_to(old).as_posix()


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
        if not isinstance(value, dict):
            raise ValueError("not a JSON object")
        return value
    except (ValueError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: unreadable ({err})") from None

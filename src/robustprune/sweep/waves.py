"""A sweep's tasks (the pre-trainings, then the points) through a backend, watched from this process: a line per
finished task (which, its headline figures, its time, its worker), a bar with the ETA on a terminal, and every task
the backend left undone — a dead worker's, or all of them in-process — done here, under the same claims.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Callable

from tqdm.auto import tqdm

from robustprune.report import METRICS
from robustprune.sweep import backends
from robustprune.sweep.tasks import Task, finished, run_task

POLL_S = 0.25  # how often a waiting sweep looks at the folder (a few stat calls)


def run_wave(folder: Path, tasks: list[Task], options: backends.BackendOptions, data, quiet: bool,
             log: Callable[[str], None]) -> dict[str, dict]:
    """Every task of the wave done (by anyone); their result records by key."""
    results: dict[str, dict] = {}
    bar = tqdm(total=len(tasks), unit="task", desc="sweep", leave=False,
               disable=quiet or not sys.stderr.isatty())
    for task in tasks:  # done before: reported once, not recomputed
        if (record := finished(folder, task)) is not None:
            results[task.key] = record
            log(f"[{len(results)}/{len(tasks)}] {task.key}: done before, skipped")
            bar.update(1)
    started = backends.start(folder, [t for t in tasks if t.key not in results], options)
    try:
        while len(results) < len(tasks):
            _collect(folder, tasks, results, bar, log)
            if len(results) == len(tasks):
                break
            if started.done() and _finish_one(folder, tasks, results, data, quiet):
                continue  # did one here; look again at once
            time.sleep(POLL_S)
    finally:
        started.close()
        bar.close()
    return results


def _collect(folder: Path, tasks: list[Task], results: dict[str, dict], bar, log: Callable[[str], None]) -> None:
    for task in tasks:
        if task.key not in results and (record := finished(folder, task)) is not None:
            results[task.key] = record
            bar.update(1)
            log(f"[{len(results)}/{len(tasks)}] {task.key}: {_headline(record)}")


def _finish_one(folder: Path, tasks: list[Task], results: dict[str, dict], data, quiet: bool) -> bool:
    """Do the first task nobody finished nor holds, here; False when every remaining one is held by a live worker."""
    for task in tasks:
        if task.key not in results and run_task(folder, task, data=data, quiet=quiet):
            return True
    return False


def _headline(record: dict) -> str:
    figures = "  ".join(f"{label} {record[key]:.3f}" for key, label in METRICS if record.get(key) is not None)
    return f"{figures}  ({record.get('time_s', 0):.1f} s, {record.get('worker', 'here')})"

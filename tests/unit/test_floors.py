"""The floors of docs/design.md §2, enforced: a unit (a top-level module or package of ``src/robustprune``) may
import only units on lower floors, and every unit has a floor. Imports inside functions count too; importing a
name of the package root (``from robustprune import fit``) is importing the top floor."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "src" / "robustprune"

#: Top floor first. The one place the floors are written (docs/design.md §2 draws them).
FLOORS: list[set[str]] = [
    {"__main__"},                       # python -m robustprune
    {"__init__", "cli"},                # public API and the command line
    {"sweep"},                          # many runs: orchestration
    {"pipeline"},                       # one run: the stage table
    {"report"},                         # rendering: report.json / .md, sweep.md, plots
    {"train", "evaluate", "prepare"},   # training; evaluation; a run's inputs
    {"verification"},                   # per-image verdicts (evaluate's bab figures use them)
    {"export"},                         # checkpoints and their formats
    {"config"},                         # the user's settings, checked against the registries below
    {"objectives"},                     # training losses (use attacks and bounds)
    {"attacks", "bounds", "pruning", "smoothing"},
    {"data"},
    {"models"},
    {"registry"},
    {"infra"},                          # errors, files, folders, journal, devices, torchrun
]
FLOOR = {unit: level for level, units in enumerate(FLOORS) for unit in units}


def unit_of(path: Path) -> str:
    part = path.relative_to(PACKAGE).parts[0]
    return part[:-3] if part.endswith(".py") else part


def imported_units(path: Path) -> list[tuple[str, int]]:
    """(unit, line) of every robustprune import in ``path``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name.split(".")[1], node.lineno) for alias in node.names
                      if alias.name.startswith("robustprune.")]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            parts = node.module.split(".")
            if parts[0] != "robustprune":
                continue
            if len(parts) > 1:
                found.append((parts[1], node.lineno))
            else:  # from robustprune import x: a submodule, or a name of the package root
                found += [(alias.name if _is_unit(alias.name) else "__init__", node.lineno) for alias in node.names]
    return found


def _is_unit(name: str) -> bool:
    return (PACKAGE / f"{name}.py").is_file() or (PACKAGE / name / "__init__.py").is_file()


def sources() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_every_unit_has_a_floor():
    units = {unit_of(p) for p in sources()}
    assert units - set(FLOOR) == set(), "place the new module in FLOORS (and docs/design.md §2)"
    assert set(FLOOR) - units == set(), "a floor names a unit that no longer exists"


def test_no_upward_or_sideways_import():
    violations = []
    for path in sources():
        own = unit_of(path)
        for unit, line in imported_units(path):
            if unit != own and FLOOR[unit] <= FLOOR[own]:
                violations.append(f"{path.relative_to(PACKAGE)}:{line} imports {unit} (floor {FLOOR[unit]}) from "
                                  f"{own} (floor {FLOOR[own]})")
    assert violations == []


def test_the_check_sees_an_upward_import(tmp_path):
    """The checker itself: a bounds module importing the pipeline (inside a function) is an upward import."""
    path = tmp_path / "m.py"
    path.write_text("import torch\n\ndef f():\n    from robustprune.pipeline import run\n")
    assert imported_units(path) == [("pipeline", 4)]
    assert FLOOR["pipeline"] < FLOOR["bounds"]


@pytest.mark.parametrize("statement, expected", [
    ("from robustprune import fit", "__init__"),
    ("from robustprune import pipeline", "pipeline"),
    ("import robustprune.infra.errors", "infra"),
    ("from robustprune.report.plots import x", "report"),
])
def test_import_forms(tmp_path, statement, expected):
    path = tmp_path / "m.py"
    path.write_text(statement + "\n")
    assert imported_units(path) == [(expected, 1)]


# ------------------------------------------------------------------------------ the shape of the code (issue 19)

MAX_FUNCTION_LINES, MAX_FILE_LINES = 60, 400


def test_no_function_over_60_lines_and_no_file_over_400():
    long = []
    for path in sources():
        text = path.read_text()
        if len(text.splitlines()) > MAX_FILE_LINES:
            long.append(f"{path.relative_to(PACKAGE)}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name}: {lines} lines")
    assert long == []

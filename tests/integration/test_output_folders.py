"""Output folders and files (``outdir``): ``--force`` replaces only a folder robustprune marked, one writer per folder
at a time (a second run is refused at once, naming the holder; a killed holder blocks nothing; two sweeps share one
folder: tests/integration/test_sweep_backends.py), ``sweep --out`` and
default folder names stay safe, any legal file name can be written, an unwritable ``--out`` fails before any work,
``report`` re-points a moved run's artifacts, and a diverged training run exits 1 with one line."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import robustprune.sweep
from robustprune import pipeline
from robustprune.infra import outdir
from robustprune.cli import main
from robustprune.config import load_config
from robustprune.infra.errors import TrainingDiverged
from robustprune.infra.fileio import write_text

# no training, a tiny evaluation: a whole run in a few seconds
SETS = [a for s in ["pretrain.epochs=0", "finetune.epochs=0", "evaluate.n_samples=20", "evaluate.pgd_steps=1",
                    "evaluate.verifiers=[]", "evaluate.pgd_eps_fractions=[]"] for a in ("--set", s)]
TINY = ["--quiet", *SETS]
# a run that trains long enough (~10 s after a ~4 s start) for a second process to start, fail and exit meanwhile
EPOCHS = 60
LONG = [*TINY, "--set", f"pretrain.epochs={EPOCHS}", "--set", "finetune.epochs=1", "--set", "objective.steps=10"]


class Reached(BaseException):
    """Raised where work (data loading, training) would start. A BaseException, so ``main`` lets it out."""


def _stop(*args, **kwargs):
    raise Reached


def _error_line(err: str) -> str:
    """The one stderr line of a refused input: 'robustprune: error: ...', no traceback, not an internal error."""
    assert err.count("\n") == 1 and err.endswith("\n"), f"not exactly one stderr line: {err!r}"
    assert err.startswith("robustprune: error: "), err
    assert "Traceback" not in err and "internal error" not in err, err
    return err.strip()


def _refused(capsys, argv: list[str], code: int = 2) -> str:
    capsys.readouterr()
    got = main(argv)
    err = capsys.readouterr().err
    assert got == code, f"exit {got} for {argv}: {err!r}"
    return _error_line(err)


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _cli(*argv: str, cwd: Path | None = None) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.Popen([sys.executable, "-m", "robustprune", *argv], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.fixture
def finished_run(tmp_path) -> Path:
    out = tmp_path / "done"
    assert main(["run", "--out", str(out), *TINY]) == 0
    return out


# ------------------------------------------------------------------------------------- 1. --force and the marker


def test_force_never_deletes_a_folder_that_only_looks_like_a_run(tmp_path, capsys):
    """The reproduced case: a project folder holding a config.yaml survives ``run --force``."""
    project = tmp_path / "P"
    (project / "src").mkdir(parents=True)
    (project / "config.yaml").write_text("db: x\n")
    (project / "src" / "main.py").write_text("x\n")
    before = _files(project)
    line = _refused(capsys, ["run", "--out", str(project), "--force", *TINY])
    assert "not a robustprune run" in line and "delete it by hand" in line
    assert _files(project) == before and not (project / outdir.MARKER).exists()
    (project / "config.yaml").unlink()  # a folder with no config at all: refused too, no hint about old runs
    line = _refused(capsys, ["run", "--out", str(project), "--force", *TINY])
    assert "not a robustprune run" in line and (project / "src" / "main.py").read_text() == "x\n"


def test_force_replaces_a_marked_run_folder_and_nothing_else(finished_run, tmp_path, capsys):
    marker = json.loads((finished_run / outdir.MARKER).read_text())
    assert marker["kind"] == "run" and marker["config_name"] == "default" and len(marker["run_id"]) == 32
    assert set(marker) == {"kind", "robustprune_version", "created", "config_name", "run_id"}
    (finished_run / "stray.txt").write_text("inside a run folder: part of the run")
    assert main(["run", "--out", str(finished_run), "--force", *TINY]) == 0
    assert not (finished_run / "stray.txt").exists() and (finished_run / "report.json").is_file()
    assert json.loads((finished_run / outdir.MARKER).read_text())["run_id"] != marker["run_id"]
    assert not (finished_run / outdir.LOCK).exists()  # released (and removed) when the run ended
    # a sweep folder is not a run folder, even with --force
    (tmp_path / "s").mkdir()
    outdir.write_marker(tmp_path / "s", outdir.SWEEP, "x")
    (tmp_path / "s" / "sweep.json").write_text("{}")
    assert "sweep folder, not a run folder" in _refused(capsys, ["run", "--out", str(tmp_path / "s"), "--force"])
    assert (tmp_path / "s" / "sweep.json").read_text() == "{}"


# ---------------------------------------------------------------------------------------- 2. one writer at a time


def test_a_locked_folder_or_file_is_refused_at_once_naming_the_holder(finished_run, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(pipeline, "load_data", _stop)  # refused before any work
    before = _files(finished_run)
    with outdir.lock_folder(finished_run):  # as another process holds it (flock: per open file, so in-process too)
        for argv in (["run", "--out", str(finished_run), "--force"], ["run", "--out", str(finished_run), "--resume"],
                     ["report", str(finished_run)]):
            line = _refused(capsys, argv)
            assert "in use by another robustprune process" in line and f"pid {os.getpid()} " in line, argv
        # sweeps share their folders (their lock is brief and waited for), so a sweep is refused for the folder's kind
        line = _refused(capsys, ["sweep", "--out", str(finished_run), "--compression", "2"])
        assert "is a robustprune run folder, not a sweep folder" in line
    assert _files(finished_run) == before
    target = tmp_path / "model.safetensors"
    with outdir.lock_file(target):
        line = _refused(capsys, ["train", "--out", str(target), *TINY])
        assert "in use" in line and f"pid {os.getpid()}" in line and not target.exists()
    assert not list(tmp_path.glob(".*.lock"))  # released and removed


def test_resume_refuses_a_live_holder_and_proceeds_once_it_is_gone(finished_run, capsys):
    with outdir.lock_folder(finished_run):
        line = _refused(capsys, ["run", "--out", str(finished_run), "--resume"])
        assert f"pid {os.getpid()}" in line
    assert main(["run", "--out", str(finished_run), "--resume"]) == 0  # finished: nothing to resume


def _first_to_exit(procs: list[subprocess.Popen], timeout: float = 240) -> tuple[subprocess.Popen, subprocess.Popen]:
    deadline = time.monotonic() + timeout
    while all(p.poll() is None for p in procs):
        assert time.monotonic() < deadline, "neither process ended"
        time.sleep(0.05)
    first = next(p for p in procs if p.poll() is not None)
    return first, next(p for p in procs if p is not first)


def _one_proceeds(procs: list[subprocess.Popen]) -> subprocess.Popen:
    """Exactly one proceeds: the other exits 2 at once (the survivor still running), naming the survivor."""
    loser, survivor = _first_to_exit(procs)
    still_running = survivor.poll() is None
    err = loser.stderr.read()
    assert loser.returncode == 2, err
    assert "in use by another robustprune process" in _error_line(err) and f"pid {survivor.pid} " in err
    assert still_running, "the refused process did not exit before the other one finished"
    out, err = survivor.communicate(timeout=240)
    assert survivor.returncode == 0, err
    return survivor


def test_two_runs_on_one_folder(tmp_path):
    out = tmp_path / "run"
    _one_proceeds([_cli("run", "--out", str(out), *LONG) for _ in range(2)])
    report = json.loads((out / "report.json").read_text())
    assert set(report["stages"]) == {"pretrained", "pruned", "finetuned"}
    epochs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    expected = [("pretrain", e) for e in range(1, EPOCHS + 1)] + [("finetune", 1)]
    assert [(e["stage"], e["epoch"]) for e in epochs] == expected
    assert not list(out.glob(".*.tmp")) and not (out / outdir.LOCK).exists()


def _wait_for_lock(folder: Path, pid: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if json.loads((folder / outdir.LOCK).read_text())["pid"] == pid and (folder / "config.yaml").is_file():
                return
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.05)
    pytest.fail(f"process {pid} never took the lock of {folder}")


def test_a_killed_run_blocks_neither_resume_nor_force(tmp_path, capsys):
    out = tmp_path / "run"
    killed = _cli("run", "--out", str(out), *LONG)
    _wait_for_lock(out, killed.pid)
    os.kill(killed.pid, signal.SIGKILL)
    killed.communicate(timeout=60)
    assert killed.returncode == -signal.SIGKILL
    assert (out / outdir.LOCK).exists() and not (out / "report.json").exists()  # its lock file stays, unheld
    assert main(["run", "--out", str(out), "--resume", "--quiet"]) == 0
    assert json.loads((out / "report.json").read_text())["stages"]["finetuned"]
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from robustprune.infra.outdir import lock_folder; lock_folder(Path(sys.argv[1])); "
                               "print('locked', flush=True); time.sleep(600)", str(out)],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    assert f"pid {holder.pid} " in _refused(capsys, ["run", "--out", str(out), "--force", *TINY])
    holder.kill()
    holder.wait(timeout=60)
    assert main(["run", "--out", str(out), "--force", *TINY]) == 0


# ------------------------------------------------------------------------------- 3. sweep --out and folder names


def test_sweep_refuses_a_folder_that_is_not_a_sweep(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(pipeline, "load_data", _stop)
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "config.yaml").write_text("my: own config\n")
    (folder / "sweep.md").write_text("my notes\n")
    before = _files(folder)
    line = _refused(capsys, ["sweep", "--out", str(folder), "--compression", "2"])
    assert "not a robustprune sweep folder" in line and _files(folder) == before
    (tmp_path / "file").write_text("x")
    assert "not a folder" in _refused(capsys, ["sweep", "--out", str(tmp_path / "file"), "--compression", "2"])


def test_a_marked_sweep_folder_and_an_old_unmarked_one_are_continued(tmp_path, monkeypatch):
    monkeypatch.setattr(robustprune.sweep, "_run_sweep", lambda *a, **k: _stop())
    marked, old = tmp_path / "marked", tmp_path / "old"
    marked.mkdir()
    outdir.write_marker(marked, outdir.SWEEP, "default")
    (old / "points").mkdir(parents=True)  # a sweep folder from before markers: its config and its points
    write_text(old / "config.yaml", yaml.safe_dump(load_config(None).to_dict()))
    for folder in (marked, old):
        with pytest.raises(Reached):  # got past every check to the sweep itself
            main(["sweep", "--out", str(folder), "--compression", "2", "--quiet"])


def test_a_folder_holding_only_another_commands_write_in_flight_counts_as_new(tmp_path, monkeypatch):
    # two sweep commands started together: one is writing the marker (or probing) when the other looks
    monkeypatch.setattr(robustprune.sweep, "_run_sweep", lambda *a, **k: _stop())
    folder = tmp_path / "s"
    folder.mkdir()
    (folder / outdir.LOCK).write_text("")
    (folder / ".rp-a1b2c3d4.tmp").write_text('{"kind": "sw')  # a marker half-written by the other command
    with pytest.raises(Reached):
        main(["sweep", "--out", str(folder), "--compression", "2", "--quiet"])
    assert outdir.read_marker(folder)["kind"] == outdir.SWEEP
    run = tmp_path / "r"
    run.mkdir()
    (run / ".rp-zzzzzzzz.tmp").write_text("left by a killed writer")
    outdir.claim_folder(run, outdir.RUN, "default", force=True).release()
    assert [p.name for p in run.iterdir()] == [outdir.MARKER]  # the leftover removed, the released lock too


@pytest.mark.parametrize("name, expected", [("../../x", "x"), ("a/b", "a-b"), ("..", "unnamed"), ("", "unnamed"),
                                            ("ok_name-1.2", "ok_name-1.2"), ("é x", "x"), ("a é", "a--"),
                                            ("y" * 300, "y" * 100)])
def test_folder_name_is_one_safe_component(name, expected):
    assert outdir.folder_name(name) == expected


def test_a_hostile_config_name_stays_inside_runs_and_sweeps(tmp_path, monkeypatch):
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    (work / "cfg.yaml").write_text("name: ../../escaped\n")
    assert main(["run", "-c", "cfg.yaml", *TINY]) == 0
    assert main(["sweep", "-c", "cfg.yaml", "--compression", "1", *TINY]) == 0
    assert [p.name[:8] for p in (work / "runs").iterdir()] == ["escaped-"]
    assert [p.name for p in (work / "sweeps").iterdir()] == ["escaped"]
    assert sorted(p.name for p in tmp_path.rglob("*escaped*")) == sorted(
        [next((work / "runs").iterdir()).name, "escaped"])


# ---------------------------------------------------------------------------------------- 4. long output names


def test_a_250_character_output_name_is_written(tmp_path, capsys):
    name = "m" * (250 - len(".sparse.safetensors")) + ".sparse.safetensors"
    write_text(tmp_path / ("t" * 250), "text\n")
    assert (tmp_path / ("t" * 250)).read_text() == "text\n"
    checkpoint = tmp_path / "model.safetensors"
    assert main(["train", "--out", str(checkpoint), *TINY]) == 0
    assert main(["export", str(checkpoint), "--format", "sparse", "--out", str(tmp_path / name)]) == 0
    assert len(name) == 250 and (tmp_path / name).stat().st_size > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([name, "model.safetensors", "t" * 250])


# ------------------------------------------------------------------------------- 5. unwritable --out, before work


def _unwritable(tmp_path: Path) -> list[str]:
    (tmp_path / "somefile").write_text("a regular file")
    return ["/proc/robustprune-test/x", "/proc/robustprune-test.safetensors", str(tmp_path / "missing" / "x"),
            str(tmp_path / "somefile" / "x")]


@pytest.mark.parametrize("command", ["train", "import", "run", "sweep"])
def test_an_unwritable_out_fails_before_any_work(tmp_path, capsys, monkeypatch, command):
    monkeypatch.setattr(pipeline, "load_data", _stop)
    monkeypatch.setattr(pipeline, "pretrain", _stop)
    (tmp_path / "weights.pt").write_bytes(b"unread: the output is checked first")
    argv = {"train": ["train"], "import": ["import", str(tmp_path / "weights.pt")], "run": ["run"],
            "sweep": ["sweep", "--compression", "2"]}[command]
    for where in _unwritable(tmp_path):
        if command in ("run", "sweep") and where.endswith("missing/x"):
            continue  # a run or sweep folder is created with its parents
        try:
            assert "--out" in _refused(capsys, [*argv, "--out", where, *SETS])
        except Reached:
            pytest.fail(f"{command} --out {where} got to loading data before noticing the output cannot be written")
    assert (tmp_path / "somefile").read_text() == "a regular file" and not (tmp_path / "missing").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
@pytest.mark.parametrize("command", ["train", "run"])
def test_a_read_only_folder_fails_before_any_work(tmp_path, capsys, monkeypatch, command):
    monkeypatch.setattr(pipeline, "load_data", _stop)
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        target = str(folder / ("m.safetensors" if command == "train" else "run"))
        assert "cannot write" in _refused(capsys, [command, "--out", target, *TINY])
    finally:
        folder.chmod(0o755)


# ------------------------------------------------------------------------------- 6. report of a moved run folder


def _artifact_paths(artifacts: dict) -> list[str]:
    return [v for k, v in artifacts.items() if k != "plots" and v is not None] + artifacts["plots"]


def test_a_moved_run_folder_still_points_at_its_artifacts(finished_run, tmp_path, capsys, monkeypatch):
    """report.json names its artifacts relative to the run folder: a moved or copied folder, read from another
    working directory, needs no rewriting; ``report`` and ``evaluate`` work on it."""
    moved = tmp_path / "elsewhere" / "run"
    moved.parent.mkdir()
    shutil.move(str(finished_run), moved)
    monkeypatch.chdir(tmp_path)
    artifacts = json.loads((moved / "report.json").read_text())["artifacts"]
    assert {"checkpoint", "sparse", "plan", "report_md"} <= {k for k, v in artifacts.items() if v is not None}
    assert artifacts["checkpoint"] == "finetuned.safetensors" and artifacts["plots"][0].startswith("plots/")
    for path in _artifact_paths(artifacts):
        assert not Path(path).is_absolute() and (moved / path).is_file(), path
    assert main(["report", str(moved)]) == 0
    assert json.loads((moved / "report.json").read_text())["artifacts"] == artifacts
    capsys.readouterr()
    assert main(["evaluate", str(moved / artifacts["checkpoint"]), "--set", "evaluate.n_samples=20",
                 "--set", "evaluate.verifiers=[]", "--json"]) == 0
    assert 0 <= json.loads(capsys.readouterr().out)["benign_acc"] <= 1


def test_report_makes_an_older_report_json_relative(finished_run, tmp_path):
    """Before, artifacts were named as written from the working directory (``<run folder>/<name>``)."""
    report = json.loads((finished_run / "report.json").read_text())
    old_place = tmp_path / "was" / "here"
    report["artifacts"] = {k: (None if v is None else [str(old_place / p) for p in v] if k == "plots"
                               else str(old_place / v)) for k, v in report["artifacts"].items()}
    (finished_run / "report.json").write_text(json.dumps(report))
    assert main(["report", str(finished_run)]) == 0
    artifacts = json.loads((finished_run / "report.json").read_text())["artifacts"]
    assert artifacts["checkpoint"] == "finetuned.safetensors" and artifacts["report_md"] == "report.md"
    for path in _artifact_paths(artifacts):
        assert (finished_run / path).is_file(), path


# ------------------------------------------------------------------------------------------ 7. diverged training


def test_a_diverged_training_is_one_line_and_exit_1(tmp_path, capsys, monkeypatch):
    def diverge(*args, **kwargs):
        raise TrainingDiverged("pretrain: non-finite loss (nan) at epoch 1, step 3")

    monkeypatch.setattr(pipeline, "pretrain", diverge)
    line = _refused(capsys, ["train", "--out", str(tmp_path / "m.safetensors"), *TINY], code=1)
    assert line == "robustprune: error: pretrain: non-finite loss (nan) at epoch 1, step 3"
    line = _refused(capsys, ["run", "--out", str(tmp_path / "run"), *TINY], code=1)
    assert "non-finite loss" in line and not (tmp_path / "run" / outdir.LOCK).exists()

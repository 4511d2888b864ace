"""Sweeps as independent tasks: local workers, Ray's local cluster and submitit's local executor give the in-process
sweep's metrics with the same seeds; a sweep killed mid-point is finished by the same command with no point lost or
done twice; two sweep commands on one folder share the work; a backend that cannot start is one line, exit 2."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from robustprune.cli import main
from robustprune.config import load_config
from robustprune.sweep import BackendOptions, sweep

TINY = ["pretrain.epochs=2", "finetune.epochs=1", "objective.steps=2", "evaluate.pgd_steps=3",
        "evaluate.verifiers=[]", "evaluate.n_samples=60", "evaluate.pgd_eps_fractions=[]", "threads=1"]
SETS = [a for s in TINY for a in ("--set", s)]
HERE = f"pid {os.getpid()}"


def metrics(result: dict) -> list[dict]:
    """The records without what names who computed them and how long it took."""
    return [{k: v for k, v in p.items() if k not in ("time_s", "worker")} for p in result["points"]]


@pytest.fixture(scope="module")
def in_process(tmp_path_factory):
    out = tmp_path_factory.mktemp("inproc") / "s"
    return sweep(load_config(None, TINY), out, [1, 4], ["pgd"], ["pgd"], quiet=True, log=lambda _: None)


@pytest.mark.parametrize("backend", [BackendOptions("local", 2), BackendOptions("ray", 2),
                                     BackendOptions("slurm", 2, slurm={"cluster": "local", "cpus_per_task": 1})],
                         ids=["workers", "ray", "submitit"])
def test_every_backend_gives_the_in_process_metrics(in_process, tmp_path, backend, capfd):
    capfd.readouterr()
    lines = []
    result = sweep(load_config(None, TINY), tmp_path / "s", [1, 4], ["pgd"], ["pgd"], quiet=True, log=lines.append,
                   backend=backend)
    if backend.name == "ray":
        import ray
        ray.shutdown()
    assert metrics(result) == metrics(in_process)
    assert all(HERE not in p["worker"] for p in result["points"]), "the points ran in the backend's workers"
    assert sum(": done before" not in line for line in lines) == 3  # the pre-training and two points, once each
    assert json.loads((tmp_path / "s" / "sweep.json").read_text())["points"] == result["points"]
    assert not list((tmp_path / "s" / "points").glob(".*.claim"))
    assert capfd.readouterr().err == "", "the backend's own start-up lines stay off the console"


def _cli(*argv: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.Popen([sys.executable, "-m", "robustprune", *argv], env=env, text=True, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _wait_for(predicate, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


LONGER = [*SETS, "--set", "finetune.epochs=6", "--quiet"]


def test_a_sweep_killed_mid_point_is_finished_by_the_same_command(tmp_path):
    out = tmp_path / "s"
    args = ["sweep", "--out", str(out), "--compression", "1,2,4", "--workers", "2", *LONGER]
    killed = _cli(*args)
    _wait_for(lambda: any(not p.name.startswith(".pretrained") for p in (out / "points").glob(".*.claim"))
              if (out / "points").is_dir() else False)
    os.killpg(killed.pid, signal.SIGKILL)  # the command and its workers, mid-point
    killed.communicate(timeout=60)
    assert main(args) == 0
    keys = sorted(json.loads(p.read_text())["key"] for p in (out / "points").glob("*.json"))
    assert keys == sorted(f"pgd--pgd--magnitude--{c}x" for c in ("1", "2", "4"))
    assert len(json.loads((out / "sweep.json").read_text())["points"]) == 3
    assert not list((out / "points").glob(".*.claim")) and not list(out.glob(".*.tmp"))


def test_two_sweep_commands_on_one_folder_share_the_points(tmp_path):
    out = tmp_path / "s"
    args = ["sweep", "--out", str(out), "--compression", "1,2,4,8", *LONGER, "--set", "finetune.epochs=12"]
    procs = [_cli(*args) for _ in range(2)]
    outputs = [p.communicate(timeout=600) for p in procs]
    for proc, (stdout, stderr) in zip(procs, outputs):
        assert proc.returncode == 0, stderr
    records = json.loads((out / "sweep.json").read_text())["points"]
    assert len(records) == 4 and len({r["key"] for r in records}) == 4
    workers = [r["worker"].split(" pid ")[1] for r in records]
    assert set(workers) == {str(p.pid) for p in procs}, "both commands did points"
    for stdout, _ in outputs:  # each command reports every point once
        assert sum(f"--{c}x: " in stdout for c in (1, 2, 4, 8)) == 4


@pytest.mark.parametrize("args, message", [
    (["--workers", "0"], "--workers must be >= 1"),
    (["--backend", "kubernetes"], "unknown backend 'kubernetes'"),
    (["--backend", "ray", "--gpus-per-task", "-1"], "--gpus-per-task must be >= 0"),
    (["--backend", "ray", "--address", "127.0.0.1:9"], "cannot reach the Ray cluster at 127.0.0.1:9"),
    (["--backend", "ray", "--address", "nonsense"], "--address must be HOST:PORT"),
])
def test_a_backend_that_cannot_start_is_one_line_and_exit_2(tmp_path, capsys, args, message):
    out = tmp_path / "s"
    assert main(["sweep", "--out", str(out), "--compression", "1", *SETS, *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and not out.exists()


def test_a_missing_extra_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "submitit", None)  # as if not installed
    out = tmp_path / "s"
    assert main(["sweep", "--out", str(out), "--compression", "1", *SETS, "--backend", "slurm"]) == 2
    err = capsys.readouterr().err
    assert "pip install 'robustprune[slurm]'" in err and len(err.strip().splitlines()) == 1 and not out.exists()

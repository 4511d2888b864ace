"""Exact resume and determinism: a run killed with SIGKILL (mid-epoch, mid-write, between stages) and resumed with
``run --resume`` ends with the metrics, weights and epoch log of an uninterrupted run with the same seed; two
uninterrupted runs agree exactly.

Each run happens in a subprocess (the kill is a real SIGKILL). The kill points are set by a small driver that
wraps one library function to kill the process on its n-th call; the library itself has no test hooks.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from conftest import without_wall_times

pytestmark = pytest.mark.slow

# The embedded default (digits, PGD training, magnitude pruning to 10×), shrunk: 2 + 1 prune round + 2 epochs,
# iterative pruning (two rounds with one epoch between) so the prune stage trains too, a light evaluation.
SETTINGS = ["pretrain.epochs=2", "finetune.epochs=2", "prune.schedule=iterative", "prune.rounds=2",
            "prune.round_epochs=1", "evaluate.n_samples=60", "evaluate.pgd_steps=5", "evaluate.verifiers=[ibp]"]

DRIVER = r'''
import os, signal, sys
import torch
point, n = sys.argv[1], int(sys.argv[2])
calls = [0]

def tick():
    calls[0] += 1
    if calls[0] == n:
        os.kill(os.getpid(), signal.SIGKILL)

if point == "step":            # inside an epoch: the n-th optimiser step of the run
    import robustprune.train as train
    make = train.make_optimizer
    def make_optimizer(*args, **kwargs):
        optimizer = make(*args, **kwargs)
        optimizer.register_step_pre_hook(lambda *_: tick())
        return optimizer
    train.make_optimizer = make_optimizer
elif point == "journal":       # the n-th journal write: temporary file complete, killed before the rename
    import robustprune.infra.resume as resume
    save_file = resume.save_file
    def write(tensors, path, metadata=None):
        save_file(tensors, path, metadata=metadata)
        tick()
    resume.save_file = write
elif point == "checkpoint":    # the n-th stage checkpoint: killed with half of the file written
    import robustprune.export.checkpoint as checkpoint
    save_file = checkpoint.save_file
    def write(tensors, path, metadata=None):
        if calls[0] + 1 == n:
            save_file(tensors, path, metadata=metadata)
            with open(path, "r+b") as handle:
                handle.truncate(os.path.getsize(path) // 2)
        tick()
        save_file(tensors, path, metadata=metadata)
    checkpoint.save_file = write
from robustprune.cli import main
sys.exit(main(sys.argv[3:]))
'''


def robustprune(args: list[str], kill: tuple[str, int] | None = None) -> subprocess.CompletedProcess:
    point, n = kill or ("none", 0)
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    return subprocess.run([sys.executable, "-c", DRIVER, point, str(n), *args], capture_output=True, text=True,
                          env=env, timeout=600)


def run_args(out: Path, *extra: str) -> list[str]:
    return ["run", "--out", str(out), "--quiet", *extra, *(a for s in SETTINGS for a in ("--set", s))]


def outcome(run: Path) -> dict:
    """What must match: every stage metric, the fine-tuned weights, the epoch log (without wall times)."""
    report = json.loads((run / "report.json").read_text())
    epochs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {"stages": without_wall_times(report["stages"]), "retention": report["retention"],
            "epochs": without_wall_times(epochs),
            "weights": load_file(str(run / "finetuned.safetensors"))}


def assert_same(a: dict, b: dict) -> None:
    assert a["stages"] == b["stages"]
    assert a["retention"] == b["retention"]
    assert a["epochs"] == b["epochs"]
    assert a["weights"].keys() == b["weights"].keys()
    for key in a["weights"]:
        assert torch.equal(a["weights"][key], b["weights"][key]), key


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("reference") / "run"
    done = robustprune(run_args(out))
    assert done.returncode == 0, done.stderr
    assert not (out / "resume.safetensors").exists()  # a finished run leaves no journal
    return outcome(out)


def test_same_seed_gives_identical_metrics(tmp_path, reference):
    done = robustprune(run_args(tmp_path / "again"))
    assert done.returncode == 0, done.stderr
    assert_same(outcome(tmp_path / "again"), reference)


# 1,437 digits at batch 64: 23 steps per epoch; the run makes 2 + 1 + 2 = 5 epochs (115 steps)
KILLS = [("step", 5),          # mid-epoch, before any journal exists
         ("step", 60),         # mid-epoch of the prune round's fine-tuning (epoch 3)
         ("step", 100),        # mid-epoch of fine-tuning (epoch 5)
         ("journal", 2),       # mid-write of the journal after pre-training's last epoch
         ("checkpoint", 2)]    # mid-write of the pruned-stage checkpoint


@pytest.mark.parametrize("point,n", KILLS, ids=[f"{p}-{n}" for p, n in KILLS])
def test_killed_run_resumes_to_identical_metrics(tmp_path, reference, point, n):
    out = tmp_path / "run"
    killed = robustprune(run_args(out), kill=(point, n))
    assert killed.returncode == -9, killed.stderr  # really killed, at the point asked
    assert not (out / "report.json").exists()
    resumed = robustprune(["run", "--resume", "--out", str(out), "--quiet"])
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed" in resumed.stdout
    assert_same(outcome(out), reference)
    assert not list(out.glob(".*.tmp"))  # the killed write's temporary file is gone
    assert not (out / "resume.safetensors").exists()


def test_resume_refuses_a_changed_config_and_reports_a_finished_run(tmp_path):
    out = tmp_path / "run"
    killed = robustprune(run_args(out), kill=("step", 3))
    assert killed.returncode == -9
    changed = robustprune(["run", "--resume", "--out", str(out), "--set", "seed=1"])
    assert changed.returncode == 2
    assert changed.stderr.strip().count("\n") == 0 and "differs" in changed.stderr and "seed" in changed.stderr
    assert robustprune(["run", "--resume", "--out", str(tmp_path / "nothing")]).returncode == 2
    assert robustprune(["run", "--resume"]).returncode == 2
    assert robustprune(["run", "--resume", "--force", "--out", str(out)]).returncode == 2
    resumed = robustprune(["run", "--resume", "--out", str(out), "--quiet"])
    assert resumed.returncode == 0, resumed.stderr
    again = robustprune(["run", "--resume", "--out", str(out), "--quiet"])
    assert again.returncode == 0 and "nothing to resume" in again.stdout


def test_a_corrupt_journal_is_a_one_line_error(tmp_path):
    out = tmp_path / "run"
    assert robustprune(run_args(out), kill=("step", 30)).returncode == -9
    journal = out / "resume.safetensors"
    journal.write_bytes(journal.read_bytes()[:100])
    resumed = robustprune(["run", "--resume", "--out", str(out)])
    assert resumed.returncode == 2
    assert "unreadable resume journal" in resumed.stderr and "Traceback" not in resumed.stderr


def test_a_run_killed_under_the_union_config_resumes_to_identical_metrics(tmp_path, reference):
    """Before objectives owned their settings, config.yaml listed every objective's settings in its objective
    section. A run interrupted then resumes (the other objectives' keys are dropped) to the same metrics."""
    import yaml

    out = tmp_path / "run"
    assert robustprune(run_args(out), kill=("step", 60)).returncode == -9
    stored = yaml.safe_load((out / "config.yaml").read_text())
    stored["objective"].update(kappa_start=1.0, kappa_end=0.5, beta_start=1.0, beta_end=0.0, trades_beta=6.0,
                               mart_lambda=5.0, noise_sd=0.25)  # the union-era section, as that version wrote it
    (out / "config.yaml").write_text(yaml.safe_dump(stored, sort_keys=False))
    resumed = robustprune(["run", "--resume", "--out", str(out), "--quiet"])
    assert resumed.returncode == 0, resumed.stderr
    assert_same(outcome(out), reference)

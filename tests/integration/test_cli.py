"""The command line: bad input gives one line on stderr, exit 2, and leaves no files; stage commands chain."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from robustprune.cli import main

FAST = ["--set", "pretrain.epochs=1", "--set", "finetune.epochs=1", "--set", "evaluate.pgd_steps=2",
        "--set", "evaluate.n_samples=50", "--set", "objective.steps=2", "--quiet"]


def _fails_cleanly(capsys, argv, message):
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2
    assert message in err
    assert err.count("\n") == 1 and "Traceback" not in err
    return err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--set", "model.name=cnn-smal"], "did you mean 'cnn-small'"),
        (["--set", "data.name=mnst"], "did you mean 'mnist'"),
        (["--set", "objective.name=pdg"], "did you mean 'pgd'"),
        (["--set", "prune.rule=magnitud"], "did you mean 'magnitude'"),
        (["--set", "threat.eps=-0.1"], "threat.eps must be >= 0"),
        (["--set", "prune.compression=0.5"], "compression must be"),
        (["--set", "prune.sparsity=1"], "sparsity must lie in [0, 1)"),
        (["--set", "threat.eps"], "malformed --set"),
        (["-c", "does-not-exist.yaml"], "config file not found"),
        (["--set", "data.name=mnist", "--set", "data.root=/nonexistent"], "train-images-idx3-ubyte"),
        (["--bogus"], "unrecognized arguments"),
        (["--set", "prune.keep_first_dense=true"], "is unreachable"),
        (["--set", "prune.min_density=0.5"], "is unreachable"),
        (["--set", "prune.min_density=1.5"], "min_density must lie in [0, 1]"),
        (["--set", "prune.schedule=gradual"], "schedule must be 'oneshot' or 'iterative'"),
        (["--set", "prune.rule=hydra", "--set", "prune.scope=global", "--set", "prune.min_density=0.01"],
         "takes no min_density"),
        (["--set", "prune.rule=filter-l1", "--set", "prune.compression=100000"], "largest reachable"),
    ],
)
def test_run_bad_input_exits_2_and_writes_nothing(tmp_path, capsys, extra, message):
    out = tmp_path / "run"
    _fails_cleanly(capsys, ["run", "--out", str(out), *extra], message)
    assert not out.exists()


def test_existing_non_empty_out_needs_force(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    _fails_cleanly(capsys, ["run", "--out", str(out)], "use --force")
    assert (out / "keep.txt").read_text() == "precious" and len(list(out.iterdir())) == 1
    # --force replaces old runs only, never a folder that is not one (say, --out ~)
    _fails_cleanly(capsys, ["run", "--out", str(out), "--force"], "not a robustprune run")
    assert (out / "keep.txt").read_text() == "precious" and len(list(out.iterdir())) == 1


def test_unknown_command_and_list(capsys):
    _fails_cleanly(capsys, ["frobnicate"], "invalid choice")
    assert main(["list", "models"]) == 0
    names = capsys.readouterr().out.split()
    assert {"mlp", "cnn-small", "cnn-large", "vgg16-bn", "wrn-28-4", "resnet18"} <= set(names)
    for kind in ["datasets", "objectives", "pruners", "attacks"]:
        assert main(["list", kind]) == 0
        assert capsys.readouterr().out.strip()


def test_run_writes_the_whole_run_folder(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", "--out", str(out), *FAST]) == 0
    printed = capsys.readouterr().out
    assert "| finetuned | 10.00× |" in printed and printed.strip().endswith(f"run folder: {out}")
    names = {p.name for p in out.iterdir()}
    assert {"config.yaml", "metrics.jsonl", "report.json", "report.md", "pretrained.safetensors",
            "pruned.safetensors", "finetuned.safetensors"} <= names
    report = json.loads((out / "report.json").read_text())
    assert set(report) >= {"robustprune_version", "config", "threat", "stages", "retention", "timing_s", "artifacts"}
    assert set(report["stages"]) == {"pretrained", "pruned", "finetuned"}
    fine = report["stages"]["finetuned"]
    assert fine["compression"] == pytest.approx(10.0, rel=0.01) and fine["n_eval"] == 50
    assert 0 <= fine["verified_acc"] <= fine["pgd_acc"] <= fine["benign_acc"] <= 1
    assert set(fine["verified_by"]) == {"ibp", "crown"} and fine["n_verified_eval"] == 50
    assert all(s["verified_acc"] is not None for s in report["stages"].values())
    assert report["stages"]["pretrained"]["compression"] == 1.0
    layers = report["layers"]  # the allocation: per layer, and adding up to the stage's counts
    assert sum(row["kept"] for row in layers) == fine["params_nonzero"]
    assert all(row["density"] == row["kept"] / row["weights"] for row in layers)
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["epoch"]) for r in lines] == [("pretrain", 1), ("finetune", 1)]
    assert "| pruned |" in (out / "report.md").read_text() and "Verified by method" in (out / "report.md").read_text()
    # --force replaces the old run
    assert main(["run", "--out", str(out), "--force", *FAST]) == 0


def test_stage_commands_chain(tmp_path, capsys):
    dense, pruned, tuned = (tmp_path / f"{s}.safetensors" for s in ("dense", "pruned", "tuned"))
    assert main(["train", "--out", str(dense), *FAST]) == 0
    assert main(["prune", str(dense), "--sparsity", "0.75", "--scope", "global", "--out", str(pruned)]) == 0
    assert main(["finetune", str(pruned), "--out", str(tuned), *FAST]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(tuned), "--json", "--set", "evaluate.n_samples=30", "--set",
                 "evaluate.pgd_steps=2"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["compression"] == pytest.approx(4.0, rel=0.01) and metrics["n_eval"] == 30
    assert main(["evaluate", str(tuned), "--json", "--attacks", "pgd,fgsm", "--set", "evaluate.n_samples=20",
                 "--set", "evaluate.pgd_steps=2", "--set", "evaluate.verifiers=[]"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert set(metrics["attack_acc"]) == {"pgd", "fgsm", "pgd@0.5", "square"}  # the gradient-free check joins
    assert metrics["robust_acc"] <= metrics["pgd_acc"] <= metrics["benign_acc"]
    _fails_cleanly(capsys, ["evaluate", str(tuned), "--attacks", "pgd,deepfool"], "unknown attack")
    _fails_cleanly(capsys, ["prune", str(dense), "--compression", "2", "--out", str(pruned)], "use --force")
    _fails_cleanly(capsys, ["prune", str(dense), "--compression", "0.5", "--out", str(tmp_path / "x.safetensors")],
                   "compression must be")
    _fails_cleanly(capsys, ["evaluate", str(tmp_path / "missing.safetensors")], "checkpoint not found")
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint")
    _fails_cleanly(capsys, ["evaluate", str(tmp_path / "junk.safetensors")], "not a valid robustprune")
    assert not (tmp_path / "x.safetensors").exists()


def test_python_dash_m_and_exit_codes(tmp_path):
    ok = subprocess.run([sys.executable, "-m", "robustprune", "list", "pruners"], capture_output=True, text=True)
    assert ok.returncode == 0 and "magnitude" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "robustprune", "run", "--set", "threat.eps=-1", "--out",
                          str(tmp_path / "r")], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and not (tmp_path / "r").exists()

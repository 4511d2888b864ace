"""``robustprune run`` under torchrun with 2 CPU processes (gloo): the ranks end with identical parameters, rank 0
alone writes a complete run folder, and the gathered evaluation equals a one-process evaluation where it is
deterministic (benign and verified accuracy)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

# Saves each rank's fine-tuned state dict beside the run (test-side: the library has no such hook).
DRIVER = r'''
import os, sys
import robustprune.pipeline as pipeline
from safetensors.torch import save_file
finetune = pipeline.finetune
def finetune_and_dump(model, *args, **kwargs):
    history = finetune(model, *args, **kwargs)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, os.path.join(sys.argv[1], "rank%s.safetensors" % os.environ["RANK"]))
    return history
pipeline.finetune = finetune_and_dump
from robustprune.cli import main
sys.exit(main(sys.argv[2:]))
'''
SETTINGS = ["pretrain.epochs=1", "finetune.epochs=1", "evaluate.n_samples=70", "evaluate.pgd_steps=5",
            "evaluate.verifiers=[ibp]", "data.eval_batch_size=16", "device=cpu"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_rank_gloo_run(tmp_path: Path):
    out = tmp_path / "run"
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), str(driver), str(tmp_path), "run", "--out", str(out), "--quiet",
               *(a for s in SETTINGS for a in ("--set", s))]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("run folder:") == 1  # rank 0 alone reports

    rank0, rank1 = (load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1))
    assert rank0.keys() == rank1.keys()
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key

    report = json.loads((out / "report.json").read_text())
    assert set(report["stages"]) == {"pretrained", "pruned", "finetuned"}
    for stage in report["stages"].values():
        assert stage["n_eval"] == 70 and stage["n_verified_eval"] == 70
        assert stage["benign_acc"] is not None and stage["pgd_acc"] is not None
        assert stage["pgd_acc"] <= stage["benign_acc"]
    assert report["stages"]["finetuned"]["compression"] == pytest.approx(10.0, rel=0.01)
    epochs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(e["stage"], e["epoch"]) for e in epochs] == [("pretrain", 1), ("finetune", 1)]  # written once
    assert not (out / "resume.safetensors").exists()
    saved = load_file(str(out / "finetuned.safetensors"))
    assert any(torch.equal(saved[k], v) for k, v in rank0.items() if k in saved)

    # the gathered evaluation (5 batches over 2 ranks) equals one process where it is deterministic
    single = subprocess.run([sys.executable, "-m", "robustprune", "evaluate", str(out / "finetuned.safetensors"),
                             "--json"], capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr
    metrics = json.loads(single.stdout)
    assert metrics["benign_acc"] == report["stages"]["finetuned"]["benign_acc"]
    assert metrics["verified_acc"] == report["stages"]["finetuned"]["verified_acc"]

"""End-to-end runs of the shipped configs: the default demo's claim, and the real-MNIST path."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from robustprune.config import load_config
from robustprune.export import load
from robustprune.pipeline import run

from conftest import REPO, SHARED_DATA


@pytest.mark.slow
def test_default_pipeline_keeps_its_robustness_at_10x(tmp_path):
    """The README's claim for `make demo`: 10× compression, fine-tuned benign and PGD accuracy ≥ 98% of dense."""
    report = run(load_config(None), tmp_path / "run", quiet=True, log=lambda _: None)
    dense, tuned = report["stages"]["pretrained"], report["stages"]["finetuned"]
    assert tuned["compression"] == pytest.approx(10.0, rel=0.01)
    assert dense["pgd_acc"] > 0.5  # the dense model is robust to begin with
    assert tuned["benign_acc"] >= 0.98 * dense["benign_acc"]
    assert tuned["pgd_acc"] >= 0.98 * dense["pgd_acc"]
    # the run leaves the fine-tuned model really compressed on disk, with the same logits
    sparse_file, checkpoint = (tmp_path / "run" / report["artifacts"][k] for k in ("sparse", "checkpoint"))
    x = torch.rand(8, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(load(sparse_file)(x), load(checkpoint)(x))
    assert sparse_file.stat().st_size < 0.1 * checkpoint.stat().st_size  # the checkpoint also stores its masks
    assert report["artifacts"]["slim"] is None  # unstructured pruning: nothing to cut


def test_benign_objective_gives_no_robustness(tmp_path):
    """The seed's contrast: the same pipeline with the benign objective is accurate but breaks under PGD."""
    cfg = load_config(None, ["objective.name=benign", "pretrain.epochs=20", "finetune.epochs=5"])
    report = run(cfg, tmp_path / "run", quiet=True, log=lambda _: None)
    tuned = report["stages"]["finetuned"]
    assert tuned["benign_acc"] > 0.9 and tuned["pgd_acc"] < 0.2


def test_mnist_config_runs_on_real_mnist(tmp_path):
    if not (SHARED_DATA / "mnist").is_dir():
        pytest.skip(f"real MNIST not found under {SHARED_DATA} (set ROBUSTPRUNE_DATA to a folder with mnist/)")
    overrides = [f"data.root={SHARED_DATA}", "pretrain.epochs=1", "objective.steps=1", "finetune.epochs=0",
                 "prune.score_training.epochs=0", "evaluate.n_samples=200", "evaluate.pgd_steps=5",
                 "evaluate.verifiers=[ibp]", "evaluate.autoattack_n_samples=20"]
    cfg = load_config(REPO / "configs" / "mnist-pgd.yaml", overrides)
    report = run(cfg, tmp_path / "run", quiet=True, log=lambda _: None)
    dense = report["stages"]["pretrained"]
    assert dense["n_eval"] == 200 and dense["benign_acc"] > 0.85
    assert report["stages"]["finetuned"]["compression"] == pytest.approx(10.0, rel=0.01)
    assert dense["n_autoattack_eval"] == 20 and dense["n_robust_eval"] == 20  # the config's AutoAttack subset
    assert report["layers"][0]["density"] == 1.0  # the shipped allocation keeps the first convolution dense
    assert report["config"]["model"]["name"] == "cnn-small" and report["threat"]["eps"] == 0.3


def test_structured_run_reports_the_slim_model(tmp_path):
    cfg = load_config(None, ["model.name=cnn-small", "prune.rule=filter-l1", "prune.compression=2",
                             "pretrain.epochs=1", "finetune.epochs=1", "objective.steps=1", "evaluate.pgd_steps=2"])
    report = run(cfg, tmp_path / "run", quiet=True, log=lambda _: None)
    dense, slim = report["structure"]["dense"], report["structure"]["slim"]
    assert slim["params"] < dense["params"] and slim["macs"] < dense["macs"]
    assert report["stages"]["finetuned"]["compression"] == pytest.approx(2.0, rel=0.1)
    assert (tmp_path / "run" / "plan.json").is_file() and report["artifacts"]["plan"].endswith("plan.json")
    masked, slim = (load(tmp_path / "run" / report["artifacts"][k]) for k in ("checkpoint", "slim"))
    x = torch.rand(4, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(slim(x), masked(x), atol=1e-5)
    assert sum(p.numel() for p in slim.parameters()) == report["structure"]["slim"]["params"]
    assert (tmp_path / "run" / report["artifacts"]["sparse"]).is_file()

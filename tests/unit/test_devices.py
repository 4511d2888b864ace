"""Devices: no hard-coded device anywhere in the library; ``device: auto`` picks CUDA only when present; mixed
precision and channels-last training run (on CPU here) and keep pruned weights at exactly 0."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from robustprune.config import Config, TrainConfig
from robustprune.infra.errors import UserError
from robustprune.objectives import create
from robustprune.pruning import prune
from robustprune.infra.runtime import resolve_device
from robustprune.train import FitOptions, fit

from conftest import make_tiny_dataset

SRC = Path(__file__).resolve().parents[2] / "src" / "robustprune"
# A device may be named only where the device rule lives (runtime.py) and where torchrun's ranks pick theirs.
DEVICE_RULE_FILES = {"runtime.py", "distributed.py"}
HARD_CODED = [r"\.cuda\(", r"""device\s*=\s*["']cuda""", r"""torch\.device\(\s*["']cuda""", r"""\.to\(\s*["']cuda""",
              r"""["']cuda:\d"""]


def test_no_hard_coded_device_in_the_library():
    offenders = []
    for path in SRC.rglob("*.py"):
        if path.name in DEVICE_RULE_FILES:
            continue
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            code = line.split("#", 1)[0]
            if any(re.search(pattern, code) for pattern in HARD_CODED):
                offenders.append(f"{path.relative_to(SRC)}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_the_grep_would_catch_a_hard_coded_device():
    assert any(re.search(p, "x = x.cuda()") for p in HARD_CODED)
    assert any(re.search(p, 'model.to("cuda:0")') for p in HARD_CODED)


def test_auto_picks_cuda_only_when_present(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto").type == "cpu"
    with pytest.raises(UserError, match="no CUDA device"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto").type == "cuda"


def test_precision_is_validated():
    with pytest.raises(UserError, match="precision"):
        Config(precision="fp8")


@pytest.mark.parametrize("precision,channels_last", [("bf16", False), ("fp32", True), ("bf16", True)])
def test_mixed_precision_and_channels_last_training(precision, channels_last):
    from robustprune.models import create_model

    data = make_tiny_dataset(n_train=64, shape=(1, 8, 8))
    torch.manual_seed(0)
    model = create_model("cnn-small", (1, 8, 8), 3)
    prune(model, "magnitude", 4.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    history = fit(model, create("pgd", eps=0.1, steps=2), data.train, TrainConfig(epochs=2, lr=1e-2),
                  FitOptions(batch_size=16, precision=precision, channels_last=channels_last))
    assert len(history) == 2 and all(torch.isfinite(torch.tensor(h["loss"])) for h in history)
    after = model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # it trained
    masked = [m for m in model.modules() if hasattr(m, "parametrizations")]
    assert masked
    for module in masked:
        mask = module.parametrizations.weight[0].mask
        assert (mask == 0).any() and torch.all(module.weight[mask == 0] == 0)
    assert all(p.is_contiguous() for p in model.parameters())  # back to the default layout for evaluation
    assert all(p.dtype == torch.float32 for p in model.parameters())  # autocast never changes stored weights


def test_stage_functions_pass_the_run_level_training_settings(monkeypatch):
    """``robustprune train/prune/finetune`` and sweeps go through these functions: they must honour precision."""
    from robustprune import pipeline
    from robustprune.config import load_config

    seen = []
    monkeypatch.setattr(pipeline, "fit",
                        lambda *a: seen.append((a[4].precision, a[4].channels_last, a[4].compile)) or [])
    cfg = load_config(None, ["precision=bf16", "channels_last=true", "compile=true", "prune.schedule=iterative",
                             "prune.rounds=2"])
    data = make_tiny_dataset(shape=(1, 8, 8))
    model = pipeline.new_model(cfg, data)
    objective = pipeline.build_objective(cfg.objective, cfg.threat)
    pipeline.pretrain(model, cfg, data, objective)
    pipeline.prune_model(model, cfg, data, objective)
    pipeline.finetune(model, cfg, data, objective)
    assert seen == [("bf16", True, True)] * 3  # pre-training, the round between the two prunings, fine-tuning


def test_threads_setting_is_applied_and_validated():
    from robustprune.infra.runtime import start

    before = torch.get_num_threads()
    try:
        start(Config(threads=1))
        assert torch.get_num_threads() == 1
        start(Config(threads=None))  # None leaves the current setting alone
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    with pytest.raises(UserError, match="threads"):
        Config(threads=0)


@pytest.mark.slow
def test_compiled_training_matches_eager_training():
    """``compile: true`` runs the PGD objective (attack and update) through torch.compile: same parameters shared,
    masks kept, and the same training within float tolerance (compiled kernels may round differently)."""
    from robustprune.models import create_model

    data = make_tiny_dataset(n_train=32, shape=(1, 6, 6))
    results = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = create_model("mlp", (1, 6, 6), 3)
        prune(model, "magnitude", 4.0)
        history = fit(model, create("pgd", eps=0.1, steps=3), data.train, TrainConfig(epochs=2, lr=1e-2),
                      FitOptions(batch_size=16, generator=torch.Generator().manual_seed(0), compile=compiled))
        results.append((history, model.state_dict()))
    (eager_history, eager), (compiled_history, compiled) = results
    assert set(eager) == set(compiled)  # no "_orig_mod." keys: the compiled module shares the model's parameters
    for key in eager:
        torch.testing.assert_close(compiled[key], eager[key], rtol=1e-4, atol=1e-5)
    for e, c in zip(eager_history, compiled_history):
        assert c["loss"] == pytest.approx(e["loss"], rel=1e-4)
    for module in (m for m in model.modules() if hasattr(m, "parametrizations")):
        mask = module.parametrizations.weight[0].mask
        assert torch.all(module.weight[mask == 0] == 0)

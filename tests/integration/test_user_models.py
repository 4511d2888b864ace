"""Bring your own network: a user's factory through ``run``, every stage command and export / load; a network handed
over in Python (``run(cfg, model=net)``, ``robustprune.compress``); starting from given weights (``--init``); bad
input in one line with exit 2 and nothing written; the README's "your own model" example."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

import robustprune
from robustprune.cli import main
from robustprune.config import load_config
from robustprune.data import load_dataset
from robustprune.evaluate import evaluate
from robustprune.export import load
from robustprune.models import factory

pytestmark = pytest.mark.usefixtures("one_thread")

USER_MODULE = '''
import torch
import torch.nn.functional as F
from torch import nn


class UserNet(nn.Module):
    """Written-out forward: functional relu, flatten, a residual add."""

    def __init__(self, width: int = 16, classes: int = 10):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc1 = nn.Linear(4 * 8 * 8, width)
        self.fc2 = nn.Linear(width, width)
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        h = F.relu(self.fc1(torch.flatten(F.relu(self.conv(x)), 1)))
        return self.head(h + F.relu(self.fc2(h)))


class NoWeights(nn.Module):
    def forward(self, x):
        return x.flatten(1)[:, :10]


def build(width: int = 16):
    return UserNet(width)


def build_nothing():
    return NoWeights()
'''
QUICK = ["pretrain.epochs=1", "finetune.epochs=1", "objective.steps=2", "evaluate.n_samples=40",
         "evaluate.pgd_steps=3", "evaluate.square_queries=20", "evaluate.verifiers=[]"]


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    folder = tmp_path / "code"
    folder.mkdir()
    (folder / "usernets.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.setattr(factory, "_trusted", set())  # each test starts trusting nothing
    return "usernets"


def sets(*overrides: str) -> list[str]:
    return [arg for o in overrides for arg in ("--set", o)]


def test_a_factory_runs_through_run_every_stage_command_and_export(user_module, tmp_path, capsys):
    model_args = sets("model.name=usernets:build", "model.kwargs={width: 12}", *QUICK)
    assert main(["run", "--out", str(tmp_path / "run"), "--quiet", *model_args]) == 0
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["config"]["model"] == {"name": "usernets:build", "kwargs": {"width": 12}, "init": None}
    assert report["stages"]["finetuned"]["compression"] == pytest.approx(10, rel=0.02)
    factory._trusted.clear()  # a new process: a checkpoint alone does not get to run code
    ckpt = tmp_path / "run" / "finetuned.safetensors"
    capsys.readouterr()
    assert main(["evaluate", str(ckpt), "--json", *sets("evaluate.n_samples=20")]) == 2
    assert "--trust-factory usernets:build" in capsys.readouterr().err
    trust = ["--trust-factory", "usernets:build"]
    dense = tmp_path / "dense.safetensors"
    assert main(["train", "--out", str(dense), "--quiet", *model_args]) == 0
    assert main(["prune", str(dense), "--compression", "5", "--out", str(tmp_path / "p.safetensors"), *trust]) == 0
    assert main(["finetune", str(tmp_path / "p.safetensors"), "--out", str(tmp_path / "f.safetensors"), "--quiet",
                 *trust]) == 0
    for fmt in ("sparse", "onnx"):
        assert main(["export", str(tmp_path / "f.safetensors"), "--format", fmt, *trust]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "f.safetensors"), "--json", *trust, *sets("evaluate.n_samples=20")]) == 0
    assert json.loads(capsys.readouterr().out)["compression"] == pytest.approx(5, rel=0.05)
    net = load(tmp_path / "f.sparse.safetensors")  # trusted by now in this process
    assert type(net).__name__ == "UserNet" and net.fc1.out_features == 12
    x = torch.rand(3, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(net(x), load(tmp_path / "f.safetensors")(x))


def test_starting_from_given_weights_skips_pre_training(user_module, tmp_path):
    import usernets

    torch.manual_seed(3)
    given = usernets.UserNet(12)
    torch.save(given.state_dict(), tmp_path / "weights.pt")
    quick = [o for o in QUICK if not o.startswith("pretrain.")]  # --init's pretrain.epochs=0 must hold
    args = ["run", "--out", str(tmp_path / "run"), "--quiet", "--init", str(tmp_path / "weights.pt"),
            *sets("model.name=usernets:build", "model.kwargs={width: 12}", *quick)]
    assert main(args) == 0
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["config"]["pretrain"]["epochs"] == 0
    cfg = load_config(None, ["model.name=usernets:build", "model.kwargs={width: 12}", *QUICK])
    expected = evaluate(given, load_dataset("digits").test, cfg.threat, cfg.evaluate, seed=cfg.seed)
    dense = report["stages"]["pretrained"]
    for key in ("benign_acc", "pgd_acc", "robust_acc"):
        assert dense[key] == expected[key], key


def test_a_network_handed_over_in_python_is_compressed_and_left_untouched(user_module, tmp_path):
    import usernets

    torch.manual_seed(0)
    net = usernets.UserNet(12)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    data = load_dataset("digits")
    small, report = robustprune.compress(net, data.train, (data.test.x, data.test.y), eps=0.1, compression=4,
                                         settings={"finetune.epochs": 1, "evaluate.n_samples": 40,
                                                   "evaluate.pgd_steps": 3, "evaluate.verifiers": []},
                                         out=tmp_path / "run")
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert report["stages"]["pretrained"]["compression"] == 1.0  # no pre-training: the given weights
    assert report["config"]["data"]["name"] == "given" and "Data `given`" in (tmp_path / "run" / "report.md").read_text()
    assert report["stages"]["finetuned"]["compression"] == pytest.approx(4, rel=0.02)
    nonzero = sum(int((m.weight != 0).sum()) for m in (small.conv, small.fc1, small.fc2, small.head))
    total = sum(m.weight.numel() for m in (small.conv, small.fc1, small.fc2, small.head))
    assert total / nonzero == pytest.approx(4, rel=0.02)


@pytest.mark.parametrize("overrides, message", [
    (["model.name=usernets_missing:build"], "cannot import usernets_missing"),
    (["model.name=usernets:nothing"], "has no attribute nothing"),
    (["model.name=usernets:build_nothing"], "has no Conv2d or Linear layer to prune"),
    (["model.name=usernets:build", "model.kwargs={depth: 3}"], "raised TypeError"),
])
def test_a_bad_model_is_one_line_exit_2_and_nothing_written(user_module, tmp_path, capsys, overrides, message):
    out = tmp_path / "run"
    assert main(["run", "--out", str(out), *sets(*overrides, *QUICK)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_weights_that_do_not_fit_are_one_line_exit_2_and_nothing_written(user_module, tmp_path, capsys):
    import usernets

    torch.save(usernets.UserNet(7).state_dict(), tmp_path / "other.pt")
    out = tmp_path / "run"
    args = ["run", "--out", str(out), "--init", str(tmp_path / "other.pt"),
            *sets("model.name=usernets:build", "model.kwargs={width: 12}", *QUICK)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "does not fit" in err or "shape" in err, err
    assert len(err.strip().splitlines()) == 1 and not out.exists()


def test_the_readme_example_runs(tmp_path, monkeypatch):
    """The README's "Your own model" section, run as a module of its own (its class is then importable)."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("## Your own model", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    (tmp_path / "readme_example.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    import importlib
    example = importlib.import_module("readme_example")
    assert example.report["stages"]["finetuned"]["compression"] == pytest.approx(10, rel=0.02)
    assert (tmp_path / "runs" / "mynet" / "report.json").is_file()


def test_a_factory_network_is_cut_structurally_and_its_slim_file_rebuilds(user_module, tmp_path):
    args = sets("model.name=usernets:build", "prune.rule=filter-l1", "prune.compression=2", *QUICK)
    assert main(["run", "--out", str(tmp_path / "run"), "--quiet", *args]) == 0
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["structure"]["slim"]["params"] < report["structure"]["dense"]["params"]
    slim, masked = (load(tmp_path / "run" / report["artifacts"][k]) for k in ("slim", "checkpoint"))
    assert type(slim).__name__ == "UserNet" and (slim.conv.out_channels < 4 or slim.fc1.out_features < 16)
    x = torch.rand(5, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(slim(x), masked(x), atol=1e-5)

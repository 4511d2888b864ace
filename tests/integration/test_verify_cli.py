"""``robustprune verify``: every image verified, falsified (a re-checked counter-example) or unknown; a verified
image is never broken by an attack, α-CROWN verifies at least what CROWN does; bad input is one line, exit 2."""
from __future__ import annotations

import json

import pytest
import torch

from robustprune.attacks import pgd
from robustprune.cli import main
from robustprune.data import load_dataset
from robustprune.export import load

pytestmark = pytest.mark.usefixtures("one_thread")
EPS = ["--set", "threat.eps=0.05"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("verify") / "model.safetensors"
    args = ["train", "--out", str(path), "--quiet", "--set", "pretrain.epochs=8", "--set", "objective.name=ibp",
            "--set", "pretrain.eps_warmup_epochs=4", *EPS]
    assert main(args) == 0
    return path


def verdicts(checkpoint, tmp_path, capsys, method: str, *more: str) -> dict:
    out = tmp_path / f"{method}{''.join(more)}.json"
    capsys.readouterr()
    args = ["verify", str(checkpoint), "--method", method, "--n", "40", "--out", str(out), "--timeout", "5", *EPS,
            *more]
    assert main(args) == 0
    assert f"| {method} | 0.05 | 40 |" in capsys.readouterr().out
    return json.loads(out.read_text())


def test_every_image_gets_one_sound_verdict(checkpoint, tmp_path, capsys):
    model = load(checkpoint).double()
    test = load_dataset("digits").test
    crown, alpha, bab = (verdicts(checkpoint, tmp_path, capsys, m) for m in ("crown", "alpha-crown", "bab"))
    for result in (crown, alpha, bab):
        assert result["verified"] + result["falsified"] + result["unknown"] == 40 == len(result["images"])
        assert result["verified"] > 0 and result["median_s"] <= result["worst_s"]
        for image in result["images"]:
            x, y = test.x[image["index"]:image["index"] + 1].double(), test.y[image["index"]:image["index"] + 1]
            if image["verdict"] == "verified":  # no attack breaks a verified image
                torch.manual_seed(0)
                point = pgd(model, x, y, 0.05, 50, restarts=3, loss="margin")
                assert int(model(point).argmax(1)[0]) == int(y)
            if image["verdict"] == "falsified":  # the point is in the ball ∩ [0, 1] and misclassified
                point = torch.tensor(image["counterexample"], dtype=torch.float64).unsqueeze(0)
                assert point.shape == x.shape and (point - x).abs().max() <= 0.05 + 1e-7
                assert point.min() >= 0 and point.max() <= 1
                assert int(model(point).argmax(1)[0]) == image["counterexample_label"] != image["label"]
            else:
                assert image["counterexample"] is None
    assert bab["verified"] >= alpha["verified"] >= crown["verified"]
    assert all(i["seconds"] <= 5 + 3 for i in bab["images"])  # the time limit holds (plus the first bound)
    assert {i["index"] for i in crown["images"] if i["verdict"] == "verified"} <= \
           {i["index"] for i in alpha["images"] if i["verdict"] == "verified"}


def test_images_verified_in_worker_processes_get_the_same_verdicts(checkpoint, tmp_path, capsys, monkeypatch):
    from robustprune import verification

    pools, original = [], verification._in_workers
    monkeypatch.setattr(verification, "_in_workers", lambda *a: pools.append(a[-2]) or original(*a))  # a[-2]: jobs

    def without_times(result: dict) -> dict:
        return {**result, "median_s": None, "worst_s": None,
                "images": [{**i, "seconds": None} for i in result["images"]]}

    pruned = tmp_path / "pruned.safetensors"  # masks are parametrizations, which do not pickle: baked for workers
    assert main(["prune", str(checkpoint), "--compression", "2", "--rule", "magnitude", "--out", str(pruned)]) == 0
    for method in ("crown", "bab"):  # bab: each image's own seed, program and time limit in its worker
        alone, shared = (verdicts(pruned, tmp_path, capsys, method, *jobs) for jobs in ((), ("--jobs", "2")))
        assert [i["index"] for i in shared["images"]] == list(range(40))
        assert without_times(shared) == without_times(alone)
    assert pools == [2, 2], "--jobs 2 verified in two worker processes"
    bab = json.loads((tmp_path / "bab--jobs2.json").read_text())
    assert {"milp", "attack"} <= {i["decided_by"] for i in bab["images"]}, "test setup: every step decides some"


def test_a_model_that_cannot_be_sent_to_workers_is_one_clear_error():
    from robustprune import verification
    from robustprune.infra.errors import UserError

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)).double()
    model.note = lambda: None  # a lambda does not pickle
    x, y = torch.rand(3, 1, 8, 8, dtype=torch.float64), torch.tensor([0, 1, 2])
    with pytest.raises(UserError, match="cannot be pickled.*use --jobs 1"):
        verification.verdicts(model, x, y, 0.01, "crown", jobs=2)
    assert len(verification.verdicts(model, x, y, 0.01, "crown", jobs=1)) == 3


@pytest.mark.parametrize("args, message", [
    (["--method", "alfa-crown"], "did you mean 'alpha-crown'"),
    (["--method", "bab", "--timeout", "0"], "--timeout must be > 0"),
    (["--n", "0"], "--n must be >= 1"),
    (["--jobs", "0"], "--jobs must be >= 1"),
    (["--alpha-iterations", "-1"], "alpha-crown iterations must be an integer >= 0"),
    (["--alpha-lr", "0"], "alpha-crown learning rate must be > 0"),
    (["--set", "threat.norm=l2"], "the verifiers bound the L∞ ball"),
])
def test_bad_input_is_one_line_and_exit_2(checkpoint, tmp_path, capsys, args, message):
    out = tmp_path / "v.json"
    capsys.readouterr()
    assert main(["verify", str(checkpoint), "--out", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and not out.exists()

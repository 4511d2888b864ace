import json

import pytest
import torch

from conftest import without_wall_times
from robustprune.config import eval_config, ThreatConfig
from robustprune.infra.errors import UserError
from robustprune.evaluate import evaluate
from robustprune.export import load, read_metadata, save
from robustprune.models import create_model
from robustprune.pruning import masks, prune


@pytest.mark.parametrize("name", ["mlp", "cnn-small", "resnet18"])
def test_checkpoint_round_trip_keeps_logits_and_masks(tmp_path, name):
    torch.manual_seed(0)
    model = create_model(name, (1, 8, 8), 10, mean=[0.3], std=[0.2]).eval()
    prune(model, "magnitude", 10.0, "global")
    path = save(model, tmp_path / "m.safetensors", stage="pruned", config={"a": 1})
    loaded, meta = load(path), read_metadata(path)
    x = torch.rand(3, 1, 8, 8)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    assert set(masks(loaded)) == set(masks(model)) and meta["stage"] == "pruned" and meta["config"] == {"a": 1}
    assert meta["arch"]["name"] == name


def test_save_is_atomic_and_leaves_no_temporary_files(tmp_path):
    model = create_model("mlp", (1, 4, 4), 2)
    save(model, tmp_path / "a.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]


@pytest.mark.parametrize("content", [b"", b"garbage" * 10, b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}....."])
def test_foreign_or_corrupt_files_are_refused(tmp_path, content):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(UserError, match="not a valid robustprune"):
        load(path)


def test_truncated_checkpoint_is_refused(tmp_path):
    path = save(create_model("mlp", (1, 4, 4), 2), tmp_path / "m.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(UserError):
        load(path)


def test_foreign_safetensors_and_wrong_version(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(UserError, match="not a robustprune checkpoint"):
        read_metadata(tmp_path / "foreign.safetensors")
    save_file({"w": torch.zeros(2)}, str(tmp_path / "v9.safetensors"),
              metadata={"format": "robustprune-checkpoint", "format_version": "9", "arch": json.dumps({})})
    with pytest.raises(UserError, match="format version"):
        read_metadata(tmp_path / "v9.safetensors")


def test_tensors_that_do_not_match_the_architecture(tmp_path):
    from safetensors.torch import save_file

    arch = create_model("mlp", (1, 4, 4), 2).arch
    save_file({"w": torch.zeros(2)}, str(tmp_path / "m.safetensors"),
              metadata={"format": "robustprune-checkpoint", "format_version": "1", "arch": json.dumps(arch)})
    with pytest.raises(UserError, match="does not match its architecture"):
        load(tmp_path / "m.safetensors")


def test_evaluate_counts_and_orders_accuracies(tiny_mlp, tiny_data):
    metrics = evaluate(tiny_mlp, tiny_data.test, ThreatConfig(eps=0.3), eval_config(pgd_steps=5, pgd_restarts=2,
                                                                                   n_samples=20))
    assert metrics["n_eval"] == 20
    assert 0 <= metrics["pgd_acc"] <= metrics["benign_acc"] <= 1
    preds = tiny_mlp(tiny_data.test.x[:20]).argmax(1)
    assert metrics["benign_acc"] == pytest.approx((preds == tiny_data.test.y[:20]).float().mean().item())
    assert 0 <= metrics["verified_acc"] <= metrics["pgd_acc"] and metrics["autoattack_acc"] is None


def test_evaluate_is_repeatable(tiny_mlp, tiny_data):
    cfg = eval_config(pgd_steps=3)
    assert without_wall_times(evaluate(tiny_mlp, tiny_data.test, ThreatConfig(eps=0.1), cfg)) == \
        without_wall_times(evaluate(tiny_mlp, tiny_data.test, ThreatConfig(eps=0.1), cfg))


def test_zero_eps_pgd_equals_benign(tiny_mlp, tiny_data):
    metrics = evaluate(tiny_mlp, tiny_data.test, ThreatConfig(eps=0.0), eval_config(pgd_steps=3))
    assert metrics["pgd_acc"] == metrics["benign_acc"]


def test_atomic_writes_get_an_ordinary_files_mode(tmp_path):
    """The temporary file is private while written; the result follows the umask like any other file."""
    import os

    from robustprune.infra.fileio import write_text
    old = os.umask(0o022)
    try:
        write_text(tmp_path / "a.txt", "x")
        save(create_model("mlp", (1, 4, 4), 2), tmp_path / "m.safetensors")
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "m.safetensors").stat().st_mode & 0o777 == 0o644

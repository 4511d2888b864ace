"""ONNX export: onnxruntime reproduces PyTorch's eval-mode logits for dense, masked and slim forms of every model."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from robustprune.infra.errors import UserError  # noqa: E402
from robustprune.export.onnx import save_onnx  # noqa: E402
from robustprune.models import MODELS, create_model  # noqa: E402
from robustprune.pruning import apply_masks, masks, prune, slim  # noqa: E402
from robustprune.pruning.structured import channel_masks  # noqa: E402

CLASSES = 10
GRAY = {"mlp", "cnn-small", "cnn-large"}
TOLERANCE = 1e-5

pytestmark = pytest.mark.usefixtures("one_thread")  # tracing is serial; tiny batches gain nothing from more threads


def input_shape(name: str) -> tuple[int, int, int]:
    return (1, 28, 28) if name in GRAY else (3, 32, 32)


def random_bn_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BatchNorm statistics and affine parameters, so that folding BN into the convolutions is exercised.

    Mild ones: they keep the logits of the deep residual models of order 1, where float32 rounding stays far below
    the tolerance (stronger ones grow wrn-28-4's logits to ~20 and its rounding differences towards 1e-5).
    """
    g = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            n = module.num_features
            module.running_mean.copy_(torch.rand(n, generator=g) * 0.2 - 0.1)
            module.running_var.copy_(torch.rand(n, generator=g) * 0.5 + 0.75)
            with torch.no_grad():
                module.weight.copy_(torch.rand(n, generator=g) * 0.5 + 0.5)
                module.bias.copy_(torch.rand(n, generator=g) * 0.2 - 0.1)
    return model


def build(name: str, shape: tuple[int, ...] | None = None) -> nn.Module:
    torch.manual_seed(0)
    return random_bn_(create_model(name, shape or input_shape(name), CLASSES))


def batch(n: int, shape: tuple[int, ...], seed: int = 1) -> torch.Tensor:
    return torch.rand(n, *shape, generator=torch.Generator().manual_seed(seed))


def onnx_logits(path: Path, x: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"input": x.numpy()})[0]


def max_diff(model: nn.Module, path: Path, x: torch.Tensor) -> float:
    """Max |onnxruntime − PyTorch eval-mode| logits over ``x`` (the model's mode is restored)."""
    was_training = model.training
    with torch.no_grad():
        expected = model.eval()(x).numpy()
    model.train(was_training)
    got = onnx_logits(path, x)
    assert got.shape == expected.shape and len(got) == len(x)
    return float(np.abs(got - expected).max())


def zero_weights(path: Path) -> int:
    """Exact zeros among the ONNX file's initializers of rank ≥ 2 (Conv/Gemm weights)."""
    graph = onnx.load(str(path)).graph
    return sum(int((onnx.numpy_helper.to_array(t) == 0).sum()) for t in graph.initializer if len(t.dims) >= 2)


def assert_only(folder: Path, names: list[str]) -> None:
    """``folder`` holds exactly ``names``: no temporary or external-data file was left beside the target."""
    assert sorted(p.name for p in folder.iterdir()) == sorted(names)


@pytest.mark.parametrize("name", MODELS.names())
def test_dense_model_matches_pytorch_with_a_dynamic_batch(tmp_path, name):
    model = build(name).eval()
    path = save_onnx(model, tmp_path / "m.onnx")
    assert path == tmp_path / "m.onnx"
    assert_only(tmp_path, ["m.onnx"])  # one self-contained file
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (inp,), (out,) = session.get_inputs(), session.get_outputs()
    assert (inp.name, out.name) == ("input", "logits")
    assert isinstance(inp.shape[0], str) and inp.shape[1:] == list(input_shape(name))  # symbolic batch axis
    for n in (3, 1):
        assert max_diff(model, path, batch(n, input_shape(name), seed=n)) <= TOLERANCE


@pytest.mark.parametrize("name", MODELS.names())
def test_masked_model_is_exported_with_masks_baked_in_and_left_unchanged(tmp_path, name):
    model = build(name)
    prune(model, "magnitude", compression=10)
    before = {k: v.clone() for k, v in masks(model).items()}
    pruned = sum(int((m == 0).sum()) for m in before.values())
    model.train()  # the export is of eval mode, whatever the caller's mode
    path = save_onnx(model, tmp_path / "m.onnx")
    assert model.training
    assert masks(model).keys() == before.keys() and all(torch.equal(masks(model)[k], v) for k, v in before.items())
    assert any(parametrize.is_parametrized(m) for m in model.modules())
    assert max_diff(model, path, batch(3, input_shape(name))) <= TOLERANCE
    assert model.training
    # Baked in: pruned weights are exact zeros in the file (not a mask multiplied at run time).
    assert zero_weights(path) >= pruned
    assert "Mul" not in {node.op_type for node in onnx.load(str(path)).graph.node}


@pytest.mark.parametrize("name, shape", [("cnn-small", (1, 28, 28)), ("resnet18", (3, 16, 16))])
def test_slim_model_matches_pytorch(tmp_path, name, shape):
    model = build(name, shape).eval()
    x = batch(3, shape)
    masked = build(name, shape).eval()
    apply_masks(masked, channel_masks(model, x, 2.0, "layer"))
    small = slim(masked)
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())
    path = save_onnx(small, tmp_path / "slim.onnx")
    assert max_diff(small, path, x) <= TOLERANCE
    with torch.no_grad():  # and therefore the masked model's outputs
        np.testing.assert_allclose(onnx_logits(path, x), masked(x).numpy(), rtol=0, atol=TOLERANCE)


def test_a_plain_module_needs_an_input_shape(tmp_path):
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 2)).eval()
    with pytest.raises(UserError, match="input_shape"):
        save_onnx(model, tmp_path / "m.onnx")
    assert_only(tmp_path, [])
    path = save_onnx(model, tmp_path / "m.onnx", input_shape=(3, 2, 2))
    assert max_diff(model, path, batch(4, (3, 2, 2))) <= TOLERANCE


def test_unwritable_destinations_are_user_errors_and_leave_nothing(tmp_path):
    model = build("mlp", (1, 4, 4))
    with pytest.raises(UserError, match="cannot write ONNX file") as error:
        save_onnx(model, tmp_path / "missing" / "m.onnx")
    assert "\n" not in str(error.value)
    (tmp_path / "folder").mkdir()
    with pytest.raises(UserError, match="cannot write ONNX file"):
        save_onnx(model, tmp_path / "folder")
    assert_only(tmp_path, ["folder"])
    assert_only(tmp_path / "folder", [])


def test_a_failed_export_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "m.onnx"
    path.write_bytes(b"previous export")

    def broken(*args, **kwargs):
        raise RuntimeError("Unsupported: ONNX export of operator weird_op, opset 20\nlong details\nmore details")

    monkeypatch.setattr(torch.onnx, "export", broken)
    with pytest.raises(UserError) as error:
        save_onnx(build("mlp", (1, 4, 4)), path)
    message = str(error.value)
    assert "'mlp'" in message and "weird_op" in message and "\n" not in message
    assert path.read_bytes() == b"previous export"
    assert_only(tmp_path, ["m.onnx"])


class Svd(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.linalg.svd(x)[1]  # aten::linalg_svd has no ONNX symbolic


def test_an_unsupported_op_is_a_one_line_user_error_and_prints_nothing(tmp_path, capfd):
    with pytest.raises(UserError, match="export of model 'Svd' failed: .*linalg_svd") as error:
        save_onnx(Svd(), tmp_path / "m.onnx", input_shape=(3, 3))
    assert "\n" not in str(error.value)
    assert capfd.readouterr().out == ""  # the exporter's C++ log would dump its whole IR graph here
    assert_only(tmp_path, [])


def test_the_requested_opset_is_used(tmp_path):
    model = build("cnn-small", (1, 8, 8)).eval()
    path = save_onnx(model, tmp_path / "m.onnx", opset=17)
    assert {o.domain: o.version for o in onnx.load(str(path)).opset_import}[""] == 17
    assert max_diff(model, path, batch(2, (1, 8, 8))) <= TOLERANCE


def test_missing_onnx_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)  # makes `import onnx` raise ImportError
    with pytest.raises(UserError, match=r"pip install 'robustprune\[onnx\]'"):
        save_onnx(build("mlp", (1, 4, 4)), tmp_path / "m.onnx")
    assert_only(tmp_path, [])


def test_onnxscript_is_not_needed(tmp_path, monkeypatch):
    """The TorchScript exporter serialises with ``onnx`` alone (onnxscript serves only the dynamo exporter)."""
    monkeypatch.setitem(sys.modules, "onnxscript", None)
    model = build("mlp", (1, 4, 4)).eval()
    assert max_diff(model, save_onnx(model, tmp_path / "m.onnx"), batch(2, (1, 4, 4))) <= TOLERANCE

"""Contract of every registered model: shapes, gradients, spec round-trip, normalisation inside, determinism."""
from __future__ import annotations

import json
from typing import Iterator

import pytest
import torch
from torch import nn

from robustprune.infra.errors import UserError
from robustprune.models import MODELS, Normalize, create_model, model_from_spec

NAMES = MODELS.names()
SHAPES = [(1, 8, 8), (1, 28, 28), (3, 32, 32)]
CLASSES = [10, 3]
def shape_id(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape))


BATCH = 2  # the smallest batch BatchNorm accepts in train mode on a 1×1 feature map


@pytest.fixture(scope="module", autouse=True)
def single_thread() -> Iterator[None]:
    """One intra-op thread: these tiny batches gain nothing from more, and spinning threads slow down a busy CI host."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def build(name: str, shape: tuple[int, ...], classes: int) -> nn.Sequential:
    """A freshly seeded model per test (no shared state; the whole file still runs in ~15 s on 2 CPU cores)."""
    torch.manual_seed(0)
    return create_model(name, shape, classes)


def inputs(shape: tuple[int, ...], seed: int = 1) -> torch.Tensor:
    return torch.rand(BATCH, *shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("classes", CLASSES)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("name", NAMES)
def test_forward_shape_finite_and_deterministic_in_eval(name: str, shape: tuple[int, ...], classes: int) -> None:
    model = build(name, shape, classes).eval()
    x = inputs(shape)
    with torch.no_grad():
        first, second = model(x), model(x)
    assert first.shape == (BATCH, classes)
    assert torch.isfinite(first).all()
    assert torch.equal(first, second)


@pytest.mark.parametrize("classes", CLASSES)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("name", NAMES)
def test_backward_reaches_every_parameter(name: str, shape: tuple[int, ...], classes: int) -> None:
    model = build(name, shape, classes).train()
    logits = model(inputs(shape))
    assert logits.shape == (BATCH, classes)
    nn.functional.cross_entropy(logits, torch.arange(BATCH) % classes).backward()
    for param_name, param in model.named_parameters():
        assert param.grad is not None, f"{param_name} got no gradient"
        assert torch.isfinite(param.grad).all(), f"{param_name} has a non-finite gradient"
    assert any(p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("name", NAMES)
def test_arch_spec_round_trips(name: str, shape: tuple[int, ...]) -> None:
    original = build(name, shape, 10).eval()
    spec = json.loads(json.dumps(original.arch))  # the spec must survive JSON (checkpoint metadata)
    assert spec == original.arch
    torch.manual_seed(123)  # a different init, so equal outputs come from the loaded weights
    rebuilt = model_from_spec(spec).eval()
    rebuilt.load_state_dict(original.state_dict(), strict=True)
    assert rebuilt.arch == original.arch
    x = inputs(shape)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), original(x))


@pytest.mark.parametrize("name", NAMES)
def test_normalisation_is_the_first_layer_and_inside_the_model(name: str) -> None:
    shape = (3, 32, 32) if name in {"mlp", "cnn-small", "cnn-large"} else (3, 8, 8)  # keep large models cheap
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    model = create_model(name, shape, 10, mean=mean, std=std).eval()
    assert isinstance(model[0], Normalize)
    assert not any(isinstance(m, Normalize) for m in model[1].modules())
    x = inputs(shape)
    normalised = (x - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model[1](normalised), rtol=0, atol=0)
    assert model.arch["mean"] == mean and model.arch["std"] == std


@pytest.mark.parametrize("name", NAMES)
def test_every_model_has_prunable_layers(name: str) -> None:
    model = build(name, (1, 8, 8), 10)
    assert any(isinstance(m, (nn.Conv2d, nn.Linear)) for m in model.modules())


def test_registry_lists_the_design_models() -> None:
    assert set(NAMES) >= {"mlp", "cnn-small", "cnn-large", "vgg16-bn", "wrn-28-4", "resnet18"}


def test_unknown_model_name_suggests_the_closest() -> None:
    with pytest.raises(UserError, match="did you mean 'cnn-small'"):
        create_model("cnn-smal", (1, 28, 28), 10)


def test_too_small_input_is_a_user_error() -> None:
    with pytest.raises(UserError):
        create_model("cnn-large", (1, 2, 2), 10)


def conv_params(c_in: int, c_out: int, k: int) -> int:
    return c_in * c_out * k * k + c_out


def linear_params(d_in: int, d_out: int) -> int:
    return d_in * d_out + d_out


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_wong_kolter_parameter_counts_on_mnist() -> None:
    # small: 28 → 14 → 7 after the two stride-2 4×4 convs; large: 28 → 28 → 14 → 14 → 7.
    small = conv_params(1, 16, 4) + conv_params(16, 32, 4) + linear_params(32 * 7 * 7, 100) + linear_params(100, 10)
    large = (
        conv_params(1, 32, 3) + conv_params(32, 32, 4) + conv_params(32, 64, 3) + conv_params(64, 64, 4)
        + linear_params(64 * 7 * 7, 512) + linear_params(512, 512) + linear_params(512, 10)
    )
    assert (small, large) == (166_406, 1_974_762)
    assert count(build("cnn-small", (1, 28, 28), 10)) == small
    assert count(build("cnn-large", (1, 28, 28), 10)) == large


def test_cifar_reference_parameter_counts() -> None:
    # The counts of the reference implementations on CIFAR-10 (kuangliu ResNet-18; Zagoruyko/xternalz WRN-28-4).
    assert count(build("resnet18", (3, 32, 32), 10)) == 11_173_962
    assert count(build("wrn-28-4", (3, 32, 32), 10)) == 5_849_050

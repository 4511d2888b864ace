"""``InputConv2d``: ``nn.Conv2d`` bit for bit except the input gradient, which is computed by the direct kernel."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from robustprune.attacks import pgd
from robustprune.export import slim
from robustprune.models import create_model
from robustprune.models.layers import InputConv2d
from robustprune.pruning.masks import prunable_layers, set_mask

GEOMETRIES = [
    dict(kernel_size=4, stride=2, padding=1),  # MNIST cnn-small's first layer
    dict(kernel_size=3, stride=1, padding=1),  # cnn-large, ResNet, VGG, WRN stems
    dict(kernel_size=5, stride=3, padding=2, dilation=2),
    dict(kernel_size=(3, 2), stride=(2, 1), padding=(1, 0)),
    dict(kernel_size=3, stride=2, padding=1, padding_mode="reflect"),
    dict(kernel_size=3, stride=2, padding=1, bias=False),
]


def pair(in_channels: int, **kwargs) -> tuple[nn.Conv2d, InputConv2d]:
    torch.manual_seed(0)
    plain = nn.Conv2d(in_channels, 8, **kwargs).double()
    fast = InputConv2d(in_channels, 8, **kwargs).double()
    fast.load_state_dict(plain.state_dict())
    return plain, fast


@pytest.mark.parametrize("kwargs", GEOMETRIES, ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()))
@pytest.mark.parametrize("in_channels", [1, 3])
def test_same_outputs_and_weight_gradients_close_input_gradient(kwargs, in_channels):
    plain, fast = pair(in_channels, **kwargs)
    x = torch.rand(5, in_channels, 17, 19, dtype=torch.float64)
    xs = [x.clone().requires_grad_(True) for _ in range(2)]
    outs = [plain(xs[0]), fast(xs[1])]
    assert type(outs[1].grad_fn).__name__ == "_AttachInputGradientBackward"  # the direct kernel was used
    assert torch.equal(outs[0], outs[1])
    upstream = torch.randn_like(outs[0])
    for out in outs:
        out.backward(upstream)
    assert torch.equal(plain.weight.grad, fast.weight.grad)
    if plain.bias is not None:
        assert torch.equal(plain.bias.grad, fast.bias.grad)
    assert xs[1].grad.shape == x.shape
    torch.testing.assert_close(xs[1].grad, xs[0].grad, rtol=1e-10, atol=1e-12)
    assert xs[0].grad.abs().sum() > 0


def test_float32_input_gradient_within_rounding_of_onednn():
    plain, fast = pair(1, kernel_size=4, stride=2, padding=1)
    plain, fast = plain.float(), fast.float()
    x = torch.rand(64, 1, 28, 28, requires_grad=True)
    grads = [torch.autograd.grad((m(x) ** 2).sum(), x)[0] for m in (plain, fast)]
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-5)


def test_masked_layer_uses_the_masked_weight():
    plain, fast = pair(1, kernel_size=4, stride=2, padding=1)
    mask = (torch.rand_like(plain.weight) > 0.5).double()
    dense = plain.weight.detach().clone()
    for module in (plain, fast):
        set_mask(module, mask)
    x = torch.rand(3, 1, 12, 12, dtype=torch.float64, requires_grad=True)
    grads = [torch.autograd.grad(m(x).sum(), x)[0] for m in (plain, fast)]
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-10, atol=1e-12)
    dense_grad = torch.autograd.grad(nn.functional.conv2d(x, dense, None, 2, 1).sum(), x)[0]
    assert not torch.allclose(grads[1], dense_grad)  # the mask reached the input gradient


def test_input_gradient_alone_computes_no_weight_gradient():
    _, fast = pair(1, kernel_size=4, stride=2, padding=1)
    x = torch.rand(4, 1, 12, 12, dtype=torch.float64, requires_grad=True)
    with torch.profiler.profile() as prof:
        torch.autograd.grad(fast(x).sum(), x)
    names = [event.key for event in prof.key_averages()]
    assert "aten::slow_conv_transpose2d" in names
    assert "aten::convolution_backward" not in names  # the weight branch was pruned by the engine


@pytest.mark.parametrize("case", ["no-grad input", "three+ channels", "groups", "autocast"])
def test_plain_path_where_the_direct_kernel_does_not_apply(case):
    channels = 4 if case == "three+ channels" else 2
    layer = InputConv2d(channels, 4, 3, groups=2 if case == "groups" else 1)
    x = torch.rand(2, channels, 8, 8, requires_grad=case != "no-grad input")
    if case == "autocast":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = layer(x)
    else:
        out = layer(x)
    assert type(out.grad_fn).__name__ == "ConvolutionBackward0"


def test_in_place_activation_and_second_derivative():
    torch.manual_seed(0)
    net = nn.Sequential(InputConv2d(1, 4, 3), nn.ReLU(inplace=True))
    x = torch.rand(2, 1, 8, 8, requires_grad=True)
    (grad,) = torch.autograd.grad(net(x).sum(), x, create_graph=True)
    assert grad.abs().sum() > 0
    with pytest.raises(RuntimeError):  # refused rather than a silently wrong second derivative
        torch.autograd.grad(grad.sum(), x)


@pytest.mark.parametrize("name,shape", [("cnn-small", (1, 28, 28)), ("cnn-large", (1, 28, 28)),
                                        ("vgg16-bn", (3, 32, 32)), ("resnet18", (3, 32, 32)),
                                        ("wrn-28-4", (3, 32, 32))])
def test_model_zoo_uses_it_for_the_image_input_layer_only(name, shape):
    model = create_model(name, shape, 10)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert type(convs[0]) is InputConv2d and convs[0].in_channels == shape[0]
    assert all(type(m) is nn.Conv2d for m in convs[1:])


def test_slim_rebuild_keeps_the_layer_type():
    model = create_model("cnn-small", (1, 28, 28), 10)
    rebuilt = slim.build(dict(model.arch, slim=True, widths=slim.widths(model)))
    first = next(name for name, m in model.named_modules() if isinstance(m, InputConv2d))
    assert type(rebuilt.get_submodule(first)) is InputConv2d


def test_attack_results_match_a_plain_conv_copy_of_the_model():
    """Same adversarial examples as the same network built from ``nn.Conv2d``, up to float rounding of the gradient:
    PGD follows the gradient's sign, so only coordinates whose gradient is within rounding of 0 may differ."""
    torch.manual_seed(0)
    model = create_model("cnn-small", (1, 28, 28), 10).eval()
    plain = copy.deepcopy(model)
    for module in plain.modules():
        if isinstance(module, InputConv2d):
            module.__class__ = nn.Conv2d  # InputConv2d adds no state: this is the nn.Conv2d network
    assert not any(isinstance(m, InputConv2d) for m in plain.modules())
    g = torch.Generator().manual_seed(1)
    for (_, a), (_, b) in zip(prunable_layers(model), prunable_layers(plain)):
        mask = (torch.rand(a.weight.shape, generator=g) > 0.5).float()
        set_mask(a, mask)
        set_mask(b, mask)
    x, y = torch.rand(64, 1, 28, 28, generator=g), torch.randint(0, 10, (64,), generator=g)
    advs = []
    for net in (model, plain):
        torch.manual_seed(5)
        advs.append(pgd(net, x, y, 0.3, steps=10))
    assert not torch.equal(advs[0], x)
    assert (advs[0] == advs[1]).float().mean().item() > 0.999
    with torch.no_grad():
        wrong = [(net(adv).argmax(1) != y).sum().item() for net, adv in zip((model, plain), advs)]
    assert abs(wrong[0] - wrong[1]) <= 1

"""Tests of kbfgs.experiments.models: shapes, parameter counts and layer structure."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest
import torch
from torch import nn

from kbfgs.experiments import models as M


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count(model: nn.Module, kind: type) -> int:
    return sum(isinstance(m, kind) for m in model.modules())


@pytest.mark.parametrize(
    ("build", "width"),
    [(M.mnist_autoencoder, 784), (M.faces_autoencoder, 625), (M.curves_autoencoder, 784)],
)
def test_autoencoder_shapes(build: Callable[[], nn.Sequential], width: int) -> None:
    model = build()
    assert model(torch.randn(3, width)).shape == (3, width)


def test_mnist_autoencoder_param_count() -> None:
    # sum of (in + 1) * out over the Table 5 widths 784-1000-500-250-30-250-500-1000-784:
    # 785000 + 500500 + 125250 + 7530 + 7750 + 125500 + 501000 + 784784
    assert n_params(M.mnist_autoencoder()) == 2_837_314


def test_other_autoencoder_param_counts() -> None:
    for widths, build in ((M.FACES_WIDTHS, M.faces_autoencoder),
                          (M.CURVES_WIDTHS, M.curves_autoencoder)):
        expected = sum((a + 1) * b for a, b in itertools.pairwise(widths))
        assert n_params(build()) == expected


@pytest.mark.parametrize("build", [M.mnist_autoencoder, M.faces_autoencoder,
                                   M.curves_autoencoder])
def test_autoencoder_activations(build: Callable[[], nn.Sequential]) -> None:
    mods = list(build())
    linears = [i for i, m in enumerate(mods) if isinstance(m, nn.Linear)]
    code = min(linears, key=lambda i: mods[i].out_features)
    follows = [type(mods[i + 1]) if i + 1 < len(mods) else None for i in linears]
    for i, nxt in zip(linears, follows):
        if i == code or i == linears[-1]:
            assert nxt in (nn.Linear, None), f"layer {i} must have no activation"
        else:
            assert nxt is nn.ReLU
    assert mods[code].out_features == (6 if build is M.curves_autoencoder else 30)
    assert not any(getattr(m, "inplace", False) for m in mods)


def test_autoencoder_rejects_bad_widths() -> None:
    with pytest.raises(ValueError):
        M.autoencoder([784])


def test_vgg16_bn_structure_and_shapes() -> None:
    model = M.vgg16_bn()
    assert count(model, nn.Conv2d) == 13
    assert count(model, nn.BatchNorm2d) == 13
    assert count(model, nn.Linear) == 1
    model.eval()
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    fmnist = M.vgg16_bn(in_channels=1, num_classes=10, image_size=28).eval()
    assert fmnist(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert M.vgg16_bn(num_classes=100).eval()(torch.randn(1, 3, 32, 32)).shape == (1, 100)


def test_resnet32_structure() -> None:
    model = M.resnet32()
    assert 460_000 <= n_params(model) <= 470_000
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(convs) == 31 and len(linears) == 1
    assert all(c.weight.requires_grad and c.bias is None for c in convs)
    for block in model.modules():
        if isinstance(block, M.BasicBlock):  # shortcuts carry no parameters
            assert n_params(block.shortcut) == 0
    kron = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert len(kron) == 32


def test_resnet32_shapes() -> None:
    model = M.resnet32().eval()
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    fmnist = M.resnet32(in_channels=1, num_classes=10).eval()
    assert fmnist(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert M.resnet32(num_classes=100).eval()(torch.randn(1, 3, 32, 32)).shape == (1, 100)


def test_resnet_no_inplace_relu() -> None:
    for model in (M.resnet32(), M.vgg16_bn()):
        assert not any(getattr(m, "inplace", False) for m in model.modules())


def test_build_model() -> None:
    assert isinstance(M.build_model("resnet32", 3, 10, 32), M.CifarResNet)
    assert count(M.build_model("VGG16-BN", 1, 10, 28), nn.Conv2d) == 13
    assert n_params(M.build_model("mnist-autoencoder")) == 2_837_314
    with pytest.raises(ValueError, match="resnet32"):
        M.build_model("resnet50", 3, 10, 32)

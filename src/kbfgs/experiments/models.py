"""Models of the paper's experiments: Table 5 autoencoders, VGG16-BN and ResNet32 (App. D.3).

No function takes a device: callers do ``model.to(device)``. No ReLU is in-place, so optimizer
hooks may read any layer's output.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "CURVES_WIDTHS",
    "FACES_WIDTHS",
    "MNIST_WIDTHS",
    "MODEL_NAMES",
    "VGG16_CONFIG",
    "autoencoder",
    "build_model",
    "curves_autoencoder",
    "faces_autoencoder",
    "mnist_autoencoder",
    "resnet32",
    "vgg16_bn",
]

# Table 5 of the paper.
MNIST_WIDTHS = (784, 1000, 500, 250, 30, 250, 500, 1000, 784)
FACES_WIDTHS = (625, 2000, 1000, 500, 30, 500, 1000, 2000, 625)
CURVES_WIDTHS = (784, 400, 200, 100, 50, 25, 6, 25, 50, 100, 200, 400, 784)

# VGG "model D" (Simonyan & Zisserman 2014): conv widths, "M" = 2x2 max-pool.
VGG16_CONFIG: tuple[int | str, ...] = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M",
                                       512, 512, 512, "M", 512, 512, 512, "M")


# --------------------------------------------------------------------------------------------
# Autoencoders
# --------------------------------------------------------------------------------------------


def autoencoder(widths: Sequence[int]) -> nn.Sequential:
    """MLP of ``nn.Linear`` layers with ReLU after each hidden layer except the code layer.

    The code layer is the hidden layer of smallest width (the first one on ties); it and the
    output layer have no activation (the loss applies the sigmoid, or is a squared error).
    """
    widths = [int(w) for w in widths]
    if len(widths) < 2 or min(widths) < 1:
        raise ValueError(f"widths must hold at least 2 positive sizes, got {widths}")
    hidden = widths[1:-1]
    code = 1 + hidden.index(min(hidden)) if hidden else -1  # index into widths
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(widths), start=1):
        layers.append(nn.Linear(fan_in, fan_out))
        if i < len(widths) - 1 and i != code:
            layers.append(nn.ReLU(inplace=False))
    return nn.Sequential(*layers)


def mnist_autoencoder() -> nn.Sequential:
    """MNIST autoencoder of Table 5: 784-1000-500-250-30-250-500-1000-784."""
    return autoencoder(MNIST_WIDTHS)


def faces_autoencoder() -> nn.Sequential:
    """FACES autoencoder of Table 5: 625-2000-1000-500-30-500-1000-2000-625."""
    return autoencoder(FACES_WIDTHS)


def curves_autoencoder() -> nn.Sequential:
    """CURVES autoencoder of Table 5: 784-400-200-100-50-25-6-25-50-100-200-400-784."""
    return autoencoder(CURVES_WIDTHS)


# --------------------------------------------------------------------------------------------
# VGG16 with batch norm
# --------------------------------------------------------------------------------------------


def _pooled_size(image_size: int, n_pools: int) -> int:
    """Spatial size after ``n_pools`` 2x2 max-pools with ceil_mode=True."""
    for _ in range(n_pools):
        image_size = (image_size + 1) // 2
    return image_size


def vgg16_bn(in_channels: int = 3, num_classes: int = 10, image_size: int = 32) -> nn.Sequential:
    """VGG16 ("model D") with BatchNorm after every conv and one final Linear (App. D.3).

    Pools use ``ceil_mode=True``: identical to floor mode for 32x32 inputs, and 28x28 inputs
    (Fashion-MNIST) shrink 28-14-7-4-2-1 instead of vanishing. Init as torchvision's VGG.
    """
    layers: list[nn.Module] = []
    channels = in_channels
    for v in VGG16_CONFIG:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True))
        else:
            layers += [nn.Conv2d(channels, int(v), kernel_size=3, padding=1),
                       nn.BatchNorm2d(int(v)), nn.ReLU(inplace=False)]
            channels = int(v)
    s = _pooled_size(image_size, VGG16_CONFIG.count("M"))
    model = nn.Sequential(*layers, nn.Flatten(), nn.Linear(channels * s * s, num_classes))
    _init_vgg(model)
    return model


def _init_vgg(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.zeros_(m.bias)


# --------------------------------------------------------------------------------------------
# ResNet32 (He et al. 2016, Section 4.2)
# --------------------------------------------------------------------------------------------


class ShortcutA(nn.Module):
    """Option A shortcut: stride-2 subsampling plus zero channels; no parameters."""

    def __init__(self, stride: int, extra_channels: int) -> None:
        super().__init__()
        self.stride = stride
        self.extra_channels = extra_channels

    def forward(self, x: Tensor) -> Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        front = self.extra_channels // 2
        return F.pad(x, (0, 0, 0, 0, front, self.extra_channels - front))


class BasicBlock(nn.Module):
    """Two 3x3 conv + BN layers with a parameter-free (identity or option A) shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = ShortcutA(stride, planes - in_planes)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """CIFAR ResNet with 6n+2 layers: 16/32/64 channels, global average pool, one Linear."""

    def __init__(self, n: int, in_channels: int = 3, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self._stage(16, 16, n, stride=1)
        self.layer2 = self._stage(16, 32, n, stride=2)
        self.layer3 = self._stage(32, 64, n, stride=2)
        self.linear = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    @staticmethod
    def _stage(in_planes: int, planes: int, n: int, stride: int) -> nn.Sequential:
        blocks = [BasicBlock(in_planes, planes, stride)]
        blocks += [BasicBlock(planes, planes, 1) for _ in range(n - 1)]
        return nn.Sequential(*blocks)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)
        return self.linear(out)


def resnet32(in_channels: int = 3, num_classes: int = 10) -> CifarResNet:
    """ResNet32 of He et al. (2016), Table 6: n = 5, option A shortcuts, ~0.46M parameters."""
    return CifarResNet(5, in_channels, num_classes)


# --------------------------------------------------------------------------------------------
# Dispatcher
# --------------------------------------------------------------------------------------------

_BUILDERS: dict[str, Callable[[int, int, int], nn.Module]] = {
    "mnist_autoencoder": lambda c, k, s: mnist_autoencoder(),
    "faces_autoencoder": lambda c, k, s: faces_autoencoder(),
    "curves_autoencoder": lambda c, k, s: curves_autoencoder(),
    "vgg16_bn": lambda c, k, s: vgg16_bn(c, k, s),
    "vgg16": lambda c, k, s: vgg16_bn(c, k, s),
    "resnet32": lambda c, k, s: resnet32(c, k),
}
MODEL_NAMES = tuple(_BUILDERS)


def build_model(name: str, in_channels: int = 3, num_classes: int = 10,
                image_size: int = 32) -> nn.Module:
    """Build a model by name (one of :data:`MODEL_NAMES`; '-' and '_' are interchangeable).

    The autoencoders ignore ``in_channels``, ``num_classes`` and ``image_size``.
    """
    key = name.lower().replace("-", "_")
    if key not in _BUILDERS:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(MODEL_NAMES)}")
    return _BUILDERS[key](in_channels, num_classes, image_size)

"""CIFAR-10 ResNets (He et al. 2016, section 4.2) with option-A identity shortcuts.

Layout (depth = 6n + 2): conv3x3(16) → 3 stages of n BasicBlocks (16, 32, 64 channels; stride 2 at the
start of stages 2 and 3) → global average pool → linear. Parameter names match the bundled
`cifar10_resnet{20,32,44,56}.pt` state dicts (conv1, bn1, layerK.i.{conv1,bn1,conv2,bn2}, linear).

Written for quantization: the whole model traces with `torch.fx.symbolic_trace`, the residual add is a
plain `out + shortcut` (an `operator.add` node), every ReLU is an `nn.ReLU` module and nothing is in-place,
so graph passes can fuse conv-bn-relu and insert quantizers around the add.

Example:
    >>> import torch
    >>> model = resnet20().eval()
    >>> model(torch.zeros(2, 3, 32, 32)).shape
    torch.Size([2, 10])
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qdet.errors import ConfigError

__all__ = ["PadShortcut", "BasicBlock", "CifarResNet", "cifar_resnet", "resnet20", "resnet32", "resnet44", "resnet56"]


class PadShortcut(nn.Module):
    """Option-A shortcut: subsample by 2 and zero-pad `pad` channels on each side (no parameters).

    Example:
        >>> PadShortcut(4)(torch.ones(1, 16, 8, 8)).shape
        torch.Size([1, 24, 4, 4])
    """

    def __init__(self, pad: int) -> None:
        super().__init__()
        self.pad = pad

    def forward(self, x: Tensor) -> Tensor:
        x = x[:, :, ::2, ::2]  # (B, C, H/2, W/2)
        # F.pad's last pair addresses the channel dim (W, H, C order): (B, C + 2*pad, H/2, W/2)
        return F.pad(x, (0, 0, 0, 0, self.pad, self.pad))

    def extra_repr(self) -> str:
        return f"pad={self.pad}"


class BasicBlock(nn.Module):
    """conv3x3-bn-relu-conv3x3-bn, plus shortcut, then relu."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        # The shortcut has no parameters in option A, so it adds no state-dict keys.
        needs_reshape = stride != 1 or in_planes != planes
        self.shortcut: nn.Module = PadShortcut(planes // 4) if needs_reshape else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + self.shortcut(x)  # plain add (not +=): quantizer passes match operator.add
        return self.relu2(out)


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32×32 inputs; see the module docstring."""

    def __init__(self, depth: int, num_classes: int = 10) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ConfigError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 44, 56, ...), got {depth}")
        n = (depth - 2) // 6
        self.depth = depth
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        self.layer1 = self._stage(16, 16, n, stride=1)
        self.layer2 = self._stage(16, 32, n, stride=2)
        self.layer3 = self._stage(32, 64, n, stride=2)
        # Adaptive pooling instead of avg_pool2d(x, x.size(3)): no shape-dependent Python in the trace.
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(64, num_classes)
        self._init_weights()

    @staticmethod
    def _stage(in_planes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [BasicBlock(in_planes, planes, stride)]
        layers += [BasicBlock(planes, planes, 1) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def _init_weights(self) -> None:
        # He init as in the paper; only matters for random-init models (tests, training from scratch).
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))  # (B, 16, 32, 32)
        out = self.layer1(out)  # (B, 16, 32, 32)
        out = self.layer2(out)  # (B, 32, 16, 16)
        out = self.layer3(out)  # (B, 64, 8, 8)
        out = torch.flatten(self.avgpool(out), 1)  # (B, 64)
        return self.linear(out)  # (B, num_classes)


def cifar_resnet(depth: int, num_classes: int = 10) -> CifarResNet:
    """Build a randomly initialised CIFAR ResNet of the given depth (6n+2)."""
    return CifarResNet(depth, num_classes)


def resnet20(num_classes: int = 10) -> CifarResNet:
    return CifarResNet(20, num_classes)


def resnet32(num_classes: int = 10) -> CifarResNet:
    return CifarResNet(32, num_classes)


def resnet44(num_classes: int = 10) -> CifarResNet:
    return CifarResNet(44, num_classes)


def resnet56(num_classes: int = 10) -> CifarResNet:
    return CifarResNet(56, num_classes)

"""EfficientNet-Lite (Tan & Le 2019, the "Lite" edge variant: ReLU6, no squeeze-excitation, stem
and head widths fixed), written to the state-dict layout of the bundled Lite1 weights:
`_conv_stem`, `_bn0`, `_blocks.N._expand_conv|_bn0|_depthwise_conv|_bn1|_project_conv|_bn2`,
`_conv_head`, `_bn1`, `_fc`.

Its convolutions are `nn.Conv2d` subclasses with their own `forward` (TensorFlow's "same" padding,
computed once for a static input size, then `F.conv2d`) — the pattern pretrained ports use, and
exactly what a generic quantizer must recognise by what it computes, not by its class.

    >>> model = efficientnet_lite("lite1")
    >>> model(torch.zeros(1, 3, 240, 240)).shape
    torch.Size([1, 1000])
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor, nn
from torch.nn import functional as F

# BN as in the TensorFlow original (momentum 0.99 there = 0.01 here)
BN_EPS, BN_MOMENTUM = 1e-3, 0.01


@dataclass(frozen=True)
class Stage:
    kernel: int
    stride: int
    expand: int
    out_channels: int
    repeats: int


# EfficientNet-B0's stages; Lite scales the repeats by the depth multiplier, except the first and last stage
B0_STAGES = (Stage(3, 1, 1, 16, 1), Stage(3, 2, 6, 24, 2), Stage(5, 2, 6, 40, 2), Stage(3, 2, 6, 80, 3),
             Stage(5, 1, 6, 112, 3), Stage(5, 2, 6, 192, 4), Stage(3, 1, 6, 320, 1))
# name → (width multiplier, depth multiplier, input size)
LITE_VARIANTS = {"lite0": (1.0, 1.0, 224), "lite1": (1.0, 1.1, 240), "lite2": (1.1, 1.2, 260),
                 "lite3": (1.2, 1.4, 280), "lite4": (1.4, 1.8, 300)}


class SamePadConv2d(nn.Conv2d):
    """Conv2d with TensorFlow "same" padding for a fixed input size (asymmetric when it must be)."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1,
                 bias: bool = False, *, image_size: int) -> None:
        super().__init__(in_ch, out_ch, kernel, stride, padding=0, groups=groups, bias=bias)
        out = math.ceil(image_size / stride)
        total = max((out - 1) * stride + kernel - image_size, 0)
        self.same_pad = (total // 2, total - total // 2, total // 2, total - total // 2)

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(F.pad(x, self.same_pad), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


class MBConvBlock(nn.Module):
    """Inverted residual: 1x1 expand → depthwise k×k → 1x1 project, identity skip when shapes match."""

    def __init__(self, in_ch: int, stage: Stage, stride: int, image_size: int) -> None:
        super().__init__()
        mid = in_ch * stage.expand
        self.has_expand = stage.expand != 1
        if self.has_expand:
            self._expand_conv = SamePadConv2d(in_ch, mid, 1, image_size=image_size)
            self._bn0 = _bn(mid)
        self._depthwise_conv = SamePadConv2d(mid, mid, stage.kernel, stride, groups=mid, image_size=image_size)
        self._bn1 = _bn(mid)
        self._project_conv = SamePadConv2d(mid, stage.out_channels, 1, image_size=math.ceil(image_size / stride))
        self._bn2 = _bn(stage.out_channels)
        self.skip = stride == 1 and in_ch == stage.out_channels

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu6(self._bn0(self._expand_conv(x))) if self.has_expand else x
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return y + x if self.skip else y


class EfficientNetLite(nn.Module):
    def __init__(self, width: float = 1.0, depth: float = 1.0, image_size: int = 224, num_classes: int = 1000,
                 dropout: float = 0.2) -> None:
        super().__init__()
        self.image_size = image_size
        self._conv_stem = SamePadConv2d(3, 32, 3, 2, image_size=image_size)
        self._bn0 = _bn(32)
        size, in_ch = math.ceil(image_size / 2), 32
        blocks = []
        for i, stage in enumerate(B0_STAGES):
            out_ch = _round_channels(stage.out_channels, width)
            fixed = i in (0, len(B0_STAGES) - 1)
            repeats = stage.repeats if fixed else math.ceil(depth * stage.repeats)
            stage = Stage(stage.kernel, stage.stride, stage.expand, out_ch, repeats)
            for r in range(repeats):
                stride = stage.stride if r == 0 else 1
                blocks.append(MBConvBlock(in_ch, stage, stride, size))
                size, in_ch = math.ceil(size / stride), out_ch
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SamePadConv2d(in_ch, 1280, 1, image_size=size)
        self._bn1 = _bn(1280)
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(1280, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self._fc(self._dropout(x))


def _round_channels(channels: int, width: float, divisor: int = 8) -> int:
    """TF's rounding of scaled channel counts to a multiple of 8, never below 90 % of the target."""
    if width == 1.0:
        return channels
    scaled = channels * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return int(rounded + divisor if rounded < 0.9 * scaled else rounded)


def efficientnet_lite(variant: str = "lite1", num_classes: int = 1000) -> EfficientNetLite:
    """An EfficientNet-Lite variant ("lite0" … "lite4") in eval mode, random weights."""
    width, depth, size = LITE_VARIANTS[variant]
    return EfficientNetLite(width, depth, size, num_classes).eval()

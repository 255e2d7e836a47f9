"""YOLOX (Ge et al. 2021) in the Megvii state-dict layout that ByteTrack's checkpoints use.

Module names follow the original so that a checkpoint's `model` dict loads key for key:
`backbone.backbone.stem.conv.{conv,bn}` (Focus), `backbone.backbone.dark2..dark5` (CSPDarknet),
`backbone.lateral_conv0`, `backbone.C3_p4`, `backbone.reduce_conv1`, `backbone.C3_p3`,
`backbone.bu_conv2`, `backbone.C3_n3`, `backbone.bu_conv1`, `backbone.C3_n4` (PAFPN), and the
decoupled head `head.stems/cls_convs/reg_convs/cls_preds/reg_preds/obj_preds.{0,1,2}`.
Written here from the paper's architecture and that key layout; no code is taken from YOLOX.

`YOLOXRaw.forward` returns, per stride (8, 16, 32), the raw (reg, obj, cls) conv outputs — what is
quantized; `decode_yolox` (sigmoid, grid offsets, exp · stride) is a float island.

    >>> net = YOLOXRaw(YOLOX_SIZES["nano"], num_classes=1)
    >>> outs = net(torch.zeros(1, 3, 64, 64))
    >>> [tuple(o.shape) for o in outs[:3]]
    [(1, 4, 8, 8), (1, 1, 8, 8), (1, 1, 8, 8)]
    >>> decode_yolox(outs, (8, 16, 32)).shape   # 8² + 4² + 2² boxes: cx cy w h obj cls
    torch.Size([1, 84, 6])
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["YOLOX_SIZES", "YOLOXRaw", "YoloxSize", "decode_yolox"]


@dataclass(frozen=True)
class YoloxSize:
    """Depth and width multiples of one YOLOX size; nano uses depthwise-separable 3×3 convs."""

    depth: float
    width: float
    depthwise: bool = False


YOLOX_SIZES = {
    "nano": YoloxSize(0.33, 0.25, depthwise=True), "tiny": YoloxSize(0.33, 0.375), "s": YoloxSize(0.33, 0.50),
    "m": YoloxSize(0.67, 0.75), "l": YoloxSize(1.0, 1.0), "x": YoloxSize(1.33, 1.25),
}


class BaseConv(nn.Module):
    """conv (no bias) → BN (eps 1e-3, YOLOX's) → SiLU."""

    def __init__(self, c_in: int, c_out: int, k: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, k, stride, (k - 1) // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(c_out, eps=1e-3, momentum=0.03)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class DWConv(nn.Module):
    """Depthwise k×k (`dconv`) then pointwise 1×1 (`pconv`), each a BaseConv."""

    def __init__(self, c_in: int, c_out: int, k: int, stride: int = 1) -> None:
        super().__init__()
        self.dconv = BaseConv(c_in, c_in, k, stride, groups=c_in)
        self.pconv = BaseConv(c_in, c_out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pconv(self.dconv(x))


def _conv(depthwise: bool, c_in: int, c_out: int, k: int, stride: int = 1) -> nn.Module:
    return DWConv(c_in, c_out, k, stride) if depthwise else BaseConv(c_in, c_out, k, stride)


class Bottleneck(nn.Module):
    def __init__(self, c_in: int, c_out: int, shortcut: bool, depthwise: bool) -> None:
        super().__init__()
        self.conv1 = BaseConv(c_in, c_out, 1)  # expansion 1.0 inside CSP layers
        self.conv2 = _conv(depthwise, c_out, c_out, 3)
        self.use_add = shortcut and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv2(self.conv1(x))
        return y + x if self.use_add else y


class CSPLayer(nn.Module):
    """Two 1×1 branches (half the output width), n bottlenecks on the first, concat, 1×1."""

    def __init__(self, c_in: int, c_out: int, n: int, shortcut: bool = True, depthwise: bool = False) -> None:
        super().__init__()
        hidden = int(c_out * 0.5)
        self.conv1 = BaseConv(c_in, hidden, 1)
        self.conv2 = BaseConv(c_in, hidden, 1)
        self.conv3 = BaseConv(2 * hidden, c_out, 1)
        self.m = nn.Sequential(*[Bottleneck(hidden, hidden, shortcut, depthwise) for _ in range(n)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv3(torch.cat([self.m(self.conv1(x)), self.conv2(x)], dim=1))


class SPPBottleneck(nn.Module):
    def __init__(self, c_in: int, c_out: int, kernels: tuple[int, ...] = (5, 9, 13)) -> None:
        super().__init__()
        hidden = c_in // 2
        self.conv1 = BaseConv(c_in, hidden, 1)
        self.m = nn.ModuleList(nn.MaxPool2d(k, 1, k // 2) for k in kernels)
        self.conv2 = BaseConv(hidden * (len(kernels) + 1), c_out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        return self.conv2(torch.cat([x, *(m(x) for m in self.m)], dim=1))


class Focus(nn.Module):
    """Space-to-depth (2×2 pixels → 4× channels; order top-left, bottom-left, top-right, bottom-right), conv."""

    def __init__(self, c_in: int, c_out: int, k: int = 3) -> None:
        super().__init__()
        self.conv = BaseConv(4 * c_in, c_out, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([x[..., ::2, ::2], x[..., 1::2, ::2], x[..., ::2, 1::2], x[..., 1::2, 1::2]], dim=1))


class CSPDarknet(nn.Module):
    def __init__(self, size: YoloxSize) -> None:
        super().__init__()
        c = int(size.width * 64)
        d = max(round(size.depth * 3), 1)
        dw = size.depthwise
        self.stem = Focus(3, c, 3)
        self.dark2 = nn.Sequential(_conv(dw, c, 2 * c, 3, 2), CSPLayer(2 * c, 2 * c, d, depthwise=dw))
        self.dark3 = nn.Sequential(_conv(dw, 2 * c, 4 * c, 3, 2), CSPLayer(4 * c, 4 * c, 3 * d, depthwise=dw))
        self.dark4 = nn.Sequential(_conv(dw, 4 * c, 8 * c, 3, 2), CSPLayer(8 * c, 8 * c, 3 * d, depthwise=dw))
        self.dark5 = nn.Sequential(_conv(dw, 8 * c, 16 * c, 3, 2), SPPBottleneck(16 * c, 16 * c),
                                   CSPLayer(16 * c, 16 * c, d, shortcut=False, depthwise=dw))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x3 = self.dark3(self.dark2(self.stem(x)))
        x4 = self.dark4(x3)
        return x3, x4, self.dark5(x4)  # strides 8, 16, 32


class YOLOPAFPN(nn.Module):
    """CSPDarknet (`self.backbone`) + top-down and bottom-up paths; outputs at strides 8, 16, 32."""

    def __init__(self, size: YoloxSize) -> None:
        super().__init__()
        c3, c4, c5 = (int(c * size.width) for c in (256, 512, 1024))
        n, dw = round(3 * size.depth), size.depthwise
        self.backbone = CSPDarknet(size)
        self.upsample = nn.Upsample(scale_factor=2, mode="nearest")
        self.lateral_conv0 = BaseConv(c5, c4, 1)
        self.C3_p4 = CSPLayer(2 * c4, c4, n, False, dw)
        self.reduce_conv1 = BaseConv(c4, c3, 1)
        self.C3_p3 = CSPLayer(2 * c3, c3, n, False, dw)
        self.bu_conv2 = _conv(dw, c3, c3, 3, 2)
        self.C3_n3 = CSPLayer(2 * c3, c4, n, False, dw)
        self.bu_conv1 = _conv(dw, c4, c4, 3, 2)
        self.C3_n4 = CSPLayer(2 * c4, c5, n, False, dw)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x2, x1, x0 = self.backbone(x)
        fpn0 = self.lateral_conv0(x0)
        f0 = self.C3_p4(torch.cat([self.upsample(fpn0), x1], 1))
        fpn1 = self.reduce_conv1(f0)
        pan2 = self.C3_p3(torch.cat([self.upsample(fpn1), x2], 1))
        pan1 = self.C3_n3(torch.cat([self.bu_conv2(pan2), fpn1], 1))
        pan0 = self.C3_n4(torch.cat([self.bu_conv1(pan1), fpn0], 1))
        return pan2, pan1, pan0


class YOLOXHead(nn.Module):
    """Decoupled head: per level a 1×1 stem, two 3×3 convs for classes, two for box + objectness."""

    def __init__(self, num_classes: int, size: YoloxSize) -> None:
        super().__init__()
        hid = int(256 * size.width)
        dw = size.depthwise
        self.stems = nn.ModuleList(BaseConv(int(c * size.width), hid, 1) for c in (256, 512, 1024))
        self.cls_convs = nn.ModuleList(nn.Sequential(_conv(dw, hid, hid, 3), _conv(dw, hid, hid, 3)) for _ in range(3))
        self.reg_convs = nn.ModuleList(nn.Sequential(_conv(dw, hid, hid, 3), _conv(dw, hid, hid, 3)) for _ in range(3))
        self.cls_preds = nn.ModuleList(nn.Conv2d(hid, num_classes, 1) for _ in range(3))
        self.reg_preds = nn.ModuleList(nn.Conv2d(hid, 4, 1) for _ in range(3))
        self.obj_preds = nn.ModuleList(nn.Conv2d(hid, 1, 1) for _ in range(3))

    def forward(self, feats: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        outs: list[torch.Tensor] = []
        for k, x in enumerate(feats):
            x = self.stems[k](x)
            reg = self.reg_convs[k](x)
            outs += [self.reg_preds[k](reg), self.obj_preds[k](reg), self.cls_preds[k](self.cls_convs[k](x))]
        return tuple(outs)  # (reg, obj, cls) per level, raw


class YOLOXRaw(nn.Module):
    """`backbone` (PAFPN) + `head`: the quantized part; keys as in Megvii's `model` dict."""

    strides = (8, 16, 32)

    def __init__(self, size: YoloxSize, num_classes: int = 80) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.backbone = YOLOPAFPN(size)
        self.head = YOLOXHead(num_classes, size)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.head(self.backbone(x))


def decode_yolox(outs: tuple[torch.Tensor, ...], strides: tuple[int, ...]) -> torch.Tensor:
    """Raw (reg, obj, cls) per level → (B, N, 5 + nc): cx, cy, w, h in input pixels, sigmoid obj and classes."""
    levels = []
    for k, stride in enumerate(strides):
        reg, obj, cls = outs[3 * k: 3 * k + 3]
        h, w = reg.shape[-2:]
        yv, xv = torch.meshgrid(torch.arange(h, dtype=reg.dtype), torch.arange(w, dtype=reg.dtype), indexing="ij")
        grid = torch.stack([xv, yv], dim=-1).reshape(1, h * w, 2)
        reg = reg.flatten(2).transpose(1, 2)  # (B, hw, 4)
        xy = (reg[..., :2] + grid) * stride
        wh = torch.exp(reg[..., 2:4]) * stride
        levels.append(torch.cat([xy, wh, obj.flatten(2).transpose(1, 2).sigmoid(),
                                 cls.flatten(2).transpose(1, 2).sigmoid()], dim=-1))
    return torch.cat(levels, dim=1)


def decode_yolox_for_selection(outs: tuple[torch.Tensor, ...], strides: tuple[int, ...]
                               ) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole graph's decode, channel-major: raw (reg, obj, cls) per level → (boxes (B, N, 4)
    x1 y1 x2 y2 in input pixels, scores (B, nc, N) = σ(obj)·σ(cls)), the same numbers as
    `decode_yolox` followed by the YOLO family's objectness × class score, without building the
    (B, N, 5 + nc) rows: the scores keep the maps' (class, position) layout that ONNX
    `NonMaxSuppression` takes, and only the 4 box channels are transposed."""
    boxes, scores = [], []
    for k, stride in enumerate(strides):
        reg, obj, cls = outs[3 * k: 3 * k + 3]
        h, w = reg.shape[-2:]
        yv, xv = torch.meshgrid(torch.arange(h, dtype=reg.dtype), torch.arange(w, dtype=reg.dtype), indexing="ij")
        grid = torch.stack([xv, yv], dim=-1).reshape(1, h * w, 2)
        reg = reg.flatten(2).transpose(1, 2)  # (B, hw, 4)
        xy = (reg[..., :2] + grid) * stride
        half_wh = torch.exp(reg[..., 2:4]) * (stride / 2)
        boxes.append(torch.cat([xy - half_wh, xy + half_wh], dim=-1))
        scores.append((cls.sigmoid() * obj.sigmoid()).flatten(2))  # (B, nc, hw)
    return torch.cat(boxes, dim=1), torch.cat(scores, dim=2)

"""Darknet layers as small `nn.Module`s, with Darknet's semantics (not PyTorch's defaults).

* `[convolutional]`: padding = size // 2 when `pad=1` (else `padding=`, default 0); a bias only
  without `batch_normalize`; BatchNorm eps 1e-5 (Darknet's cuDNN path; its CPU path adds 1e-6 to
  the standard deviation instead, a difference far below float32 noise for trained variances).
* `[maxpool]`: Darknet pads `padding = size - 1` in total (key `padding=`), `padding // 2` before and
  the rest after, and takes the max over the positions inside the image. So size 2 stride 1 (the
  13×13 layer of yolov3-tiny) keeps the size with the extra column on the right/bottom, and size 2
  stride 2 gives ceil(W / 2). Built from torch max-pools (which ignore padded positions the same way)
  plus, for stride 1 with uneven padding, a crop of the first row/column.
"""
from __future__ import annotations

import torch
from torch import nn

from qdet.errors import ConfigError

LEAKY_SLOPE = 0.1  # Darknet's leaky ReLU


def activation(name: str) -> nn.Module:
    """Darknet activation name → module (raises KeyError for an unknown name)."""
    table = {
        "linear": nn.Identity,
        "leaky": lambda: nn.LeakyReLU(LEAKY_SLOPE),
        "relu": nn.ReLU,
        "logistic": nn.Sigmoid,
        "mish": nn.Mish,
        "swish": nn.SiLU,  # Darknet's swish is x·sigmoid(x)
    }
    return table[name]()


ACTIVATIONS = ("linear", "leaky", "relu", "logistic", "mish", "swish")


class ConvBlock(nn.Module):
    """conv → (BN) → activation; `conv`, `bn`, `act` as submodules so the generic path folds the BN."""

    def __init__(self, c_in: int, filters: int, size: int, stride: int, padding: int, groups: int,
                 batch_normalize: bool, act: str) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, filters, size, stride, padding, groups=groups, bias=not batch_normalize)
        self.bn = nn.BatchNorm2d(filters, eps=1e-5) if batch_normalize else nn.Identity()
        self.act = activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class DarknetMaxPool(nn.Module):
    """Darknet's max-pool: `pad_total` padding split pad//2 before, the rest after; max over valid positions.

    >>> m = DarknetMaxPool(2, 1, 1)
    >>> m(torch.arange(9.).view(1, 1, 3, 3))[0, 0]
    tensor([[4., 5., 5.],
            [7., 8., 8.],
            [7., 8., 8.]])
    """

    def __init__(self, size: int, stride: int, pad_total: int) -> None:
        super().__init__()
        before, after = pad_total // 2, pad_total - pad_total // 2
        self.size, self.stride, self.before, self.after = size, stride, before, after
        self.crop = 0
        if before == after:
            self.pool = nn.MaxPool2d(size, stride, padding=before)
        elif stride == 1:
            # pad `after` on both sides, then drop the first (after - before) windows
            self.pool = nn.MaxPool2d(size, 1, padding=after)
            self.crop = after - before
        elif after - before == 1 and stride == 2:
            # windows start at -before + 2k; ceil_mode keeps the last, partly outside, window
            self.pool = nn.MaxPool2d(size, stride, padding=before, ceil_mode=True)
        else:
            raise ConfigError(f"maxpool size={size} stride={stride} padding={pad_total}: uneven padding is "
                              "supported for stride 1 and 2 only")
        if max(before, after) * 2 > size:
            raise ConfigError(f"maxpool size={size} padding={pad_total}: padding beyond half the window is not supported")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.pool(x)
        if self.crop:
            y = y[:, :, self.crop:, self.crop:]
        return y


def darknet_maxpool_reference(x: torch.Tensor, size: int, stride: int, pad_total: int) -> torch.Tensor:
    """Darknet's maxpool loop, written plainly (slow; for tests): (B, C, H, W) → (B, C, H', W')."""
    b, c, h, w = x.shape
    off = -(pad_total // 2)
    oh, ow = (h + pad_total - size) // stride + 1, (w + pad_total - size) // stride + 1
    out = torch.full((b, c, oh, ow), float("-inf"), dtype=x.dtype)
    for i in range(oh):
        for j in range(ow):
            for n in range(size):
                for m in range(size):
                    y, xx = off + i * stride + n, off + j * stride + m
                    if 0 <= y < h and 0 <= xx < w:
                        out[:, :, i, j] = torch.maximum(out[:, :, i, j], x[:, :, y, xx])
    return out


class Route(nn.Module):
    """`[route]`: concatenation of earlier layers' outputs; with `groups`, the `group_id`-th channel
    slice of each (yolov4-tiny's CSP split)."""

    def __init__(self, groups: int = 1, group_id: int = 0) -> None:
        super().__init__()
        self.groups, self.group_id = groups, group_id

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        if self.groups > 1:
            xs = tuple(x.chunk(self.groups, 1)[self.group_id] for x in xs)
        return xs[0] if len(xs) == 1 else torch.cat(xs, 1)


class Shortcut(nn.Module):
    """`[shortcut]`: residual add of the previous layer and layer `from`, then the activation."""

    def __init__(self, act: str = "linear") -> None:
        super().__init__()
        self.act = activation(act)

    def forward(self, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        return self.act(x + other)


class YoloHead(nn.Module):
    """`[yolo]`: identity in the traced body (its input is a raw head map); decoding is a float island."""

    def __init__(self, anchors: list[tuple[float, float]], classes: int, scale_x_y: float, new_coords: bool) -> None:
        super().__init__()
        self.anchors = anchors  # the masked anchors, (w, h) in network-input pixels
        self.classes, self.scale_x_y, self.new_coords = classes, scale_x_y, new_coords

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

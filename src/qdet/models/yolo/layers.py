"""YOLOv5 (v6.1) building blocks, written from the published architecture.

Attribute names (`conv`, `bn`, `act`, `cv1`, `cv2`, `cv3`, `m`) follow the ultralytics layout so that
their state dicts load without renaming. Every block is `torch.fx`-traceable: no data-dependent
control flow and no in-place ops (qdet inserts observers between the ops, and in-place ops would
let an observer see a tensor after it has been overwritten).

Example:
    >>> import torch
    >>> block = C3(16, 32, n=1)
    >>> tuple(block(torch.zeros(1, 16, 8, 8)).shape)
    (1, 32, 8, 8)
"""
from __future__ import annotations

from enum import Enum

import torch
from torch import nn

from qdet.errors import ConfigError

# ultralytics sets these on every BatchNorm2d after building the model; the fp16 checkpoint was trained
# (and its running statistics accumulated) with them, so eps must match for faithful outputs.
BN_EPS = 1e-3
BN_MOMENTUM = 0.03


class Activation(Enum):
    """The non-linearity after every Conv-BN: SiLU (official YOLOv5) or ReLU (the seed's YOLOv5-ReLU)."""

    SILU = "silu"
    RELU = "relu"

    @classmethod
    def parse(cls, value: "Activation | str") -> "Activation":
        """Accept an enum member or its name/value as a string (the CLI/YAML edge).

        >>> Activation.parse("ReLU")
        <Activation.RELU: 'relu'>
        """
        if isinstance(value, Activation):
            return value
        try:
            return cls(str(value).lower())
        except ValueError:
            known = ", ".join(a.value for a in cls)
            raise ConfigError(f"unknown activation {value!r}; expected one of: {known}") from None

    def make(self) -> nn.Module:
        # Not in-place: an in-place activation would overwrite the BN output an observer may hold.
        return nn.SiLU() if self is Activation.SILU else nn.ReLU()


def autopad(k: int, p: int | None = None) -> int:
    """'Same' padding for an odd kernel (and for k=6, s=2 in the stem, where the yaml gives p=2)."""
    return k // 2 if p is None else p


class Conv(nn.Module):
    """Conv2d (no bias) → BatchNorm2d → activation. BN is kept separate: qdet folds it itself.

    >>> tuple(Conv(3, 8, 3, 2)(torch.zeros(1, 3, 16, 16)).shape)
    (1, 8, 8, 8)
    """

    def __init__(
        self,
        c1: int,
        c2: int,
        k: int = 1,
        s: int = 1,
        p: int | None = None,
        g: int = 1,
        *,
        act: Activation = Activation.SILU,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, autopad(k, p), groups=g, bias=False)
        self.bn = nn.BatchNorm2d(c2, eps=BN_EPS, momentum=BN_MOMENTUM)
        self.act = act.make()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class Bottleneck(nn.Module):
    """1×1 Conv → 3×3 Conv, plus the input when `shortcut` and the channel counts agree."""

    def __init__(
        self, c1: int, c2: int, shortcut: bool = True, g: int = 1, e: float = 0.5, *, act: Activation = Activation.SILU
    ) -> None:
        super().__init__()
        c_ = int(c2 * e)
        self.cv1 = Conv(c1, c_, 1, 1, act=act)
        self.cv2 = Conv(c_, c2, 3, 1, g=g, act=act)
        # A Python bool fixed at build time, so fx traces one branch only.
        self.add = shortcut and c1 == c2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C3(nn.Module):
    """CSP bottleneck with three convs: cv3(cat(m(cv1(x)), cv2(x)))."""

    def __init__(
        self,
        c1: int,
        c2: int,
        n: int = 1,
        shortcut: bool = True,
        g: int = 1,
        e: float = 0.5,
        *,
        act: Activation = Activation.SILU,
    ) -> None:
        super().__init__()
        c_ = int(c2 * e)
        self.cv1 = Conv(c1, c_, 1, 1, act=act)
        self.cv2 = Conv(c1, c_, 1, 1, act=act)
        self.cv3 = Conv(2 * c_, c2, 1, act=act)
        self.m = nn.Sequential(*(Bottleneck(c_, c_, shortcut, g, e=1.0, act=act) for _ in range(n)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cv3(torch.cat([self.m(self.cv1(x)), self.cv2(x)], 1))


class SPPF(nn.Module):
    """Spatial pyramid pooling, fast: three chained k×k max-pools (same result as 5/9/13 in parallel)."""

    def __init__(self, c1: int, c2: int, k: int = 5, *, act: Activation = Activation.SILU) -> None:
        super().__init__()
        c_ = c1 // 2
        self.cv1 = Conv(c1, c_, 1, 1, act=act)
        self.cv2 = Conv(c_ * 4, c2, 1, 1, act=act)
        self.m = nn.MaxPool2d(kernel_size=k, stride=1, padding=k // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.cv1(x)
        y1 = self.m(x)
        y2 = self.m(y1)
        return self.cv2(torch.cat([x, y1, y2, self.m(y2)], 1))


class Concat(nn.Module):
    """Concatenate a list of feature maps along `dim` (channels)."""

    def __init__(self, dim: int = 1) -> None:
        super().__init__()
        self.d = dim

    def forward(self, xs: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(xs, self.d)


class Detect(nn.Module):
    """The three 1×1 prediction convs, plus the anchors (in grid units of each level, as ultralytics stores them).

    Only the convs run in `forward` (raw maps, the quantizable part); box decoding lives in
    `YOLOv5.decode`, a float island. `anchors` is a buffer so the state-dict key `model.24.anchors`
    round-trips; `stride` is a plain tuple of Python floats (ultralytics does not save it either).

    >>> d = Detect(80, [[10, 13, 16, 30, 33, 23]], (16,))
    >>> [tuple(t.shape) for t in d([torch.zeros(1, 16, 4, 4)])]
    [(1, 255, 4, 4)]
    """

    def __init__(self, nc: int, anchors: list[list[float]], ch: tuple[int, ...]) -> None:
        super().__init__()
        self.nc = nc
        self.no = nc + 5  # outputs per anchor: x, y, w, h, obj, classes
        self.nl = len(anchors)  # detection levels
        self.na = len(anchors[0]) // 2  # anchors per level
        if len(ch) != self.nl:
            raise ConfigError(f"Detect has {self.nl} anchor levels but {len(ch)} input layers")
        # Pixel anchors until the stride is known; YOLOv5.__init__ divides by the stride.
        self.register_buffer("anchors", torch.tensor(anchors, dtype=torch.float32).view(self.nl, -1, 2))
        self.stride: tuple[float, ...] = ()
        self.m = nn.ModuleList(nn.Conv2d(c, self.no * self.na, 1) for c in ch)

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        # Python loop over a fixed number of levels: unrolled by fx.
        return [conv(x) for conv, x in zip(self.m, xs)]  # each (B, na*no, H, W)

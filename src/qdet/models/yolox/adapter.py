"""YOLOX adapter (ByteTrack's detector family): nano / tiny / s / m / l / x on Megvii's state-dict layout.

What is int8: the whole network (`body`: CSPDarknet, PAFPN, decoupled head convs) through the
generic path. Float islands: the input convention (`prep`: RGB [0, 1] → BGR 0–255 for Megvii's
YOLOX ≥ 0.2, or ImageNet-normalised RGB for ByteTrack's checkpoints), the decode (sigmoid,
grid offsets, exp · stride) and NMS. The decoded output is (B, N, 5 + nc) cx cy w h obj classes —
YOLOv5's format — so COCO data, evaluation, display and the tracking detector are the YOLO
adapter's. No YOLOX weights are bundled: `--weights` takes a Megvii/ByteTrack checkpoint (its
`model` dict is unwrapped), or `random`.

    >>> adapter = YoloxAdapter("yolox_nano")
    >>> det = adapter.build("random", num_classes=1)
    >>> det(torch.zeros(1, 3, 64, 64)).shape
    torch.Size([1, 84, 6])
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qdet.errors import ConfigError
from qdet.models.base import Region
from qdet.models.yolo.adapter import YoloAdapter
from qdet.models.yolox.model import (
    YOLOX_SIZES,
    YOLOXRaw,
    decode_yolox,
    decode_yolox_for_selection,
)

__all__ = ["INPUT_FORMATS", "YOLOX_ADAPTERS", "YoloxAdapter", "YoloxDetector"]

INPUT_FORMATS = ("yolox", "bytetrack")
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


class YoloxDetector(nn.Module):
    """RGB (B, 3, H, W) in [0, 1] → `prep` (float) → `body` (quantized) → decode (float): (B, N, 5 + nc)."""

    def __init__(self, body: YOLOXRaw, input_format: str = "yolox") -> None:
        super().__init__()
        if input_format not in INPUT_FORMATS:
            raise ConfigError(f"YOLOX input_format {input_format!r}: choose one of {', '.join(INPUT_FORMATS)}")
        self.body = body
        self.input_format = input_format
        self.register_buffer("mean", torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1))
        self.strides = body.strides
        self.names = [str(i) for i in range(body.num_classes)]

    def prep(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_format == "yolox":  # Megvii YOLOX ≥ 0.2: BGR, 0..255, no normalisation
            return x.flip(1) * 255.0
        return (x - self.mean) / self.std  # ByteTrack: RGB, ImageNet mean/std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return decode_yolox(self.body(self.prep(x)), self.strides)

    def boxes_and_scores(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole graph's decode: (boxes (B, N, 4) x1 y1 x2 y2, scores (B, nc, N)), channel-major."""
        return decode_yolox_for_selection(self.body(self.prep(x)), self.strides)


@dataclass(frozen=True)
class YoloxAdapter(YoloAdapter):
    """`yolox_<size>` (COCO, 80 classes, Megvii input) or `bytetrack_<size>` (ByteTrack's MOT checkpoints:
    1 class, ImageNet-normalised RGB); build options num_classes and input_format override those."""

    weights_kind: str = "a YOLOX checkpoint (Megvii/ByteTrack layout: its 'model' dict)"
    default_num_classes: int = 80
    default_input_format: str = "yolox"

    @property
    def size(self) -> str:
        return self.name.split("_", 1)[1]

    def bundled_weights(self) -> Path:
        from qdet.paths import assets_dir

        return assets_dir() / "weights" / f"{self.name}.pth"  # none are bundled; --weights is required

    def build(self, weights: str | Path | None = None, **options: Any) -> YoloxDetector:
        from qdet.models.weights import load_into, load_state_dict_file

        num_classes = int(options.pop("num_classes", self.default_num_classes))
        input_format = options.pop("input_format", self.default_input_format)
        if options:
            raise ConfigError(f"{self.name}: unknown option(s) {sorted(options)}")
        if self.size not in YOLOX_SIZES:
            raise ConfigError(f"unknown YOLOX size {self.size!r}: {', '.join(YOLOX_SIZES)}")
        raw = YOLOXRaw(YOLOX_SIZES[self.size], num_classes)
        if weights is None:
            raise ConfigError(f"{self.name} has no bundled weights; pass --weights PATH ({self.weights_kind}) "
                              "or --weights random")
        if str(weights) != "random":
            load_into(raw, load_state_dict_file(weights, expected_keys_from=raw), source=weights, model_name=self.name)
        return YoloxDetector(raw.eval(), input_format).eval()

    def regions(self, model: nn.Module) -> list[Region]:
        return [Region("body")]


YOLOX_ADAPTERS: Sequence[YoloxAdapter] = (
    *(YoloxAdapter(f"yolox_{s}") for s in YOLOX_SIZES),
    *(YoloxAdapter(f"bytetrack_{s}", default_num_classes=1, default_input_format="bytetrack") for s in YOLOX_SIZES),
)

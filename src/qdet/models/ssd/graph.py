"""SSD300-ResNet50's whole graph: the int8 `net`, box decoding against the default boxes (folded in
as constants), softmax and the same per-class selection as `boxes.postprocess`.

    >>> from qdet.models.ssd.adapter import SSDResNet50Adapter  # doctest: +SKIP
    >>> whole = qdet.lower(qm, "openvino", whole_graph=True)  # doctest: +SKIP
    >>> whole(x)[0].keys()  # same output as SSDDetector  # doctest: +SKIP
    dict_keys(['boxes', 'scores', 'labels'])
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from qdet.errors import ConfigError
from qdet.models.ssd.boxes import decode
from qdet.models.ssd.resnet50 import SSDDetector
from qdet.runtimes.whole_graph import DetectionGraph, NmsSettings, split_rows


class SSDBoxesScores(nn.Module):
    """x → (boxes (B, N, 4) relative x1 y1 x2 y2, scores (B, C-1, N) softmax without the background)."""

    def __init__(self, detector: SSDDetector) -> None:
        super().__init__()
        self.detector = detector

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        det = self.detector
        loc, conf = det.net(x)
        boxes = decode(loc, det.dboxes, scale_xy=det.box_config.scale_xy, scale_wh=det.box_config.scale_wh)
        return boxes, torch.softmax(conf.float(), dim=1)[:, 1:]


def to_dicts(rows: Tensor, batch: int) -> list[dict[str, Tensor]]:
    """(M, 7) rows → SSDDetector's per-image {"boxes", "scores", "labels" 1..C-1}, best first."""
    return [{"boxes": d[:, :4], "scores": d[:, 4], "labels": d[:, 5].long() + 1} for d in split_rows(rows, batch)]


def ssd_graph(model: nn.Module, nms: NmsSettings | None = None) -> DetectionGraph:
    if not isinstance(model, SSDDetector):
        raise ConfigError(f"whole graph: expected an SSDDetector, got {type(model).__name__}")
    post = model.post
    settings = nms or NmsSettings(conf=post.score_thresh, iou=post.iou_thresh, max_det=post.max_detections)
    return DetectionGraph(SSDBoxesScores(model), settings, to_dicts)

"""The YOLO family's whole graph (YOLOv5 and Darknet adapters): decoded (B, N, 5+nc) → boxes + scores.

Both detectors' forward already decodes in PyTorch (grid and anchors from the maps' shapes and
constants), which the ONNX exporter writes as graph ops; this only turns the decoded rows into what
`qdet.runtimes.whole_graph.select_detections` takes, with the island path's score: objectness ×
class probability (`non_max_suppression`).

    >>> import torch
    >>> from qdet.models.yolo.adapter import YoloAdapter
    >>> det = YoloAdapter("yolov5n").build("random")
    >>> boxes, scores = DecodedToScores(det)(torch.zeros(1, 3, 64, 64))
    >>> tuple(boxes.shape), tuple(scores.shape)
    ((1, 252, 4), (1, 80, 252))
"""
from __future__ import annotations

from torch import Tensor, nn

from qdet.models.yolo.postprocess import xywh2xyxy
from qdet.runtimes.whole_graph import (
    DetectionGraph,
    Detections,
    NmsSettings,
    split_rows,
)

# `run_yolo_on_coco`'s defaults (the reference val.py) and Darknet's `detector map` settings
YOLO_EVAL_NMS = NmsSettings(conf=0.001, iou=0.6, max_det=300)
DARKNET_EVAL_NMS = NmsSettings(conf=0.005, iou=0.45, max_det=300)


class DecodedToScores(nn.Module):
    """`detector(x)` = decoded (B, N, 5+nc) xywh, objectness, class probabilities →
    (boxes (B, N, 4) x1 y1 x2 y2, scores (B, nc, N) = objectness · class probability).

    A detector with a `boxes_and_scores(x)` method giving those two directly (YOLOv5's and
    Darknet's channel-major decodes, cheaper in the graph) is used through it instead."""

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        self.detector = detector

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if hasattr(self.detector, "boxes_and_scores"):
            return self.detector.boxes_and_scores(x)
        pred = self.detector(x).float()
        scores = pred[..., 5:] * pred[..., 4:5]
        return xywh2xyxy(pred[..., :4]), scores.transpose(1, 2)


def yolo_family_graph(detector: nn.Module, nms: NmsSettings) -> DetectionGraph:
    """The declaration for a detector whose forward returns decoded YOLO rows; outputs `Detections`."""
    from qdet.models.yolo.detect import suppressed

    return DetectionGraph(DecodedToScores(detector), nms, lambda rows, batch: Detections(split_rows(rows, batch), nms),
                          lambda out: suppressed(out, None, nms.conf, nms.iou, multi_label=nms.multi_label,
                                                 max_det=nms.max_det))

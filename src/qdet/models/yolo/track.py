"""YOLO as a tracking detector: one RGB frame → person boxes and scores in frame pixels.

Any runnable of the YOLO detector works (the float model, a QuantizedModel, a lowered OpenVINO or
onnxruntime model): it gets the letterboxed (1, 3, H, W) frame and returns decoded (1, N, 5+nc)
predictions. Only the class of interest is kept before NMS (score = objectness × that class's
probability), as a single-class tracking detector would give it.

    >>> import numpy as np, torch
    >>> from qdet.models.yolo.adapter import YoloAdapter
    >>> det = YoloFrameDetector(YoloAdapter("yolov5n").build("random"), img_size=64)
    >>> boxes, scores = det(np.zeros((48, 64, 3), np.uint8))
    >>> boxes.shape[1], boxes.shape[0] == scores.shape[0]
    (4, True)
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from qdet.models.yolo.detect import predictions
from qdet.models.yolo.postprocess import (
    non_max_suppression,
    preprocess,
    rect_shape,
    scale_boxes,
)

__all__ = ["YoloFrameDetector"]

COCO_PERSON_INDEX = 0


@dataclass
class YoloFrameDetector:
    """`model` on frames letterboxed to the minimal stride-32 rectangle of long side `img_size`.

    conf 0.1 / NMS IoU 0.7: ByteTrack discards detections under 0.1 itself and uses NMS 0.7.
    """

    model: Callable[[torch.Tensor], Any]
    img_size: int = 640
    class_index: int = COCO_PERSON_INDEX
    conf: float = 0.1
    iou: float = 0.7
    max_det: int = 300

    def __call__(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """RGB uint8 (H, W, 3) → boxes (n, 4) x1 y1 x2 y2 in frame pixels, scores (n,)."""
        lb, info = preprocess(image, self.img_size, rect_shape(image.shape[:2], self.img_size))
        x = torch.from_numpy(lb.transpose(2, 0, 1).copy()).float().div_(255.0)[None]  # (1, 3, H, W)
        with torch.no_grad():
            pred = predictions(self.model(x), None)  # (1, N, 5 + nc)
        c = 5 + self.class_index
        pred = torch.cat([pred[..., :5], pred[..., c:c + 1]], dim=-1)  # one class: the tracked one
        det = non_max_suppression(pred, self.conf, self.iou, multi_label=False, max_det=self.max_det)[0]
        return scale_boxes(det[:, :4], info).numpy().astype(np.float64), det[:, 4].numpy().astype(np.float64)

"""SSD default boxes, box decoding and per-class NMS — the float islands after the int8 network.

The default-box generator follows NVIDIA DeepLearningExamples' SSD300 v1.1 (`dboxes300_coco`): a
300×300 input, feature maps 38/19/10/5/3/1 with steps 8/16/32/64/100/300, box sizes
21/45/99/153/207/261/315 px and aspect ratios {2} / {2, 3} / {2, 3} / {2, 3} / {2} / {2}: per cell
two square boxes (s_k and √(s_k·s_k+1)) and two boxes per ratio → [4, 6, 6, 6, 4, 4] per cell,
8,732 in all, (cx, cy, w, h) relative to the image and clamped to [0, 1]. The centres use
fk = 300 / step (37.5 for the 38×38 map), as the reference does.

Order: feature map, then box shape, then cell (row-major) — the order in which the heads'
(B, n·4, H, W) output reshaped to (B, 4, n·H·W) lists the boxes.

    >>> boxes = default_boxes(SSD300_BOXES)
    >>> tuple(boxes.shape), SSD300_BOXES.boxes_per_cell
    ((8732, 4), (4, 6, 6, 6, 4, 4))
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["SSD300_BOXES", "BoxConfig", "PostProcess", "decode", "default_boxes", "postprocess", "scaled_box_config"]


@dataclass(frozen=True)
class BoxConfig:
    """Where the default boxes sit: one entry per feature map (scales has one more: s_k+1 of the last)."""

    fig_size: int
    feat_sizes: tuple[int, ...]
    steps: tuple[float, ...]
    scales: tuple[float, ...]
    aspect_ratios: tuple[tuple[float, ...], ...]
    scale_xy: float = 0.1  # loc offsets are divided by 10 (centre) ...
    scale_wh: float = 0.2  # ... and by 5 (log size), as the reference's variances

    @property
    def boxes_per_cell(self) -> tuple[int, ...]:
        return tuple(2 + 2 * len(r) for r in self.aspect_ratios)

    @property
    def num_boxes(self) -> int:
        return sum(n * f * f for n, f in zip(self.boxes_per_cell, self.feat_sizes))


SSD300_BOXES = BoxConfig(
    fig_size=300,
    feat_sizes=(38, 19, 10, 5, 3, 1),
    steps=(8, 16, 32, 64, 100, 300),
    scales=(21, 45, 99, 153, 207, 261, 315),
    aspect_ratios=((2,), (2, 3), (2, 3), (2, 3), (2,), (2,)),
)


def scaled_box_config(img_size: int, feat_sizes: tuple[int, ...]) -> BoxConfig:
    """SSD300's boxes moved to another input size: sizes scaled by img_size/300, steps img_size/feat."""
    if img_size == SSD300_BOXES.fig_size and tuple(feat_sizes) == SSD300_BOXES.feat_sizes:
        return SSD300_BOXES
    k = img_size / SSD300_BOXES.fig_size
    return BoxConfig(img_size, tuple(feat_sizes), tuple(img_size / f for f in feat_sizes),
                     tuple(s * k for s in SSD300_BOXES.scales), SSD300_BOXES.aspect_ratios)


def default_boxes(cfg: BoxConfig) -> Tensor:
    """(N, 4) default boxes (cx, cy, w, h) in [0, 1], in the heads' order."""
    out: list[tuple[float, float, float, float]] = []
    for k, feat in enumerate(cfg.feat_sizes):
        fk = cfg.fig_size / cfg.steps[k]
        s1 = cfg.scales[k] / cfg.fig_size
        s2 = math.sqrt(s1 * cfg.scales[k + 1] / cfg.fig_size)
        shapes = [(s1, s1), (s2, s2)]
        for ratio in cfg.aspect_ratios[k]:
            w, h = s1 * math.sqrt(ratio), s1 / math.sqrt(ratio)
            shapes += [(w, h), (h, w)]
        for w, h in shapes:
            for i, j in itertools.product(range(feat), repeat=2):  # i: row (y), j: column (x)
                out.append(((j + 0.5) / fk, (i + 0.5) / fk, w, h))
    return torch.tensor(out, dtype=torch.float32).clamp_(0.0, 1.0)


def decode(loc: Tensor, dboxes: Tensor, *, scale_xy: float = 0.1, scale_wh: float = 0.2) -> Tensor:
    """loc (B, 4, N) offsets + default boxes (N, 4) cxcywh → (B, N, 4) boxes x1 y1 x2 y2 (relative).

    Equals torchvision's `BoxCoder(weights=(1/scale_xy, 1/scale_xy, 1/scale_wh, 1/scale_wh))` without its
    exp clamp.
    """
    loc = loc.permute(0, 2, 1).float()  # (B, N, 4)
    d_xy, d_wh = dboxes[None, :, :2], dboxes[None, :, 2:]
    xy = loc[..., :2] * scale_xy * d_wh + d_xy
    wh = torch.exp(loc[..., 2:] * scale_wh) * d_wh
    return torch.cat([xy - 0.5 * wh, xy + 0.5 * wh], dim=-1)


@dataclass(frozen=True)
class PostProcess:
    """Per-class NMS settings (the seed's: score > 0.05, IoU 0.5, at most 200 detections per image)."""

    score_thresh: float = 0.05
    iou_thresh: float = 0.5
    max_detections: int = 200


def postprocess(boxes: Tensor, conf: Tensor, settings: PostProcess | None = None) -> list[dict[str, Tensor]]:
    """Decoded boxes (B, N, 4) and class logits (B, C, N), class 0 = background → per image
    {"boxes" (k, 4) relative x1y1x2y2, "scores" (k,), "labels" (k,) int64 in 1..C-1}, best first.

    Softmax over classes, every (box, class ≥ 1) pair above `score_thresh` is a candidate,
    `torchvision.ops.batched_nms` suppresses within each class, the best `max_detections` remain.
    """
    from torchvision.ops import batched_nms

    settings = settings or PostProcess()
    probs = torch.softmax(conf.float(), dim=1)[:, 1:]  # (B, C-1, N)
    results = []
    for b in range(boxes.shape[0]):
        scores = probs[b].t()  # (N, C-1)
        idx, cls = torch.nonzero(scores > settings.score_thresh, as_tuple=True)
        cand_scores = scores[idx, cls]
        cand_boxes = boxes[b, idx]
        keep = batched_nms(cand_boxes, cand_scores, cls, settings.iou_thresh)[: settings.max_detections]
        results.append({"boxes": cand_boxes[keep], "scores": cand_scores[keep], "labels": cls[keep] + 1})
    return results

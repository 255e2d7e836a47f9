"""SSD training loss (for the synthetic benchmark): default-box matching, smooth-L1 on the encoded
offsets of positives, cross-entropy with 3:1 hard-negative mining — the SSD paper's recipe as
NVIDIA's SSD300 v1.1 uses it (IoU 0.5 matching, each ground truth keeps its best default box,
offsets scaled by 1/scale_xy and 1/scale_wh).

    >>> from qdet.models.ssd.boxes import SSD300_BOXES, default_boxes
    >>> d = default_boxes(SSD300_BOXES)
    >>> loc, lab = match(torch.tensor([[0.1, 0.1, 0.4, 0.5]]), torch.tensor([2]), d)
    >>> tuple(loc.shape), int((lab == 2).sum()) > 0
    ((4, 8732), True)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import box_convert, box_iou

__all__ = ["match", "ssd_loss"]


def match(boxes: Tensor, labels: Tensor, dboxes: Tensor, *, iou: float = 0.5, scale_xy: float = 0.1,
          scale_wh: float = 0.2) -> tuple[Tensor, Tensor]:
    """Ground truth (k, 4) relative xyxy + labels (k,) → encoded loc targets (4, N), labels (N,) (0 = background)."""
    n = dboxes.shape[0]
    if boxes.numel() == 0:
        return torch.zeros(4, n), torch.zeros(n, dtype=torch.long)
    overlaps = box_iou(boxes, box_convert(dboxes, "cxcywh", "xyxy"))  # (k, N)
    best, idx = overlaps.max(0)
    forced = overlaps.argmax(1)  # every ground truth keeps its best default box
    best[forced] = 2.0
    idx[forced] = torch.arange(len(boxes))
    target_labels = torch.where(best >= iou, labels[idx], torch.zeros_like(idx))
    g = box_convert(boxes[idx], "xyxy", "cxcywh")
    gxy = (g[:, :2] - dboxes[:, :2]) / (scale_xy * dboxes[:, 2:])
    gwh = torch.log(g[:, 2:] / dboxes[:, 2:]) / scale_wh
    return torch.cat([gxy, gwh], 1).t(), target_labels


def ssd_loss(loc: Tensor, conf: Tensor, gloc: Tensor, glabel: Tensor) -> Tensor:
    """loc (B, 4, N), conf (B, C, N), targets (B, 4, N) and (B, N) → the mean over images of
    (smooth-L1 + CE on positives and the 3·pos hardest negatives) / positives."""
    pos = glabel > 0
    n_pos = pos.sum(1)
    sl1 = (F.smooth_l1_loss(loc, gloc, reduction="none").sum(1) * pos).sum(1)
    ce = F.cross_entropy(conf, glabel, reduction="none")  # (B, N)
    neg_ce = ce.clone().detach()
    neg_ce[pos] = 0
    rank = neg_ce.argsort(1, descending=True).argsort(1)
    neg = rank < (3 * n_pos).clamp(max=pos.shape[1]).unsqueeze(1)
    closs = (ce * (pos | neg)).sum(1)
    has = (n_pos > 0).float()
    return ((sl1 + closs) * has / n_pos.float().clamp(min=1e-6)).mean()

"""YOLOv5 (v6.1) training loss on raw head maps: CIoU box loss, objectness BCE with the IoU as
target, class BCE, and YOLOv5's target assignment, written for qdet's QAT fine-tuning.

Assignment (per level): a target matches an anchor when both width and height ratios are within
`anchor_t` (4) of it; besides its own cell it is also assigned to the two neighbouring cells whose
borders its centre is closest to (within half a cell), so up to 3 cells × 3 anchors predict it.
Predictions: xy = 2σ(t) − 0.5 (cell units), wh = (2σ(t))² · anchor. Weights follow hyp.scratch-low:
box 0.05, obj 1.0, cls 0.5, scaled by 3 / levels (and obj by (size / 640)², cls by nc / 80);
level balance (4.0, 1.0, 0.4); total = (box + obj + cls) · batch size.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch.nn import functional as F


def bbox_ciou(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Complete IoU of (N, 4) xywh boxes a and b (Zheng et al. 2020): IoU − ρ²/c² − αv.

    >>> box = torch.tensor([[5.0, 5.0, 2.0, 2.0]])
    >>> float(bbox_ciou(box, box))
    1.0
    """
    a1, a2 = a[:, :2] - a[:, 2:4] / 2, a[:, :2] + a[:, 2:4] / 2
    b1, b2 = b[:, :2] - b[:, 2:4] / 2, b[:, :2] + b[:, 2:4] / 2
    inter = (torch.minimum(a2, b2) - torch.maximum(a1, b1)).clamp(0).prod(1)
    wa, ha = a[:, 2], a[:, 3] + eps
    wb, hb = b[:, 2], b[:, 3] + eps
    union = wa * ha + wb * hb - inter + eps
    iou = inter / union
    cw_ch = torch.maximum(a2, b2) - torch.minimum(a1, b1)  # enclosing box
    c2 = (cw_ch ** 2).sum(1) + eps
    rho2 = ((a[:, :2] - b[:, :2]) ** 2).sum(1)
    v = (4 / math.pi ** 2) * (torch.atan(wb / hb) - torch.atan(wa / ha)) ** 2
    with torch.no_grad():
        alpha = v / (v - iou + (1 + eps))
    return iou - (rho2 / c2 + v * alpha)


@dataclass(frozen=True)
class YoloLossWeights:
    box: float = 0.05
    obj: float = 1.0
    cls: float = 0.5
    anchor_t: float = 4.0
    balance: tuple[float, ...] = (4.0, 1.0, 0.4)


class YoloV5Loss:
    """loss(raw_maps, targets) → (total, (box, obj, cls) detached).

    raw_maps: per level (B, na·(5+nc), H, W), as `YOLOv5Raw` / the quantized body returns them.
    targets: (n, 6) rows [image index in batch, class 0..nc-1, cx, cy, w, h] in input pixels.
    anchors: (nl, na, 2) in grid units of each level; strides per level.
    """

    def __init__(self, anchors: torch.Tensor, strides: Sequence[float], nc: int, *, img_size: int = 640,
                 weights: YoloLossWeights = YoloLossWeights()) -> None:
        self.anchors = anchors.detach().float()
        self.strides = tuple(float(s) for s in strides)
        self.nl, self.na = self.anchors.shape[:2]
        self.nc = nc
        scale = 3 / self.nl
        self.w_box = weights.box * scale
        self.w_obj = weights.obj * scale * (img_size / 640) ** 2
        self.w_cls = weights.cls * scale * nc / 80
        self.anchor_t = weights.anchor_t
        self.balance = weights.balance[: self.nl]

    def __call__(self, raw: Sequence[torch.Tensor], targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        device = raw[0].device
        bs = raw[0].shape[0]
        lbox = torch.zeros((), device=device)
        lobj = torch.zeros((), device=device)
        lcls = torch.zeros((), device=device)
        for i, p in enumerate(raw):
            b, _, h, w = p.shape
            p = p.view(b, self.na, self.nc + 5, h, w).permute(0, 1, 3, 4, 2)  # (B, na, H, W, no)
            tobj = torch.zeros(p.shape[:4], device=device)
            img, a, gj, gi, tbox, cls = self._assign(targets.to(device), i, h, w)
            if len(img):
                ps = p[img, a, gj, gi]  # (n, no)
                iou = bbox_ciou(self.decode_box(ps, i, self.anchors[i].to(device)[a]), tbox)
                lbox = lbox + (1.0 - iou).mean()
                tobj[img, a, gj, gi] = iou.detach().clamp(0).to(tobj.dtype)  # IoU as objectness target
                if self.nc > 1:
                    t = torch.zeros_like(ps[:, 5:])
                    t[torch.arange(len(cls)), cls] = 1.0
                    lcls = lcls + F.binary_cross_entropy_with_logits(ps[:, 5:], t)
            lobj = lobj + F.binary_cross_entropy_with_logits(p[..., 4], tobj) * self.balance[i]
        parts = torch.stack((lbox * self.w_box, lobj * self.w_obj, lcls * self.w_cls))
        return parts.sum() * bs, parts.detach()

    def decode_box(self, ps: torch.Tensor, level: int, anchors: torch.Tensor) -> torch.Tensor:
        """Matched raw rows (n, no) → (n, 4) xywh in grid units relative to the cell; YOLOv5's decode."""
        pxy = ps[:, :2].sigmoid() * 2 - 0.5
        pwh = (ps[:, 2:4].sigmoid() * 2) ** 2 * anchors
        return torch.cat((pxy, pwh), 1)

    def neighbour_reach(self, level: int) -> float:
        """How far (cells) beyond its own cell a prediction's centre reaches: YOLOv5's 2σ − 0.5 reaches
        0.5, so targets are also assigned to the neighbouring cells within half a cell."""
        return 0.5

    def _assign(self, targets: torch.Tensor, level: int, h: int, w: int) -> tuple[torch.Tensor, ...]:
        """Matched (image, anchor, grid y, grid x, target box relative to the cell, class) at one level."""
        device = targets.device
        anchors = self.anchors[level].to(device)  # (na, 2) grid units
        s = self.strides[level]
        t = targets[:, 2:6] / s  # (n, 4) grid units
        ratio = t[None, :, 2:4] / anchors[:, None]  # (na, n, 2)
        keep = torch.maximum(ratio, 1 / ratio).amax(2) < self.anchor_t  # (na, n)
        a_idx, t_idx = keep.nonzero(as_tuple=True)
        gxy = t[t_idx, :2]  # (m, 2)
        gxy_inv = torch.tensor([w, h], device=device, dtype=gxy.dtype) - gxy
        g = self.neighbour_reach(level)
        near_lo = (gxy % 1 < g) & (gxy > 1)  # closer to the left/top border: the cell left/above too
        near_hi = (gxy_inv % 1 < g) & (gxy_inv > 1)
        offsets = torch.tensor([[0, 0], [1, 0], [0, 1], [-1, 0], [0, -1]], device=device, dtype=gxy.dtype) * g
        use = torch.stack((torch.ones_like(near_lo[:, 0]), near_lo[:, 0], near_lo[:, 1], near_hi[:, 0], near_hi[:, 1]))
        k_idx, m_idx = use.nonzero(as_tuple=True)  # (offset, match)
        gxy_sel = gxy[m_idx]
        gij = (gxy_sel - offsets[k_idx]).long()
        gi = gij[:, 0].clamp(0, w - 1)
        gj = gij[:, 1].clamp(0, h - 1)
        rows = t_idx[m_idx]
        tbox = torch.cat((gxy_sel - torch.stack((gi, gj), 1).to(gxy.dtype), t[rows, 2:4]), 1)
        return (targets[rows, 0].long(), a_idx[m_idx], gj, gi, tbox, targets[rows, 1].long())

"""Training loss for Darknet [yolo] heads: YOLOv5's loss (`qdet.models.yolo.loss`: CIoU box,
objectness BCE with the IoU as target, class BCE, YOLOv5's anchor-ratio assignment) with the box
decoded as Darknet's get_yolo_box does it:

* xy = σ(t)·s − (s−1)/2 (cell units, s = `scale_x_y`), wh = exp(t)·anchor.

A target is also assigned to the neighbouring cells its centre is within half a cell of only when
the prediction can reach them, i.e. when s ≥ 2 (s = 2 is YOLOv5's 2σ − 0.5); with Darknet's usual
s ≤ 1.2 only its own cell. Heads with `new_coords=1` (whose conv already applies the logistic) are
refused: the objectness/class BCE needs the logits.

    >>> from qdet.models.darknet.cfg import parse_cfg_text
    >>> from qdet.models.darknet.model import DarknetDetector, build_darknet
    >>> text = ("[net]\\nwidth=64\\nheight=64\\n[convolutional]\\nfilters=18\\nsize=3\\nstride=2\\npad=1\\n"
    ...         "activation=linear\\n[yolo]\\nmask=0,1\\nanchors=10,14, 23,27\\nclasses=4\\n")
    >>> det = DarknetDetector(build_darknet(parse_cfg_text(text, "toy.cfg")))
    >>> loss = DarknetYoloLoss(det, img_size=64)
    >>> total, parts = loss(det.body(torch.zeros(1, 3, 64, 64)), torch.tensor([[0, 1, 20.0, 20.0, 12.0, 14.0]]))
    >>> total.shape, parts.shape
    (torch.Size([]), torch.Size([3]))
"""
from __future__ import annotations

import torch

from qdet.errors import ConfigError
from qdet.models.yolo.loss import YoloLossWeights, YoloV5Loss

BALANCE_BY_STRIDE = {8: 4.0, 16: 1.0, 32: 0.4}  # YOLOv5's objectness level balance (P3, P4, P5)
EXP_CLAMP = 4.0  # exp(t) ≤ e⁴ ≈ 55 anchors wide in training: keeps early steps finite


class DarknetYoloLoss(YoloV5Loss):
    """loss(raw_maps, targets) for a `DarknetDetector`; targets (n, 6) [image, class, cx, cy, w, h] in pixels."""

    def __init__(self, det: torch.nn.Module, *, img_size: int, weights: YoloLossWeights | None = None) -> None:
        heads = det.heads  # YoloSpec per output
        for k, h in enumerate(heads):
            if h.new_coords:
                raise ConfigError(f"[yolo] head {k}: new_coords=1 is not supported by this loss (its conv applies "
                                  "the logistic; the BCE needs logits)")
        if len({len(h.anchors) for h in heads}) != 1:
            raise ConfigError("every [yolo] head must have the same number of anchors (mask entries)")
        anchors = torch.tensor([[[w / h.stride, hh / h.stride] for w, hh in h.anchors] for h in heads])
        balance = tuple(BALANCE_BY_STRIDE.get(h.stride, 1.0) for h in heads)  # Darknet lists stride 32 first
        w = weights or YoloLossWeights(balance=balance)
        super().__init__(anchors, [h.stride for h in heads], heads[0].classes, img_size=img_size, weights=w)
        self.scale_x_y = tuple(float(h.scale_x_y) for h in heads)

    def decode_box(self, ps: torch.Tensor, level: int, anchors: torch.Tensor) -> torch.Tensor:
        s = self.scale_x_y[level]
        pxy = ps[:, :2].sigmoid() * s - (s - 1) / 2
        pwh = ps[:, 2:4].clamp(max=EXP_CLAMP).exp() * anchors
        return torch.cat((pxy, pwh), 1)

    def neighbour_reach(self, level: int) -> float:
        return 0.5 if self.scale_x_y[level] >= 2.0 else 0.0

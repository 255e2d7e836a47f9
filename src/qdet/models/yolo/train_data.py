"""COCO images with YOLO training targets, letterboxed exactly as at inference (for QAT fine-tuning)."""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch.utils.data import Dataset

from qdet.data.coco import CocoDetection, coco91_to_80
from qdet.models.yolo.postprocess import preprocess


class CocoYoloTargets(Dataset):
    """Item i: ((3, S, S) float image in [0, 1], (n, 5) targets [class, cx, cy, w, h] in input pixels).

    Crowd boxes and boxes under 2 pixels after letterboxing are dropped (YOLOv5 drops them too).
    """

    def __init__(self, coco: CocoDetection, img_size: int = 640) -> None:
        self.coco = coco
        self.img_size = img_size

    def __len__(self) -> int:
        return len(self.coco)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, meta = self.coco[i]
        lb, info = preprocess(image, self.img_size)  # (S, S, 3) uint8
        (gh, gw), (left, top) = info.ratio, info.pad
        rows = []
        for ann in self.coco.annotations(meta["image_id"]):
            if ann.get("iscrowd", 0):
                continue
            x, y, w, h = ann["bbox"]  # top-left xywh, original pixels
            w, h = w * gw, h * gh
            if w < 2 or h < 2:
                continue
            rows.append([coco91_to_80(ann["category_id"]), x * gw + left + w / 2, y * gh + top + h / 2, w, h])
        targets = torch.tensor(rows, dtype=torch.float32).reshape(-1, 5)
        return torch.from_numpy(lb.transpose(2, 0, 1).copy()).float() / 255.0, targets


def collate_targets(items: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack images; targets become (n, 6) [image index, class, cx, cy, w, h] as `YoloV5Loss` reads them."""
    images = torch.stack([im for im, _ in items])
    targets = [torch.cat((torch.full((len(t), 1), float(k)), t), 1) for k, (_, t) in enumerate(items)]
    return images, torch.cat(targets) if targets else torch.zeros(0, 6)


def yolo_loss_fn(loss: Any) -> Any:
    """`train_qat` loss: raw maps and an (images, targets) batch → scalar loss."""
    return lambda outputs, batch: loss(outputs, batch[1])[0]

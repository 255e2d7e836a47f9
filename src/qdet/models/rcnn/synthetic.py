"""Procedural detection data (coloured shapes on textured backgrounds) and small Faster R-CNNs.

No real detector weights can be downloaded here, so the Faster R-CNN adapter is checked on a
detector trained from scratch on generated images: SYNTHETIC data, seeded and reproducible, with
exact boxes. It says nothing about accuracy on real images; it does show whether int8 keeps what a
trained float detector learned.

Example:
    >>> ds = SyntheticShapes(4, seed=0, size=96)
    >>> image, target = ds[0]
    >>> image.shape, target["boxes"].shape[1], int(target["labels"].min()) >= 1
    (torch.Size([3, 96, 96]), 4, True)
"""
from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

__all__ = [
    "SHAPE_CLASSES",
    "SyntheticShapes",
    "collate",
    "render",
    "resnet18_faster_rcnn",
    "tiny_faster_rcnn",
    "train_detector",
]

SHAPE_CLASSES: tuple[str, ...] = ("box", "disc", "triangle")


def _texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """(size, size, 3) background in [0, 1]: gratings + blotchy low-frequency noise + grain."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    base = rng.uniform(0.15, 0.85, 3).astype(np.float32)
    img = np.broadcast_to(base, (size, size, 3)).copy()
    for _ in range(int(rng.integers(1, 4))):
        angle, freq = rng.uniform(0, math.pi), rng.uniform(2, 14)
        wave = np.sin(2 * math.pi * freq * (xx * math.cos(angle) + yy * math.sin(angle)) + rng.uniform(0, 6.3))
        img += wave[..., None] * rng.uniform(-0.12, 0.12, 3).astype(np.float32)
    coarse = rng.normal(0, 0.12, (6, 6, 3)).astype(np.float32)
    reps = math.ceil(size / 6)
    blotches = np.kron(coarse, np.ones((reps, reps, 1), np.float32))[:size, :size]
    img += blotches + rng.normal(0, 0.03, (size, size, 3)).astype(np.float32)
    return np.clip(img, 0, 1)


def _shape_mask(kind: int, box: tuple[int, int, int, int], size: int, rng: np.random.Generator) -> np.ndarray:
    from PIL import Image, ImageDraw

    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    x0, y0, x1, y1 = box
    if kind == 0:
        draw.rectangle([x0, y0, x1, y1], fill=255)
    elif kind == 1:
        draw.ellipse([x0, y0, x1, y1], fill=255)
    else:
        apex = rng.uniform(x0, x1)
        corners = [(apex, y0), (x0, y1), (x1, y1)] if rng.random() < 0.5 else [(apex, y1), (x0, y0), (x1, y0)]
        draw.polygon(corners, fill=255)
    return np.asarray(mask) > 127


def _iou(a: Sequence[float], b: Sequence[float]) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def render(index: int, *, seed: int = 0, size: int = 256, max_objects: int = 4,
           min_frac: float = 0.12, max_frac: float = 0.42) -> tuple[Tensor, Tensor, Tensor]:
    """Image `index` of the stream `seed`: ((3, size, size) float in [0, 1], boxes (n, 4) xyxy, labels (n,) in 1..3).

    Boxes are the tight extents of each drawn shape; shapes overlap little (IoU < 0.3).
    """
    rng = np.random.default_rng([seed, index])
    img = _texture(rng, size)
    boxes: list[list[float]] = []
    labels: list[int] = []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        for _attempt in range(10):
            w = int(rng.uniform(min_frac, max_frac) * size)
            h = int(np.clip(w * rng.uniform(0.6, 1.6), min_frac * size, max_frac * size))
            x0, y0 = int(rng.integers(0, size - w)), int(rng.integers(0, size - h))
            cand = (x0, y0, x0 + w, y0 + h)
            if all(_iou(cand, b) < 0.3 for b in boxes):
                break
        else:
            continue
        kind = int(rng.integers(0, len(SHAPE_CLASSES)))
        mask = _shape_mask(kind, cand, size, rng)
        if mask.sum() < 16:
            continue
        under = img[mask].mean(0)
        color = rng.uniform(0, 1, 3).astype(np.float32)
        far = np.where(under > 0.5, rng.uniform(0.0, 0.3, 3), rng.uniform(0.7, 1.0, 3)).astype(np.float32)
        channel = int(rng.integers(0, 3))
        color[channel] = far[channel]  # at least one channel contrasts with the background
        shade = 1.0 - rng.uniform(0, 0.15) * rng.random((int(mask.sum()), 1)).astype(np.float32)
        img[mask] = np.clip(color[None, :] * shade, 0, 1)
        ys, xs = np.nonzero(mask)
        boxes.append([float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)])
        labels.append(kind + 1)
    image = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))
    return image, torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), torch.tensor(labels, dtype=torch.int64)


class SyntheticShapes(torch.utils.data.Dataset):
    """`n` generated images of stream `seed`; item = (image, {"boxes", "labels", "image_id"}).

    Different seeds give disjoint, independent streams (train on seed 0, evaluate on seed 1).
    """

    def __init__(self, n: int, *, seed: int = 0, size: int = 256, max_objects: int = 4,
                 min_frac: float = 0.12, max_frac: float = 0.42) -> None:
        self.n, self.seed, self.size, self.max_objects = n, seed, size, max_objects
        self.min_frac, self.max_frac = min_frac, max_frac

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Tensor]]:
        if not 0 <= index < self.n:
            raise IndexError(index)
        image, boxes, labels = render(index, seed=self.seed, size=self.size, max_objects=self.max_objects,
                                      min_frac=self.min_frac, max_frac=self.max_frac)
        return image, {"boxes": boxes, "labels": labels, "image_id": torch.tensor(index)}

    def coco_annotations(self) -> dict[str, Any]:
        """COCO-format ground truth (category ids 1..3) for `qdet.eval.coco.evaluate_coco`."""
        images, anns = [], []
        for i in range(self.n):
            _, t = self[i]
            images.append({"id": i, "width": self.size, "height": self.size})
            for box, label in zip(t["boxes"].tolist(), t["labels"].tolist()):
                w, h = box[2] - box[0], box[3] - box[1]
                anns.append({"id": len(anns) + 1, "image_id": i, "category_id": int(label),
                             "bbox": [box[0], box[1], w, h], "area": w * h, "iscrowd": 0})
        cats = [{"id": i + 1, "name": n} for i, n in enumerate(SHAPE_CLASSES)]
        return {"images": images, "annotations": anns, "categories": cats}


def collate(batch: list[tuple[Tensor, dict[str, Tensor]]]) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    return [b[0] for b in batch], [b[1] for b in batch]


# ---------------------------------------------------------------- small detectors
class _Block(nn.Module):
    """conv-BN-ReLU (stride s), then a residual conv-BN-ReLU-conv-BN + add + ReLU."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.down = nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())
        self.conv1 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)

    def forward(self, x: Tensor) -> Tensor:
        x = self.down(x)
        y = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        return self.relu(x + y)


class _TinyBody(nn.Sequential):
    def __init__(self, widths: Sequence[int]) -> None:
        layers: list[tuple[str, nn.Module]] = [("stem", nn.Sequential(
            nn.Conv2d(3, widths[0], 3, 2, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU()))]
        for i, (cin, cout) in enumerate(itertools.pairwise(widths)):
            layers.append((f"layer{i + 1}", _Block(cin, cout, 2)))
        from collections import OrderedDict

        super().__init__(OrderedDict(layers))


def tiny_faster_rcnn(num_classes: int = len(SHAPE_CLASSES) + 1, *, image_size: int = 128,
                     widths: Sequence[int] = (16, 32, 64, 96), fpn_channels: int = 48) -> nn.Module:
    """A ~0.5 M-parameter Faster R-CNN (residual body, FPN, RPN, TwoMLPHead) for fast tests.

    Feature strides 4/8/16 (+ pool 32); images are resized to `image_size` (min = max size).
    """
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.ops import MultiScaleRoIAlign

    body = _TinyBody(widths)
    n = len(widths) - 1
    backbone = BackboneWithFPN(body, {f"layer{i + 1}": str(i) for i in range(n)}, list(widths[1:]), fpn_channels)
    sizes = tuple((16 * 2**i,) for i in range(n + 1))
    anchors = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))
    pool = MultiScaleRoIAlign([str(i) for i in range(n)], output_size=7, sampling_ratio=2)
    from torchvision.models.detection.faster_rcnn import TwoMLPHead

    head = TwoMLPHead(fpn_channels * 49, 128)
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor

    return FasterRCNN(backbone, num_classes=None, min_size=image_size, max_size=image_size,
                      rpn_anchor_generator=anchors, box_roi_pool=pool, box_head=head,
                      box_predictor=FastRCNNPredictor(128, num_classes),
                      rpn_pre_nms_top_n_train=600, rpn_post_nms_top_n_train=300,
                      rpn_pre_nms_top_n_test=300, rpn_post_nms_top_n_test=100,
                      rpn_batch_size_per_image=128, box_batch_size_per_image=128, box_detections_per_img=50)


def resnet18_faster_rcnn(num_classes: int = len(SHAPE_CLASSES) + 1, *, image_size: int = 256) -> nn.Module:
    """torchvision ResNet18-FPN Faster R-CNN (trainable BatchNorm, from scratch) at `image_size`."""
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

    backbone = resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=5,
                                   norm_layer=nn.BatchNorm2d, returned_layers=[2, 3, 4])
    sizes = ((32,), (64,), (128,), (256,))  # strides 8, 16, 32 + pool
    anchors = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))
    from torchvision.ops import MultiScaleRoIAlign

    pool = MultiScaleRoIAlign(["0", "1", "2"], output_size=7, sampling_ratio=2)
    return FasterRCNN(backbone, num_classes=num_classes, min_size=image_size, max_size=image_size,
                      rpn_anchor_generator=anchors, box_roi_pool=pool,
                      rpn_pre_nms_top_n_train=1000, rpn_post_nms_top_n_train=500,
                      rpn_pre_nms_top_n_test=500, rpn_post_nms_top_n_test=300,
                      rpn_batch_size_per_image=128, box_batch_size_per_image=128, box_detections_per_img=50)


def train_detector(model: nn.Module, data: torch.utils.data.Dataset, *, steps: int, batch_size: int = 8,
                   lr: float = 2e-3, seed: int = 0, time_limit_s: float | None = None,
                   log: Callable[[str], None] | None = None) -> dict[str, float]:
    """AdamW + cosine schedule on `data` for `steps` batches (or until `time_limit_s`); returns stats.

    The model ends in eval mode. Deterministic for a given seed and thread count.
    """
    g = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=True, collate_fn=collate, generator=g,
                                         drop_last=True)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    model.train()
    step, start, last = 0, time.perf_counter(), float("nan")
    torch.set_flush_denormal(True)  # tiny gradients become denormals: 5-10× slower steps on CPU otherwise
    try:
        while step < steps:
            for images, targets in loader:
                losses = model(images, targets)
                loss = sum(losses.values())
                opt.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 10.0)
                opt.step()
                sched.step()
                step += 1
                last = float(loss.detach())
                if log is not None and (step % 25 == 0 or step == 1):
                    log(f"step {step}/{steps} loss {last:.3f} ({time.perf_counter() - start:.0f} s)")
                if step >= steps or (time_limit_s is not None and time.perf_counter() - start > time_limit_s):
                    steps = step
                    break
    finally:
        torch.set_flush_denormal(False)
    model.eval()
    return {"steps": float(step), "seconds": time.perf_counter() - start, "final_loss": last}

"""Images as the SSDs see them, and their detections as COCO results.

`SSDInputs` wraps a COCO set (or any dataset of (image, target) with images (3, H, W) in [0, 1], e.g.
`qdet.models.rcnn.synthetic.SyntheticShapes`) and yields the SSD300-ResNet50 input: resized to S×S
(bilinear, antialiased) and normalised with ImageNet's mean/std — or left in [0, 1] with
`normalize=False`, the seed's mis-normalised calibration set. `coco_detections` turns the
detector's relative boxes back into the original image's pixels and its labels into category ids.

    >>> from qdet.models.rcnn.synthetic import SyntheticShapes
    >>> x, image_id = SSDInputs(SyntheticShapes(2, size=64), img_size=96)[1]
    >>> tuple(x.shape), image_id
    ((3, 96, 96), 1)
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from qdet.models.ssd.resnet50 import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["SSDInputs", "as_float_image", "coco_detections", "image_id_of", "preprocess"]


def as_float_image(image: Any) -> Tensor:
    """(H, W, 3) uint8 ndarray, (3, H, W) uint8 or float tensor → (3, H, W) float in [0, 1]."""
    if isinstance(image, np.ndarray):
        image = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    return image.float() / 255.0 if image.dtype == torch.uint8 else image.float()


def preprocess(image: Tensor, img_size: int, *, normalize: bool = True) -> Tensor:
    """(3, H, W) in [0, 1] → (3, S, S) resized, ImageNet-normalised unless `normalize=False`."""
    x = F.interpolate(image[None], size=(img_size, img_size), mode="bilinear", align_corners=False, antialias=True)[0]
    if normalize:
        mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
        x = (x - mean) / std
    return x


def image_id_of(target: Any, index: int) -> int:
    """The image id in a COCO meta / torchvision-style target, else the index."""
    if isinstance(target, Mapping) and "image_id" in target:
        return int(target["image_id"])
    return index


class SSDInputs(torch.utils.data.Dataset):
    """(image, target) items → ((3, S, S) network input, image id)."""

    def __init__(self, source: Any, *, img_size: int = 300, normalize: bool = True) -> None:
        self.source, self.img_size, self.normalize = source, img_size, normalize

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image, target = self.source[index]
        return preprocess(as_float_image(image), self.img_size, normalize=self.normalize), image_id_of(target, index)


def coco_detections(model: Callable[[Tensor], list[dict[str, Tensor]]], source: Any, *, img_size: int = 300,
                    label_to_category: Sequence[int] | None = None, batch_size: int = 8,
                    indices: Sequence[int] | None = None, progress: bool = True) -> list[dict[str, Any]]:
    """Run a detector with relative-box outputs over `source` (or the images at `indices`, batched
    among themselves); COCO result dicts in original pixels.

    label_to_category[label - 1] is the category id of label (labels 1..C-1); None: the label itself.
    """
    from tqdm.auto import tqdm

    order = list(indices) if indices is not None else list(range(len(source)))
    inputs = torch.utils.data.Subset(SSDInputs(source, img_size=img_size), order)  # ids from the source's index
    loader = torch.utils.data.DataLoader(inputs, batch_size=batch_size, shuffle=False)
    sizes = [_size_of(source, i) for i in order]
    dets: list[dict[str, Any]] = []
    k = 0
    with torch.no_grad():
        for x, ids in tqdm(loader, desc="detecting", disable=not progress, leave=False):
            for out, image_id in zip(model(x), ids.tolist()):
                h, w = sizes[k]
                k += 1
                scale = torch.tensor([w, h, w, h], dtype=torch.float32)
                boxes = (out["boxes"].float().clamp(0, 1) * scale).tolist()
                for b, s, lab in zip(boxes, out["scores"].tolist(), out["labels"].tolist()):
                    cat = int(lab) if label_to_category is None else int(label_to_category[int(lab) - 1])
                    dets.append({"image_id": int(image_id), "category_id": cat,
                                 "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]], "score": float(s)})
    return dets


def _size_of(source: Any, index: int) -> tuple[int, int]:
    meta = getattr(source, "meta", None)
    if callable(meta):
        size = meta(index).get("orig_size")
        if size is not None:
            return int(size[0]), int(size[1])
    image = source[index][0]
    return (int(image.shape[0]), int(image.shape[1])) if isinstance(image, np.ndarray) else \
        (int(image.shape[-2]), int(image.shape[-1]))



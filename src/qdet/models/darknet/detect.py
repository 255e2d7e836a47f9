"""Darknet's preprocessing and COCO inference: what `darknet detector map` feeds the network.

* `[net] letter_box=0` (yolov3, yolov4, the tiny cfgs): a plain resize to width × height (the
  aspect ratio is not kept), bilinear with aligned corners (Darknet's resize_image);
* `letter_box=1` (yolov4-csp): resize keeping the aspect ratio, centred on a grey 0.5 canvas.

Input to the network: RGB float in [0, 1]. Boxes come back with `to_original`.

    >>> import numpy as np
    >>> x, info = darknet_preprocess(np.zeros((100, 200, 3), np.uint8), (64, 64), letter_box=True)
    >>> tuple(x.shape), info.scale, info.offset
    ((3, 64, 64), (0.32, 0.32), (0.0, 16.0))
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from qdet.data.coco import COCO80_TO_91, CocoDetection

LETTERBOX_GREY = 0.5  # Darknet's letterbox_image fill


@dataclass(frozen=True)
class DarknetInput:
    """How an original (h0, w0) image became the network input: input = original · scale + offset (x, y)."""

    scale: tuple[float, float]
    offset: tuple[float, float]
    orig_size: tuple[int, int]


def darknet_resize(x: torch.Tensor, size_wh: tuple[int, int]) -> torch.Tensor:
    """Darknet's resize_image on a (3, H, W) float image: bilinear with the corners aligned
    (source x = c·(W−1)/(w−1)), which is torch's align_corners=True."""
    w, h = size_wh
    if tuple(x.shape[-2:]) == (h, w):
        return x
    return torch.nn.functional.interpolate(x[None], size=(h, w), mode="bilinear", align_corners=True)[0]


def darknet_preprocess(image: np.ndarray, size_wh: tuple[int, int], *, letter_box: bool) -> tuple[torch.Tensor, DarknetInput]:
    """RGB uint8 (H, W, 3) → (3, h, w) float in [0, 1] as Darknet feeds it, and the mapping back."""
    w, h = size_wh
    h0, w0 = image.shape[:2]
    src = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float() / 255.0  # (3, H, W)
    if not letter_box:
        return darknet_resize(src, (w, h)), DarknetInput((w / w0, h / h0), (0.0, 0.0), (h0, w0))
    # letterbox_image: integer sizes as Darknet computes them, centred with integer offsets
    if w / w0 < h / h0:
        nw, nh = w, max(1, (h0 * w) // w0)
    else:
        nw, nh = max(1, (w0 * h) // h0), h
    dx, dy = (w - nw) // 2, (h - nh) // 2
    x = torch.full((3, h, w), LETTERBOX_GREY)
    x[:, dy:dy + nh, dx:dx + nw] = darknet_resize(src, (nw, nh))
    return x, DarknetInput((nw / w0, nh / h0), (float(dx), float(dy)), (h0, w0))


def to_original(boxes: torch.Tensor, info: DarknetInput) -> torch.Tensor:
    """(n, 4) x1 y1 x2 y2 in input pixels → original image pixels, clipped to the image."""
    sx, sy = info.scale
    ox, oy = info.offset
    h0, w0 = info.orig_size
    x1, x2 = ((boxes[:, [0, 2]] - ox) / sx).clamp(0, w0).unbind(1)
    y1, y2 = ((boxes[:, [1, 3]] - oy) / sy).clamp(0, h0).unbind(1)
    return torch.stack((x1, y1, x2, y2), 1)


class DarknetCoco(Dataset):
    """COCO images through Darknet's preprocessing: ((3, h, w) float in [0, 1], image id). Calibration
    uses it, so it sees exactly the inference input."""

    def __init__(self, coco: CocoDetection, size_wh: tuple[int, int], letter_box: bool) -> None:
        self.coco, self.size_wh, self.letter_box = coco, size_wh, letter_box

    def __len__(self) -> int:
        return len(self.coco)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image, meta = self.coco[i]
        x, _ = darknet_preprocess(image, self.size_wh, letter_box=self.letter_box)
        return x, int(meta["image_id"])


def run_darknet_on_coco(
    model: Callable[[torch.Tensor], Any],
    dataset: CocoDetection,
    decode: Callable[[Sequence[torch.Tensor]], torch.Tensor],
    *,
    size_wh: tuple[int, int],
    letter_box: bool,
    conf: float = 0.005,
    iou: float = 0.45,
    class_map: Sequence[int] = COCO80_TO_91,
    indices: Sequence[int] | None = None,
    progress: bool = True,
    desc: str = "darknet inference (images)",
) -> list[dict[str, Any]]:
    """COCO json detections. Darknet's `detector map` settings: conf 0.005, NMS IoU 0.45, every class
    above the threshold per box. `model` returns decoded (B, N, 5+nc) or raw maps (then `decode`)."""
    from tqdm import tqdm

    from qdet.models.yolo.detect import suppressed

    results: list[dict[str, Any]] = []
    order = list(indices) if indices is not None else list(range(len(dataset)))
    with torch.inference_mode():
        for i in tqdm(order, desc=desc, disable=not progress):
            image, meta = dataset[i]
            x, info = darknet_preprocess(image, size_wh, letter_box=letter_box)
            det = suppressed(model(x[None]), decode, conf, iou, multi_label=True, max_det=300)[0]
            if not len(det):
                continue
            b = to_original(det[:, :4], info)
            xywh = torch.cat((b[:, :2], b[:, 2:] - b[:, :2]), 1).tolist()
            results += [{"image_id": int(meta["image_id"]), "category_id": class_map[int(c)],
                         "bbox": [round(v, 3) for v in bb], "score": round(s, 5)}
                        for bb, s, c in zip(xywh, det[:, 4].tolist(), det[:, 5].tolist())]
    return results

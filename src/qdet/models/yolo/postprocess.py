"""YOLOv5 pre/post-processing as the reference `val.py` does it: letterbox, NMS, boxes back to the image.

Preprocessing is two steps, kept separate so each matches the reference:
1. `resize_long_side`: scale so the long side is `img_size` (area averaging when shrinking, bilinear
   when enlarging; sizes truncated with int() like the reference loader);
2. `letterbox`: pad (value 114) to the target shape, resizing only if the image does not fit.
`preprocess` does both and returns a `LetterboxInfo` that `scale_boxes` uses to undo them.

Example:
    >>> import numpy as np
    >>> img = np.zeros((320, 400, 3), np.uint8)
    >>> out, info = preprocess(img, 640)
    >>> out.shape, info.ratio, info.pad
    ((640, 640, 3), (1.6, 1.6), (0.0, 64.0))
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torchvision


@dataclass(frozen=True)
class LetterboxInfo:
    """How an original image became the network input.

    ratio: (h_gain, w_gain) from the original to the unpadded resized image.
    pad: (left, top) padding in input pixels (halves of the total padding, may be x.5).
    orig_size: (h0, w0); input_size: (H, W) of the network input.
    """

    ratio: tuple[float, float]
    pad: tuple[float, float]
    orig_size: tuple[int, int]
    input_size: tuple[int, int]


def _area_weights(n_in: int, n_out: int) -> torch.Tensor:
    # Output pixel o averages source interval [o*s, (o+1)*s), s = n_in / n_out, with fractional
    # coverage of the end pixels — what OpenCV's INTER_AREA computes when shrinking.
    s = n_in / n_out
    lo = torch.arange(n_out, dtype=torch.float64) * s  # (n_out,)
    hi = lo + s
    src = torch.arange(n_in, dtype=torch.float64)  # (n_in,)
    overlap = (torch.minimum(hi[:, None], src[None] + 1) - torch.maximum(lo[:, None], src[None])).clamp(min=0)
    return overlap / s  # (n_out, n_in), rows sum to 1


def _linear_weights(n_in: int, n_out: int) -> torch.Tensor:
    # Half-pixel-centre bilinear with edge replication — OpenCV's INTER_LINEAR.
    s = n_in / n_out
    x = ((torch.arange(n_out, dtype=torch.float64) + 0.5) * s - 0.5).clamp(min=0)  # source coordinate
    x0 = x.floor().clamp(max=n_in - 1)
    frac = (x - x0).clamp(max=1)
    x1 = (x0 + 1).clamp(max=n_in - 1)
    w = torch.zeros(n_out, n_in, dtype=torch.float64)
    rows = torch.arange(n_out)
    w[rows, x0.long()] += 1 - frac
    w[rows, x1.long()] += frac
    return w  # (n_out, n_in)


def resize(image: np.ndarray, size_wh: tuple[int, int], *, area: bool) -> np.ndarray:
    """Resize uint8 (H, W, C) to (h, w) = size_wh[::-1]; `area` averaging (for shrinking) or bilinear.

    Separable weight matrices reproduce OpenCV's INTER_AREA / INTER_LINEAR within ±1 grey level
    (OpenCV uses fixed-point coefficients), without depending on OpenCV.
    """
    w_out, h_out = size_wh
    h_in, w_in = image.shape[:2]
    make = _area_weights if area else _linear_weights
    wy, wx = make(h_in, h_out).float(), make(w_in, w_out).float()
    src = torch.tensor(image, dtype=torch.float32)  # (H, W, C); a copy, so read-only arrays are fine
    out = torch.einsum("oh,hwc->owc", wy, src)  # (h, W, C)
    out = torch.einsum("pw,owc->opc", wx, out)  # (h, w, C)
    return out.round().clamp(0, 255).to(torch.uint8).numpy()


def resize_long_side(image: np.ndarray, img_size: int = 640) -> tuple[np.ndarray, tuple[float, float]]:
    """Scale so the long side is `img_size` (the reference loader's step). Returns (image, (h/h0, w/w0))."""
    h0, w0 = image.shape[:2]
    r = img_size / max(h0, w0)
    if r == 1:
        return image, (1.0, 1.0)
    w, h = int(w0 * r), int(h0 * r)  # truncation, as the reference loader does
    image = resize(image, (w, h), area=r < 1)
    return image, (h / h0, w / w0)


def letterbox(
    image: np.ndarray,
    new_shape: int | tuple[int, int] = 640,
    *,
    color: int = 114,
    auto: bool = False,
    scaleup: bool = False,
    stride: int = 32,
) -> tuple[np.ndarray, tuple[float, float], tuple[float, float]]:
    """Fit `image` (H, W, C) into `new_shape` (h, w) keeping aspect ratio, pad with `color`.

    auto=True pads only up to a multiple of `stride` (minimum rectangle); scaleup=False never enlarges
    (evaluation). Returns (image, (h_gain, w_gain), (pad_left, pad_top)).
    """
    shape = image.shape[:2]
    if isinstance(new_shape, int):
        new_shape = (new_shape, new_shape)
    r = min(new_shape[0] / shape[0], new_shape[1] / shape[1])
    if not scaleup:
        r = min(r, 1.0)
    new_unpad = (int(round(shape[1] * r)), int(round(shape[0] * r)))  # (w, h)
    dw, dh = new_shape[1] - new_unpad[0], new_shape[0] - new_unpad[1]
    if auto:
        dw, dh = dw % stride, dh % stride
    dw, dh = dw / 2, dh / 2  # split the padding between both sides
    if (shape[1], shape[0]) != new_unpad:
        image = resize(image, new_unpad, area=False)
    # An odd total puts the extra pixel at the bottom/right (round(x ± 0.1) breaks the .5 tie).
    top, bottom = int(round(dh - 0.1)), int(round(dh + 0.1))
    left, right = int(round(dw - 0.1)), int(round(dw + 0.1))
    image = np.pad(image, ((top, bottom), (left, right), (0, 0)), constant_values=color)
    return image, (new_unpad[1] / shape[0], new_unpad[0] / shape[1]), (dw, dh)


def preprocess(image: np.ndarray, img_size: int = 640, shape: tuple[int, int] | None = None) -> tuple[np.ndarray, LetterboxInfo]:
    """Reference evaluation preprocessing of one RGB uint8 image: long side → img_size, then letterbox.

    shape: the (h, w) to letterbox into; default square (img_size, img_size).
    """
    h0, w0 = image.shape[:2]
    resized, (gh, gw) = resize_long_side(image, img_size)
    out, (lh, lw), pad = letterbox(resized, shape or (img_size, img_size), auto=False, scaleup=False)
    return out, LetterboxInfo((gh * lh, gw * lw), (float(pad[0]), float(pad[1])), (h0, w0), out.shape[:2])


def rect_shape(orig_size: tuple[int, int], img_size: int = 640, *, stride: int = 32, pad: float = 0.5) -> tuple[int, int]:
    """The reference's rectangular-inference input shape (h, w) for one image (batch of one).

    >>> rect_shape((480, 640))
    (512, 672)
    """
    h, w = orig_size
    ar = h / w
    rel = (ar, 1.0) if ar < 1 else (1.0, 1 / ar)
    return tuple(int(math.ceil(x * img_size / stride + pad) * stride) for x in rel)  # type: ignore[return-value]


def xywh2xyxy(b: torch.Tensor) -> torch.Tensor:
    """(…, 4) centre-x, centre-y, w, h → x1, y1, x2, y2."""
    xy, wh = b[..., :2], b[..., 2:4]
    return torch.cat((xy - wh / 2, xy + wh / 2), -1)


def non_max_suppression(
    pred: torch.Tensor,
    conf_thres: float = 0.001,
    iou_thres: float = 0.6,
    *,
    multi_label: bool = True,
    max_det: int = 300,
    max_nms: int = 30000,
    agnostic: bool = False,
) -> list[torch.Tensor]:
    """Decoded predictions (B, N, 5+nc) → per image (n, 6): x1, y1, x2, y2, score, class index.

    Candidates need objectness > conf_thres; score = objectness × class probability. With
    multi_label a box yields one detection per class whose score exceeds conf_thres (the reference
    evaluation setting); otherwise only its best class. NMS is per class (unless `agnostic`).

    >>> p = torch.zeros(1, 2, 7); p[0, :, :4] = torch.tensor([50., 50, 20, 20]); p[0, :, 4] = 0.9; p[0, :, 5] = 1
    >>> non_max_suppression(p)[0].shape  # two identical boxes, one survives
    torch.Size([1, 6])
    """
    out = []
    for x in pred.float():  # (N, 5+nc)
        x = x[x[:, 4] > conf_thres]
        if not len(x):
            out.append(torch.zeros(0, 6, device=pred.device))
            continue
        scores = x[:, 5:] * x[:, 4:5]  # (n, nc)
        box = xywh2xyxy(x[:, :4])
        if multi_label:
            i, j = (scores > conf_thres).nonzero(as_tuple=True)
            det = torch.cat((box[i], scores[i, j, None], j[:, None].float()), 1)
        else:
            conf, j = scores.max(1, keepdim=True)
            det = torch.cat((box, conf, j.float()), 1)[conf.view(-1) > conf_thres]
        if len(det) > max_nms:  # bound NMS cost on pathological inputs (e.g. a random model)
            det = det[det[:, 4].argsort(descending=True)[:max_nms]]
        if not len(det):
            out.append(torch.zeros(0, 6, device=pred.device))
            continue
        groups = torch.zeros_like(det[:, 5]) if agnostic else det[:, 5]
        keep = torchvision.ops.batched_nms(det[:, :4], det[:, 4], groups, iou_thres)[:max_det]
        out.append(det[keep])
    return out


def scale_boxes(boxes: torch.Tensor, info: LetterboxInfo) -> torch.Tensor:
    """xyxy boxes in network-input pixels → original image pixels, clipped to the image.

    Uses the height gain for both axes, as the reference does (the two differ only by int() truncation).
    """
    gain = info.ratio[0]
    pad = torch.tensor([info.pad[0], info.pad[1], info.pad[0], info.pad[1]], dtype=boxes.dtype, device=boxes.device)
    out = (boxes - pad) / gain
    h0, w0 = info.orig_size
    return torch.stack(
        (out[:, 0].clamp(0, w0), out[:, 1].clamp(0, h0), out[:, 2].clamp(0, w0), out[:, 3].clamp(0, h0)), 1
    )

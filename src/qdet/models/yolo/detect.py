"""Run a YOLOv5 (float, fake-quantized or any runtime) over a COCO set and collect COCO-json detections.

The callable maps a (B, 3, H, W) float tensor of RGB in [0, 1] to either
- decoded predictions (B, N, 5+nc) — a float `YOLOv5`, or
- raw maps [(B, na*(5+nc), H/s, W/s) for s in strides] (tensors or numpy arrays) — `forward_raw`, a
  quantized region or an exported runtime; they are decoded with `decode` (the float model's
  `YOLOv5.decode`, so box decoding stays a float island whatever ran the body).

Example:
    >>> from qdet.models.yolo import load_yolov5
    >>> from qdet.data.coco import CocoDetection
    >>> from qdet.eval.coco import evaluate_coco
    >>> model = load_yolov5("yolov5n_v6.1_state_dict_fp16.pt")  # doctest: +SKIP
    >>> ds = CocoDetection("val2017", "instances_val2017_subset.json")  # doctest: +SKIP
    >>> dets = run_yolo_on_coco(model, ds)  # doctest: +SKIP
    >>> evaluate_coco(dets, ds.annotations_json, image_ids=ds.image_ids).map50  # doctest: +SKIP
    # int8 body, float decode:
    >>> dets = run_yolo_on_coco(qbody, ds, decode=model.decode)  # doctest: +SKIP
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from qdet.data.coco import COCO80_TO_91, CocoDetection
from qdet.errors import ConfigError
from qdet.models.yolo.postprocess import LetterboxInfo, non_max_suppression, preprocess, rect_shape, scale_boxes

Decode = Callable[[Sequence[torch.Tensor]], torch.Tensor]


def to_input(images: Sequence[np.ndarray]) -> torch.Tensor:
    """Letterboxed RGB uint8 (H, W, 3) images → (B, 3, H, W) float32 in [0, 1] (the reference divides by 255)."""
    batch = np.stack([np.ascontiguousarray(im.transpose(2, 0, 1)) for im in images])  # (B, 3, H, W)
    return torch.from_numpy(batch).float() / 255.0


def predictions(output: Any, decode: Decode | None) -> torch.Tensor:
    """Normalise a model output to decoded (B, N, 5+nc): pass decoded tensors through, decode raw maps."""
    if isinstance(output, np.ndarray):
        output = torch.from_numpy(output)
    if isinstance(output, torch.Tensor) and output.dim() == 3:
        return output.float()
    if isinstance(output, (list, tuple)):
        maps = [torch.from_numpy(np.asarray(o)) if not isinstance(o, torch.Tensor) else o for o in output]
        if all(m.dim() == 4 for m in maps):
            if decode is None:
                raise ConfigError("the model returned raw YOLO maps: pass decode=<float YOLOv5>.decode to decode them")
            return decode(maps).float()
        if len(maps) >= 1 and maps[0].dim() == 3:  # (decoded, raw) as some exports return
            return maps[0].float()
    shape = tuple(output.shape) if hasattr(output, "shape") else type(output).__name__
    raise ConfigError(f"cannot interpret model output {shape}: expected (B, N, 5+nc) or a list of (B, C, H, W) raw maps")


def suppressed(output: Any, decode: Decode | None, conf: float, iou: float, *, multi_label: bool,
               max_det: int) -> list[torch.Tensor]:
    """Per image (n, 6) detections of a model output: NMS on decoded predictions, or a whole graph's
    `Detections` as they are — which must have been built with these very settings."""
    from qdet.runtimes.whole_graph import Detections, NmsSettings

    if isinstance(output, Detections):
        wanted = NmsSettings(conf=conf, iou=iou, max_det=max_det, multi_label=multi_label)
        if output.settings != wanted:
            raise ConfigError(f"the whole graph was built with {output.settings}, this evaluation needs {wanted}: "
                              "lower it with nms= those settings")
        return list(output)
    return non_max_suppression(predictions(output, decode).cpu(), conf, iou, multi_label=multi_label, max_det=max_det)


@contextlib.contextmanager
def _threads(n: int | None) -> Iterator[None]:
    """Pin torch's intra-op thread count inside the block, restoring it even on error."""
    previous = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _detections(det: torch.Tensor, info: LetterboxInfo, image_id: int, class_map: Sequence[int]) -> list[dict[str, Any]]:
    # det: (n, 6) xyxy in input pixels, score, class → COCO json entries in original pixels, xywh top-left.
    if not len(det):
        return []
    boxes = scale_boxes(det[:, :4], info)
    xywh = torch.cat((boxes[:, :2], boxes[:, 2:] - boxes[:, :2]), 1).tolist()
    # Rounded like the reference's json (3 decimals for boxes, 5 for scores) so results match it exactly.
    return [
        {"image_id": image_id, "category_id": class_map[int(c)], "bbox": [round(v, 3) for v in b], "score": round(s, 5)}
        for b, s, c in zip(xywh, det[:, 4].tolist(), det[:, 5].tolist())
    ]


def run_yolo_on_coco(
    model_or_callable: Callable[[torch.Tensor], Any],
    dataset: CocoDetection,
    *,
    img_size: int = 640,
    conf: float = 0.001,
    iou: float = 0.6,
    batch_size: int = 1,
    max_det: int = 300,
    multi_label: bool = True,
    rect: bool = False,
    decode: Decode | None = None,
    class_map: Sequence[int] = COCO80_TO_91,
    num_threads: int | None = None,
    indices: Sequence[int] | None = None,
    progress: bool = True,
    desc: str = "yolo inference (images)",
) -> list[dict[str, Any]]:
    """Detections over `dataset` as COCO json dicts {image_id, category_id, bbox [x, y, w, h], score}.

    Square letterbox `img_size`² by default; `rect=True` uses the reference's minimal rectangle per
    image ((h, w) rounded up to a multiple of 32 plus half a stride; batching then groups images of
    equal shape). `decode` defaults to the model's own when it is a `YOLOv5`. `num_threads` pins
    torch's intra-op threads for the run (restored afterwards): on a shared, busy CPU one thread
    avoids OpenMP oversubscription, which can slow inference twenty-fold. `indices` (default: all)
    runs only those images, in that order (one shard of a sharded evaluation).
    """
    from tqdm import tqdm

    from qdet.models.yolo.model import YOLOv5

    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    if decode is None and isinstance(model_or_callable, YOLOv5):
        decode = model_or_callable.decode
    device = torch.device("cpu")
    if isinstance(model_or_callable, nn.Module):
        p = next(model_or_callable.parameters(), None)
        device = p.device if p is not None else device
        if model_or_callable.training:
            raise ConfigError("the model is in training mode: call model.eval() before evaluating")

    # Group image indices into batches of one input shape (all one shape for the square letterbox).
    order = list(indices) if indices is not None else list(range(len(dataset)))
    shape_of = {}
    for i in order:
        size = dataset.meta(i)["orig_size"]
        if rect and size is None:
            size = dataset[i][1]["orig_size"]
        shape_of[i] = rect_shape(size, img_size) if rect else (img_size, img_size)
    batches: list[list[int]] = []
    for shape in dict.fromkeys(shape_of[i] for i in order):
        same = [i for i in order if shape_of[i] == shape]
        batches += [same[k : k + batch_size] for k in range(0, len(same), batch_size)]

    results: list[dict[str, Any]] = []
    with _threads(num_threads), torch.inference_mode(), tqdm(total=len(order), desc=desc, disable=not progress) as bar:
        for idx in batches:
            images, infos, ids = [], [], []
            for i in idx:
                image, meta = dataset[i]
                if isinstance(image, torch.Tensor):  # a dataset built with as_tensor=True
                    image = image.permute(1, 2, 0).numpy()
                lb, info = preprocess(image, img_size, shape_of[i])
                images.append(lb)
                infos.append(info)
                ids.append(meta["image_id"])
            x = to_input(images).to(device)  # (B, 3, H, W)
            dets = suppressed(model_or_callable(x), decode, conf, iou, multi_label=multi_label, max_det=max_det)
            for det, info, image_id in zip(dets, infos, ids):
                results += _detections(det, info, image_id, class_map)
            bar.update(len(idx))
    return results

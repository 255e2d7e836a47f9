"""COCO bbox mAP with pycocotools, as a typed result.

pycocotools is imported lazily (so `import qdet` stays light) and its printing is captured: the
numbers come back in a frozen `CocoResult`.

Example:
    >>> dets = [{"image_id": 139, "category_id": 1, "bbox": [10.0, 20.0, 30.0, 40.0], "score": 0.9}]
    >>> r = evaluate_coco(dets, "instances_val2017.json")  # doctest: +SKIP
    >>> print(r.table())  # doctest: +SKIP
"""
from __future__ import annotations

import contextlib
import copy
import io
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from qdet.errors import DataError

_LABELS = {
    "map": "AP @[IoU=0.50:0.95 | area=all | maxDets=100]",
    "map50": "AP @[IoU=0.50 | area=all | maxDets=100]",
    "map75": "AP @[IoU=0.75 | area=all | maxDets=100]",
    "map_small": "AP @[IoU=0.50:0.95 | area=small | maxDets=100]",
    "map_medium": "AP @[IoU=0.50:0.95 | area=medium | maxDets=100]",
    "map_large": "AP @[IoU=0.50:0.95 | area=large | maxDets=100]",
    "ar1": "AR @[IoU=0.50:0.95 | area=all | maxDets=1]",
    "ar10": "AR @[IoU=0.50:0.95 | area=all | maxDets=10]",
    "ar100": "AR @[IoU=0.50:0.95 | area=all | maxDets=100]",
    "ar_small": "AR @[IoU=0.50:0.95 | area=small | maxDets=100]",
    "ar_medium": "AR @[IoU=0.50:0.95 | area=medium | maxDets=100]",
    "ar_large": "AR @[IoU=0.50:0.95 | area=large | maxDets=100]",
}


@dataclass(frozen=True)
class CocoResult:
    """The 12 standard COCOeval bbox statistics, in COCOeval's order, as fractions in [0, 1].

    -1 means pycocotools had no ground truth in that area range. `num_images`/`num_detections` say
    what was evaluated.
    """

    map: float
    map50: float
    map75: float
    map_small: float
    map_medium: float
    map_large: float
    ar1: float
    ar10: float
    ar100: float
    ar_small: float
    ar_medium: float
    ar_large: float
    num_images: int = 0
    num_detections: int = 0

    @classmethod
    def from_stats(cls, stats: Sequence[float], *, num_images: int = 0, num_detections: int = 0) -> "CocoResult":
        if len(stats) != 12:
            raise ValueError(f"expected the 12 COCOeval stats, got {len(stats)}")
        return cls(*(float(s) for s in stats), num_images=num_images, num_detections=num_detections)

    def as_dict(self) -> dict[str, float]:
        """Name → value, e.g. {"map": 0.256, "map50": 0.404, ...} (counts included)."""
        return asdict(self)

    def table(self) -> str:
        """The pycocotools summary, one named line per statistic.

        >>> print(CocoResult.from_stats([0.5] * 12).table().splitlines()[0])
        map         AP @[IoU=0.50:0.95 | area=all | maxDets=100]      0.500
        """
        lines = [f"{name:<11} {label:<48} {getattr(self, name):6.3f}" for name, label in _LABELS.items()]
        lines.append(f"({self.num_detections} detections on {self.num_images} images)")
        return "\n".join(lines)


def _load_gt(annotations: str | Path | Mapping[str, Any]) -> Any:
    from pycocotools.coco import COCO

    from qdet.data.coco import read_coco_json

    data = copy.deepcopy(dict(annotations)) if isinstance(annotations, Mapping) else read_coco_json(annotations)
    data.setdefault("annotations", [])
    data.setdefault("categories", [])
    for ann in data["annotations"]:  # pycocotools indexes both; CocoDetection has validated what is present
        if isinstance(ann, dict) and isinstance(ann.get("bbox"), list) and len(ann["bbox"]) == 4:
            ann.setdefault("area", float(ann["bbox"][2]) * float(ann["bbox"][3]))
            ann.setdefault("iscrowd", 0)
    gt = COCO()
    gt.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    return gt


def evaluate_coco(
    detections: Iterable[Mapping[str, Any]],
    annotations_json: str | Path | Mapping[str, Any],
    *,
    image_ids: Iterable[int] | None = None,
) -> CocoResult:
    """COCO bbox evaluation of `detections` ({image_id, category_id, bbox [x, y, w, h], score}).

    image_ids: restrict to these images (the reference restricts to the images it ran on); default
    all images in the annotations. An empty detection list gives zeros.

    >>> gt = {"images": [{"id": 1, "width": 100, "height": 100}], "categories": [{"id": 1, "name": "a"}],
    ...       "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 50, 50], "area": 2500, "iscrowd": 0}]}
    >>> evaluate_coco([{"image_id": 1, "category_id": 1, "bbox": [10, 10, 50, 50], "score": 1.0}], gt).map  # doctest: +ELLIPSIS
    0.99999...
    """
    from pycocotools.cocoeval import COCOeval

    gt = _load_gt(annotations_json)
    ids = sorted(gt.getImgIds()) if image_ids is None else sorted(int(i) for i in image_ids)
    dets = []
    for k, d in enumerate(detections):
        try:
            bbox = [float(v) for v in d["bbox"]]
            dets.append({"image_id": int(d["image_id"]), "category_id": int(d["category_id"]), "bbox": bbox, "score": float(d["score"])})
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"detection {k} is not {{image_id, category_id, bbox[4], score}}: {d!r} ({e})") from None
        if len(bbox) != 4:
            raise DataError(f"detection {k}: bbox must be [x, y, w, h], got {bbox}")
    if not dets:  # pycocotools' loadRes cannot take an empty list
        return CocoResult.from_stats([0.0] * 12, num_images=len(ids), num_detections=0)
    unknown = {d["image_id"] for d in dets} - set(gt.getImgIds())
    if unknown:
        raise DataError(f"detections refer to image ids not in the annotations: {sorted(unknown)[:5]}")

    with contextlib.redirect_stdout(io.StringIO()):
        pred = gt.loadRes(dets)
        ev = COCOeval(gt, pred, "bbox")
        ev.params.imgIds = ids
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return CocoResult.from_stats(list(ev.stats), num_images=len(ids), num_detections=len(dets))

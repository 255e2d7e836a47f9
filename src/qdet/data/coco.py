"""COCO detection data: an images folder plus an `instances_*.json`, and the 80-class ↔ category-id map.

Images decode with Pillow to RGB uint8 (H, W, 3) — the channel order detectors trained with
ultralytics/torchvision expect — or to a (3, H, W) uint8 tensor with `as_tensor=True`.

Example:
    >>> from qdet.paths import assets_dir
    >>> coco = assets_dir() / "coco"
    >>> ds = CocoDetection(coco / "val2017", coco / "annotations/instances_val2017_subset.json")  # doctest: +SKIP
    >>> image, meta = ds[0]  # doctest: +SKIP
    >>> image.shape, meta["image_id"], meta["orig_size"]  # doctest: +SKIP
    ((426, 640, 3), 139, (426, 640))
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from qdet.errors import DataError

# COCO's 80 detection classes use category ids 1..90 with 10 gaps (ids of the 91-entry paper list that
# were never annotated). Index i of an 80-class detector ↔ COCO80_TO_91[i].
COCO80_TO_91: tuple[int, ...] = (
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21,
    22, 23, 24, 25, 27, 28, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44,
    46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 58, 59, 60, 61, 62, 63, 64, 65,
    67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 84, 85, 86, 87, 88, 89, 90,
)  # fmt: skip
COCO91_TO_80: dict[int, int] = {cat: i for i, cat in enumerate(COCO80_TO_91)}


def coco80_to_91(index: int) -> int:
    """Detector class index (0..79) → COCO category id.

    >>> coco80_to_91(0), coco80_to_91(79)
    (1, 90)
    """
    return COCO80_TO_91[index]


def coco91_to_80(category_id: int) -> int:
    """COCO category id → detector class index (0..79); DataError for an id outside the 80 classes.

    >>> coco91_to_80(90)
    79
    """
    try:
        return COCO91_TO_80[category_id]
    except KeyError:
        raise DataError(f"COCO category id {category_id} is not one of the 80 detection classes") from None


def read_coco_json(path: str | Path) -> dict[str, Any]:
    """Read an instances json, with a DataError naming the file when it is missing, unreadable or malformed."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"COCO annotation file not found: {path}")
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"cannot read COCO annotation file {path}: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DataError(f"COCO annotation file {path} has no 'images' list")
    for key in ("annotations", "categories"):
        if not isinstance(data.get(key, []), list):
            raise DataError(f"COCO annotation file {path}: {key!r} must be a list")
    return data


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and bool(np.isfinite(v))


def load_image(path: str | Path) -> np.ndarray:
    """Decode an image file to RGB uint8 (H, W, 3); DataError naming the file when missing or undecodable."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise DataError(f"image file not found: {path}")
    try:
        with Image.open(path) as im:
            return np.array(im.convert("RGB"))  # (H, W, 3) uint8, writable
    except Image.DecompressionBombError as e:
        raise DataError(f"cannot decode image {path}: refused, too many pixels ({e})") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError, MemoryError) as e:
        raise DataError(f"cannot decode image {path}: {e}") from None


class CocoDetection:
    """Indexable COCO detection set: `ds[i] -> (image, meta)`.

    image: RGB uint8 ndarray (H, W, 3), or a (3, H, W) uint8 torch tensor when `as_tensor`.
    meta: {"image_id": int, "orig_size": (h, w), "path": Path, "file_name": str}.
    `verify_files=True` (default) checks up front that every listed image exists, so a missing file is
    reported before a long evaluation rather than half-way through.
    `annotations(image_id)` gives that image's ground-truth annotation dicts.
    """

    def __init__(
        self, images_dir: str | Path, annotations_json: str | Path, *, as_tensor: bool = False, verify_files: bool = True
    ) -> None:
        self.images_dir = Path(images_dir)
        self.annotations_json = Path(annotations_json)
        if not self.images_dir.is_dir():
            raise DataError(f"COCO images folder not found: {self.images_dir}")
        data = read_coco_json(self.annotations_json)
        self.as_tensor = as_tensor
        self.images: list[dict[str, Any]] = []
        src = self.annotations_json
        for k, img in enumerate(data["images"]):
            if not isinstance(img, dict) or "id" not in img or "file_name" not in img:
                raise DataError(f"{src}: images[{k}] lacks 'id' or 'file_name'")
            if not _is_int(img["id"]):
                raise DataError(f"{src}: images[{k}].id must be an integer, got {img['id']!r:.60}")
            if not isinstance(img["file_name"], str) or not img["file_name"].strip() or "\0" in img["file_name"]:
                raise DataError(f"{src}: images[{k}].file_name must be a non-empty string, got {img['file_name']!r:.60}")
            for dim in ("height", "width"):
                if dim in img and (not _is_int(img[dim]) or not 1 <= img[dim] <= 1_000_000):
                    raise DataError(f"{src}: images[{k}].{dim} must be a positive integer, got {img[dim]!r:.60}")
            self.images.append(img)
        ids = [img["id"] for img in self.images]
        if len(set(ids)) != len(ids):
            dup = next(i for i in ids if ids.count(i) > 1)
            raise DataError(f"{src}: image id {dup} appears more than once in 'images'")
        image_ids = set(ids)
        self.categories: list[dict[str, Any]] = list(data.get("categories", []))
        for k, cat in enumerate(self.categories):
            if not isinstance(cat, dict) or not _is_int(cat.get("id")):
                raise DataError(f"{src}: categories[{k}] must be an object with an integer 'id', got {cat!r:.60}")
        self._anns: dict[int, list[dict[str, Any]]] = {}
        known = {c["id"] for c in self.categories}
        for k, ann in enumerate(data.get("annotations", [])):
            if isinstance(ann, dict) and known and ann.get("category_id") not in known:
                raise DataError(f"{src}: annotations[{k}].category_id {ann.get('category_id')!r:.60} "
                                "is not among the file's categories")
            if not isinstance(ann, dict) or "image_id" not in ann:
                raise DataError(f"{src}: annotations[{k}] lacks 'image_id'")
            if not _is_int(ann["image_id"]) or ann["image_id"] not in image_ids:
                raise DataError(f"{src}: annotations[{k}].image_id {ann['image_id']!r:.60} is not the id of an "
                                "image in 'images'")
            if not known and not _is_int(ann.get("category_id")):
                raise DataError(f"{src}: annotations[{k}].category_id must be an integer, got {ann.get('category_id')!r:.60}")
            if "area" in ann and not (_is_number(ann["area"]) and ann["area"] >= 0):
                raise DataError(f"{src}: annotations[{k}].area must be a finite number >= 0, got {ann['area']!r:.60}")
            if "iscrowd" in ann and (not _is_int(ann["iscrowd"]) or ann["iscrowd"] not in (0, 1)):
                raise DataError(f"{src}: annotations[{k}].iscrowd must be 0 or 1, got {ann['iscrowd']!r:.60}")
            box = ann.get("bbox")
            if not (isinstance(box, list) and len(box) == 4
                    and all(isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) for v in box)
                    and box[2] > 0 and box[3] > 0):
                raise DataError(f"{src}: annotations[{k}].bbox must be 4 finite numbers with w, h > 0, got {box!r}")
            self._anns.setdefault(ann["image_id"], []).append(ann)
        if verify_files:
            missing = [img["file_name"] for img in self.images if not (self.images_dir / img["file_name"]).is_file()]
            if missing:
                raise DataError(
                    f"{len(missing)} image(s) listed in {self.annotations_json} are missing from {self.images_dir}, "
                    f"first: {self.images_dir / missing[0]}"
                )

    def __len__(self) -> int:
        return len(self.images)

    @property
    def image_ids(self) -> list[int]:
        return [img["id"] for img in self.images]

    def annotations(self, image_id: int) -> list[dict[str, Any]]:
        return self._anns.get(image_id, [])

    def meta(self, index: int) -> dict[str, Any]:
        """Meta without decoding the image (sizes from the json)."""
        img = self.images[index]
        size = (int(img["height"]), int(img["width"])) if "height" in img and "width" in img else None
        return {"image_id": img["id"], "orig_size": size, "path": self.images_dir / img["file_name"], "file_name": img["file_name"]}

    def __getitem__(self, index: int) -> tuple[Any, dict[str, Any]]:
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        meta = self.meta(index)
        image = load_image(meta["path"])
        if meta["orig_size"] is not None and meta["orig_size"] != image.shape[:2]:
            raise DataError(
                f"image {meta['path']} is {image.shape[1]}x{image.shape[0]} but {self.annotations_json} says "
                f"{meta['orig_size'][1]}x{meta['orig_size'][0]}"
            )
        meta["orig_size"] = tuple(image.shape[:2])
        if self.as_tensor:
            import torch

            return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))), meta  # (3, H, W)
        return image, meta

    def __iter__(self) -> Iterator[tuple[Any, dict[str, Any]]]:
        for i in range(len(self)):
            yield self[i]

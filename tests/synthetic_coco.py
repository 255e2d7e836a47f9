"""Test helper: a tiny COCO folder of SYNTHETIC images (noise with random boxes) in qdet's layout."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def write_tiny_coco(root: Path, *, train: int = 4, val: int = 3) -> Path:
    """train2017 (`train` images) and val2017 (`val` images) of 96×72 noise with two boxes each, as
    `root/{split}/` plus `root/annotations/instances_{split}_subset.json`."""
    from PIL import Image

    (root / "annotations").mkdir(parents=True)
    for split, n, seed in (("train2017", train, 1), ("val2017", val, 2)):
        rng = np.random.default_rng(seed)
        (root / split).mkdir()
        images, anns = [], []
        for i in range(n):
            image_id = seed * 100 + i
            name = f"{image_id:012d}.png"
            Image.fromarray(rng.integers(0, 255, (72, 96, 3), dtype=np.uint8)).save(root / split / name)
            images.append({"id": image_id, "file_name": name, "height": 72, "width": 96})
            for k, cat in enumerate((1, 18)):
                x, y = float(rng.integers(0, 40)), float(rng.integers(0, 30))
                anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": cat, "iscrowd": 0,
                             "bbox": [x, y, 30.0 + 10 * k, 25.0], "area": 750.0})
        cats = [{"id": 1, "name": "person"}, {"id": 18, "name": "dog"}]
        (root / "annotations" / f"instances_{split}_subset.json").write_text(
            json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return root

"""KITTI object detection (2D): `training/image_2/*.png` + `training/label_2/*.txt`.

Each label line is
    type truncated occluded alpha x1 y1 x2 y2 h w l x y z rotation_y [score]
(15 fields; result files add a 16th, the score). Types: Car, Van, Truck, Pedestrian, Person_sitting,
Cyclist, Tram, Misc and DontCare (regions where objects were not labelled: detections there are
neither true nor false positives). The official benchmark's difficulty levels:

    level     min box height   max occlusion        max truncation
    Easy      40 px            0 (fully visible)    0.15
    Moderate  25 px            1 (partly occluded)  0.30
    Hard      25 px            2 (largely occluded) 0.50

An object belongs to the easiest level whose limits it meets (a Moderate evaluation also counts the
Easy objects); objects beyond Hard are ignored by every evaluation. Evaluation is in `qdet.eval.kitti`.

Example:
    >>> from qdet.paths import assets_dir
    >>> ds = KittiDataset(assets_dir() / "kitti")  # doctest: +SKIP
    >>> image, target = ds[1]  # doctest: +SKIP
    >>> target["boxes"].shape, [o.type for o in ds.labels(1)][:3]  # doctest: +SKIP
    (torch.Size([3, 4]), ['Truck', 'Car', 'Cyclist'])
"""
from __future__ import annotations

import math

from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path

import torch
from torch import Tensor

from qdet.errors import DataError

__all__ = [
    "DIFFICULTY_LIMITS",
    "DONT_CARE",
    "KITTI_CLASSES",
    "Difficulty",
    "KittiDataset",
    "KittiObject",
    "parse_label_line",
    "read_label_file",
]

KITTI_CLASSES: tuple[str, ...] = ("Car", "Van", "Truck", "Pedestrian", "Person_sitting", "Cyclist", "Tram", "Misc")
DONT_CARE = "DontCare"


class Difficulty(IntEnum):
    EASY = 0
    MODERATE = 1
    HARD = 2


# (min height px, max occlusion level, max truncation), from the devkit's evaluate_object.cpp
DIFFICULTY_LIMITS: dict[Difficulty, tuple[float, int, float]] = {
    Difficulty.EASY: (40.0, 0, 0.15),
    Difficulty.MODERATE: (25.0, 1, 0.30),
    Difficulty.HARD: (25.0, 2, 0.50),
}


@dataclass(frozen=True)
class KittiObject:
    """One label (or result) line. `box` is (x1, y1, x2, y2) in pixels; `score` only in result files."""

    type: str
    truncated: float
    occluded: int
    alpha: float
    box: tuple[float, float, float, float]
    dimensions: tuple[float, float, float] = (-1.0, -1.0, -1.0)  # h, w, l (m)
    location: tuple[float, float, float] = (-1000.0, -1000.0, -1000.0)  # x, y, z (m, camera frame)
    rotation_y: float = -10.0
    score: float | None = None

    @property
    def height(self) -> float:
        return self.box[3] - self.box[1]

    @property
    def is_dont_care(self) -> bool:
        return self.type.lower() == DONT_CARE.lower()

    def within(self, level: Difficulty) -> bool:
        """Whether the object is evaluated at `level` (the devkit's ignore rule, negated)."""
        min_h, max_occ, max_trunc = DIFFICULTY_LIMITS[level]
        return not (self.occluded > max_occ or self.truncated > max_trunc or self.height < min_h)

    @property
    def difficulty(self) -> Difficulty | None:
        """The easiest level the object counts in; None when even Hard ignores it (or DontCare).

        >>> KittiObject("Car", 0.0, 0, 0.0, (0.0, 0.0, 50.0, 45.0)).difficulty
        <Difficulty.EASY: 0>
        >>> KittiObject("Car", 0.4, 2, 0.0, (0.0, 0.0, 50.0, 30.0)).difficulty
        <Difficulty.HARD: 2>
        """
        if self.is_dont_care:
            return None
        for level in Difficulty:
            if self.within(level):
                return level
        return None


def parse_label_line(line: str, *, source: str = "<string>") -> KittiObject:
    """Parse one label/result line; DataError naming `source` (file:line) when it is malformed.

    >>> parse_label_line("Car 0.00 0 1.85 387.63 181.54 423.81 203.12 1.67 1.87 3.69 -16.53 2.39 58.49 1.57").box
    (387.63, 181.54, 423.81, 203.12)
    """
    fields = line.split()
    if len(fields) not in (15, 16):
        raise DataError(f"{source}: a KITTI label line has 15 fields (16 with a score), found {len(fields)}: {line.strip()!r}")
    try:
        v = [float(x) for x in fields[1:]]
    except ValueError:
        raise DataError(f"{source}: non-numeric value in KITTI label line {line.strip()!r}") from None
    if not all(math.isfinite(x) for x in v):
        raise DataError(f"{source}: non-finite value (nan/inf) in KITTI label line {line.strip()!r}")
    x1, y1, x2, y2 = v[3:7]
    if not (x2 >= x1 and y2 >= y1):
        raise DataError(f"{source}: box ({x1}, {y1}, {x2}, {y2}) has x2 < x1 or y2 < y1")
    return KittiObject(
        type=fields[0], truncated=v[0], occluded=int(v[1]), alpha=v[2], box=(x1, y1, x2, y2),
        dimensions=(v[7], v[8], v[9]), location=(v[10], v[11], v[12]), rotation_y=v[13],
        score=v[14] if len(v) == 15 else None,
    )


def read_label_file(path: str | Path) -> list[KittiObject]:
    """All objects of one label (or result) file, DontCare included; empty lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"KITTI label file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read KITTI label file {path}: {e}") from None
    return [parse_label_line(line, source=f"{path}:{i + 1}") for i, line in enumerate(text.splitlines()) if line.strip()]


class KittiDataset(torch.utils.data.Dataset):
    """KITTI object frames; item = (image (3, H, W) float in [0, 1], target).

    root: the KITTI object folder (containing `training/`) or the `training/` folder itself.
    ids: frame ids to use (e.g. the lines of an ImageSets/val.txt); default every image in image_2.
    classes: classes that become `boxes`/`labels` (label = index + 1; DontCare never does).

    target: boxes (n, 4) xyxy, labels (n,), difficulty (n,) (0/1/2, -1 beyond Hard), truncated,
    occluded, dontcare (m, 4) boxes, image_id (index), frame (id string is in `frame_ids`).
    """

    def __init__(self, root: str | Path, *, split: str = "training", ids: Sequence[str] | None = None,
                 classes: Sequence[str] = KITTI_CLASSES) -> None:
        root = Path(root)
        base = root if (root / "image_2").is_dir() else root / split
        self.image_dir, self.label_dir = base / "image_2", base / "label_2"
        if not self.image_dir.is_dir():
            raise DataError(f"KITTI image folder not found: {self.image_dir} (expected <root>/{split}/image_2)")
        if not self.label_dir.is_dir():
            raise DataError(f"KITTI label folder not found: {self.label_dir} (expected <root>/{split}/label_2)")
        if ids is None:
            ids = sorted(p.stem for p in self.image_dir.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
            if not ids:
                raise DataError(f"no images in {self.image_dir}")
        self.frame_ids = [str(i).strip() for i in ids if str(i).strip()]
        self.classes = tuple(classes)
        self._class_index = {c.lower(): i + 1 for i, c in enumerate(self.classes)}
        for frame in self.frame_ids:
            if not (self.label_dir / f"{frame}.txt").is_file():
                raise DataError(f"KITTI label file missing for frame {frame}: {self.label_dir / f'{frame}.txt'}")
        self._labels: dict[int, list[KittiObject]] = {}

    def __len__(self) -> int:
        return len(self.frame_ids)

    def image_path(self, index: int) -> Path:
        frame = self.frame_ids[index]
        for ext in (".png", ".jpg", ".jpeg"):
            p = self.image_dir / f"{frame}{ext}"
            if p.is_file():
                return p
        raise DataError(f"KITTI image missing for frame {frame} in {self.image_dir}")

    def labels(self, index: int) -> list[KittiObject]:
        """Every object of frame `index` as written in its label file (DontCare included)."""
        if index not in self._labels:
            self._labels[index] = read_label_file(self.label_dir / f"{self.frame_ids[index]}.txt")
        return self._labels[index]

    def image(self, index: int) -> Tensor:
        from qdet.data.coco import load_image

        array = load_image(self.image_path(index))  # (H, W, 3) uint8 RGB; DataError naming the file
        return torch.from_numpy(array).permute(2, 0, 1).float().div_(255.0)

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Tensor]]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        return self.image(index), self.target(index)

    def target(self, index: int) -> dict[str, Tensor]:
        objs = self.labels(index)
        kept = [o for o in objs if not o.is_dont_care and o.type.lower() in self._class_index]
        dc = [o for o in objs if o.is_dont_care]
        diff = [-1 if o.difficulty is None else int(o.difficulty) for o in kept]
        return {
            "boxes": torch.tensor([o.box for o in kept], dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor([self._class_index[o.type.lower()] for o in kept], dtype=torch.int64),
            "difficulty": torch.tensor(diff, dtype=torch.int64),
            "truncated": torch.tensor([o.truncated for o in kept], dtype=torch.float32),
            "occluded": torch.tensor([o.occluded for o in kept], dtype=torch.int64),
            "dontcare": torch.tensor([o.box for o in dc], dtype=torch.float32).reshape(-1, 4),
            "image_id": torch.tensor(index),
        }

"""SYNTHETIC MOTChallenge sequences from still COCO images: a virtual camera over one photo.

What these sequences ARE: for each chosen COCO image (seeded), a camera window pans across the
photo, zooms in and out and jitters frame by frame; each frame is that window resampled to the
output size, and each COCO person box is transformed with the window and clipped at the frame
edges (visibility = the part still inside the frame; a box wholly outside is dropped). Written in
MOTChallenge format (seqinfo.ini, img1/, gt/gt.txt, MOT17's nine columns): persons are class 1
(pedestrian, flag 1); COCO crowd regions, persons with less than `min_visible` of their box inside
the frame and persons under `min_height` pixels are class 8 (distractor, flag 0): a tracker box on
them is neither a false positive nor a hit. Track ids are the image's COCO person annotations,
constant over the sequence.

What they are NOT: video. Nobody moves relative to anyone else; there is no occlusion between
people that changes over time, no motion blur, no appearance change, no person entering except
through the camera's motion. They exercise a detector + tracker under camera motion, scale change
and truncation at the edges — enough to compare a float with an int8 detector on the same frames —
and their MOTA/IDF1 are not comparable to MOT17 numbers.

    >>> from qdet.paths import assets_dir
    >>> coco = assets_dir() / "coco"
    >>> seqs = build_sequences("runs/synthcam", coco / "val2017",
    ...                        coco / "annotations/instances_val2017_subset.json", n_sequences=2, frames=10)  # doctest: +SKIP
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qdet.errors import ConfigError, DataError

__all__ = ["SYNTHETIC_NOTE", "CameraConfig", "build_sequences", "camera_windows", "transform_boxes"]

SYNTHETIC_NOTE = ("SYNTHETIC sequences: a virtual camera panning/zooming/jittering over still COCO images; "
                  "objects do not move relative to each other. Not MOT17, not comparable to MOTChallenge results.")
COCO_PERSON = 1


@dataclass(frozen=True)
class CameraConfig:
    """The virtual camera: output frame size, zoom range (image width / window width), pan, jitter."""

    width: int = 640
    height: int = 360
    frames: int = 60
    frame_rate: int = 30
    zoom_min: float = 1.2
    zoom_max: float = 2.0
    zoom_cycles: float = 1.0  # zoom in and out this many times over the sequence
    jitter_px: float = 3.0  # std of the window's per-frame shake, in output pixels
    min_visible: float = 0.3  # below this visible fraction a person becomes a distractor (ignored)
    min_height: float = 16.0  # persons smaller than this (output pixels) become distractors too

    def __post_init__(self) -> None:
        if not (32 <= self.width <= 4096 and 32 <= self.height <= 4096):
            raise ConfigError(f"CameraConfig: frame size {self.width}x{self.height} outside 32..4096")
        if self.frames < 1 or not (1.0 <= self.zoom_min <= self.zoom_max <= 8.0):
            raise ConfigError(f"CameraConfig: frames >= 1 and 1 <= zoom_min <= zoom_max <= 8 needed, got "
                              f"{self.frames}, {self.zoom_min}, {self.zoom_max}")


def camera_windows(img_w: int, img_h: int, cam: CameraConfig, rng: np.random.Generator) -> np.ndarray:
    """(frames, 4) x0 y0 x1 y1 windows in image pixels, all inside the image, of the output's aspect."""
    aspect = cam.width / cam.height
    t = np.linspace(0.0, 1.0, cam.frames)
    phase = rng.uniform(0, 2 * math.pi)
    zoom = cam.zoom_min + (cam.zoom_max - cam.zoom_min) * 0.5 * (1 + np.sin(2 * math.pi * cam.zoom_cycles * t + phase))
    w = img_w / zoom
    h = w / aspect
    too_tall = h > img_h
    h = np.where(too_tall, img_h, h)
    w = np.where(too_tall, h * aspect, w)
    # pan: centre moves in a straight line between two random points (in the unit square of free space)
    start, end = rng.uniform(0, 1, 2), rng.uniform(0, 1, 2)
    u = start[0] + (end[0] - start[0]) * t
    v = start[1] + (end[1] - start[1]) * t
    scale = w / cam.width  # image pixels per output pixel
    cx = w / 2 + u * (img_w - w) + rng.normal(0, cam.jitter_px, cam.frames) * scale
    cy = h / 2 + v * (img_h - h) + rng.normal(0, cam.jitter_px, cam.frames) * scale
    cx = np.clip(cx, w / 2, img_w - w / 2)
    cy = np.clip(cy, h / 2, img_h - h / 2)
    return np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)


def transform_boxes(boxes_xywh: np.ndarray, window: np.ndarray, cam: CameraConfig
                    ) -> tuple[np.ndarray, np.ndarray]:
    """COCO (N, 4) x y w h in the image → clipped (N, 4) left top w h in the frame, and visibility (N,)."""
    sx = cam.width / (window[2] - window[0])
    sy = cam.height / (window[3] - window[1])
    x0 = (boxes_xywh[:, 0] - window[0]) * sx
    y0 = (boxes_xywh[:, 1] - window[1]) * sy
    x1 = x0 + boxes_xywh[:, 2] * sx
    y1 = y0 + boxes_xywh[:, 3] * sy
    cx0, cy0 = np.clip(x0, 0, cam.width), np.clip(y0, 0, cam.height)
    cx1, cy1 = np.clip(x1, 0, cam.width), np.clip(y1, 0, cam.height)
    full = np.maximum((x1 - x0) * (y1 - y0), 1e-9)
    vis = np.clip((cx1 - cx0), 0, None) * np.clip((cy1 - cy0), 0, None) / full
    return np.stack([cx0, cy0, cx1 - cx0, cy1 - cy0], axis=1), vis


def _person_images(annotations: Path, min_persons: int, min_box_h: float) -> tuple[dict, dict]:
    try:
        data = json.loads(annotations.read_text())
        images = {int(im["id"]): im for im in data["images"]}
        anns: dict[int, list[dict]] = {}
        for a in data["annotations"]:
            if int(a["category_id"]) == COCO_PERSON:
                anns.setdefault(int(a["image_id"]), []).append(a)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{annotations}: not a readable COCO instances json ({type(e).__name__}: {e})") from None
    good = {i: a for i, a in anns.items() if i in images and
            sum(1 for x in a if not x.get("iscrowd", 0) and float(x["bbox"][3]) >= min_box_h) >= min_persons}
    return images, good


def build_sequences(out_dir: str | Path, images_dir: str | Path, annotations: str | Path, *,
                    n_sequences: int = 8, camera: CameraConfig | None = None, seed: int = 0,
                    min_persons: int = 2, min_box_h: float = 40.0, progress: bool = True) -> list[Path]:
    """Write `n_sequences` SYNTHETIC sequences (one per seeded COCO image with ≥ `min_persons`
    persons ≥ `min_box_h` px tall) under `out_dir`; returns their folders."""
    from PIL import Image
    from tqdm import tqdm

    from qdet.data.coco import load_image
    from qdet.fileio import write_text_atomically

    cam = camera or CameraConfig()
    out_dir, images_dir, annotations = Path(out_dir), Path(images_dir), Path(annotations)
    images, persons = _person_images(annotations, min_persons, min_box_h)
    ids = sorted(persons)
    if len(ids) < n_sequences:
        raise DataError(f"{annotations}: only {len(ids)} images with >= {min_persons} persons >= {min_box_h:g} px "
                        f"tall; asked for {n_sequences} sequences")
    rng = np.random.default_rng(seed)
    chosen = sorted(rng.choice(ids, n_sequences, replace=False).tolist())
    folders = []
    for image_id in tqdm(chosen, desc="synthetic sequences (SYNTHETIC camera over COCO stills)", disable=not progress):
        info = images[image_id]
        img = load_image(images_dir / info["file_name"])
        pil = Image.fromarray(img)
        seq_rng = np.random.default_rng([seed, image_id])
        windows = camera_windows(pil.width, pil.height, cam, seq_rng)
        anns = persons[image_id]
        boxes = np.array([a["bbox"] for a in anns], dtype=np.float64)
        crowd = np.array([bool(a.get("iscrowd", 0)) for a in anns])
        name = f"COCO{image_id:012d}-synthcam"
        root = out_dir / name
        (root / "img1").mkdir(parents=True, exist_ok=True)
        (root / "gt").mkdir(exist_ok=True)
        rows = []
        for f, win in enumerate(windows, 1):
            frame = pil.transform((cam.width, cam.height), Image.Transform.EXTENT, tuple(win.tolist()),
                                  resample=Image.Resampling.BILINEAR)
            frame.save(root / "img1" / f"{f:06d}.jpg", quality=95)
            tlwh, vis = transform_boxes(boxes, win, cam)
            for k in np.flatnonzero(vis > 0):
                x, y, w, h = tlwh[k]
                # crowds, mostly-cut-off and tiny persons: distractors (a box on them is neither FP nor TP)
                ignore = crowd[k] or vis[k] < cam.min_visible or h < cam.min_height
                cls, flag = (8, 0) if ignore else (1, 1)
                rows.append(f"{f},{k + 1},{x:.2f},{y:.2f},{w:.2f},{h:.2f},{flag},{cls},{vis[k]:.3f}\n")
        write_text_atomically(root / "gt" / "gt.txt", "".join(rows))
        write_text_atomically(root / "seqinfo.ini", (
            f"[Sequence]\nname={name}\nimDir=img1\nframeRate={cam.frame_rate}\nseqLength={cam.frames}\n"
            f"imWidth={cam.width}\nimHeight={cam.height}\nimExt=.jpg\n"
            f"; {SYNTHETIC_NOTE}\n; source: {info['file_name']} (COCO image {image_id}), seed {seed}\n"))
        folders.append(root)
    write_text_atomically(out_dir / "SYNTHETIC.txt", SYNTHETIC_NOTE + "\n" + json.dumps(
        {"seed": seed, "camera": cam.__dict__, "images": chosen, "source": str(annotations)}, indent=1) + "\n")
    return folders

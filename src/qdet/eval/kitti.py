"""KITTI 2D detection metrics over a whole split.

1. The official 2D AP (devkit `evaluate_object.cpp`, reimplemented): per class Car / Pedestrian /
   Cyclist and level Easy / Moderate / Hard, minimum IoU 0.7 for cars and 0.5 for pedestrians and
   cyclists. Neighbouring classes (Van for Car, Person_sitting for Pedestrian) and objects beyond the
   level are ignored (matched detections are neither TP nor FP), detections shorter than the level's
   minimum height are ignored, detections inside DontCare regions (intersection / detection area
   above the class IoU) are not false positives. Precision is sampled at the devkit's 41 recall
   thresholds and interpolated; AP_R40 averages points 1..40 (the benchmark's metric since 2019),
   AP_11 points 0, 4, ..., 40 (the original one). As in the devkit, the recall sampling assumes at
   least 40 ground-truth objects per class and level: on a handful of frames even perfect detections
   score far below 1.
2. The seed paper's numbers (seed 001), at score ≥ 0.5 and IoU ≥ 0.5: each prediction, in score
   order, takes the unmatched ground truth of its class with the highest IoU; accuracy = TP / ground
   truths (a recall), precision = TP / predictions, mIoU = mean IoU of the matched pairs. Here DontCare
   objects are not ground truth, and unmatched predictions lying mostly (≥ 50 % of their area) in a
   DontCare region are not counted.

Example:
    >>> from qdet.data.kitti import KittiObject
    >>> gt = [[KittiObject("Car", 0.0, 0, 0.0, (10.0, 10.0, 100.0, 60.0))]]
    >>> det = [[Detection("Car", (10.0, 10.0, 100.0, 60.0), 0.9)]]
    >>> r = evaluate_kitti(gt, det)
    >>> r.seed_accuracy, r.seed_precision, round(r.seed_miou, 3)
    (1.0, 1.0, 1.0)
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from qdet.data.kitti import DONT_CARE, Difficulty, KittiObject

__all__ = ["EVAL_CLASSES", "MIN_OVERLAP", "Detection", "KittiResult", "detections_from_outputs", "evaluate_kitti"]

EVAL_CLASSES: tuple[str, ...] = ("Car", "Pedestrian", "Cyclist")
MIN_OVERLAP: dict[str, float] = {"Car": 0.7, "Pedestrian": 0.5, "Cyclist": 0.5}
NEIGHBOURS: dict[str, str] = {"car": "van", "pedestrian": "person_sitting"}
N_SAMPLE_PTS = 41
_MIN_HEIGHT = {Difficulty.EASY: 40, Difficulty.MODERATE: 25, Difficulty.HARD: 25}


@dataclass(frozen=True)
class Detection:
    """One detection: KITTI class name, (x1, y1, x2, y2) in original image pixels, score."""

    type: str
    box: tuple[float, float, float, float]
    score: float


@dataclass(frozen=True)
class KittiResult:
    """AP per class and level (fractions in [0, 1]; NaN without ground truth) and the seed's metrics."""

    ap_r40: dict[str, dict[str, float]]
    ap_11: dict[str, dict[str, float]]
    num_gt: dict[str, dict[str, int]]
    seed_accuracy: float
    seed_precision: float
    seed_miou: float
    seed_counts: dict[str, int] = field(default_factory=dict)
    num_images: int = 0

    def moderate_map(self) -> float:
        """Mean AP_R40 over the classes at Moderate (NaN classes skipped)."""
        vals = [v["Moderate"] for v in self.ap_r40.values() if not math.isnan(v["Moderate"])]
        return float(np.mean(vals)) if vals else math.nan

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {f"ap_r40/{c}/{lvl}": v for c, d in self.ap_r40.items() for lvl, v in d.items()}
        out.update({f"ap_11/{c}/{lvl}": v for c, d in self.ap_11.items() for lvl, v in d.items()})
        out.update(seed_accuracy=self.seed_accuracy, seed_precision=self.seed_precision, seed_miou=self.seed_miou,
                   num_images=self.num_images, **{f"seed_{k}": v for k, v in self.seed_counts.items()})
        return out

    def table(self) -> str:
        lines = [f"{'class':<11} {'min IoU':>7} {'Easy':>7} {'Moderate':>9} {'Hard':>7}   (AP_R40 %, GT counts)"]
        for cls, d in self.ap_r40.items():
            n = self.num_gt[cls]
            vals = " ".join(f"{100 * d[lvl]:>{w}.2f}" for lvl, w in (("Easy", 7), ("Moderate", 9), ("Hard", 7)))
            lines.append(f"{cls:<11} {MIN_OVERLAP.get(cls, 0.5):>7.1f} {vals}   ({n['Easy']}/{n['Moderate']}/{n['Hard']})")
        lines.append(f"seed metrics @ score 0.5, IoU 0.5: accuracy {self.seed_accuracy:.3f}  precision "
                     f"{self.seed_precision:.3f}  mIoU {self.seed_miou:.3f}  {self.seed_counts}")
        lines.append(f"({self.num_images} images)")
        return "\n".join(lines)


# ---------------------------------------------------------------- box overlap
def _overlap(dets: np.ndarray, box: Sequence[float], *, criterion: int = -1) -> np.ndarray:
    """Devkit boxoverlap of every det (D, 4) against one box: -1 IoU, 0 intersection / det area."""
    if len(dets) == 0:
        return np.zeros(0)
    w = np.minimum(dets[:, 2], box[2]) - np.maximum(dets[:, 0], box[0])
    h = np.minimum(dets[:, 3], box[3]) - np.maximum(dets[:, 1], box[1])
    inter = np.where((w > 0) & (h > 0), w * h, 0.0)
    a_area = (dets[:, 2] - dets[:, 0]) * (dets[:, 3] - dets[:, 1])
    if criterion == 0:
        return np.divide(inter, a_area, out=np.zeros_like(inter), where=a_area > 0)
    b_area = (box[2] - box[0]) * (box[3] - box[1])
    union = a_area + b_area - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


# ---------------------------------------------------------------- official AP
@dataclass
class _Frame:
    gt_boxes: np.ndarray  # (G, 4) every non-DontCare object, in file order
    ignored_gt: np.ndarray  # (G,) 0 valid, 1 ignored (neighbour class / beyond level), -1 other class
    dc_boxes: np.ndarray  # (C, 4)
    det_boxes: np.ndarray  # (D, 4)
    scores: np.ndarray  # (D,)
    ignored_det: np.ndarray  # (D,) 0 valid, 1 too small, -1 other class


def _clean(cls: str, level: Difficulty, gts: Sequence[KittiObject], dets: Sequence[Detection]) -> tuple[_Frame, int]:
    """The devkit's cleanData for one frame."""
    name = cls.lower()
    objs = list(gts)  # DontCare lines get ignored_gt = -1 like any other class
    ignored_gt = np.empty(len(objs), dtype=np.int64)
    n_gt = 0
    for i, o in enumerate(objs):
        t = o.type.lower()
        valid = 1 if t == name else 0 if NEIGHBOURS.get(name) == t else -1
        ignore = not o.within(level)
        if valid == 1 and not ignore:
            ignored_gt[i] = 0
            n_gt += 1
        elif valid == 0 or (ignore and valid == 1):
            ignored_gt[i] = 1
        else:
            ignored_gt[i] = -1
    dc = np.array([o.box for o in gts if o.type.lower() == DONT_CARE.lower()], dtype=np.float64).reshape(-1, 4)
    det_boxes = np.array([d.box for d in dets], dtype=np.float64).reshape(-1, 4)
    scores = np.array([d.score for d in dets], dtype=np.float64)
    ignored_det = np.empty(len(dets), dtype=np.int64)
    for j, d in enumerate(dets):
        height = int(abs(d.box[1] - d.box[3]))  # int32 in the devkit
        if height < _MIN_HEIGHT[level]:
            ignored_det[j] = 1
        elif d.type.lower() == name:
            ignored_det[j] = 0
        else:
            ignored_det[j] = -1
    gt_boxes = np.array([o.box for o in objs], dtype=np.float64).reshape(-1, 4)
    return _Frame(gt_boxes, ignored_gt, dc, det_boxes, scores, ignored_det), n_gt


def _statistics(f: _Frame, min_overlap: float, *, compute_fp: bool, thresh: float = 0.0) -> tuple[int, int, int, list[float]]:
    """The devkit's computeStatistics for one frame: (tp, fp, fn, TP scores)."""
    n_det = len(f.scores)
    assigned = np.zeros(n_det, dtype=bool)
    below = f.scores < thresh if compute_fp else np.zeros(n_det, dtype=bool)
    tp = fp = fn = 0
    v: list[float] = []
    for i in range(len(f.gt_boxes)):
        if f.ignored_gt[i] == -1:
            continue
        overlap = _overlap(f.det_boxes, f.gt_boxes[i])
        cand = (f.ignored_det != -1) & ~assigned & ~below & (overlap > min_overlap)
        det_idx = -1
        if not compute_fp:
            if cand.any():
                idx = np.flatnonzero(cand)
                det_idx = int(idx[np.argmax(f.scores[idx])])
        else:
            good = cand & (f.ignored_det == 0)
            if good.any():
                idx = np.flatnonzero(good)
                det_idx = int(idx[np.argmax(overlap[idx])])
            elif (cand & (f.ignored_det == 1)).any():
                det_idx = int(np.flatnonzero(cand & (f.ignored_det == 1))[0])
        if det_idx < 0:
            if f.ignored_gt[i] == 0:
                fn += 1
        elif f.ignored_gt[i] == 1 or f.ignored_det[det_idx] == 1:
            assigned[det_idx] = True
        else:
            tp += 1
            v.append(float(f.scores[det_idx]))
            assigned[det_idx] = True
    if compute_fp:
        fp = int(np.sum(~(assigned | (f.ignored_det == -1) | (f.ignored_det == 1) | below)))
        nstuff = 0
        for box in f.dc_boxes:
            free = ~assigned & (f.ignored_det == 0) & ~below
            hit = free & (_overlap(f.det_boxes, box, criterion=0) > min_overlap)
            assigned |= hit
            nstuff += int(hit.sum())
        fp -= nstuff
    return tp, fp, fn, v


def _thresholds(v: list[float], n_gt: int) -> list[float]:
    """The devkit's getThresholds: scores at (about) 41 linearly spaced recall values."""
    scores = sorted(v, reverse=True)
    out: list[float] = []
    current = 0.0
    for i, s in enumerate(scores):
        l_recall = (i + 1) / n_gt
        r_recall = (i + 2) / n_gt if i < len(scores) - 1 else l_recall
        if (r_recall - current) < (current - l_recall) and i < len(scores) - 1:
            continue
        out.append(s)
        current += 1.0 / (N_SAMPLE_PTS - 1.0)
    return out


def _precision_curve(frames: list[_Frame], n_gt: int, min_overlap: float) -> np.ndarray:
    v: list[float] = []
    for f in frames:
        v.extend(_statistics(f, min_overlap, compute_fp=False)[3])
    precision = np.zeros(N_SAMPLE_PTS)
    if n_gt == 0:
        return precision
    thresholds = _thresholds(v, n_gt)
    tp = np.zeros(len(thresholds))
    fp = np.zeros(len(thresholds))
    for f in frames:
        for t, thr in enumerate(thresholds):
            a, b, _, _ = _statistics(f, min_overlap, compute_fp=True, thresh=thr)
            tp[t] += a
            fp[t] += b
    for t in range(len(thresholds)):
        precision[t] = tp[t] / (tp[t] + fp[t]) if tp[t] + fp[t] > 0 else 0.0
    for t in range(len(thresholds)):
        precision[t] = precision[t:].max()
    return precision


def official_ap(ground_truth: Sequence[Sequence[KittiObject]], detections: Sequence[Sequence[Detection]],
                cls: str, level: Difficulty, *, min_overlap: float | None = None) -> tuple[float, float, int]:
    """(AP_R40, AP_11, number of valid ground truths) of one class and level over all frames."""
    mo = MIN_OVERLAP.get(cls, 0.5) if min_overlap is None else min_overlap
    frames, n_gt = [], 0
    for gts, dets in zip(ground_truth, detections):
        f, n = _clean(cls, level, gts, dets)
        frames.append(f)
        n_gt += n
    if n_gt == 0:
        return math.nan, math.nan, 0
    p = _precision_curve(frames, n_gt, mo)
    return float(p[1:].sum() / 40.0), float(p[::4].sum() / 11.0), n_gt


# ---------------------------------------------------------------- the seed's metrics
def _iou(a: Sequence[float], b: Sequence[float]) -> float:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    if w <= 0 or h <= 0:
        return 0.0
    inter = w * h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def _in_dont_care(box: Sequence[float], dc: np.ndarray, frac: float = 0.5) -> bool:
    """Whether at least `frac` of `box`'s area lies in one DontCare region."""
    pred = np.array([box], dtype=np.float64)
    return any(float(_overlap(pred, region, criterion=0)[0]) >= frac for region in dc)


def seed_metrics(ground_truth: Sequence[Sequence[KittiObject]], detections: Sequence[Sequence[Detection]], *,
                 classes: Sequence[str] = EVAL_CLASSES, score: float = 0.5, iou: float = 0.5) -> dict[str, float]:
    """Seed 001's accuracy / precision / mIoU (see the module docstring), summed over every frame."""
    wanted = {c.lower() for c in classes}
    n_gt = n_pred = tp = 0
    ious: list[float] = []
    for gts, dets in zip(ground_truth, detections):
        gt = [o for o in gts if o.type.lower() in wanted]
        dc = np.array([o.box for o in gts if o.type.lower() == DONT_CARE.lower()], dtype=np.float64).reshape(-1, 4)
        preds = sorted((d for d in dets if d.score >= score and d.type.lower() in wanted), key=lambda d: -d.score)
        n_gt += len(gt)
        matched = [False] * len(gt)
        for d in preds:
            best, best_i = 0.0, -1
            for i, g in enumerate(gt):
                if matched[i] or g.type.lower() != d.type.lower():
                    continue
                o = _iou(d.box, g.box)
                if o > best:
                    best, best_i = o, i
            if best_i >= 0 and best >= iou:
                matched[best_i] = True
                tp += 1
                n_pred += 1
                ious.append(best)
            elif not _in_dont_care(d.box, dc):
                n_pred += 1
    return {
        "accuracy": tp / n_gt if n_gt else 0.0,
        "precision": tp / n_pred if n_pred else 0.0,
        "miou": float(np.mean(ious)) if ious else 0.0,
        "gt": n_gt, "predictions": n_pred, "tp": tp,
    }


def evaluate_kitti(ground_truth: Sequence[Sequence[KittiObject]], detections: Sequence[Sequence[Detection]], *,
                   classes: Sequence[str] = EVAL_CLASSES, seed_score: float = 0.5, seed_iou: float = 0.5) -> KittiResult:
    """Official 2D AP (R40 and 11-point) and the seed's metrics over a whole split.

    ground_truth[i]: every object of frame i (`KittiDataset.labels(i)`, DontCare included);
    detections[i]: that frame's detections (all scores: AP needs the low ones too).
    """
    if len(ground_truth) != len(detections):
        from qdet.errors import DataError

        raise DataError(f"{len(ground_truth)} ground-truth frames but {len(detections)} detection frames")
    ap_r40: dict[str, dict[str, float]] = {}
    ap_11: dict[str, dict[str, float]] = {}
    num_gt: dict[str, dict[str, int]] = {}
    for cls in classes:
        ap_r40[cls], ap_11[cls], num_gt[cls] = {}, {}, {}
        for level in Difficulty:
            key = level.name.capitalize()
            ap_r40[cls][key], ap_11[cls][key], num_gt[cls][key] = official_ap(ground_truth, detections, cls, level)
    s = seed_metrics(ground_truth, detections, classes=classes, score=seed_score, iou=seed_iou)
    return KittiResult(ap_r40, ap_11, num_gt, s["accuracy"], s["precision"], s["miou"],
                       {"gt": int(s["gt"]), "predictions": int(s["predictions"]), "tp": int(s["tp"])},
                       num_images=len(ground_truth))


def detections_from_outputs(output: Mapping[str, Any], class_names: Mapping[int, str], *,
                            min_score: float = 0.0) -> list[Detection]:
    """torchvision output {boxes, labels, scores} → Detections; labels missing from `class_names` are dropped."""
    boxes = np.asarray(output["boxes"], dtype=np.float64).reshape(-1, 4)
    labels = np.asarray(output["labels"]).reshape(-1)
    scores = np.asarray(output["scores"], dtype=np.float64).reshape(-1)
    out = []
    for b, lab, s in zip(boxes, labels, scores):
        name = class_names.get(int(lab))
        if name is not None and s >= min_score:
            out.append(Detection(name, (float(b[0]), float(b[1]), float(b[2]), float(b[3])), float(s)))
    return out

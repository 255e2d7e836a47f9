"""MOT metrics with MOT17's conventions: MOTA, IDF1, ID switches (motmetrics) and HOTA (TrackEval).

Both evaluators see the same per-frame data, prepared as the MOTChallenge devkit / TrackEval's
`MotChallenge2DBox` prepare it for MOT17:
* tracker boxes matched (Hungarian, IoU ≥ 0.5) to a gt box of a distractor class (2 person on
  vehicle, 7 static person, 8 distractor, 12 reflection) — or, with `min_visibility`, to a
  pedestrian less visible than that — are removed, so they count as neither FP nor TP;
* only pedestrians (class 1) with flag ≠ 0 are then evaluated; gt rows with flag 0
  ("zero-marked") and the other classes are ignored.
MOTA, IDF1, ID switches, FP, FN come from motmetrics (a gt–track pair matches at IoU ≥ 0.5); HOTA
(mean over IoU thresholds 0.05…0.95), DetA and AssA from TrackEval's `HOTA` metric when the
`trackeval` package is installed — otherwise `hota` is None and `hota_note` says why.
Percentages are on the 0–100 scale MOTChallenge publishes.

    >>> import numpy as np
    >>> gt = np.array([[1, 1, 0, 0, 10, 20, 1, 1, 1.0], [2, 1, 1, 0, 10, 20, 1, 1, 1.0]])
    >>> res = np.array([[1, 7, 0, 0, 10, 20, 0.9], [2, 7, 1, 0, 10, 20, 0.9]])
    >>> r = evaluate_mot({"seq": (gt, res)})
    >>> r.overall["mota_pct"], r.overall["idf1_pct"], r.overall["id_switches"]
    (100.0, 100.0, 0)
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from qdet.data.mot import DISTRACTOR_CLASSES, PEDESTRIAN
from qdet.errors import RuntimeUnavailable
from qdet.track.matching import iou_matrix

__all__ = ["MOTEvaluation", "evaluate_mot", "hota_available", "prepare_frame"]

MATCH_IOU = 0.5


def _xyxy(tlwh: np.ndarray) -> np.ndarray:
    return np.concatenate([tlwh[:, :2], tlwh[:, :2] + tlwh[:, 2:4]], axis=1)


def prepare_frame(gt: np.ndarray, res: np.ndarray, *, min_visibility: float = 0.0
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One frame's gt (r, 9) and result (k, ≥6) rows → (gt ids, gt boxes, track ids, track boxes), x1y1x2y2."""
    from scipy.optimize import linear_sum_assignment

    # all gt rows, zero-marked ones too, take part in the distractor matching (as in TrackEval)
    gt_boxes, res_boxes = _xyxy(gt[:, 2:6]), _xyxy(res[:, 2:6])
    cls, vis = gt[:, 7].astype(int), gt[:, 8]
    ignore_gt = np.isin(cls, DISTRACTOR_CLASSES) | ((cls == PEDESTRIAN) & (vis < min_visibility))
    keep_res = np.ones(len(res), dtype=bool)
    if len(gt) and len(res) and ignore_gt.any():
        sim = iou_matrix(gt_boxes, res_boxes)
        sim[sim < MATCH_IOU - 1e-9] = 0.0
        rows, cols = linear_sum_assignment(-sim)
        hit = (sim[rows, cols] > 0) & ignore_gt[rows]
        keep_res[cols[hit]] = False
    eval_gt = (cls == PEDESTRIAN) & ~ignore_gt & (gt[:, 6] != 0)  # zero-marked rows are not evaluated
    return (gt[eval_gt, 1].astype(int), gt_boxes[eval_gt], res[keep_res, 1].astype(int), res_boxes[keep_res])


def hota_available() -> bool:
    try:
        from trackeval.metrics import HOTA  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass
class MOTEvaluation:
    """Per-sequence and overall metrics (dicts of plain numbers: *_pct on 0–100, counts as int)."""

    sequences: dict[str, dict[str, Any]]
    overall: dict[str, Any]
    hota_note: str = ""
    meta: dict[str, Any] = field(default_factory=dict)


_MM_METRICS = {"mota": "mota_pct", "idf1": "idf1_pct", "motp": "motp_iou_dist", "precision": "precision_pct",
               "recall": "recall_pct", "num_switches": "id_switches", "num_false_positives": "fp",
               "num_misses": "fn", "num_objects": "gt_boxes", "num_unique_objects": "gt_ids",
               "mostly_tracked": "mostly_tracked", "mostly_lost": "mostly_lost",
               "num_fragmentations": "fragmentations"}


def _mm_row(row: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, name in _MM_METRICS.items():
        v = float(row[k])
        if name.endswith("_pct"):
            out[name] = round(100.0 * v, 4) if np.isfinite(v) else None
        elif name == "motp_iou_dist":
            out[name] = round(v, 4) if np.isfinite(v) else None
        else:
            out[name] = int(v)
    return out


def _hota_data(frames: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]) -> dict[str, Any]:
    """TrackEval's per-sequence input: ids relabelled 0..n-1 per sequence, IoU similarity per frame."""
    gt_u = np.unique(np.concatenate([f[0] for f in frames] + [np.zeros(0, int)]))
    tr_u = np.unique(np.concatenate([f[2] for f in frames] + [np.zeros(0, int)]))
    return {
        "num_timesteps": len(frames), "num_gt_ids": len(gt_u), "num_tracker_ids": len(tr_u),
        "num_gt_dets": sum(len(f[0]) for f in frames), "num_tracker_dets": sum(len(f[2]) for f in frames),
        "gt_ids": [np.searchsorted(gt_u, f[0]) for f in frames],
        "tracker_ids": [np.searchsorted(tr_u, f[2]) for f in frames],
        "similarity_scores": [iou_matrix(f[1], f[3]) for f in frames],
    }


def _hota_row(res: Mapping[str, Any]) -> dict[str, float]:
    return {"hota_pct": round(100 * float(np.mean(res["HOTA"])), 4),
            "deta_pct": round(100 * float(np.mean(res["DetA"])), 4),
            "assa_pct": round(100 * float(np.mean(res["AssA"])), 4)}


def evaluate_mot(pairs: Mapping[str, tuple[np.ndarray, np.ndarray]], *, min_visibility: float = 0.0,
                 hota: bool = True) -> MOTEvaluation:
    """{sequence name: (gt (R, 9), results (K, ≥6))} → per-sequence and overall (all frames pooled) metrics."""
    try:
        import motmetrics as mm
    except ImportError:
        raise RuntimeUnavailable("MOT evaluation needs motmetrics (pip install 'qdet[track]')") from None
    use_hota = hota and hota_available()
    note = "" if use_hota else ("HOTA not computed: motmetrics 1.4.0 has no HOTA and the trackeval package "
                                "is not installed (pip install trackeval)" if hota else "HOTA not requested")
    accs, names, hota_res = [], [], {}
    for name, (gt, res) in pairs.items():
        res = np.asarray(res, dtype=np.float64).reshape(-1, max(np.shape(res)[-1] if np.size(res) else 7, 6))
        gt = np.asarray(gt, dtype=np.float64).reshape(-1, 9)
        n_frames = int(max(gt[:, 0].max() if len(gt) else 0, res[:, 0].max() if len(res) else 0))
        acc = mm.MOTAccumulator(auto_id=False)
        frames = []
        for f in range(1, n_frames + 1):
            g_ids, g_boxes, t_ids, t_boxes = prepare_frame(gt[gt[:, 0] == f], res[res[:, 0] == f],
                                                           min_visibility=min_visibility)
            iou = iou_matrix(g_boxes, t_boxes)
            dist = np.where(iou >= MATCH_IOU, 1.0 - iou, np.nan)  # motmetrics: NaN = may not match
            acc.update(g_ids.tolist(), t_ids.tolist(), dist, frameid=f)
            frames.append((g_ids, g_boxes, t_ids, t_boxes))
        accs.append(acc)
        names.append(name)
        if use_hota:
            from trackeval.metrics import HOTA

            hota_res[name] = HOTA().eval_sequence(_hota_data(frames))
    mh = mm.metrics.create()
    summary = mh.compute_many(accs, names=names, metrics=list(_MM_METRICS), generate_overall=True)
    per_seq = {n: _mm_row(summary.loc[n]) for n in names}
    overall = _mm_row(summary.loc["OVERALL"])
    if use_hota:
        from trackeval.metrics import HOTA

        for n in names:
            per_seq[n].update(_hota_row(hota_res[n]))
        overall.update(_hota_row(HOTA().combine_sequences(hota_res)))
    else:
        for row in (*per_seq.values(), overall):
            row.update({"hota_pct": None, "deta_pct": None, "assa_pct": None})
    return MOTEvaluation(per_seq, overall, note, {"match_iou": MATCH_IOU, "min_visibility": min_visibility,
                                                   "evaluators": "motmetrics" + (" + trackeval HOTA" if use_hota else "")})

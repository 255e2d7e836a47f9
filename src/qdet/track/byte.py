"""BYTE (ByteTrack, Zhang et al. 2022): two-stage association of high- and low-score detections.

Per frame, as the published tracker does it:
1. detections split by score: high (> track_thresh) and low (low_thresh < s < track_thresh);
2. the pool = confirmed tracked tracks + lost tracks is Kalman-predicted, then matched to the high
   detections by IoU (cost 1 − IoU, fused with the detection score) under `match_thresh`;
3. the pool's still-unmatched *tracked* tracks are matched to the low detections (IoU cost, 0.5):
   an occluded, low-confidence person keeps its track. Tracked tracks unmatched after that turn lost;
4. unconfirmed tracks (started last frame) are matched to the remaining high detections (0.7);
   unmatched unconfirmed tracks are removed;
5. remaining high detections with score ≥ track_thresh + 0.1 start new tracks (confirmed at once
   only in the first frame); lost tracks older than `track_buffer` frames (at 30 fps) are removed,
   and a tracked/lost pair overlapping with IoU > 0.85 keeps only the older one.

The Kalman state of all tracks lives in two arrays (`(capacity, 8)`, `(capacity, 8, 8)`) indexed by
each track's slot, so every predict and update runs once per frame over all tracks involved.

    >>> import numpy as np
    >>> tracker = ByteTracker()
    >>> out = tracker.update(np.array([[10, 10, 50, 110.0]]), np.array([0.9]))
    >>> out.ids.tolist(), out.boxes.round().tolist()
    ([1], [[10.0, 10.0, 50.0, 110.0]])
    >>> out = tracker.update(np.array([[12, 10, 52, 110.0]]), np.array([0.3]))   # low score: stage 2 keeps it
    >>> out.ids.tolist()
    [1]
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import IntEnum

import numpy as np

from qdet.errors import ConfigError
from qdet.track.kalman import KalmanXYAH, tlbr_to_xyah, xyah_to_tlbr
from qdet.track.matching import fuse_score, iou_matrix, linear_assignment

__all__ = ["STAGES", "ByteTrackConfig", "ByteTracker", "FrameTracks", "Track", "TrackState"]

STAGES = ("predict", "first_association", "second_association", "kalman_update", "other", "total")


class TrackState(IntEnum):
    NEW = 0
    TRACKED = 1
    LOST = 2
    REMOVED = 3


@dataclass(frozen=True)
class ByteTrackConfig:
    """ByteTrack's defaults (its MOT17 settings). `min_box_area`/`aspect_ratio_thresh` filter only the
    output, as ByteTrack's evaluation script does (no box ≤ 10 px², none wider than 1.6 × its height)."""

    track_thresh: float = 0.5
    match_thresh: float = 0.8
    track_buffer: int = 30
    frame_rate: float = 30.0
    low_thresh: float = 0.1
    second_match_thresh: float = 0.5
    unconfirmed_match_thresh: float = 0.7
    fuse_score: bool = True  # ByteTrack fuses scores except on MOT20
    min_box_area: float = 10.0
    aspect_ratio_thresh: float | None = 1.6  # None: keep wide boxes (non-pedestrian classes)

    def __post_init__(self) -> None:
        for name in ("track_thresh", "match_thresh", "low_thresh", "second_match_thresh", "unconfirmed_match_thresh"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ConfigError(f"ByteTrackConfig.{name} must be in [0, 1], got {v}")
        if self.track_buffer < 0 or self.frame_rate <= 0:
            raise ConfigError(f"ByteTrackConfig: track_buffer >= 0 and frame_rate > 0 needed, got "
                              f"{self.track_buffer}, {self.frame_rate}")

    @property
    def new_track_thresh(self) -> float:
        return self.track_thresh + 0.1

    @property
    def max_time_lost(self) -> int:
        return int(self.frame_rate / 30.0 * self.track_buffer)


@dataclass(eq=False)
class Track:
    """Bookkeeping of one track; its Kalman state is row `slot` of the tracker's arrays."""

    slot: int
    track_id: int
    score: float
    frame_id: int  # last frame it was updated (ByteTrack's end_frame)
    start_frame: int
    state: TrackState = TrackState.TRACKED
    is_activated: bool = False
    tracklet_len: int = 0


@dataclass(frozen=True)
class FrameTracks:
    """The confirmed tracks after one frame: ids (K,), boxes (K, 4) x1 y1 x2 y2, scores (K,)."""

    ids: np.ndarray
    boxes: np.ndarray
    scores: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class ByteTracker:
    """Online ByteTrack over frames of (N, 4) x1 y1 x2 y2 boxes and (N,) scores (any detector)."""

    config: ByteTrackConfig = field(default_factory=ByteTrackConfig)
    kalman: KalmanXYAH = field(default_factory=KalmanXYAH)

    def __post_init__(self) -> None:
        self.frame_id = 0
        self.tracked: list[Track] = []  # confirmed and unconfirmed, state TRACKED
        self.lost: list[Track] = []
        self._next_id = 1
        self._mean = np.zeros((64, 8))
        self._cov = np.zeros((64, 8, 8))
        self._free = list(range(63, -1, -1))
        self.timings: dict[str, float] = dict.fromkeys(STAGES, 0.0)  # seconds, last frame

    # ---- Kalman state in slot arrays ----
    def _alloc(self, n: int) -> np.ndarray:
        while len(self._free) < n:
            cap = len(self._mean)
            self._mean = np.concatenate([self._mean, np.zeros_like(self._mean)])
            self._cov = np.concatenate([self._cov, np.zeros_like(self._cov)])
            self._free.extend(range(2 * cap - 1, cap - 1, -1))
        return np.array([self._free.pop() for _ in range(n)], dtype=np.int64)

    def boxes_of(self, tracks: list[Track]) -> np.ndarray:
        """(len(tracks), 4) x1 y1 x2 y2 of the tracks' current Kalman means."""
        if not tracks:
            return np.zeros((0, 4))
        return xyah_to_tlbr(self._mean[[t.slot for t in tracks]])

    def _kalman_update(self, tracks: list[Track], det_boxes: np.ndarray) -> None:
        t0 = time.perf_counter()
        if tracks:
            slots = [t.slot for t in tracks]
            self._mean[slots], self._cov[slots] = self.kalman.update(self._mean[slots], self._cov[slots],
                                                                     tlbr_to_xyah(det_boxes))
        self.timings["kalman_update"] += time.perf_counter() - t0

    def _apply_matches(self, tracks: list[Track], matches: np.ndarray, boxes: np.ndarray, scores: np.ndarray,
                       activated: list[Track], refound: list[Track]) -> None:
        """ByteTrack's update (tracked) / re_activate (lost) for every matched pair, one batched update."""
        matched = [tracks[i] for i in matches[:, 0]]
        self._kalman_update(matched, boxes[matches[:, 1]])
        for t, d in zip(matched, matches[:, 1]):
            t.tracklet_len = t.tracklet_len + 1 if t.state == TrackState.TRACKED else 0
            (activated if t.state == TrackState.TRACKED else refound).append(t)
            t.state, t.is_activated, t.frame_id, t.score = TrackState.TRACKED, True, self.frame_id, float(scores[d])

    def _cost(self, tracks: list[Track], boxes: np.ndarray, scores: np.ndarray, *, fuse: bool) -> np.ndarray:
        cost = 1.0 - iou_matrix(self.boxes_of(tracks), boxes)
        return fuse_score(cost, scores) if fuse else cost

    # ---- one frame ----
    def update(self, boxes: np.ndarray, scores: np.ndarray) -> FrameTracks:
        """Advance one frame with this frame's detections; returns the confirmed tracks."""
        cfg, t_start = self.config, time.perf_counter()
        self.timings = dict.fromkeys(STAGES, 0.0)
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        scores = np.asarray(scores, dtype=np.float64).reshape(-1)
        if len(boxes) != len(scores):
            raise ConfigError(f"ByteTracker.update: {len(boxes)} boxes but {len(scores)} scores")
        # degenerate boxes (zero size after clipping at the frame edge, NaN) would give an infinite aspect
        ok = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1]) & np.isfinite(boxes).all(1) & np.isfinite(scores)
        boxes, scores = boxes[ok], scores[ok]
        self.frame_id += 1
        high = scores > cfg.track_thresh
        low = (scores > cfg.low_thresh) & (scores < cfg.track_thresh)
        hb, hs, lb, ls = boxes[high], scores[high], boxes[low], scores[low]
        activated: list[Track] = []
        refound: list[Track] = []
        newly_lost: list[Track] = []
        removed: list[Track] = []
        unconfirmed = [t for t in self.tracked if not t.is_activated]
        pool = [t for t in self.tracked if t.is_activated] + self.lost

        t0 = time.perf_counter()  # Kalman predict of the pool; lost tracks' height velocity zeroed first
        if pool:
            slots = np.array([t.slot for t in pool])
            mean = self._mean[slots]
            mean[[t.state != TrackState.TRACKED for t in pool], 7] = 0.0
            self._mean[slots], self._cov[slots] = self.kalman.predict(mean, self._cov[slots])
        t1 = time.perf_counter()
        self.timings["predict"] = t1 - t0

        # first association: high-score detections vs tracked + lost
        matches, u_pool, u_high = linear_assignment(self._cost(pool, hb, hs, fuse=cfg.fuse_score), cfg.match_thresh)
        self._apply_matches(pool, matches, hb, hs, activated, refound)
        t2 = time.perf_counter()
        self.timings["first_association"] = t2 - t1

        # second association: low-score detections vs the still-unmatched tracked tracks (plain IoU)
        remaining = [pool[i] for i in u_pool if pool[i].state == TrackState.TRACKED]
        matches, u_rem, _ = linear_assignment(self._cost(remaining, lb, ls, fuse=False), cfg.second_match_thresh)
        self._apply_matches(remaining, matches, lb, ls, activated, refound)
        for i in u_rem:
            remaining[i].state = TrackState.LOST
            newly_lost.append(remaining[i])
        t3 = time.perf_counter()
        self.timings["second_association"] = t3 - t2

        # unconfirmed tracks vs the remaining high detections; unmatched unconfirmed tracks are removed
        hb, hs = hb[u_high], hs[u_high]
        matches, u_unc, u_new = linear_assignment(self._cost(unconfirmed, hb, hs, fuse=cfg.fuse_score),
                                                  cfg.unconfirmed_match_thresh)
        self._apply_matches(unconfirmed, matches, hb, hs, activated, [])
        for i in u_unc:
            unconfirmed[i].state = TrackState.REMOVED
            removed.append(unconfirmed[i])

        # new tracks from the remaining confident high detections
        new = u_new[hs[u_new] >= cfg.new_track_thresh]
        if len(new):
            tk = time.perf_counter()
            slots = self._alloc(len(new))
            self._mean[slots], self._cov[slots] = self.kalman.initiate(tlbr_to_xyah(hb[new]))
            self.timings["kalman_update"] += time.perf_counter() - tk
            for s, d in zip(slots, new):
                activated.append(Track(int(s), self._next_id, float(hs[d]), self.frame_id, self.frame_id,
                                       is_activated=self.frame_id == 1))
                self._next_id += 1

        for t in self.lost:
            if self.frame_id - t.frame_id > cfg.max_time_lost:
                t.state = TrackState.REMOVED
                removed.append(t)
        self._merge(activated, refound, newly_lost, removed)
        t_end = time.perf_counter()
        self.timings["total"] = t_end - t_start
        self.timings["other"] = t_end - t3
        return self._output()

    def _merge(self, activated: list[Track], refound: list[Track], newly_lost: list[Track],
               removed: list[Track]) -> None:
        """ByteTrack's list bookkeeping (joint / sub / remove_duplicate_stracks), then free dead slots."""
        tracked = _joint(_joint([t for t in self.tracked if t.state == TrackState.TRACKED], activated), refound)
        tracked_ids = {t.track_id for t in tracked}
        removed_ids = {t.track_id for t in removed}
        lost = [t for t in self.lost if t.track_id not in tracked_ids] + newly_lost
        lost = [t for t in lost if t.track_id not in removed_ids]
        # a tracked/lost pair at IoU > 0.85: the one tracked for the shorter time goes
        close = np.argwhere(1.0 - iou_matrix(self.boxes_of(tracked), self.boxes_of(lost)) < 0.15)
        drop_t, drop_l = set(), set()
        for p, q in close:
            if tracked[p].frame_id - tracked[p].start_frame > lost[q].frame_id - lost[q].start_frame:
                drop_l.add(q)
            else:
                drop_t.add(p)
        self.tracked = [t for i, t in enumerate(tracked) if i not in drop_t]
        self.lost = [t for i, t in enumerate(lost) if i not in drop_l]
        live = {t.slot for t in self.tracked} | {t.slot for t in self.lost}
        for t in (*removed, *(tracked[i] for i in drop_t), *(lost[i] for i in drop_l)):
            if t.slot not in live and t.slot >= 0:
                self._free.append(t.slot)
                t.slot = -1

    def _output(self) -> FrameTracks:
        out = [t for t in self.tracked if t.is_activated]
        boxes = self.boxes_of(out)
        w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
        keep = w * h > self.config.min_box_area
        if self.config.aspect_ratio_thresh is not None:
            keep &= w / np.where(h > 0, h, 1e-12) <= self.config.aspect_ratio_thresh
        return FrameTracks(np.array([t.track_id for t in out], dtype=np.int64)[keep], boxes[keep],
                           np.array([t.score for t in out])[keep])

    @property
    def active_tracks(self) -> int:
        """Tracked + lost tracks held now (the number the association cost grows with)."""
        return len(self.tracked) + len(self.lost)


def _joint(a: list[Track], b: list[Track]) -> list[Track]:
    """a, then the tracks of b whose id is not yet in (ByteTrack's joint_stracks)."""
    out, seen = list(a), {t.track_id for t in a}
    for t in b:
        if t.track_id not in seen:
            seen.add(t.track_id)
            out.append(t)
    return out

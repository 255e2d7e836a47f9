"""Run any detector + ByteTrack over a MOTChallenge sequence, timing each part.

`detect` is any callable from an RGB uint8 (H, W, 3) frame to (boxes (n, 4) x1 y1 x2 y2, scores (n,)).

    >>> import numpy as np
    >>> from qdet.track.run import track_frames
    >>> frames = [np.zeros((48, 64, 3), np.uint8)] * 3
    >>> detect = lambda img: (np.array([[10.0, 10, 30, 40]]), np.array([0.9]))
    >>> run = track_frames(detect, frames, name="toy", progress=False)
    >>> run.rows[:, :2].tolist()                # frame, track id
    [[1.0, 1.0], [2.0, 1.0], [3.0, 1.0]]
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np

from qdet.data.mot import MOTSequence
from qdet.track.byte import ByteTrackConfig, ByteTracker, FrameTracks

__all__ = ["Detect", "SequenceRun", "track_frames", "track_sequence"]

Detect = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


@dataclass
class SequenceRun:
    """Tracker output of one sequence as MOTChallenge rows (K, 7): frame, id, left, top, w, h, score;
    seconds spent reading frames, detecting and tracking; the per-frame tracks when kept."""

    name: str
    rows: np.ndarray
    frames: int
    seconds: dict[str, float]
    tracks: list[FrameTracks] = field(default_factory=list)
    max_active_tracks: int = 0

    @property
    def fps(self) -> float:
        """End to end: frame decode + detector (pre/post-processing included) + tracker."""
        total = sum(self.seconds.values())
        return self.frames / total if total > 0 else float("nan")

    def ms_per_frame(self, part: str) -> float:
        return 1000.0 * self.seconds[part] / max(self.frames, 1)


def track_frames(detect: Detect, frames: Iterable[np.ndarray], *, name: str = "", config: ByteTrackConfig | None = None,
                 keep_tracks: bool = False, progress: bool = True, desc: str | None = None,
                 total: int | None = None) -> SequenceRun:
    """Detect and track frame by frame (frames numbered from 1)."""
    from tqdm import tqdm

    tracker = ByteTracker(config or ByteTrackConfig())
    seconds = {"read": 0.0, "detect": 0.0, "track": 0.0}
    rows, kept, max_active, n = [], [], 0, 0
    it = iter(frames)
    bar = tqdm(total=total, desc=desc or f"{name}: tracking (frames)", disable=not progress, leave=False)
    while True:
        t0 = time.perf_counter()
        try:
            image = next(it)
        except StopIteration:
            break
        t1 = time.perf_counter()
        boxes, scores = detect(image)
        t2 = time.perf_counter()
        out = tracker.update(boxes, scores)
        t3 = time.perf_counter()
        seconds["read"] += t1 - t0
        seconds["detect"] += t2 - t1
        seconds["track"] += t3 - t2
        n += 1
        max_active = max(max_active, tracker.active_tracks)
        if len(out):
            b = out.boxes
            rows.append(np.column_stack([np.full(len(out), n), out.ids, b[:, 0], b[:, 1], b[:, 2] - b[:, 0],
                                         b[:, 3] - b[:, 1], out.scores]))
        if keep_tracks:
            kept.append(out)
        bar.update(1)
    bar.close()
    table = np.concatenate(rows) if rows else np.zeros((0, 7))
    return SequenceRun(name, table, n, seconds, kept, max_active)


def track_sequence(detect: Detect, seq: MOTSequence, config: ByteTrackConfig | None = None, *,
                   max_frames: int | None = None, keep_tracks: bool = False, progress: bool = True,
                   desc: str | None = None) -> SequenceRun:
    """`track_frames` over `seq`'s frames, the tracker at the sequence's frame rate."""
    from qdet.data.coco import load_image

    cfg = dataclasses.replace(config or ByteTrackConfig(), frame_rate=seq.frame_rate)
    n = seq.seq_length if max_frames is None else min(max_frames, seq.seq_length)
    frames = (load_image(seq.frame_path(f)) for f in range(1, n + 1))
    return track_frames(detect, frames, name=seq.name, config=cfg, keep_tracks=keep_tracks, progress=progress,
                        desc=desc, total=n)

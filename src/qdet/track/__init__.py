"""Multi-object tracking: ByteTrack (vectorised Kalman filter, BYTE association) and its driver.

    >>> from qdet.track import ByteTracker, ByteTrackConfig
    >>> ByteTracker(ByteTrackConfig(track_buffer=60)).config.max_time_lost
    60
"""
from qdet.track.byte import (
           STAGES,
           ByteTrackConfig,
           ByteTracker,
           FrameTracks,
           Track,
           TrackState,
)
from qdet.track.kalman import KalmanXYAH, tlbr_to_xyah, xyah_to_tlbr
from qdet.track.matching import (
           assignment_backend,
           fuse_score,
           iou_matrix,
           linear_assignment,
)

__all__ = [
           "STAGES",
           "ByteTrackConfig",
           "ByteTracker",
           "FrameTracks",
           "KalmanXYAH",
           "Track",
           "TrackState",
           "assignment_backend",
           "fuse_score",
           "iou_matrix",
           "linear_assignment",
           "tlbr_to_xyah",
           "xyah_to_tlbr",
]

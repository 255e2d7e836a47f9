"""IoU matrices (vectorised numpy) and thresholded linear assignment (`lap`, else scipy).

`linear_assignment(cost, thresh)` solves what ByteTrack's `lap.lapjv(cost, extend_cost=True,
cost_limit=thresh)` solves: a minimum-cost matching in which a pair costing more than `thresh` is
never taken and leaving a row or a column unmatched costs thresh / 2. Without `lap` the same
extended problem goes to `scipy.optimize.linear_sum_assignment`, so both give the same matching
(up to ties).

    >>> import numpy as np
    >>> a = np.array([[0, 0, 10, 10], [20, 20, 30, 30]], float)
    >>> b = np.array([[21, 21, 31, 31], [0, 0, 10, 10]], float)
    >>> iou_matrix(a, b).round(2).tolist()
    [[0.0, 1.0], [0.68, 0.0]]
    >>> m, ua, ub = linear_assignment(1 - iou_matrix(a, b), 0.8)
    >>> m.tolist(), ua.tolist(), ub.tolist()
    ([[0, 1], [1, 0]], [], [])
"""
from __future__ import annotations

import numpy as np

__all__ = ["assignment_backend", "fuse_score", "iou_matrix", "linear_assignment"]


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, 4) × (M, 4) x1 y1 x2 y2 boxes → (N, M) IoU; empty inputs give an empty matrix."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)))
    iw = np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0])
    ih = np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1])
    inter = np.clip(iw, 0, None) * np.clip(ih, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def fuse_score(cost: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """ByteTrack's `fuse_score`: IoU similarity times the detection score, back to a cost."""
    if cost.size == 0:
        return cost
    return 1.0 - (1.0 - cost) * np.asarray(scores, dtype=np.float64)[None, :]


def assignment_backend() -> str:
    """"lap" when the `lap` package imports (ByteTrack's own solver), else "scipy"."""
    try:
        import lap  # noqa: F401
    except ImportError:
        return "scipy"
    return "lap"


def _scipy_extended(cost: np.ndarray, thresh: float) -> np.ndarray:
    # lapjv's extend_cost/cost_limit construction: (n+m)² matrix, dummy pairs cost thresh / 2
    from scipy.optimize import linear_sum_assignment

    n, m = cost.shape
    big = 1e9
    ext = np.full((n + m, n + m), big)
    ext[:n, :m] = np.where(cost > thresh, big, cost)
    ext[np.arange(n), m + np.arange(n)] = thresh / 2  # row i left unmatched
    ext[n + np.arange(m), np.arange(m)] = thresh / 2  # column j left unmatched
    ext[n:, m:] = 0.0
    rows, cols = linear_sum_assignment(ext)
    x = np.full(n, -1, dtype=np.int64)
    keep = (rows < n) & (cols < m)
    x[rows[keep]] = cols[keep]
    return x


def linear_assignment(cost: np.ndarray, thresh: float, *, backend: str | None = None
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Matches (K, 2) [row, col], unmatched rows, unmatched columns of a thresholded assignment."""
    cost = np.asarray(cost, dtype=np.float64)
    n, m = cost.shape
    if n == 0 or m == 0:
        return np.empty((0, 2), dtype=np.int64), np.arange(n), np.arange(m)
    if (backend or assignment_backend()) == "lap":
        import lap

        _, x, _ = lap.lapjv(cost, extend_cost=True, cost_limit=thresh)
        x = np.asarray(x, dtype=np.int64)
    else:
        x = _scipy_extended(cost, thresh)
    rows = np.flatnonzero(x >= 0)
    matches = np.stack([rows, x[rows]], axis=1)
    matched_cols = np.zeros(m, dtype=bool)
    matched_cols[x[rows]] = True
    return matches, np.flatnonzero(x < 0), np.flatnonzero(~matched_cols)

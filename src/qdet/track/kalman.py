"""ByteTrack's Kalman filter, vectorised over tracks: state (cx, cy, a, h, vcx, vcy, va, vh).

Constant velocity (one frame = one time step); the noise is ByteTrack's (Zhang et al. 2022, after
DeepSORT): standard deviations proportional to the box height h, `std_weight_position` 1/20 and
`std_weight_velocity` 1/160, with fixed small terms for the aspect ratio a = w / h. Every function
takes N tracks at once — means (N, 8), covariances (N, 8, 8) — and loops over none of them.

    >>> import numpy as np
    >>> kf = KalmanXYAH()
    >>> mean, cov = kf.initiate(np.array([[50.0, 60.0, 0.5, 100.0]]))
    >>> mean.shape, cov.shape, float(cov[0, 0, 0])   # (2 * h / 20)^2 = 100
    ((1, 8), (1, 8, 8), 100.0)
    >>> mean, cov = kf.predict(mean, cov)
    >>> mean, cov = kf.update(mean, cov, np.array([[52.0, 60.0, 0.5, 100.0]]))
    >>> bool(50.0 < mean[0, 0] < 52.0)
    True
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["KalmanXYAH", "tlbr_to_xyah", "xyah_to_tlbr"]


def tlbr_to_xyah(boxes: np.ndarray) -> np.ndarray:
    """(N, 4) x1 y1 x2 y2 → (N, 4) centre x, centre y, aspect w / h, height."""
    b = np.asarray(boxes, dtype=np.float64)
    w, h = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
    return np.stack([b[:, 0] + w / 2, b[:, 1] + h / 2, w / h, h], axis=1)


def xyah_to_tlbr(xyah: np.ndarray) -> np.ndarray:
    """(N, ≥4) cx cy a h … → (N, 4) x1 y1 x2 y2."""
    cx, cy, a, h = (xyah[:, i] for i in range(4))
    w = a * h
    return np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)


@dataclass(frozen=True)
class KalmanXYAH:
    """The filter's constants; its state lives in the caller's arrays."""

    std_weight_position: float = 1.0 / 20
    std_weight_velocity: float = 1.0 / 160

    def _std(self, h: np.ndarray, pos: float, a_term: float, *, scale: float = 1.0) -> np.ndarray:
        # (N, 4) standard deviations (h·w, h·w, a_term, h·w) with w = pos·scale
        s = scale * pos * h
        return np.stack([s, s, np.full_like(h, a_term), s], axis=1)

    def initiate(self, xyah: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """New tracks from (N, 4) measurements: zero velocity, ByteTrack's initial uncertainty."""
        z = np.asarray(xyah, dtype=np.float64)
        n, h = len(z), z[:, 3]
        mean = np.concatenate([z, np.zeros((n, 4))], axis=1)
        std = np.concatenate([self._std(h, self.std_weight_position, 1e-2, scale=2.0),
                              self._std(h, self.std_weight_velocity, 1e-5, scale=10.0)], axis=1)
        cov = np.zeros((n, 8, 8))
        idx = np.arange(8)
        cov[:, idx, idx] = std**2
        return mean, cov

    def predict(self, mean: np.ndarray, cov: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One constant-velocity step for (N, 8) means and (N, 8, 8) covariances (new arrays)."""
        h = mean[:, 3]
        std = np.concatenate([self._std(h, self.std_weight_position, 1e-2),
                              self._std(h, self.std_weight_velocity, 1e-5)], axis=1)  # (N, 8)
        new_mean = mean.copy()
        new_mean[:, :4] += mean[:, 4:]
        # F P Fᵀ with F = [[I, I], [0, I]]: F P adds the velocity rows to the position rows, (F P) Fᵀ
        # the velocity columns to the position columns (faster than batched 8×8 matmuls)
        new_cov = cov.copy()
        new_cov[:, :4, :] += cov[:, 4:, :]
        new_cov[:, :, :4] += new_cov[:, :, 4:]
        idx = np.arange(8)
        new_cov[:, idx, idx] += std**2
        return new_mean, new_cov

    def project(self, mean: np.ndarray, cov: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Measurement space: H x and H P Hᵀ + R, (N, 4) and (N, 4, 4)."""
        std = self._std(mean[:, 3], self.std_weight_position, 1e-1)
        s = cov[:, :4, :4].copy()
        idx = np.arange(4)
        s[:, idx, idx] += std**2
        return mean[:, :4].copy(), s

    def update(self, mean: np.ndarray, cov: np.ndarray, xyah: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Correct N predicted states with N (N, 4) measurements (row i with row i)."""
        z = np.asarray(xyah, dtype=np.float64)
        proj_mean, s = self.project(mean, cov)
        pht = cov[:, :, :4]  # P Hᵀ, (N, 8, 4)
        idx = np.arange(4)
        diag = s[:, idx, idx]  # (N, 4)
        if np.count_nonzero(s) == np.count_nonzero(diag):
            # S diagonal — always so under ByteTrack's model (diagonal noise, each coordinate coupled
            # only to its own velocity): S⁻¹ is 1 / diag, exactly, and no per-track LAPACK call is needed
            gain = pht / diag[:, None, :]
        else:  # K = P Hᵀ S⁻¹  ⇔  S Kᵀ = (P Hᵀ)ᵀ  (S symmetric positive definite)
            gain = np.linalg.solve(s, pht.transpose(0, 2, 1)).transpose(0, 2, 1)  # (N, 8, 4)
        innovation = z - proj_mean  # (N, 4)
        new_mean = mean + np.einsum("nij,nj->ni", gain, innovation)
        new_cov = cov - pht @ gain.transpose(0, 2, 1)  # K S Kᵀ = P Hᵀ Kᵀ
        return new_mean, new_cov

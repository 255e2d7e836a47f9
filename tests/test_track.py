"""ByteTrack: Kalman filter against hand-computed values, BYTE association, assignment backends."""
from __future__ import annotations

import doctest

import numpy as np
import pytest

from qdet.errors import ConfigError
from qdet.track import (
    ByteTrackConfig,
    ByteTracker,
    KalmanXYAH,
    byte,
    iou_matrix,
    kalman,
    linear_assignment,
    matching,
    run,
    tlbr_to_xyah,
)


@pytest.mark.parametrize("module", [kalman, matching, byte, run])
def test_docstring_examples(module):
    assert doctest.testmod(module).failed == 0


def test_kalman_initiate_predict_update_hand_computed():
    kf = KalmanXYAH()
    mean, cov = kf.initiate(np.array([[100.0, 200.0, 0.5, 80.0]]))
    # initial std: position 2·h/20 = 8, aspect 1e-2, velocity 10·h/160 = 5, aspect velocity 1e-5
    np.testing.assert_allclose(np.diag(cov[0]), [64, 64, 1e-4, 64, 25, 25, 1e-10, 25])
    mean, cov = kf.predict(mean, cov)
    # P' = F P Fᵀ + Q, Q std: h/20 = 4 (16), 1e-2, h/160 = 0.5 (0.25), 1e-5
    assert cov[0, 0, 0] == pytest.approx(64 + 25 + 16)
    assert cov[0, 0, 4] == pytest.approx(25) and cov[0, 4, 0] == pytest.approx(25)
    assert cov[0, 4, 4] == pytest.approx(25.25)
    assert cov[0, 2, 2] == pytest.approx(2e-4 + 1e-10)
    np.testing.assert_allclose(mean[0], [100, 200, 0.5, 80, 0, 0, 0, 0])
    mean, cov = kf.update(mean, cov, np.array([[110.0, 200.0, 0.5, 80.0]]))
    # S = 105 + R (std h/20 = 4 → 16) = 121; gain 105/121 on cx, 25/121 on vx
    assert mean[0, 0] == pytest.approx(100 + 10 * 105 / 121)
    assert mean[0, 4] == pytest.approx(10 * 25 / 121)
    assert cov[0, 0, 0] == pytest.approx(105 * 16 / 121)
    assert cov[0, 0, 4] == pytest.approx(25 * 16 / 121)
    assert cov[0, 4, 4] == pytest.approx(25.25 - 625 / 121)
    np.testing.assert_allclose(mean[0, [1, 2, 3, 5, 6, 7]], [200, 0.5, 80, 0, 0, 0], atol=1e-12)
    # next predict moves by the estimated velocity
    mean2, _ = kf.predict(mean, cov)
    assert mean2[0, 0] == pytest.approx(mean[0, 0] + mean[0, 4])


def test_kalman_batched_equals_one_by_one():
    rng = np.random.default_rng(0)
    kf = KalmanXYAH()
    z = np.column_stack([rng.uniform(0, 500, 20), rng.uniform(0, 500, 20), rng.uniform(0.3, 1, 20),
                         rng.uniform(20, 200, 20)])
    mean, cov = kf.predict(*kf.initiate(z))
    z2 = z + rng.normal(0, 2, z.shape)
    m_all, c_all = kf.update(mean, cov, z2)
    for i in range(20):
        m_i, c_i = kf.update(mean[i:i + 1], cov[i:i + 1], z2[i:i + 1])
        np.testing.assert_allclose(m_all[i], m_i[0])
        np.testing.assert_allclose(c_all[i], c_i[0])


def test_iou_matrix_hand_values():
    a = np.array([[0, 0, 10, 10], [5, 5, 15, 15]], float)
    b = np.array([[0, 0, 10, 10], [0, 0, 5, 5], [100, 100, 110, 110]], float)
    np.testing.assert_allclose(iou_matrix(a, b), [[1, 0.25, 0], [25 / 175, 0, 0]])
    assert iou_matrix(a, np.zeros((0, 4))).shape == (2, 0)


def test_lap_and_scipy_give_the_same_matching():
    pytest.importorskip("lap")
    rng = np.random.default_rng(1)
    for _ in range(30):
        cost = rng.uniform(0, 1, (rng.integers(1, 12), rng.integers(1, 12)))
        m_lap, ur_lap, uc_lap = linear_assignment(cost, 0.6, backend="lap")
        m_sp, ur_sp, uc_sp = linear_assignment(cost, 0.6, backend="scipy")
        assert sorted(map(tuple, m_lap.tolist())) == sorted(map(tuple, m_sp.tolist()))
        assert ur_lap.tolist() == ur_sp.tolist() and uc_lap.tolist() == uc_sp.tolist()
        assert all(cost[r, c] <= 0.6 for r, c in m_lap)


def _run(cfg, frames):
    tracker = ByteTracker(cfg)
    return [tracker.update(np.array(b, float).reshape(-1, 4), np.array(s, float)) for b, s in frames]


def test_second_stage_keeps_a_track_through_low_scores():
    # a person walks right; for 5 frames the detector is unsure (score 0.3, e.g. occluded)
    scores = [0.9, 0.9, 0.3, 0.3, 0.3, 0.3, 0.3, 0.9, 0.9]
    frames = [([[10 + 3 * i, 10, 50 + 3 * i, 110]], [s]) for i, s in enumerate(scores)]
    byte_cfg = ByteTrackConfig(track_buffer=2)
    # one-stage matching: no detection below track_thresh is ever used (ByteTrack without BYTE)
    one_stage = ByteTrackConfig(track_buffer=2, low_thresh=0.5)
    out_byte, out_one = _run(byte_cfg, frames), _run(one_stage, frames)
    assert [o.ids.tolist() for o in out_byte] == [[1]] * len(frames)
    # one stage: lost in the low-score frames, removed after track_buffer, a new id (unconfirmed first)
    assert [o.ids.tolist() for o in out_one] == [[1], [1], [], [], [], [], [], [], [2]]


def test_two_walkers_keep_their_ids_and_new_tracks_need_confirmation():
    frames = []
    for i in range(12):
        boxes = [[10 + 4 * i, 10, 50 + 4 * i, 110], [300 - 4 * i, 20, 340 - 4 * i, 120]]
        scores = [0.9, 0.8]
        if i >= 5:  # a third person appears in frame 6
            boxes.append([150, 200, 190, 300])
            scores.append(0.95)
        frames.append((boxes, scores))
    out = _run(ByteTrackConfig(), frames)
    assert out[0].ids.tolist() == [1, 2]
    assert all(o.ids.tolist()[:2] == [1, 2] for o in out)
    assert out[5].ids.tolist() == [1, 2]  # the new track is unconfirmed in the frame it appears
    assert out[6].ids.tolist() == [1, 2, 3]
    np.testing.assert_allclose(out[-1].boxes[0], [54, 10, 94, 110], atol=1.0)  # follows the motion


def test_lost_track_is_removed_after_track_buffer_and_can_be_refound_before():
    det = ([[10, 10, 50, 110]], [0.9])
    gap = lambda n: [(np.zeros((0, 4)), [])] * n
    cfg = ByteTrackConfig(track_buffer=3)
    refound = _run(cfg, [det, det, *gap(3), det])
    assert refound[-1].ids.tolist() == [1]
    too_late = _run(cfg, [det, det, *gap(4), det, det])
    assert too_late[-2].ids.tolist() == [] and too_late[-1].ids.tolist() == [2]


def test_output_filters_tiny_and_wide_boxes():
    out = _run(ByteTrackConfig(), [([[0, 0, 3, 3], [0, 0, 100, 40], [200, 0, 240, 100]], [0.9, 0.9, 0.9])])
    assert out[0].ids.tolist() == [3]
    wide_ok = _run(ByteTrackConfig(aspect_ratio_thresh=None), [([[0, 0, 100, 40]], [0.9])])
    assert len(wide_ok[0]) == 1


def test_slots_are_reused_and_timings_recorded():
    tracker = ByteTracker(ByteTrackConfig(track_buffer=0))
    for i in range(200):  # every frame a new, far-away box: tracks come and go
        tracker.update(np.array([[10 * (i % 50), 0, 10 * (i % 50) + 8, 20.0]]) + 1000 * (i % 2), np.array([0.9]))
    assert len(tracker._mean) == 64  # never grew: dead tracks free their slots
    assert set(tracker.timings) == set(byte.STAGES) and tracker.timings["total"] > 0


def test_bad_config_and_inputs():
    with pytest.raises(ConfigError, match="track_thresh"):
        ByteTrackConfig(track_thresh=1.5)
    with pytest.raises(ConfigError, match="2 boxes but 1 scores"):
        ByteTracker().update(np.zeros((2, 4)), np.zeros(1))


def test_tlbr_xyah_roundtrip():
    b = np.array([[10, 20, 50, 120.0]])
    np.testing.assert_allclose(tlbr_to_xyah(b), [[30, 70, 0.4, 100]])
    np.testing.assert_allclose(kalman.xyah_to_tlbr(tlbr_to_xyah(b)), b)


def test_kalman_general_covariance_matches_textbook_formulas():
    # a covariance with cross terms between coordinates (not ByteTrack's block structure): the
    # general solve path must give x + K (z − H x), P − K S Kᵀ with K = P Hᵀ S⁻¹, and F P Fᵀ + Q
    rng = np.random.default_rng(2)
    kf = KalmanXYAH()
    a = rng.normal(size=(3, 8, 8))
    cov = a @ a.transpose(0, 2, 1) + 8 * np.eye(8)
    mean = np.column_stack([rng.uniform(50, 100, (3, 2)), rng.uniform(0.3, 1, 3), rng.uniform(50, 100, 3),
                            rng.normal(size=(3, 4))])
    z = mean[:, :4] + rng.normal(size=(3, 4))
    new_mean, new_cov = kf.update(mean, cov, z)
    F = np.eye(8)
    F[:4, 4:] = np.eye(4)
    p_mean, p_cov = kf.predict(mean, cov)
    for i in range(3):
        h = mean[i, 3]
        R = np.diag([(h / 20) ** 2, (h / 20) ** 2, 1e-2, (h / 20) ** 2])
        S = cov[i, :4, :4] + R
        K = cov[i, :, :4] @ np.linalg.inv(S)
        np.testing.assert_allclose(new_mean[i], mean[i] + K @ (z[i] - mean[i, :4]))
        np.testing.assert_allclose(new_cov[i], cov[i] - K @ S @ K.T, atol=1e-9)
        Q = np.diag([(h / 20) ** 2, (h / 20) ** 2, 1e-4, (h / 20) ** 2, (h / 160) ** 2, (h / 160) ** 2, 1e-10,
                     (h / 160) ** 2])
        np.testing.assert_allclose(p_cov[i], F @ cov[i] @ F.T + Q)
        np.testing.assert_allclose(p_mean[i], F @ mean[i])


def test_degenerate_detections_are_ignored():
    boxes = np.array([[10, 10, 10, 50], [0, 0, 20, 0], [np.nan, 0, 5, 5], [10, 10, 50, 110]], float)
    out = ByteTracker().update(boxes, np.array([0.9, 0.9, 0.9, 0.9]))
    assert out.ids.tolist() == [1] and np.isfinite(out.boxes).all()


def test_tracker_gives_the_same_tracks_with_lap_and_scipy(monkeypatch):
    pytest.importorskip("lap")
    rng = np.random.default_rng(5)
    xy = rng.uniform(0, 500, (30, 2))
    v = rng.uniform(-4, 4, (30, 2))
    frames = []
    for f in range(40):  # 30 crossing walkers, noisy boxes, mixed scores, some missed
        p = xy + f * v
        boxes = np.column_stack([p, p + [30, 80]]) + rng.normal(0, 1.5, (30, 4))
        scores = rng.choice([0.9, 0.7, 0.3], 30)
        keep = rng.uniform(size=30) > 0.1
        frames.append((boxes[keep], scores[keep]))

    def ids(backend):
        monkeypatch.setattr(matching, "assignment_backend", lambda: backend)
        return [o.ids.tolist() for o in _run(ByteTrackConfig(), frames)]

    with_lap, with_scipy = ids("lap"), ids("scipy")
    assert with_lap == with_scipy and sum(map(len, with_lap)) > 800

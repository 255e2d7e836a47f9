"""SYNTHETIC camera sequences over COCO stills: windows, box transforms, MOTChallenge output."""
from __future__ import annotations

import numpy as np
import pytest
from conftest import require_asset

from qdet.data.mot import check_frames, read_sequences
from qdet.data.mot_synth import (
    SYNTHETIC_NOTE,
    CameraConfig,
    build_sequences,
    camera_windows,
    transform_boxes,
)
from qdet.errors import ConfigError


def test_windows_stay_inside_the_image_with_the_output_aspect():
    cam = CameraConfig(width=320, height=180, frames=50)
    win = camera_windows(640, 480, cam, np.random.default_rng(0))
    assert win.shape == (50, 4)
    assert (win[:, 0] >= -1e-9).all() and (win[:, 2] <= 640 + 1e-9).all()
    assert (win[:, 1] >= -1e-9).all() and (win[:, 3] <= 480 + 1e-9).all()
    np.testing.assert_allclose((win[:, 2] - win[:, 0]) / (win[:, 3] - win[:, 1]), 320 / 180)
    zoom = 640 / (win[:, 2] - win[:, 0])
    assert zoom.min() >= cam.zoom_min - 1e-9 and zoom.max() <= cam.zoom_max + 1e-9
    again = camera_windows(640, 480, cam, np.random.default_rng(0))
    np.testing.assert_array_equal(win, again)  # seeded


def test_transform_boxes_scales_shifts_and_clips():
    cam = CameraConfig(width=200, height=100)
    window = np.array([100.0, 50.0, 300.0, 150.0])  # 200×100 window: scale 1
    tlwh, vis = transform_boxes(np.array([[110.0, 60, 20, 40], [280, 60, 40, 20], [0, 0, 10, 10]]), window, cam)
    np.testing.assert_allclose(tlwh[0], [10, 10, 20, 40])
    np.testing.assert_allclose(tlwh[1], [180, 10, 20, 20])  # half outside the right edge
    assert vis.tolist() == pytest.approx([1.0, 0.5, 0.0])
    tlwh2, _ = transform_boxes(np.array([[110.0, 60, 20, 40]]), np.array([100.0, 50, 200, 100]), cam)
    np.testing.assert_allclose(tlwh2[0], [20, 20, 40, 80])  # zoomed 2×


def test_bad_camera_config():
    with pytest.raises(ConfigError, match="zoom_min"):
        CameraConfig(zoom_min=3.0, zoom_max=2.0)


@pytest.mark.assets
def test_build_two_tiny_sequences_from_coco(tmp_path):
    images = require_asset("coco/val2017")
    ann = require_asset("coco/annotations/instances_val2017_subset.json")
    cam = CameraConfig(width=160, height=96, frames=4)
    folders = build_sequences(tmp_path, images, ann, n_sequences=2, camera=cam, seed=3, progress=False)
    seqs = read_sequences(tmp_path)
    assert [s.root for s in seqs] == folders and all(s.seq_length == 4 and s.size == (160, 96) for s in seqs)
    for s in seqs:
        check_frames(s)
        gt = s.gt
        assert len(gt) and set(np.unique(gt[:, 7])) <= {1.0, 8.0}
        assert ((gt[:, 7] == 1) == (gt[:, 6] == 1)).all()  # pedestrians evaluated, distractors zero-marked
        assert (gt[:, 2] >= 0).all() and (gt[:, 2] + gt[:, 4] <= 160 + 1e-6).all()
    assert SYNTHETIC_NOTE in (tmp_path / "SYNTHETIC.txt").read_text()
    assert "SYNTHETIC" in (folders[0] / "seqinfo.ini").read_text()
    other = tmp_path / "again"
    build_sequences(other, images, ann, n_sequences=2, camera=cam, seed=3, progress=False)
    assert (other / folders[0].name / "gt/gt.txt").read_text() == (folders[0] / "gt/gt.txt").read_text()

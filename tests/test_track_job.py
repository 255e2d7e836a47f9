"""`qdet track`: option errors (fast) and one small real run (YOLOv5n, 1 synthetic sequence, 20 frames)."""
from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import require_asset

from qdet.cli import main
from qdet.track.byte import FrameTracks
from qdet.track_job import _slug, draw_tracks


def _err(capsys, argv):
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    return rc, err


def test_missing_sequences_folder_is_exit_2(capsys, tmp_path):
    rc, err = _err(capsys, ["track", "yolov5n", "--sequences", str(tmp_path / "nope")])
    assert rc == 2 and err.startswith("qdet: error: sequences folder not found") and "\n" not in err


def test_folder_without_seqinfo_is_exit_2(capsys, tmp_path):
    (tmp_path / "S1").mkdir()
    rc, err = _err(capsys, ["track", "yolov5n", "--sequences", str(tmp_path)])
    assert rc == 2 and "no seqinfo.ini" in err


@pytest.mark.parametrize("argv, message", [
    (["--track-thresh", "1.5"], "--track-thresh must be in [0, 1]"),
    (["--video", "out.avi"], "give a .gif or .mp4 path"),
])
def test_bad_options_are_exit_2(capsys, tmp_path, argv, message):
    rc, err = _err(capsys, ["track", "yolov5n", "--sequences", str(tmp_path), *argv])
    assert rc == 2 and message in err


def test_synthesize_refuses_a_non_empty_folder(capsys, tmp_path):
    (tmp_path / "x").write_text("keep me")
    rc, err = _err(capsys, ["track", "yolov5n", "--weights", "random", "--sequences", str(tmp_path),
                            "--synthesize", "1"])
    assert rc == 2 and "exists and is not empty" in err


def test_draw_tracks_and_slug():
    img = np.zeros((40, 60, 3), np.uint8)
    im = draw_tracks(img, FrameTracks(np.array([7]), np.array([[5.0, 15, 25, 35]]), np.array([0.9])), "t")
    assert im.size == (60, 40) and np.asarray(im)[25, 5].any()  # box edge drawn
    assert _slug("int8 (openvino)") == "int8_openvino"


@pytest.mark.assets
@pytest.mark.slow
def test_track_yolov5n_float_vs_int8_small(tmp_path, capsys):
    pytest.importorskip("openvino")
    require_asset("weights/yolov5n_v6.1_state_dict_fp16.pt")
    require_asset("coco/annotations/instances_val2017_subset.json")
    seqs, out = tmp_path / "seqs", tmp_path / "out.json"
    rc = main(["track", "yolov5n", "--sequences", str(seqs), "--synthesize", "1", "--synth-frames", "20",
               "--calib-images", "8", "--threads", "1", "--runtime", "openvino", "--json", str(out),
               "--out-dir", str(tmp_path / "res"), "--video", str(tmp_path / "t.gif"), "--video-frames", "5",
               "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    rows = json.loads(out.read_text())["rows"]
    assert [r["model"] for r in rows] == ["float (openvino)", "int8 (openvino)"]
    for r in rows:
        assert r["frames"] == 20 and r["fps"] > 0 and r["tracker_ms"] > 0
        assert r["mota_pct"] is not None and r["idf1_pct"] is not None
    assert rows[0]["d_mota_pct"] == 0.0 and rows[0]["fps_ratio"] == 1.0
    # the real detector finds and tracks people on these frames (not an empty output)
    per_seq = json.loads(out.read_text())["meta"]["per_sequence"]
    assert all(next(iter(per_seq[r["model"]].values()))["recall_pct"] > 0 for r in rows)
    res = sorted((tmp_path / "res" / "float_openvino").glob("*.txt"))
    assert len(res) == 1 and res[0].read_text().strip()
    assert (tmp_path / "t.gif").stat().st_size > 0
    assert "SYNTHETIC" in capsys.readouterr().out


def test_yolo_frame_detector_docstring(one_torch_thread):
    import doctest

    from qdet.models.yolo import track

    assert doctest.testmod(track).failed == 0

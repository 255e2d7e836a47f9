"""KITTI reader and evaluation: label parsing, DontCare, difficulty, the devkit's AP rules, the seed metrics."""
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import require_asset

from qdet.data.kitti import (
    Difficulty,
    KittiDataset,
    KittiObject,
    parse_label_line,
    read_label_file,
)
from qdet.errors import DataError
from qdet.eval.kitti import Detection, evaluate_kitti, official_ap, seed_metrics

CAR = "Car 0.00 0 1.85 387.63 181.54 423.81 203.12 1.67 1.87 3.69 -16.53 2.39 58.49 1.57"
DONTCARE = "DontCare -1 -1 -10 503.89 169.71 590.61 190.13 -1 -1 -1 -1000 -1000 -1000 -10"


def _obj(t, box, trunc=0.0, occ=0):
    return KittiObject(t, trunc, occ, 0.0, tuple(float(v) for v in box))


def _line(t, box, trunc=0.0, occ=0):
    return f"{t} {trunc:.2f} {occ} 0.00 {box[0]:.2f} {box[1]:.2f} {box[2]:.2f} {box[3]:.2f} 1.5 1.6 3.9 1.0 1.7 20.0 0.1"


def _write_split(root: Path, frames: list[list[str]], size=(64, 48)) -> Path:
    from PIL import Image

    (root / "training" / "image_2").mkdir(parents=True)
    (root / "training" / "label_2").mkdir(parents=True)
    for i, lines in enumerate(frames):
        Image.new("RGB", size, (i * 20 % 255, 90, 160)).save(root / "training" / "image_2" / f"{i:06d}.png")
        (root / "training" / "label_2" / f"{i:06d}.txt").write_text("\n".join(lines) + "\n")
    return root


# ------------------------------------------------------------------ parsing
def test_parse_label_line_fields():
    o = parse_label_line(CAR)
    assert o.type == "Car" and o.occluded == 0 and o.truncated == 0.0
    assert o.box == (387.63, 181.54, 423.81, 203.12) and o.score is None
    assert o.location == (-16.53, 2.39, 58.49) and o.rotation_y == 1.57
    assert parse_label_line(CAR + " 0.87").score == pytest.approx(0.87)  # result files carry a score


def test_dontcare_is_never_a_target(tmp_path):
    root = _write_split(tmp_path, [[CAR.replace("387.63 181.54", "10.00 5.00").replace("423.81 203.12", "50.00 45.00"),
                                    DONTCARE]])
    ds = KittiDataset(root)
    image, target = ds[0]
    assert image.shape == (3, 48, 64) and 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    assert target["labels"].tolist() == [1]  # Car only
    assert target["dontcare"].shape == (1, 4)
    assert [o.type for o in ds.labels(0)] == ["Car", "DontCare"]
    assert parse_label_line(DONTCARE).difficulty is None


@pytest.mark.parametrize("height,occ,trunc,expected", [
    (40.0, 0, 0.15, Difficulty.EASY),       # limits are inclusive
    (39.9, 0, 0.00, Difficulty.MODERATE),   # too small for Easy
    (50.0, 1, 0.00, Difficulty.MODERATE),   # partly occluded
    (50.0, 0, 0.31, Difficulty.HARD),       # truncated beyond Moderate
    (25.0, 2, 0.50, Difficulty.HARD),
    (24.9, 0, 0.00, None),                  # below every minimum height
    (50.0, 3, 0.00, None),                  # occlusion 3 (unknown) is beyond Hard
    (50.0, 0, 0.51, None),
])
def test_difficulty_follows_the_devkit_table(height, occ, trunc, expected):
    assert _obj("Car", (0, 0, 30, height), trunc, occ).difficulty == expected


def test_malformed_label_file_raises_data_error_naming_it(tmp_path):
    root = _write_split(tmp_path, [[CAR, "Car 0.0 0 1.0 10 20 30"]])
    ds = KittiDataset(root)
    bad = str(root / "training" / "label_2" / "000000.txt")
    with pytest.raises(DataError, match=rf"{bad}:2.*15 fields"):
        ds.labels(0)
    (root / "training" / "label_2" / "000000.txt").write_text(CAR.replace("0.00 0 1.85", "0.00 x 1.85"))
    with pytest.raises(DataError, match="000000.txt:1.*non-numeric"):
        read_label_file(root / "training" / "label_2" / "000000.txt")


def test_missing_label_or_image_is_a_data_error(tmp_path):
    root = _write_split(tmp_path, [[CAR], [CAR]])
    (root / "training" / "label_2" / "000001.txt").unlink()
    with pytest.raises(DataError, match="000001.txt"):
        KittiDataset(root)
    (root / "training" / "label_2" / "000001.txt").write_text(CAR)
    (root / "training" / "image_2" / "000001.png").write_bytes(b"not a png")
    ds = KittiDataset(root, ids=["000000", "000001"])
    with pytest.raises(DataError, match="000001.png"):
        ds[1]
    with pytest.raises(DataError, match="image folder not found"):
        KittiDataset(tmp_path / "nowhere")


# ------------------------------------------------------------------ official AP
def _grid_frames(n_frames=12, per_frame=4, cls="Car", height=60.0):
    """Many well separated, fully visible objects: enough ground truth (>= 40) for the 41-point sampling."""
    frames = []
    for f in range(n_frames):
        frames.append([_obj(cls, (10 + 80 * k, 10, 70 + 80 * k, 10 + height)) for k in range(per_frame)])
    return frames


def test_ground_truth_as_detections_scores_ap_one():
    gt = [a + b for a, b in zip(_grid_frames(cls="Car"), _grid_frames(cls="Pedestrian", height=80.0))]
    dets = [[Detection(o.type, o.box, 1.0) for o in frame] for frame in gt]
    r = evaluate_kitti(gt, dets)
    for cls in ("Car", "Pedestrian"):
        for level in ("Easy", "Moderate", "Hard"):
            assert r.ap_r40[cls][level] == pytest.approx(1.0) and r.ap_11[cls][level] == pytest.approx(1.0)
    assert math.isnan(r.ap_r40["Cyclist"]["Moderate"])  # no cyclist ground truth
    assert (r.seed_accuracy, r.seed_precision, r.seed_miou) == (1.0, 1.0, pytest.approx(1.0))


def test_scores_rank_detections():
    gt = _grid_frames()
    good = [[Detection("Car", o.box, 0.9) for o in frame] for frame in gt]
    junk = [[Detection("Car", (300.0 + 5 * i, 200.0, 360.0 + 5 * i, 260.0), s) for i in range(4)] for s in (0.95, 0.1)]
    high = [g + junk[0] for g in good]  # false positives ranked above every true one
    low = [g + junk[1] for g in good]  # ranked below: precision stays 1 up to full recall
    ap_high = official_ap(gt, high, "Car", Difficulty.MODERATE)[0]
    ap_low = official_ap(gt, low, "Car", Difficulty.MODERATE)[0]
    assert ap_low == pytest.approx(1.0) and ap_high < 0.6


def test_car_needs_iou_07_and_pedestrian_05():
    gt = _grid_frames()
    shifted = [[Detection("Car", (o.box[0] + 12, o.box[1], o.box[2] + 12, o.box[3]), 1.0) for o in f] for f in gt]
    assert official_ap(gt, shifted, "Car", Difficulty.EASY)[0] == 0.0  # IoU 0.67 < 0.7
    ped = [[_obj("Pedestrian", o.box) for o in f] for f in gt]
    ped_dets = [[Detection("Pedestrian", d.box, 1.0) for d in f] for f in shifted]
    assert official_ap(ped, ped_dets, "Pedestrian", Difficulty.EASY)[0] == pytest.approx(1.0)


def test_van_dontcare_and_small_detections_are_neither_tp_nor_fp():
    gt = _grid_frames()
    extra_gt = [f + [_obj("Van", (10, 100, 70, 160)), _obj("DontCare", (400, 100, 480, 180))] for f in gt]
    dets = [[Detection("Car", o.box, 0.9) for o in f] for f in gt]
    noisy = [d + [Detection("Car", (10, 100, 70, 160), 0.95),     # on the Van: neighbour class, ignored
                  Detection("Car", (410, 110, 470, 170), 0.95),    # inside DontCare: not a FP
                  Detection("Car", (600, 10, 640, 30), 0.95)]      # 20 px high: below every level's minimum
             for d in dets]
    assert official_ap(extra_gt, noisy, "Car", Difficulty.MODERATE)[0] == pytest.approx(1.0)
    # the same detections with no Van / DontCare in the ground truth are false positives
    assert official_ap(gt, noisy, "Car", Difficulty.MODERATE)[0] < 0.8


def test_ignored_ground_truth_is_not_a_miss():
    gt = _grid_frames()
    hard = [f + [_obj("Car", (10, 100, 70, 130), trunc=0.4)] for f in gt]  # 30 px, truncated: Hard only
    dets = [[Detection("Car", o.box, 0.9) for o in f] for f in gt]
    assert official_ap(hard, dets, "Car", Difficulty.MODERATE)[0] == pytest.approx(1.0)
    assert official_ap(hard, dets, "Car", Difficulty.HARD)[0] < 0.9  # counted, and missed, at Hard


def test_few_objects_give_low_ap_as_in_the_devkit():
    gt = [[_obj("Car", (10, 10, 70, 70))] for _ in range(3)]
    dets = [[Detection("Car", f[0].box, 1.0)] for f in gt]
    ap40, ap11, n = official_ap(gt, dets, "Car", Difficulty.EASY)
    assert n == 3 and ap40 == pytest.approx(2 / 40) and ap11 == pytest.approx(1 / 11)


def test_seed_metrics_match_by_class_score_and_iou():
    gt = [[_obj("Car", (0, 0, 100, 100)), _obj("Pedestrian", (200, 0, 240, 90)), _obj("DontCare", (300, 0, 400, 100))]]
    dets = [[Detection("Car", (0, 0, 100, 80), 0.9),            # IoU 0.8 → TP
             Detection("Car", (200, 0, 240, 90), 0.8),          # wrong class → FP
             Detection("Pedestrian", (0, 0, 100, 100), 0.4),    # below score 0.5 → ignored
             Detection("Car", (310, 10, 390, 90), 0.7)]]        # inside DontCare → not counted
    s = seed_metrics(gt, dets)
    assert (s["tp"], s["gt"], s["predictions"]) == (1, 2, 2)
    assert s["accuracy"] == 0.5 and s["precision"] == 0.5 and s["miou"] == pytest.approx(0.8)


def test_mismatched_frame_counts_is_a_data_error():
    with pytest.raises(DataError, match="2 ground-truth frames but 1"):
        evaluate_kitti([[], []], [[]])


# ------------------------------------------------------------------ the six real frames
@pytest.mark.assets
def test_real_frames_parse_with_devkit_difficulties():
    require_asset("kitti/training/label_2/000001.txt")
    from qdet.paths import assets_dir

    ds = KittiDataset(assets_dir() / "kitti")
    assert len(ds) == 6 and ds.frame_ids[0] == "000000"
    image, target = ds[1]
    assert image.shape == (3, 375, 1242)
    assert [o.type for o in ds.labels(1)].count("DontCare") == 4
    # Truck 32.9 px high → Moderate; Car 21.6 px → below every level; Cyclist occlusion 3 → ignored
    assert target["difficulty"].tolist() == [1, -1, -1]
    gt = [ds.labels(i) for i in range(len(ds))]
    r = evaluate_kitti(gt, [[Detection(o.type, o.box, 1.0) for o in f if not o.is_dont_care] for f in gt])
    assert r.num_gt["Car"] == {"Easy": 1, "Moderate": 3, "Hard": 3}
    assert r.seed_accuracy == 1.0 and r.seed_precision == 1.0
    assert np.isnan(r.ap_r40["Cyclist"]["Easy"])
    assert torch.equal(target["labels"], torch.tensor([3, 1, 6]))  # Truck, Car, Cyclist in KITTI_CLASSES order

"""MOTChallenge reading/writing and MOT17-convention evaluation (motmetrics, TrackEval HOTA)."""
from __future__ import annotations

import doctest
from pathlib import Path

import numpy as np
import pytest

from qdet.data import mot as motdata
from qdet.data.mot import (
    check_frames,
    read_results,
    read_sequence,
    read_sequences,
    write_results,
)
from qdet.errors import DataError

pytest.importorskip("motmetrics")
from qdet.eval import mot as moteval
from qdet.eval.mot import evaluate_mot, hota_available

SEQINFO = "[Sequence]\nname={name}\nimDir=img1\nframeRate=30\nseqLength={n}\nimWidth=64\nimHeight=48\nimExt=.png\n"


def _sequence(root: Path, name: str = "S1", n: int = 3, gt: str | None = "1,1,0,0,10,20,1,1,1\n",
              sizes: list[tuple[int, int]] | None = None) -> Path:
    from PIL import Image

    d = root / name
    (d / "img1").mkdir(parents=True)
    (d / "seqinfo.ini").write_text(SEQINFO.format(name=name, n=n))
    for i, size in enumerate(sizes or [(64, 48)] * n, 1):
        Image.new("RGB", size).save(d / "img1" / f"{i:06d}.png")
    if gt is not None:
        (d / "gt").mkdir()
        (d / "gt" / "gt.txt").write_text(gt)
    return d


@pytest.mark.parametrize("module", [motdata, moteval])
def test_docstring_examples(module):
    assert doctest.testmod(module).failed == 0


def test_read_sequence_and_folder_of_sequences(tmp_path):
    _sequence(tmp_path, "A")
    _sequence(tmp_path, "B", gt=None)
    seqs = read_sequences(tmp_path)
    assert [s.name for s in seqs] == ["A", "B"]
    assert seqs[0].gt.shape == (1, 9) and seqs[1].gt is None
    check_frames(seqs[0])
    assert read_sequences(tmp_path / "A")[0].name == "A"


def test_missing_seqinfo_is_one_clear_error(tmp_path):
    d = _sequence(tmp_path)
    (d / "seqinfo.ini").unlink()
    with pytest.raises(DataError, match=r"S1: no seqinfo.ini"):
        read_sequences(tmp_path)


def test_seqinfo_missing_field_names_it(tmp_path):
    d = _sequence(tmp_path)
    (d / "seqinfo.ini").write_text("[Sequence]\nname=S1\nimDir=img1\nframeRate=30\nimWidth=64\nimHeight=48\nimExt=.png\n")
    with pytest.raises(DataError, match="no 'seqLength' field"):
        read_sequence(d)


@pytest.mark.parametrize("line, message", [
    ("1,1,0,0,10,20,1,1", r"gt.txt:2: expected 9 comma-separated"),
    ("1,1,0,zero,10,20,1,1,1", r"gt.txt:2: non-numeric field"),
    ("1,1,0,0,nan,20,1,1,1", r"gt.txt:2: non-finite"),
    ("0,1,0,0,10,20,1,1,1", r"gt.txt:2: frame must be an integer >= 1"),
])
def test_malformed_gt_line_names_file_and_line(tmp_path, line, message):
    d = _sequence(tmp_path, gt=f"1,1,0,0,10,20,1,1,1\n{line}\n")
    with pytest.raises(DataError, match=message) as e:
        read_sequence(d)
    assert str(d / "gt" / "gt.txt") in str(e.value) and "\n" not in str(e.value)


def test_gt_frame_beyond_seq_length(tmp_path):
    d = _sequence(tmp_path, n=2, gt="1,1,0,0,10,20,1,1,1\n5,1,0,0,10,20,1,1,1\n")
    with pytest.raises(DataError, match="row 2 is in frame 5, beyond seqLength 2"):
        read_sequence(d)


def test_frames_of_differing_size_are_one_clear_error(tmp_path):
    d = _sequence(tmp_path, sizes=[(64, 48), (64, 48), (80, 48)])
    with pytest.raises(DataError, match=r"000003.png: frame is 80x48, but seqinfo.ini says 64x48"):
        check_frames(read_sequence(d))


def test_missing_frame(tmp_path):
    d = _sequence(tmp_path)
    (d / "img1" / "000002.png").unlink()
    with pytest.raises(DataError, match="frame 2 missing"):
        check_frames(read_sequence(d))


def test_results_roundtrip(tmp_path):
    p = write_results(tmp_path / "r" / "S1.txt", [(1, 3, 1.5, 2.0, 10.0, 20.0, 0.91), (2, 3, 2.0, 2.0, 10, 20, 0.8)])
    assert p.read_text().splitlines()[0] == "1,3,1.50,2.00,10.00,20.00,0.910,-1,-1,-1"
    np.testing.assert_allclose(read_results(p), [[1, 3, 1.5, 2, 10, 20, 0.91], [2, 3, 2, 2, 10, 20, 0.8]])


def _hand_sequence():
    # gt: frame, id, left, top, w, h, flag, class, visibility
    gt = [[f, 1, 0, 0, 10, 20, 1, 1, 1.0] for f in range(1, 5)] + [[f, 2, 50, 0, 10, 20, 1, 1, 0.8] for f in range(1, 5)]
    gt += [[1, 3, 100, 0, 10, 20, 0, 7, 1.0],  # static person (distractor, zero-marked as in MOT17)
           [1, 4, 300, 0, 20, 10, 0, 3, 1.0],  # a car: ignored class
           [2, 5, 200, 0, 10, 20, 0, 1, 1.0]]  # a zero-marked pedestrian: not evaluated
    res = [[1, 10, 0, 0, 10, 20, 0.9], [1, 20, 50, 0, 10, 20, 0.9],
           [1, 30, 100, 0, 10, 20, 0.9],   # on the distractor: removed, neither FP nor TP
           [1, 40, 300, 0, 20, 10, 0.9],   # on the car: a false positive
           [2, 10, 1, 0, 10, 20, 0.9], [2, 20, 50, 1, 10, 20, 0.9],
           [3, 10, 1, 0, 10, 20, 0.9],     # gt 2 missed in frame 3
           [4, 60, 0, 0, 10, 20, 0.9],     # gt 1 changes id 10 → 60: an ID switch
           [4, 20, 50, 0, 10, 20, 0.9]]
    return np.array(gt, float), np.array(res, float)


def test_mota_idf1_on_a_hand_made_sequence_equal_hand_computed():
    r = evaluate_mot({"hand": _hand_sequence()}, hota=False)
    o = r.overall
    # 8 evaluated gt boxes; FN 1, FP 1, IDSW 1 → MOTA = 1 − 3/8
    assert (o["gt_boxes"], o["fn"], o["fp"], o["id_switches"]) == (8, 1, 1, 1)
    assert o["mota_pct"] == pytest.approx(100 * (1 - 3 / 8))
    # IDF1: best global id match gt1↔10 (3 frames), gt2↔20 (3); 8 gt and 8 kept tracker boxes → 2·6 / 16
    assert o["idf1_pct"] == pytest.approx(100 * 12 / 16)
    assert r.sequences["hand"]["mota_pct"] == o["mota_pct"] and o["hota_pct"] is None


def test_min_visibility_ignores_less_visible_pedestrians():
    r = evaluate_mot({"hand": _hand_sequence()}, min_visibility=0.9, hota=False)
    # gt 2 (visibility 0.8) is ignored, boxes on it are removed: 4 gt, FP 1 (car), IDSW 1
    assert (r.overall["gt_boxes"], r.overall["fn"], r.overall["fp"], r.overall["id_switches"]) == (4, 0, 1, 1)
    assert r.overall["mota_pct"] == pytest.approx(100 * (1 - 2 / 4))


@pytest.mark.skipif(not hota_available(), reason="trackeval not installed")
def test_hota_perfect_and_empty():
    gt, _ = _hand_sequence()
    ped = gt[(gt[:, 7] == 1) & (gt[:, 6] == 1)]
    perfect = evaluate_mot({"s": (gt, ped[:, :7])})
    assert perfect.overall["hota_pct"] == pytest.approx(100.0) and perfect.overall["mota_pct"] == 100.0
    empty = evaluate_mot({"s": (gt, np.zeros((0, 7)))})
    assert empty.overall["hota_pct"] == pytest.approx(0.0) and empty.overall["fn"] == 8


def test_evaluation_pools_sequences():
    gt, res = _hand_sequence()
    r = evaluate_mot({"a": (gt, res), "b": (gt, res)}, hota=False)
    assert r.overall["gt_boxes"] == 16 and r.overall["mota_pct"] == pytest.approx(62.5)

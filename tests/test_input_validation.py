"""Bad input at the boundary: one line naming the file/field/option, exit 2, before any work (issue 14, part)."""
import json

import pytest

from qdet.cli import main
from qdet.data.coco import CocoDetection
from qdet.errors import DataError


def _coco(tmp_path, ann: dict) -> CocoDetection:
    (tmp_path / "img").mkdir()
    path = tmp_path / "a.json"
    path.write_text(json.dumps({"images": [{"id": 1, "file_name": "x.jpg", "height": 4, "width": 4}],
                                "categories": [{"id": 1, "name": "person"}],
                                "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 2, 2]} | ann]}))
    return CocoDetection(tmp_path / "img", path, verify_files=False)


@pytest.mark.parametrize("ann, message", [
    ({"bbox": ["nan", None, 1, 1]}, r"annotations\[0\]\.bbox must be 4 finite numbers"),
    ({"bbox": [0, 0, -1, 2]}, r"annotations\[0\]\.bbox must be 4 finite numbers with w, h > 0"),
    ({"category_id": 999}, r"annotations\[0\]\.category_id 999 is not among the file's categories"),
])
def test_bad_coco_annotation_names_the_field(tmp_path, ann, message) -> None:
    with pytest.raises(DataError, match=message):
        _coco(tmp_path, ann)


def test_coco_annotation_without_image_id(tmp_path) -> None:
    (tmp_path / "img").mkdir()
    path = tmp_path / "a.json"
    path.write_text(json.dumps({"images": [], "categories": [], "annotations": [{"id": 1, "bbox": [0, 0, 1, 1]}]}))
    with pytest.raises(DataError, match=r"annotations\[0\] lacks 'image_id'"):
        CocoDetection(tmp_path / "img", path, verify_files=False)


def test_json_pointing_at_a_folder_fails_before_any_work(tmp_path, capsys) -> None:
    code = main(["quantize", "resnet20", "--weights", "random", "--json", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err == [f"qdet: error: --json '{tmp_path}' is a folder, expected a file path"]


def test_nan_and_constant_evaluation_images_warn() -> None:
    import torch
    from torch import nn

    from qdet.eval.classification import evaluate_topk

    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3)).eval()
    images = torch.rand(4, 3, 2, 2)
    images[0] = float("nan")
    images[1] = 0.5
    with pytest.warns(UserWarning) as record:
        evaluate_topk(model, [(images, torch.zeros(4, dtype=torch.long))], progress=False)
    messages = [str(w.message) for w in record]
    assert any("1 of 4 evaluation images contain NaN or Inf" in m for m in messages)
    assert any("1 of 4 evaluation images are constant" in m for m in messages)


def test_argparse_errors_are_one_line(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["quantize", "resnet20", "--threads", "2000"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2
    assert err == ["qdet quantize: error: argument --threads: must be within 1..1024, got 2000 "
                   "(see `qdet quantize --help`)"]


def test_out_in_an_uncreatable_folder_fails_before_any_work(capsys) -> None:
    code = main(["quantize", "resnet20", "--weights", "random", "--out", "/proc/qdet/x.qdet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--out '/proc/qdet/x.qdet'" in err[0] and "not writable" in err[0]

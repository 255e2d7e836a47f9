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

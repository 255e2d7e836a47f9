"""MOTChallenge sequences: `seqinfo.ini`, `img1/` frames, `gt/gt.txt`, and tracker result files.

A sequence folder holds `seqinfo.ini` ([Sequence] name, imDir, frameRate, seqLength, imWidth,
imHeight, imExt), the frames `<imDir>/000001<imExt>` … and, for training sequences, `gt/gt.txt`
with MOT17's nine columns per row: frame, id, left, top, width, height, flag (0 = ignore the row,
"zero-marked"), class, visibility. The MOT17 classes are in `MOT17_CLASSES`; class 1 (pedestrian)
is evaluated, the distractor classes (2, 7, 8, 12) remove the tracker boxes that match them, and
the other classes are ignored (`qdet.eval.mot`). Result files have MOTChallenge's ten columns:
frame, id, left, top, width, height, score, -1, -1, -1.

    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (d / "seqinfo.ini").write_text("[Sequence]\\nname=S\\nimDir=img1\\nframeRate=30\\nseqLength=2\\n"
    ...                                  "imWidth=64\\nimHeight=48\\nimExt=.jpg\\n")
    >>> seq = read_sequence(d)
    >>> seq.name, seq.seq_length, seq.size, seq.frame_path(1).name
    ('S', 2, (64, 48), '000001.jpg')
"""
from __future__ import annotations

import configparser
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qdet.errors import DataError
from qdet.fileio import write_text_atomically

__all__ = [
    "DISTRACTOR_CLASSES",
    "MOT17_CLASSES",
    "PEDESTRIAN",
    "MOTSequence",
    "check_frames",
    "read_gt",
    "read_results",
    "read_sequence",
    "read_sequences",
    "write_results",
]

MOT17_CLASSES = {1: "pedestrian", 2: "person_on_vehicle", 3: "car", 4: "bicycle", 5: "motorbike",
                 6: "non_mot_vehicle", 7: "static_person", 8: "distractor", 9: "occluder",
                 10: "occluder_on_ground", 11: "occluder_full", 12: "reflection", 13: "crowd"}
PEDESTRIAN = 1
DISTRACTOR_CLASSES = (2, 7, 8, 12)
GT_COLUMNS = ("frame", "id", "left", "top", "width", "height", "flag", "class", "visibility")


@dataclass(frozen=True)
class MOTSequence:
    """One sequence folder as `seqinfo.ini` describes it; `gt` is (R, 9) float64 or None (test split)."""

    root: Path
    name: str
    im_dir: str
    frame_rate: float
    seq_length: int
    width: int
    height: int
    im_ext: str
    gt: np.ndarray | None

    @property
    def size(self) -> tuple[int, int]:
        return self.width, self.height

    def frame_path(self, frame: int) -> Path:
        """Frame numbers start at 1, as in gt.txt."""
        return self.root / self.im_dir / f"{frame:06d}{self.im_ext}"

    def gt_frame(self, frame: int) -> np.ndarray:
        """The gt rows of one frame, (r, 9)."""
        if self.gt is None:
            return np.zeros((0, 9))
        return self.gt[self.gt[:, 0] == frame]


def _ini_field(section: configparser.SectionProxy, key: str, path: Path, kind: type) -> object:
    if key not in section:
        raise DataError(f"{path}: [Sequence] has no '{key}' field")
    text = section[key].strip()
    try:
        value = kind(text)
    except ValueError:
        raise DataError(f"{path}: field '{key}' = {text!r} is not a valid {kind.__name__}") from None
    if kind in (int, float) and not (math.isfinite(value) and value > 0):  # type: ignore[arg-type]
        raise DataError(f"{path}: field '{key}' must be > 0, got {text!r}")
    return value


def read_sequence(root: str | Path, *, with_gt: bool = True) -> MOTSequence:
    """Read `root/seqinfo.ini` and (when present and `with_gt`) `root/gt/gt.txt`."""
    root = Path(root)
    ini = root / "seqinfo.ini"
    if not root.is_dir():
        raise DataError(f"sequence folder not found: {root}")
    if not ini.is_file():
        raise DataError(f"{root}: no seqinfo.ini (a MOTChallenge sequence folder needs one)")
    parser = configparser.ConfigParser()
    try:
        parser.read(ini)
    except configparser.Error as e:
        raise DataError(f"{ini}: not a valid ini file ({' '.join(str(e).split())[:200]})") from None
    if "Sequence" not in parser:
        raise DataError(f"{ini}: no [Sequence] section")
    s = parser["Sequence"]
    gt_path = root / "gt" / "gt.txt"
    seq = MOTSequence(
        root=root, name=str(_ini_field(s, "name", ini, str)), im_dir=str(_ini_field(s, "imDir", ini, str)),
        frame_rate=float(_ini_field(s, "frameRate", ini, float)),  # type: ignore[arg-type]
        seq_length=int(_ini_field(s, "seqLength", ini, int)),  # type: ignore[arg-type]
        width=int(_ini_field(s, "imWidth", ini, int)), height=int(_ini_field(s, "imHeight", ini, int)),  # type: ignore[arg-type]
        im_ext=str(_ini_field(s, "imExt", ini, str)), gt=None)
    if with_gt and gt_path.is_file():
        seq = MOTSequence(**{**seq.__dict__, "gt": read_gt(gt_path, seq.seq_length)})
    return seq


def read_sequences(folder: str | Path, *, with_gt: bool = True) -> list[MOTSequence]:
    """`folder` itself when it holds a seqinfo.ini, else every sub-folder (sorted), each a sequence."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"sequences folder not found: {folder}")
    if (folder / "seqinfo.ini").exists():
        return [read_sequence(folder, with_gt=with_gt)]
    subdirs = sorted(p for p in folder.iterdir() if p.is_dir())
    if not subdirs:
        raise DataError(f"{folder}: no seqinfo.ini and no sequence sub-folders")
    return [read_sequence(p, with_gt=with_gt) for p in subdirs]


def _parse_rows(path: Path, min_fields: int, what: str) -> np.ndarray:
    rows = []
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {path}: {e}") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        fields = [f.strip() for f in line.split(",")]
        if len(fields) < min_fields:
            raise DataError(f"{path}:{n}: expected {min_fields} comma-separated {what} fields, got {len(fields)}")
        try:
            values = [float(f) for f in fields[:min_fields]]
        except ValueError:
            raise DataError(f"{path}:{n}: non-numeric field in {line.strip()[:80]!r}") from None
        if not all(math.isfinite(v) for v in values):
            raise DataError(f"{path}:{n}: non-finite value in {line.strip()[:80]!r}")
        if values[0] < 1 or values[0] != int(values[0]) or values[1] != int(values[1]):
            raise DataError(f"{path}:{n}: frame must be an integer >= 1 and id an integer, got "
                            f"{fields[0]!r}, {fields[1]!r}")
        if values[4] < 0 or values[5] < 0:
            raise DataError(f"{path}:{n}: negative box width/height {fields[4]}, {fields[5]}")
        rows.append(values)
    return np.array(rows, dtype=np.float64).reshape(-1, min_fields)


def read_gt(path: str | Path, seq_length: int | None = None) -> np.ndarray:
    """MOT17 gt.txt → (R, 9): frame, id, left, top, width, height, flag, class, visibility."""
    path = Path(path)
    gt = _parse_rows(path, 9, "MOT17 gt")
    if seq_length is not None and len(gt) and gt[:, 0].max() > seq_length:
        line = int(np.argmax(gt[:, 0] > seq_length)) + 1
        raise DataError(f"{path}: row {line} is in frame {int(gt[line - 1, 0])}, beyond seqLength {seq_length}")
    return gt


def read_results(path: str | Path) -> np.ndarray:
    """A MOTChallenge result file → (R, 7): frame, id, left, top, width, height, score."""
    return _parse_rows(Path(path), 7, "result")


def write_results(path: str | Path, rows: Iterable[tuple[int, int, float, float, float, float, float]]) -> Path:
    """Write (frame, id, left, top, width, height, score) rows in MOTChallenge's result format."""
    text = "".join(f"{int(f)},{int(i)},{x:.2f},{y:.2f},{w:.2f},{h:.2f},{s:.3f},-1,-1,-1\n"
                   for f, i, x, y, w, h, s in rows)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return write_text_atomically(path, text)


def check_frames(seq: MOTSequence) -> None:
    """Every frame 1..seqLength exists and has seqinfo.ini's size (reads image headers only)."""
    from PIL import Image, UnidentifiedImageError

    for f in range(1, seq.seq_length + 1):
        p = seq.frame_path(f)
        if not p.is_file():
            raise DataError(f"{seq.root}: frame {f} missing ({p.relative_to(seq.root)}; seqLength={seq.seq_length})")
        try:
            with Image.open(p) as im:
                size = im.size
        except (UnidentifiedImageError, OSError) as e:
            raise DataError(f"cannot decode frame {p}: {e}") from None
        if size != seq.size:
            raise DataError(f"{p}: frame is {size[0]}x{size[1]}, but seqinfo.ini says {seq.width}x{seq.height} "
                            "(all frames of a sequence must have one size)")

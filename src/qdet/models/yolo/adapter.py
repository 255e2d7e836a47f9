"""YOLOv5 adapter: what is int8 (backbone, neck, the three Detect convs) and what stays float
(letterbox preprocessing, sigmoid + grid/anchor decoding, NMS), and how data becomes inputs.

    >>> adapter = YoloAdapter("yolov5n")
    >>> det = adapter.build("random")
    >>> det(torch.zeros(1, 3, 64, 64)).shape
    torch.Size([1, 252, 85])
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn
from torch.utils.data import Dataset

from qdet.data.coco import CocoDetection
from qdet.errors import ConfigError
from qdet.models.base import Region, Task
from qdet.models.yolo.model import YOLOv5, YOLOv5Raw, decode_maps, decode_maps_for_selection, load_yolov5, yolov5_config
from qdet.models.yolo.postprocess import preprocess
from qdet.paths import assets_dir

RANDOM_INIT = "random"


class YoloDetector(nn.Module):
    """`body` (traced and quantized) → `decode` (float island). Input (B, 3, H, W) RGB in [0, 1]."""

    def __init__(self, yolo: YOLOv5) -> None:
        super().__init__()
        self.body: nn.Module = yolo.raw_module()
        det = yolo.detect
        self.register_buffer("anchors", det.anchors.detach().clone())  # (nl, na, 2) grid units
        self.stride = tuple(det.stride)
        self.na, self.no = det.na, det.no
        self.names = list(yolo.names)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return decode_maps(self.body(x), self.anchors, self.stride, self.na, self.no)  # (B, N, 5+nc)

    def boxes_and_scores(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole graph's decode: (boxes (B, N, 4) x1 y1 x2 y2, scores (B, nc, N)), channel-major."""
        return decode_maps_for_selection(self.body(x), self.anchors, self.stride, self.na, self.no)


class LetterboxedCoco(Dataset):
    """COCO images letterboxed to `img_size`² as the detector sees them: (3, S, S) float in [0, 1]."""

    def __init__(self, coco: CocoDetection, img_size: int = 640) -> None:
        self.coco = coco
        self.img_size = img_size

    def __len__(self) -> int:
        return len(self.coco)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image, meta = self.coco[i]
        lb, _ = preprocess(image, self.img_size)  # (S, S, 3) uint8 RGB
        return torch.from_numpy(lb.transpose(2, 0, 1).copy()).float() / 255.0, int(meta["image_id"])


@dataclass(frozen=True)
class YoloAdapter:
    """YOLOv5 n/s/m/l. `yolov5n` has bundled COCO weights; others need `weights=`."""

    name: str
    img_size: int = 640
    task: Task = Task.DETECTION
    input_range: tuple[float, float] = (0.0, 1.0)

    @property
    def size(self) -> str:
        return self.name.removeprefix("yolov5").removesuffix("-relu")

    def bundled_weights(self) -> Path:
        return assets_dir() / "weights" / f"{self.name}_v6.1_state_dict_fp16.pt"

    def build(self, weights: str | Path | None = None, **options: Any) -> YoloDetector:
        """weights: a state-dict file (ultralytics layout), None (bundled file) or "random".

        Options: activation ("silu" or "relu" for models trained with ReLU).
        """
        activation = options.pop("activation", "relu" if self.name.endswith("-relu") else "silu")
        if options:
            raise ConfigError(f"{self.name}: unknown option(s) {sorted(options)}")
        if weights is None:
            weights = self.bundled_weights()
            if not Path(weights).is_file():
                warnings.warn(f"{self.name}: bundled weights '{weights}' not found; using random initialisation", stacklevel=2)
                weights = RANDOM_INIT
        if str(weights) == RANDOM_INIT:
            return YoloDetector(YOLOv5(yolov5_config(self.size), activation=activation).eval()).eval()
        return YoloDetector(load_yolov5(weights, activation=activation)).eval()

    def regions(self, model: nn.Module) -> list[Region]:
        return [Region("body")]

    def detection_graph(self, model: nn.Module, nms: Any = None) -> Any:
        """Whole graph (`qdet.lower(..., whole_graph=True)`): body + decode + NMS; `nms` default: the evaluation's."""
        from qdet.models.yolo.graph import YOLO_EVAL_NMS, yolo_family_graph

        return yolo_family_graph(model, nms or YOLO_EVAL_NMS)

    def transform_fn(self, model: nn.Module) -> Callable[[Any], torch.Tensor]:
        """(images, ids) batches of LetterboxedCoco → images: exactly the inference input."""
        return lambda batch: batch[0] if isinstance(batch, (tuple, list)) else batch

    # ---- data ----
    def coco(self, split: str, data: str | Path | None = None) -> CocoDetection:
        """`data`: a COCO folder (`<split>/` images + `annotations/instances_<split>_subset.json`), `coco:DIR`, or None."""
        text = str(data) if data else ""
        if text.startswith("kitti:"):
            raise ConfigError(f"--data {text!r}: {self.name} is a COCO detector; pass a COCO folder or coco:DIR")
        text = text.removeprefix("coco:")
        root = Path(text) if text else assets_dir() / "coco"
        return CocoDetection(root / split, root / "annotations" / f"instances_{split}_subset.json")

    def eval_dataset(self, data: str | Path | None = None) -> CocoDetection:
        """COCO val images (default: the bundled 158 val2017 images)."""
        return self.coco("val2017", data)

    def labeled_calibration_dataset(self, data: str | Path | None = None) -> CocoDetection:
        """The calibration images with their labels (COCO train; default the bundled 160 train2017 images):
        a layer search measured here leaves the evaluation images held out."""
        return self.coco("train2017", data)

    def calibration_dataset(self, data: str | Path | None = None) -> Dataset:
        """COCO train images through the inference letterbox — never the evaluation images."""
        return LetterboxedCoco(self.labeled_calibration_dataset(data), self.img_size)

    def evaluate(self, model: Callable[..., Any], data: CocoDetection | None = None, *, progress: bool = True,
                 desc: str | None = None) -> Any:
        """COCO mAP (pycocotools) of any callable returning decoded (B, N, 5+nc) predictions;
        `desc` labels the progress bar (what runs, e.g. "int8 (openvino)")."""
        dataset = data if data is not None else self.eval_dataset()
        return self.score(self.predict(model, dataset, progress=progress, desc=desc), dataset)

    def predict(self, model: Callable[..., Any], data: CocoDetection, *, indices: Sequence[int] | None = None,
                progress: bool = True, desc: str | None = None) -> list[dict[str, Any]]:
        """`evaluate`'s first half: COCO-json detections of the images at `indices` (default all), one
        image per call (so a shard's detections are those of the same images unsharded)."""
        from qdet.models.yolo.detect import run_yolo_on_coco

        return run_yolo_on_coco(model, data, img_size=self.img_size, indices=indices, progress=progress,
                                desc=f"{desc or self.name}: COCO inference (images)")

    def score(self, predictions: list[dict[str, Any]], data: CocoDetection) -> Any:
        """`evaluate`'s second half: all detections scored once by pycocotools."""
        from qdet.eval.coco import evaluate_coco

        return evaluate_coco(predictions, data.annotations_json, image_ids=data.image_ids)

    # ---- frames (qdet.analysis.frames) ----
    def frame_input(self, path: str | Path) -> torch.Tensor:
        """One image file as the detector sees it, letterboxed to the reference's minimal rectangle
        (e.g. a 1242×375 KITTI frame → 224×640): (3, H, W) float in [0, 1]."""
        from qdet.data.coco import load_image
        from qdet.models.yolo.postprocess import rect_shape

        image = load_image(path)
        lb, _ = preprocess(image, self.img_size, rect_shape(image.shape[:2], self.img_size))
        return torch.from_numpy(lb.transpose(2, 0, 1).copy()).float() / 255.0

    def boxes(self, output: Any, *, conf: float = 0.25, iou: float = 0.45) -> list[torch.Tensor]:
        """Decoded (B, N, 5+nc) output → per image (n, 6) x1 y1 x2 y2 score class (display thresholds)."""
        from qdet.models.yolo.detect import predictions
        from qdet.models.yolo.postprocess import non_max_suppression

        return non_max_suppression(predictions(output, None), conf, iou, multi_label=False, max_det=100)


YOLO_ADAPTERS: Sequence[YoloAdapter] = tuple(
    YoloAdapter(n) for n in ("yolov5n", "yolov5s", "yolov5m", "yolov5l", "yolov5n-relu", "yolov5s-relu")
)

__all__ = ["YoloAdapter", "YoloDetector", "LetterboxedCoco", "YOLO_ADAPTERS", "YOLOv5Raw"]

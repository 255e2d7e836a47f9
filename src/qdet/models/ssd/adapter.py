"""SSD adapters: NVIDIA's SSD300-ResNet50 (`ssd300_resnet50`) and torchvision's `ssd300_vgg16` and
`ssdlite320_mobilenet_v3_large`.

int8 regions, by scope:
    Scope.DETECTOR (default)   ssd300_resnet50: `net` (backbone + extra blocks + loc/conf heads);
                               torchvision: `backbone` and `head`
    Scope.BACKBONE             only the backbone (`net.feature_extractor` / `backbone`): seed 003's
                               "half-quantized" SSD
float islands: default boxes / anchors, box decoding, softmax, per-class NMS (and torchvision's
GeneralizedRCNNTransform: resize + normalise).

No pretrained SSD is bundled: `build()` takes a state-dict file (NVIDIA's layout for ssd300_resnet50,
torchvision's for the others) or "random".

    >>> adapter = REGISTRY.get("ssd300_resnet50")  # doctest: +SKIP
    >>> det = adapter.build("random")  # doctest: +SKIP
    >>> [r.path for r in adapter.with_scope("backbone").regions(det)]  # doctest: +SKIP
    ['net.feature_extractor']
"""
from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from qdet.errors import ConfigError, WeightsError
from qdet.models.base import Region, Task
from qdet.models.ssd.boxes import PostProcess
from qdet.models.ssd.resnet50 import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    SSD300ResNet50,
    SSDDetector,
)
from qdet.models.weights import load_into, load_state_dict_file

__all__ = ["SSD_ADAPTERS", "SSDResNet50Adapter", "Scope", "TorchvisionSSDAdapter"]

RANDOM_INIT = "random"


class Scope(Enum):
    """What an SSD quantizes: the whole network (detector) or only its backbone (seed 003's half)."""

    DETECTOR = "detector"
    BACKBONE = "backbone"


def _scope(value: Scope | str) -> Scope:
    from qdet.config import parse_enum

    return parse_enum(Scope, value, "scope")


def _coco(split: str, data: str | Path | None) -> Any:
    from qdet.data.coco import CocoDetection
    from qdet.paths import assets_dir

    root = Path(data) if data else assets_dir() / "coco"
    return CocoDetection(root / split, root / "annotations" / f"instances_{split}_subset.json")


def _ground_truth(data: Any) -> tuple[Any, list[int]]:
    """(annotations json path or dict, image ids) of a CocoDetection or a dataset with coco_annotations()."""
    if hasattr(data, "annotations_json"):
        return data.annotations_json, list(data.image_ids)
    if hasattr(data, "coco_annotations"):
        gt = data.coco_annotations()
        return gt, [img["id"] for img in gt["images"]]
    raise ConfigError(f"cannot evaluate on a {type(data).__name__}: pass a CocoDetection or a dataset with "
                      "coco_annotations() (e.g. qdet.models.rcnn.synthetic.SyntheticShapes)")


def _load_checked(model: nn.Module, weights: str | Path, *, name: str, class_key: str, boxes_per_cell: int,
                  num_classes: int, foreign: Mapping[str, str]) -> None:
    """Read `weights`, name what the file is when it is another SSD's layout or another class count, load."""
    state = load_state_dict_file(weights, expected_keys_from=model)
    own = set(model.state_dict())
    if not own & set(state):
        for prefix, what in foreign.items():
            if any(k.startswith(prefix) for k in state):
                raise WeightsError(f"weights '{weights}' are {what}, not {name}'s layout (e.g. {min(own)}); "
                                   "use the matching adapter")
    if class_key in state and class_key in own:
        out = state[class_key].shape[0]
        if out % boxes_per_cell == 0 and out // boxes_per_cell != num_classes:
            n = out // boxes_per_cell
            raise WeightsError(f"weights '{weights}' have {n} classes ({class_key} has {out} = {boxes_per_cell} × {n} "
                               f"output channels), {name} was built with num_classes={num_classes}: pass "
                               f"--num-classes {n} (num_classes={n})")
    load_into(model, state, source=str(weights), model_name=name)


@dataclass(frozen=True)
class SSDResNet50Adapter:
    """NVIDIA DeepLearningExamples SSD300 v1.1 (ResNet50): 81 classes (background + COCO's 80)."""

    name: str = "ssd300_resnet50"
    num_classes: int = 81
    img_size: int = 300
    scope: Scope = Scope.DETECTOR
    task: Task = Task.DETECTION
    # ImageNet-normalised [0, 1] pixels: calibrating on raw [0, 1] images warns (seed 003's collapse)
    input_range: tuple[float, float] = (-IMAGENET_MEAN[0] / IMAGENET_STD[0], (1 - IMAGENET_MEAN[2]) / IMAGENET_STD[2])

    def with_scope(self, scope: Scope | str) -> SSDResNet50Adapter:
        return dataclasses.replace(self, scope=_scope(scope))

    def build(self, weights: str | Path | None = None, **options: Any) -> SSDDetector:
        """weights: a state-dict file in NVIDIA's layout (`{"model": ...}` and `module.` are unwrapped) or
        "random". Options: num_classes (with background), img_size (>= 264; default boxes follow it),
        score_thresh, iou_thresh, max_detections (per-class NMS)."""
        num_classes = int(options.pop("num_classes", self.num_classes))
        img_size = int(options.pop("img_size", self.img_size))
        post = PostProcess(**{k: options.pop(k) for k in ("score_thresh", "iou_thresh", "max_detections") if k in options})
        if options:
            raise ConfigError(f"{self.name}: unknown build option(s) {sorted(options)}; known: num_classes, img_size, "
                              "score_thresh, iou_thresh, max_detections")
        if num_classes < 2:
            raise ConfigError(f"{self.name}: num_classes={num_classes} must count the background class too (>= 2)")
        net = SSD300ResNet50(num_classes)
        if weights is None:
            warnings.warn(f"{self.name}: no weights given (none are bundled); using random initialisation "
                          "(pass an NVIDIA-layout state-dict file, or weights='random')", stacklevel=2)
        elif str(weights) != RANDOM_INIT:
            _load_checked(net, weights, name=self.name, class_key="conf.0.weight", boxes_per_cell=4,
                          num_classes=num_classes,
                          foreign={"backbone.": "a torchvision SSD state dict (backbone.*/head.* keys; "
                                                "ssd300_vgg16 or ssdlite320_mobilenet_v3_large)",
                                   "roi_heads.": "a torchvision Faster R-CNN state dict"})
        return SSDDetector(net, img_size=img_size, post=post).eval()

    def regions(self, model: nn.Module) -> list[Region]:
        return [Region("net.feature_extractor" if self.scope is Scope.BACKBONE else "net")]

    def detection_graph(self, model: nn.Module, nms: Any = None) -> Any:
        """Whole graph (`qdet.lower(..., whole_graph=True)`): net + box decode + softmax + per-class NMS,
        the default boxes as constants; `nms` default: the model's own `PostProcess` settings."""
        from qdet.models.ssd.graph import ssd_graph

        return ssd_graph(model, nms)

    def transform_fn(self, model: nn.Module) -> Callable[[Any], Tensor]:
        """(inputs, ids) batches of `SSDInputs` → the (B, 3, S, S) normalised input: exactly inference's."""
        return lambda batch: batch[0] if isinstance(batch, (tuple, list)) else batch

    # ---- data ----
    def eval_dataset(self, data: str | Path | None = None) -> Any:
        """COCO val images (default: the bundled val2017 subset)."""
        return _coco("val2017", data)

    def calibration_dataset(self, data: str | Path | None = None, *, normalize: bool = True) -> Any:
        """COCO train2017 images through the inference preprocessing (resize, ImageNet normalisation);
        `normalize=False` is the seed's mistake ([0, 1] pixels), kept for the study."""
        from qdet.models.ssd.data import SSDInputs

        return SSDInputs(_coco("train2017", data), img_size=self.img_size, normalize=normalize)

    eval_batch_size = 8  # images per network call in `predict`: shards of a sharded evaluation are whole batches

    def evaluate(self, model: Callable[..., Any], data: Any = None, *, progress: bool = True) -> Any:
        """COCO mAP of any callable with SSDDetector's outputs. 81 classes: label k ↔ COCO80_TO_91[k-1]
        (NVIDIA's label map); other class counts: the label is the category id."""
        data = data if data is not None else self.eval_dataset()
        _ground_truth(data)  # a dataset without ground truth fails before inference
        return self.score(self.predict(model, data, progress=progress), data)

    def predict(self, model: Callable[..., Any], data: Any, *, indices: Sequence[int] | None = None,
                progress: bool = True, desc: str | None = None) -> list[dict[str, Any]]:
        """`evaluate`'s first half: COCO-json detections of the images at `indices` (default all)."""
        from qdet.data.coco import COCO80_TO_91
        from qdet.models.ssd.data import coco_detections

        det = next((m for m in getattr(model, "modules", list)() if isinstance(m, SSDDetector)), None)
        n = getattr(det, "num_classes", self.num_classes)
        img_size = getattr(det, "img_size", self.img_size)
        return coco_detections(model, data, img_size=img_size, label_to_category=COCO80_TO_91 if n == 81 else None,
                               batch_size=self.eval_batch_size, indices=indices, progress=progress)

    def score(self, predictions: list[dict[str, Any]], data: Any) -> Any:
        """`evaluate`'s second half: all detections scored once by pycocotools."""
        from qdet.eval.coco import evaluate_coco

        gt, ids = _ground_truth(data)
        return evaluate_coco(predictions, gt, image_ids=ids)


# torchvision heads: (boxes per cell of the first level, the key whose rows give the class count)
_TV_CLASS_KEYS = {
    "ssd300_vgg16": ("head.classification_head.module_list.0.weight", 4),
    "ssdlite320_mobilenet_v3_large": ("head.classification_head.module_list.0.1.weight", 6),
}
_TV_OPTIONS = ("score_thresh", "nms_thresh", "detections_per_img", "topk_candidates", "image_mean", "image_std")


@dataclass(frozen=True)
class TorchvisionSSDAdapter:
    """torchvision `ssd300_vgg16` / `ssdlite320_mobilenet_v3_large`, 91 COCO labels (0 = background)."""

    name: str
    num_classes: int = 91
    scope: Scope = Scope.DETECTOR
    task: Task = Task.DETECTION

    def with_scope(self, scope: Scope | str) -> TorchvisionSSDAdapter:
        return dataclasses.replace(self, scope=_scope(scope))

    def build(self, weights: str | Path | None = None, **options: Any) -> nn.Module:
        """weights: a torchvision state-dict file of this architecture, or "random". Options: num_classes and
        torchvision's score_thresh, nms_thresh, detections_per_img, topk_candidates, image_mean, image_std."""
        import torchvision.models.detection as det

        from qdet.models.ssd.views import make_quantizable

        num_classes = int(options.pop("num_classes", self.num_classes))
        unknown = sorted(set(options) - set(_TV_OPTIONS))
        if unknown:
            raise ConfigError(f"unknown build option(s) for {self.name}: {', '.join(unknown)}; known: num_classes, "
                              f"{', '.join(_TV_OPTIONS)}")
        model = getattr(det, self.name)(weights=None, weights_backbone=None, num_classes=num_classes, **options)
        if weights is None:
            warnings.warn(f"{self.name}: no weights given; using random initialisation (pass a torchvision "
                          "state-dict file, or weights='random')", stacklevel=2)
        elif str(weights) != RANDOM_INIT:
            key, per_cell = _TV_CLASS_KEYS[self.name]
            _load_checked(model, weights, name=self.name, class_key=key, boxes_per_cell=per_cell,
                          num_classes=num_classes,
                          foreign={"feature_extractor.": "an NVIDIA SSD300-ResNet50 state dict (use ssd300_resnet50)",
                                   "additional_blocks.": "an NVIDIA SSD300-ResNet50 state dict (use ssd300_resnet50)",
                                   "roi_heads.": "a torchvision Faster R-CNN state dict"})
        return make_quantizable(model)

    def regions(self, model: nn.Module) -> list[Region]:
        from qdet.models.ssd.views import check_quantizable

        check_quantizable(model)
        return [Region("backbone")] if self.scope is Scope.BACKBONE else [Region("backbone"), Region("head")]

    def detection_graph(self, model: nn.Module, nms: Any = None) -> Any:
        """Whole graph (`qdet.lower(..., whole_graph=True)`): torchvision's SSD exported end to end around
        the int8 regions (transform incl. resize, default boxes, decode, softmax, per-class selection,
        boxes rescaled to the image), one image a call; its thresholds are the model's own
        (score_thresh, nms_thresh, topk_candidates, detections_per_img), so `nms` must be None."""
        from qdet.models.torchvision_graph import torchvision_detector_graph

        if nms is not None:
            raise ConfigError(f"{self.name}: the whole graph keeps the model's own thresholds; build it with "
                              "score_thresh/nms_thresh/detections_per_img instead of nms=")
        return torchvision_detector_graph(model)

    def transform_fn(self, model: nn.Module) -> Callable[[Any], list[Tensor]]:
        """Batch → list of (3, H, W) images in [0, 1]; torchvision's transform resizes and normalises."""
        from qdet.models.faster_rcnn import images_of

        checked: list[bool] = []

        def transform(batch: Any) -> list[Tensor]:
            images = images_of(batch)
            if not checked:
                checked.append(True)
                lo, hi = min(float(i.min()) for i in images), max(float(i.max()) for i in images)
                if hi > 1.5 or lo < -0.5:
                    warnings.warn(f"{self.name}: calibration images span [{lo:.3g}, {hi:.3g}]; torchvision SSDs expect "
                                  "pixels in [0, 1] and normalise themselves", stacklevel=2)
            return images

        return transform

    # ---- data ----
    def eval_dataset(self, data: str | Path | None = None) -> Any:
        return _coco("val2017", data)

    def calibration_dataset(self, data: str | Path | None = None) -> Any:
        """COCO train2017 images as (3, H, W) floats in [0, 1] (batch them with `collate`)."""
        from qdet.models.ssd.data import as_float_image

        return _FloatImages(_coco("train2017", data), as_float_image)

    @staticmethod
    def collate(items: list[Any]) -> list[Any]:
        return list(items)

    def evaluate(self, model: Callable[..., Any], data: Any = None, *, progress: bool = True) -> Any:
        """COCO mAP; torchvision's 91-class labels are COCO category ids (other class counts: label = id)."""
        data = data if data is not None else self.eval_dataset()
        return self.score(self.predict(model, data, progress=progress), data)

    def predict(self, model: Callable[..., Any], data: Any, *, indices: Sequence[int] | None = None,
                progress: bool = True, desc: str | None = None) -> list[dict[str, Any]]:
        """`evaluate`'s first half: COCO-json detections of the images at `indices` (default all), one
        image per call."""
        from qdet.models.faster_rcnn import coco_json_detections, predict
        from qdet.models.ssd.data import as_float_image

        order = list(indices) if indices is not None else list(range(len(data)))
        ids = _ground_truth(data)[1]
        outputs = predict(model, _FloatImages(data, as_float_image), indices=order, progress=progress)
        return coco_json_detections([ids[i] for i in order], outputs)

    def score(self, predictions: list[dict[str, Any]], data: Any) -> Any:
        """`evaluate`'s second half: all detections scored once by pycocotools."""
        from qdet.eval.coco import evaluate_coco

        gt, ids = _ground_truth(data)
        return evaluate_coco(predictions, gt, image_ids=ids)


class _FloatImages(torch.utils.data.Dataset):
    def __init__(self, source: Any, convert: Callable[[Any], Tensor]) -> None:
        self.source, self.convert = source, convert

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> Tensor:
        return self.convert(self.source[index][0])


SSD_ADAPTERS: tuple[Any, ...] = (
    SSDResNet50Adapter(),
    TorchvisionSSDAdapter("ssd300_vgg16"),
    TorchvisionSSDAdapter("ssdlite320_mobilenet_v3_large"),
)

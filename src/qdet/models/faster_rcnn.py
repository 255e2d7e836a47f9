"""torchvision Faster R-CNN (ResNet50-FPN v1/v2, MobileNetV3-Large-FPN) as an int8 detector.

int8 regions (module paths of the whole model):
    backbone                  body + FPN, one graph (the FPN gets the body's dict directly)
    rpn.head                  shared 3×3 conv + objectness/box-delta convs, every level
    roi_heads.box_head        TwoMLPHead (fc6, fc7) or the v2 conv head
    roi_heads.box_predictor   class scores + box deltas
float islands: GeneralizedRCNNTransform (normalise, resize, pad), anchor generation, box decoding,
proposal filtering + NMS, MultiScaleRoIAlign, detection post-processing (softmax, NMS, rescale).

A calibration batch is a list of (3, H, W) images in [0, 1] (or `(images, targets)` from a detection
loader); the model's own transform runs inside `model(images)`, so calibration sees exactly the
inference preprocessing (seed 001 calibrates through the transform too).

Example:
    >>> from qdet.models import REGISTRY
    >>> adapter = REGISTRY.get("fasterrcnn_resnet50_fpn")
    >>> model = adapter.build(weights="random", min_size=256, max_size=512)
    >>> [r.path for r in adapter.regions(model)]
    ['backbone', 'rpn.head', 'roi_heads.box_head', 'roi_heads.box_predictor']
    >>> qm = qdet.quantize(model, [[torch.rand(3, 200, 300)]], adapter=adapter)  # doctest: +SKIP
    >>> qm([torch.rand(3, 200, 300)])[0].keys()  # doctest: +SKIP
    dict_keys(['boxes', 'labels', 'scores'])
"""
from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from qdet.errors import ConfigError, DataError, WeightsError
from qdet.models.base import Region, Task
from qdet.models.rcnn.views import check_quantizable, make_quantizable
from qdet.models.weights import load_into, load_state_dict_file

__all__ = [
    "COCO_TO_KITTI",
    "FASTER_RCNN_ADAPTERS",
    "RANDOM_INIT",
    "data_source",
    "REGION_PATHS",
    "FasterRCNNAdapter",
    "images_of",
    "predict",
]

RANDOM_INIT = "random"
REGION_PATHS: tuple[str, ...] = ("backbone", "rpn.head", "roi_heads.box_head", "roi_heads.box_predictor")

# torchvision FasterRCNN keyword arguments `build()` passes through (everything else is an error).
_MODEL_OPTIONS = (
    "min_size", "max_size", "image_mean", "image_std", "rpn_pre_nms_top_n_test", "rpn_post_nms_top_n_test",
    "rpn_nms_thresh", "rpn_score_thresh", "box_score_thresh", "box_nms_thresh", "box_detections_per_img",
    "trainable_backbone_layers",
)
# Builders whose backbone BN torchvision makes FrozenBatchNorm2d whenever weights are loaded (v2 trains its BN).
_FROZEN_BN_WHEN_TRAINED = ("fasterrcnn_resnet50_fpn", "fasterrcnn_mobilenet_v3_large_fpn")
# COCO category id → KITTI class, for evaluating COCO-trained weights on KITTI (person → Pedestrian, ...).
# Approximate: a COCO "bicycle" box covers the bike, a KITTI "Cyclist" box the bike and its rider.
COCO_TO_KITTI: dict[int, str] = {1: "Pedestrian", 2: "Cyclist", 3: "Car", 8: "Truck", 7: "Tram"}


def images_of(batch: Any) -> list[Tensor]:
    """A calibration/inference batch → list of (3, H, W) float images.

    Accepts a list/tuple of images, `(images, targets)`, a single (3, H, W) image or an (N, 3, H, W)
    tensor.

    >>> [tuple(x.shape) for x in images_of(torch.zeros(2, 3, 8, 8))]
    [(3, 8, 8), (3, 8, 8)]
    """
    if isinstance(batch, Tensor):
        if batch.dim() == 3:
            return [batch]
        if batch.dim() == 4:
            return list(batch.unbind(0))
        raise DataError(f"an image batch must be (3, H, W) or (N, 3, H, W), got shape {tuple(batch.shape)}")
    if isinstance(batch, (list, tuple)) and len(batch) == 2 and isinstance(batch[0], (list, tuple, Tensor)) \
            and not isinstance(batch[1], Tensor) and isinstance(batch[1], (list, tuple, dict)):
        return images_of(batch[0])  # (images, targets)
    if isinstance(batch, (list, tuple)) and batch and all(isinstance(x, Tensor) and x.dim() == 3 for x in batch):
        return list(batch)
    raise DataError(f"cannot read images from a batch of type {type(batch).__name__}: pass a list of (3, H, W) "
                    "tensors in [0, 1] or (images, targets)")


def _mark_backbone_bn_frozen(model: nn.Module) -> int:
    """Mark the backbone's BN frozen (as torchvision's FrozenBatchNorm2d for trained weights): QAT then
    folds them with their running statistics from the first step and leaves γ, β fixed. PTQ and
    inference are unaffected (eval mode). Returns how many were marked."""
    from qdet.quant.fusion import mark_frozen

    bns = [m for m in model.backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn in bns:
        mark_frozen(bn)
        bn.weight.requires_grad_(False)
        bn.bias.requires_grad_(False)
    return len(bns)


def _upgrade_legacy_keys(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """torchvision < 0.13 checkpoints (the COCO v1 file) name the RPN conv `rpn.head.conv.weight`."""
    out = {}
    for key, value in state.items():
        m = re.fullmatch(r"(.*rpn\.head\.conv)\.(weight|bias)", key)
        out[f"{m.group(1)}.0.0.{m.group(2)}" if m else key] = value
    return out


@dataclass(frozen=True)
class FasterRCNNAdapter:
    """One torchvision Faster R-CNN builder (`fasterrcnn_resnet50_fpn`, `..._v2`, `fasterrcnn_mobilenet_v3_large_fpn`).

    `build(weights)`: weights is a state-dict file (torchvision COCO weights, or your own checkpoint:
    pass `num_classes` when it differs from 91), a torchvision weights name ("DEFAULT", "COCO_V1";
    downloads, WeightsError offline), "random", or None (random + warning). The returned model is
    already `make_quantizable` (BN unfrozen, traceable head views) and in eval mode. With loaded
    weights, the v1 ResNet50 and MobileNetV3 backbones' BN are marked frozen, as torchvision builds
    them (FrozenBatchNorm2d): QAT keeps their statistics and affine fixed.
    """

    name: str
    num_classes: int = 91
    task: Task = Task.DETECTION

    # ------------------------------------------------------------------ model
    def build(self, weights: str | Path | None = None, **options: Any) -> nn.Module:
        """Float model in eval mode. Options: num_classes, bn_eps, and FasterRCNN's min_size, max_size,
        box_score_thresh, box_nms_thresh, box_detections_per_img, rpn_pre/post_nms_top_n_test, ...

        bn_eps: BatchNorm epsilon to use — torchvision's COCO_V1 ResNet50 file was trained with 0.0
        (it is set automatically when weights="COCO_V1"/"DEFAULT" name that file).
        """
        import torchvision.models.detection as det

        num_classes = int(options.pop("num_classes", self.num_classes))
        bn_eps = options.pop("bn_eps", None)
        unknown = sorted(set(options) - set(_MODEL_OPTIONS))
        if unknown:
            raise ConfigError(f"unknown build option(s) for {self.name}: {', '.join(unknown)}; known: num_classes, "
                              f"bn_eps, {', '.join(_MODEL_OPTIONS)}")
        model = getattr(det, self.name)(weights=None, weights_backbone=None, num_classes=num_classes, **options)
        make_quantizable(model)
        if weights is None:
            warnings.warn(f"{self.name}: no weights given; using random initialisation (pass a state-dict file, "
                          "weights='DEFAULT' or weights='random')", stacklevel=2)
        elif str(weights) != RANDOM_INIT:
            member = self._enum_member(weights)
            if member is not None:
                state, source = self._download(member, num_classes), f"torchvision {member}"
                if bn_eps is None and str(member).endswith("COCO_V1") and self.name == "fasterrcnn_resnet50_fpn":
                    bn_eps = 0.0  # torchvision's overwrite_eps(model, 0.0) for this file
            else:
                state, source = load_state_dict_file(weights, expected_keys_from=model), str(weights)
            load_into(model, _upgrade_legacy_keys(state), source=source, model_name=self.name)
            if self.name in _FROZEN_BN_WHEN_TRAINED:
                _mark_backbone_bn_frozen(model)
        if bn_eps is not None:
            for m in model.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.eps = float(bn_eps)
        return model.eval()

    def _weights_enum(self) -> Any:
        from torchvision.models import get_model_weights

        return get_model_weights(self.name)

    def _enum_member(self, weights: str | Path) -> Any | None:
        if isinstance(weights, Path):
            return None
        enum = self._weights_enum()
        key = str(weights).removeprefix(f"{enum.__name__}.")
        if key == "DEFAULT":
            return enum.DEFAULT
        if key in enum.__members__:
            return enum[key]
        if key.isupper() and not any(c in key for c in "./\\") and not Path(weights).exists():
            raise ConfigError(f"unknown torchvision weights {weights!r} for {self.name}; known: DEFAULT, "
                              f"{', '.join(enum.__members__)}, or a state-dict file")
        return None

    def _download(self, member: Any, num_classes: int) -> dict[str, Tensor]:
        n = len(member.meta.get("categories", ()))
        if n and n != num_classes:
            raise ConfigError(f"{self.name}: torchvision weights {member} have {n} classes, not num_classes={num_classes}; "
                              "load them with the default num_classes and fine-tune, or pass your own checkpoint file")
        try:
            return member.get_state_dict(progress=True, check_hash=True, weights_only=True)
        except OSError as e:  # URLError / socket errors / unwritable cache
            raise WeightsError(
                f"could not download torchvision weights {member} for {self.name} from {member.url} "
                f"(no network? {e}); download the file elsewhere and pass it: build(weights='path/to/file.pth')"
            ) from None
        except RuntimeError as e:  # hash mismatch or a truncated download
            raise WeightsError(f"downloaded torchvision weights {member} for {self.name} are corrupt ({e})") from None

    # ------------------------------------------------------------------ quantization
    def detection_graph(self, model: nn.Module, nms: Any = None) -> Any:
        """Whole graph (`qdet.lower(..., whole_graph=True)`): torchvision's detector exported end to end
        around the int8 regions, one image a call; its thresholds are the model's own (box_score_thresh,
        box_nms_thresh, box_detections_per_img), so `nms` must be None."""
        from qdet.models.torchvision_graph import torchvision_detector_graph

        if nms is not None:
            raise ConfigError(f"{self.name}: the whole graph keeps the model's own thresholds; build it with "
                              "box_score_thresh/box_nms_thresh/box_detections_per_img instead of nms=")
        return torchvision_detector_graph(model)

    def regions(self, model: nn.Module) -> list[Region]:
        """backbone (body+FPN), rpn.head, roi_heads.box_head, roi_heads.box_predictor.

        Raises ConfigError when `model` was not made quantizable (use `build()` or `make_quantizable`).
        """
        check_quantizable(model)
        return [Region(path) for path in REGION_PATHS]

    def transform_fn(self, model: nn.Module) -> Callable[[Any], list[Tensor]]:
        """Batch → list of (3, H, W) images on the model's device; the model's transform does the rest."""
        p = next(model.parameters(), None)
        device = p.device if p is not None else torch.device("cpu")
        checked: list[bool] = []

        def transform(batch: Any) -> list[Tensor]:
            images = [img.to(device) for img in images_of(batch)]
            if not checked:
                checked.append(True)
                hi = max(float(img.max()) for img in images)
                if hi > 1.5:
                    warnings.warn(f"{self.name}: calibration images reach {hi:.3g}; torchvision detectors expect "
                                  "pixels in [0, 1] (divide uint8 images by 255)", stacklevel=2)
            return images

        return transform

    # ------------------------------------------------------------------ data and evaluation
    def eval_dataset(self, data: str | Path | None = None) -> Any:
        """`kitti:DIR` or a KITTI folder (one with `training/image_2`, or `image_2`) → KittiDataset;
        `coco:DIR`, another folder or None (the bundled val2017 subset) → CocoDetection of val2017."""
        from qdet.data.kitti import KittiDataset

        kind, root = data_source(data)
        return KittiDataset(root) if kind == "kitti" else _coco("val2017", root)

    def calibration_dataset(self, data: str | Path | None = None) -> Any:
        """Training images as (3, H, W) float tensors in [0, 1]: KITTI training frames or COCO train2017
        (never COCO's evaluation images). Sizes differ: batch them with `collate` (lists)."""
        from qdet.data.kitti import KittiDataset

        kind, root = data_source(data)
        return _Images(KittiDataset(root) if kind == "kitti" else _coco("train2017", root))

    @staticmethod
    def collate(items: list[Any]) -> list[Any]:
        """Batch of a detection loader: a plain list (images of different sizes are not stacked)."""
        return list(items)

    def evaluate(self, model: Callable[..., Any], data: Any = None, *, progress: bool = True,
                 class_names: Mapping[int, str] | None = None, desc: str | None = None) -> Any:
        """COCO mAP on a CocoDetection (91-class torchvision labels are COCO category ids), or KITTI 2D AP
        + the seed's accuracy/precision/mIoU on a KittiDataset (whole split).

        class_names (KITTI): detector label → KITTI class (default COCO_TO_KITTI for 91-class models,
        else the order of `qdet.data.kitti.KITTI_CLASSES`, label 1 = Car).
        """
        data = data if data is not None else self.eval_dataset()
        return self.score(self.predict(model, data, progress=progress, class_names=class_names, desc=desc), data)

    def predict(self, model: Callable[..., Any], data: Any, *, indices: Sequence[int] | None = None,
                progress: bool = True, class_names: Mapping[int, str] | None = None,
                desc: str | None = None) -> list[Any]:
        """`evaluate`'s first half over the images at `indices` (default all), one image per call:
        COCO-json detections (CocoDetection), or per frame [[KITTI class, [x1, y1, x2, y2], score], ...]
        (KittiDataset). JSON values, so shards travel and concatenate."""
        from qdet.data.coco import CocoDetection
        from qdet.data.kitti import KITTI_CLASSES, KittiDataset

        order = list(indices) if indices is not None else list(range(len(data)))
        n_classes = _num_classes(model, self.num_classes)
        if isinstance(data, KittiDataset):
            from qdet.eval.kitti import detections_from_outputs

            if class_names is None:
                class_names = COCO_TO_KITTI if n_classes == 91 else {i + 1: c for i, c in enumerate(KITTI_CLASSES)}
            outputs = predict(model, data, indices=order, progress=progress,
                              desc=f"{desc or self.name}: KITTI inference (images)")
            return [[[d.type, list(d.box), d.score] for d in detections_from_outputs(out, class_names)]
                    for out in outputs]
        if isinstance(data, CocoDetection):
            if n_classes != 91:
                raise ConfigError(f"{self.name}: COCO evaluation needs the 91-class COCO label space, the model has "
                                  f"{n_classes} classes; evaluate it on its own data (e.g. a KittiDataset)")
            outputs = predict(model, _Images(data), indices=order, progress=progress,
                              desc=f"{desc or self.name}: COCO inference (images)")
            return coco_json_detections([data.image_ids[i] for i in order], outputs)
        raise ConfigError(f"{self.name}: cannot evaluate on a {type(data).__name__}; pass a KittiDataset or CocoDetection")

    def score(self, predictions: list[Any], data: Any) -> Any:
        """`evaluate`'s second half: COCO detections scored once by pycocotools, or the KITTI
        evaluation of every frame's detections (`predictions[i]` for frame i)."""
        from qdet.data.kitti import KittiDataset

        if isinstance(data, KittiDataset):
            from qdet.eval.kitti import Detection, evaluate_kitti

            dets = [[Detection(t, tuple(box), s) for t, box, s in frame] for frame in predictions]
            return evaluate_kitti([data.labels(i) for i in range(len(data))], dets)
        from qdet.eval.coco import evaluate_coco

        return evaluate_coco(predictions, data.annotations_json, image_ids=data.image_ids)


class _Images(torch.utils.data.Dataset):
    """Items of a (image, meta/target) dataset as (3, H, W) float tensors in [0, 1]."""

    def __init__(self, source: Any) -> None:
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> Tensor:
        image = self.source[index][0]
        if isinstance(image, Tensor):
            return image.float() / 255.0 if image.dtype == torch.uint8 else image
        return torch.from_numpy(image).permute(2, 0, 1).float().div_(255.0)  # (H, W, 3) uint8 RGB


_DATA_KINDS = ("kitti", "coco")


def _is_kitti(path: Path) -> bool:
    return (path / "image_2").is_dir() or (path / "training" / "image_2").is_dir()


def data_source(data: str | Path | None) -> tuple[str, Path | None]:
    """`--data` → (kind, folder): "kitti:DIR" / "coco:DIR" name the format; a bare folder is KITTI when it
    has `image_2` (or `training/image_2`), else COCO; None is the bundled COCO subset.

    >>> data_source("kitti:/data/kitti")
    ('kitti', PosixPath('/data/kitti'))
    """
    if data is None:
        return "coco", None
    text = str(data)
    kind, sep, rest = text.partition(":")
    if sep and kind.lower() in _DATA_KINDS:
        root = Path(rest).expanduser()
        if not root.is_dir():
            raise DataError(f"--data {text}: {root} is not a folder")
        if kind.lower() == "kitti" and not _is_kitti(root):
            raise DataError(f"--data {text}: {root} has neither image_2/ nor training/image_2/ (a KITTI folder)")
        return kind.lower(), root
    if sep and not Path(text).exists() and len(kind) > 1:
        raise ConfigError(f"--data {text}: unknown data kind {kind!r}; use kitti:DIR, coco:DIR or a folder")
    root = Path(text)
    return ("kitti" if _is_kitti(root) else "coco"), root


def _coco(split: str, data: str | Path | None) -> Any:
    from qdet.data.coco import CocoDetection
    from qdet.paths import assets_dir

    root = Path(data) if data else assets_dir() / "coco"
    return CocoDetection(root / split, root / "annotations" / f"instances_{split}_subset.json")


def _num_classes(model: Any, default: int) -> int:
    """Classes of the detector inside `model` (float, QuantizedModel or lowered), else `default`."""
    for m in getattr(model, "modules", list)():
        predictor = getattr(getattr(m, "roi_heads", None), "box_predictor", None)
        score = getattr(predictor, "cls_score", None)
        if isinstance(score, nn.Linear):
            return score.out_features
    return default


def predict(model: Callable[..., Any], data: Any, *, indices: Sequence[int] | None = None, progress: bool = True,
            desc: str = "detecting (images)") -> list[dict[str, Tensor]]:
    """Run `model` image by image over a dataset yielding images or (image, target) — or over the
    items at `indices` of an indexable one; torchvision outputs."""
    from tqdm.auto import tqdm

    items: Iterable[Any] = data if indices is None else (data[i] for i in indices)
    total = len(indices) if indices is not None else (len(data) if hasattr(data, "__len__") else None)
    outputs = []
    with torch.no_grad():
        for item in tqdm(items, total=total, desc=desc, disable=not progress, leave=False):
            image = item[0] if isinstance(item, (tuple, list)) else item
            outputs.append({k: v.detach().cpu() for k, v in model([image])[0].items()})
    return outputs


def coco_json_detections(image_ids: Sequence[int], outputs: Sequence[Mapping[str, Tensor]]) -> list[dict[str, Any]]:
    """torchvision outputs (x1, y1, x2, y2 boxes; labels = COCO category ids) of the images `image_ids`
    → COCO result dicts {image_id, category_id, bbox [x, y, w, h], score}."""
    return [{"image_id": int(image_id), "category_id": int(lab), "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]],
             "score": float(sc)}
            for image_id, out in zip(image_ids, outputs)
            for b, lab, sc in zip(out["boxes"].tolist(), out["labels"].tolist(), out["scores"].tolist())]


FASTER_RCNN_ADAPTERS: tuple[FasterRCNNAdapter, ...] = (
    FasterRCNNAdapter("fasterrcnn_resnet50_fpn"),
    FasterRCNNAdapter("fasterrcnn_resnet50_fpn_v2"),
    FasterRCNNAdapter("fasterrcnn_mobilenet_v3_large_fpn"),
)

"""Darknet adapters: `darknet` (any cfg: `qdet quantize darknet --cfg my.cfg --weights my.weights`) and
`darknet-yolov3`, `darknet-yolov4-tiny`, ... (the bundled cfgs) + a user's .weights.

What is int8: the whole `body` (every convolution, BN folded, activations, shortcuts, routes,
max-pools, upsamples). What stays float: the [yolo] decode (sigmoid, grid, anchors, exp or
new_coords) and NMS — the float islands after the region. Quantization itself is qdet's generic path.

    >>> adapter = DarknetAdapter("darknet-yolov3-tiny", "yolov3-tiny.cfg")
    >>> det = adapter.build("random")
    >>> [tuple(m.shape) for m in det.body(torch.zeros(1, 3, 128, 128))]
    [(1, 255, 4, 4), (1, 255, 8, 8)]
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn
from torch.utils.data import Dataset

from qdet.errors import ConfigError
from qdet.models.base import Region, Task
from qdet.models.darknet.cfg import DarknetCfg, parse_cfg, parse_cfg_text
from qdet.models.darknet.model import DarknetDetector, build_darknet, random_init_
from qdet.models.darknet.weights import load_darknet_weights
from qdet.paths import assets_dir

RANDOM_INIT = "random"
GENERIC = "darknet"  # the adapter for any cfg: `qdet quantize darknet --cfg my.cfg --weights my.weights`
SAVED_CFG = "<cfg saved in the .qdet file>"


def darknet_assets() -> Path:
    return assets_dir() / "darknet"


def read_names(path: str | Path) -> list[str]:
    """A Darknet `.names` file: one class name a line (blank lines ignored)."""
    try:
        return [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    except OSError as e:
        raise ConfigError(f"cannot read class names '{path}': {e.strerror or e}") from None


def load_darknet(cfg: str | Path | DarknetCfg, weights: str | Path | None = None, *,
                 names: Sequence[str] | None = None, seed: int = 0) -> DarknetDetector:
    """A `DarknetDetector` from a .cfg (a path or a parsed cfg) and (optionally) a .weights file;
    float32, eval mode. Its `cfg_text` keeps the cfg text (a saved .qdet stores it).

    Without weights (or with "random") the model is randomly initialised by `random_init_(seed=seed)`.
    """
    parsed = cfg if isinstance(cfg, DarknetCfg) else parse_cfg(cfg)
    body = build_darknet(parsed)
    if weights is None or str(weights) == RANDOM_INIT:
        random_init_(body, seed=seed)
    else:
        load_darknet_weights(body, weights)
    det = DarknetDetector(body, names, parsed.net).eval()
    det.cfg_text = parsed.text
    return det


@dataclass(frozen=True)
class DarknetAdapter:
    """One Darknet cfg. No weights are bundled: `build` needs a .weights path or "random"."""

    name: str
    cfg_file: str  # a bare file name: under the assets' darknet/ folder; otherwise a path; "" = none yet (--cfg)
    task: Task = Task.DETECTION
    weights_kind: str = "a Darknet .weights file"
    input_range: tuple[float, float] = (0.0, 1.0)

    @property
    def cfg_path(self) -> Path:
        if not self.cfg_file:
            raise ConfigError(f"model {self.name!r} needs --cfg PATH (a Darknet .cfg file)")
        p = Path(self.cfg_file)
        return darknet_assets() / p if p.name == self.cfg_file else p  # never a same-named file in the cwd

    @property
    def needs_cfg(self) -> bool:
        """The generic `darknet` adapter has no cfg of its own: the CLI asks for --cfg."""
        return not self.cfg_file

    def with_cfg(self, path: str | Path) -> "DarknetAdapter":
        """This adapter on another cfg file (the CLI's --cfg): checked to exist and to parse, before any work."""
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"--cfg {str(path)!r}: no such file")
        parse_cfg(p)  # a malformed file fails here: one line naming file, line and key
        return replace(self, cfg_file=str(p.resolve()))

    @property
    def img_size(self) -> int:
        """The cfg's [net] width (the bundled cfgs are square)."""
        return parse_cfg(self.cfg_path).net.width

    def build(self, weights: str | Path | None = None, **options: Any) -> DarknetDetector:
        """weights: a Darknet .weights file or "random" (None: random, with a warning). Options: cfg (another .cfg of the family),
        cfg_text (the cfg's text, as a saved .qdet holds it), names (a .names file; default the bundled
        coco.names when the cfg has 80 classes)."""
        cfg_text = options.pop("cfg_text", None)
        cfg = options.pop("cfg", None)
        cfg = parse_cfg_text(cfg_text, SAVED_CFG) if cfg_text is not None else cfg or self.cfg_path
        names_file = options.pop("names", None)
        if options:
            raise ConfigError(f"{self.name}: unknown option(s) {sorted(options)}")
        if weights is None:  # the CLI refuses this (check_weights); qdet.load overwrites the weights anyway
            warnings.warn(f"{self.name}: no weights given (none are bundled); using random initialisation "
                          "(pass a Darknet .weights file)", stacklevel=2)
            weights = RANDOM_INIT
        det = load_darknet(cfg, weights)
        nc = det.heads[0].classes
        if names_file is None and nc == 80 and (darknet_assets() / "coco.names").is_file():
            names_file = darknet_assets() / "coco.names"
        if names_file is not None:
            names = read_names(names_file)
            if len(names) != nc:
                raise ConfigError(f"{Path(names_file).name} has {len(names)} class names, the cfg has {nc} classes")
            det.names = names
        return det

    def regions(self, model: nn.Module) -> list[Region]:
        return [Region("body")]

    def detection_graph(self, model: nn.Module, nms: Any = None) -> Any:
        """Whole graph (`qdet.lower(..., whole_graph=True)`): body + [yolo] decode + NMS; `nms` default: `detector map`'s."""
        from qdet.models.yolo.graph import DARKNET_EVAL_NMS, yolo_family_graph

        return yolo_family_graph(model, nms or DARKNET_EVAL_NMS)

    def transform_fn(self, model: nn.Module) -> Callable[[Any], torch.Tensor]:
        """(images, ids) batches → images: exactly the inference input."""
        return lambda batch: batch[0] if isinstance(batch, (tuple, list)) else batch

    # ---- data: COCO through Darknet's preprocessing ----
    def _net(self) -> Any:
        return parse_cfg(self.cfg_path).net

    def _coco(self, split: str, data: str | Path | None) -> Any:
        from qdet.data.coco import CocoDetection

        root = Path(data) if data else assets_dir() / "coco"
        return CocoDetection(root / split, root / "annotations" / f"instances_{split}_subset.json")

    def eval_dataset(self, data: str | Path | None = None) -> Any:
        """COCO val images (default: the bundled 158 val2017 images)."""
        return self._coco("val2017", data)

    def labeled_calibration_dataset(self, data: str | Path | None = None) -> Any:
        """COCO train images with labels (default: the bundled 160 train2017 images), never the val images."""
        return self._coco("train2017", data)

    def calibration_dataset(self, data: str | Path | None = None) -> Dataset:
        """The calibration images through Darknet's preprocessing (plain resize, or letterbox with letter_box=1)."""
        from qdet.models.darknet.detect import DarknetCoco

        net = self._net()
        return DarknetCoco(self.labeled_calibration_dataset(data), (net.width, net.height), net.letter_box)

    def evaluate(self, model: Callable[..., Any], data: Any = None, *, progress: bool = True,
                 desc: str | None = None) -> Any:
        """COCO mAP (pycocotools) of a callable returning decoded (B, N, 5+nc) predictions, with
        Darknet's preprocessing and `detector map` thresholds (conf 0.005, NMS IoU 0.45). Darknet's
        class order is COCO's 80-class order, mapped to COCO category ids."""
        dataset = data if data is not None else self.eval_dataset()
        return self.score(self.predict(model, dataset, progress=progress, desc=desc), dataset)

    def predict(self, model: Callable[..., Any], data: Any, *, indices: Sequence[int] | None = None,
                progress: bool = True, desc: str | None = None) -> list[dict[str, Any]]:
        """`evaluate`'s first half: COCO-json detections of the images at `indices` (default all)."""
        from qdet.models.darknet.detect import run_darknet_on_coco

        net = self._net()
        return run_darknet_on_coco(model, data, getattr(model, "decode", None), size_wh=(net.width, net.height),
                                   letter_box=net.letter_box, indices=indices, progress=progress,
                                   desc=f"{desc or self.name}: COCO inference (images)")

    def score(self, predictions: list[dict[str, Any]], data: Any) -> Any:
        """`evaluate`'s second half: all detections scored once by pycocotools."""
        from qdet.eval.coco import evaluate_coco

        return evaluate_coco(predictions, data.annotations_json, image_ids=data.image_ids)

    def frame_input(self, path: str | Path) -> torch.Tensor:
        """One image file as the network sees it: (3, height, width) float in [0, 1]."""
        from qdet.data.coco import load_image
        from qdet.models.darknet.detect import darknet_preprocess

        net = self._net()
        return darknet_preprocess(load_image(path), (net.width, net.height), letter_box=net.letter_box)[0]

    def boxes(self, output: Any, *, conf: float = 0.25, iou: float = 0.45) -> list[torch.Tensor]:
        """Decoded (B, N, 5+nc) output → per image (n, 6) x1 y1 x2 y2 score class (display thresholds)."""
        from qdet.models.yolo.detect import predictions
        from qdet.models.yolo.postprocess import non_max_suppression

        return non_max_suppression(predictions(output, None), conf, iou, multi_label=False, max_det=100)


DARKNET_ADAPTERS: Sequence[DarknetAdapter] = (DarknetAdapter(GENERIC, ""),) + tuple(
    DarknetAdapter(f"darknet-{n}", f"{n}.cfg")
    for n in ("yolov3", "yolov3-spp", "yolov3-tiny", "yolov4", "yolov4-tiny", "yolov4-csp")
)

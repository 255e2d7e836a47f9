"""Whole detectors in one exported graph: int8 regions + decode + score filter + NMS, one `infer` call.

The island path (`qdet.lower(qm, "openvino")`) runs each int8 region on the runtime and decodes,
filters and suppresses in PyTorch between the calls. Here the detector's adapter declares its
decode as a PyTorch module over the (still fake-quantized) regions; `select_detections` appends
score filtering, ONNX `NonMaxSuppression` (its class dimension makes it per-class, like
`torchvision.ops.batched_nms`) and a per-image top-k; torch's ONNX exporter writes the lot as ONNX
ops and `export_region`'s QDQ rewrites make the regions int8 exactly as on the island path. Grid,
anchor and default-box constants are folded in by the exporter; letterbox/resize stays outside
(the input is the letterboxed batch).

The graph's one output is (M, 7) rows `[image index, x1, y1, x2, y2, score, class]` over the
whole batch, best first within each image; the adapter turns them into its usual per-image
output (`Detections` for the YOLO family, SSD's list of dicts). Detectors whose own code is
exportable selection included (torchvision's Faster R-CNN and SSDs) declare a `PerImageGraph` instead: their
forward is exported as it is (one image a call), with `batched_nms_graph` for torchvision's NMS.

    >>> import qdet  # doctest: +SKIP
    >>> whole = qdet.lower(qm, "openvino", whole_graph=True)  # doctest: +SKIP
    >>> whole(images)[0].shape   # (n, 6) x1 y1 x2 y2 score class of image 0  # doctest: +SKIP
"""
from __future__ import annotations

import contextlib
import copy
import re
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from qdet.errors import ConfigError

__all__ = ["DetectionGraph", "Detections", "NmsSettings", "PerImageGraph", "PerImageGraphModule",
           "WholeGraphModule", "batched_nms_graph", "graph_nms", "lower_whole_graph", "select_detections",
           "split_rows"]

ROW_COLUMNS = ("image", "x1", "y1", "x2", "y2", "score", "class")


@dataclass(frozen=True)
class NmsSettings:
    """What survives decoding: (box, class) pairs scoring above `conf`, per-class NMS at IoU `iou`,
    the best `max_det` per image. `multi_label=False` keeps only each box's best class (YOLO's
    display setting); the evaluation settings keep every class above `conf`."""

    conf: float
    iou: float
    max_det: int
    multi_label: bool = True

    def __post_init__(self) -> None:
        if not 0.0 <= self.conf < 1.0:
            raise ConfigError(f"NMS conf threshold must be in [0, 1), got {self.conf}")
        if not 0.0 < self.iou <= 1.0:
            raise ConfigError(f"NMS IoU threshold must be in (0, 1], got {self.iou}")
        if self.max_det < 1:
            raise ConfigError(f"NMS max_det must be >= 1, got {self.max_det}")


class Detections(list):
    """Per image (n, 6) tensors x1 y1 x2 y2 score class, already suppressed with `settings`: what
    the YOLO-family whole graphs return, so evaluation knows not to suppress again."""

    def __init__(self, items: list[Tensor], settings: NmsSettings) -> None:
        super().__init__(items)
        self.settings = settings


@dataclass
class DetectionGraph:
    """An adapter's whole-graph declaration.

    decoder: x (B, 3, H, W) → (boxes (B, N, 4) x1 y1 x2 y2, scores (B, C, N)), built over the
             model's regions (exportable PyTorch: ONNX-mappable ops only);
    nms: the selection settings (the adapter's evaluation settings by default);
    outputs: (rows (M, 7), batch size) → the adapter's per-image output;
    island_select: the island path's own output → the same per-image output with the same `nms`
             (YOLO: PyTorch NMS on the decoded rows; SSD: identity, its forward suppresses), so
             both paths can be timed and compared end to end.
    """

    decoder: nn.Module
    nms: NmsSettings
    outputs: Callable[[Tensor, int], Any]
    island_select: Callable[[Any], Any] = lambda out: out


@dataclass
class PerImageGraph:
    """A declaration for a detector whose own forward is exportable end to end, selection included
    (torchvision's Faster R-CNN: transform, anchors, proposal NMS, MultiScaleRoIAlign, post-processing).

    module: (1, 3, H, W) image → flat output tensors of that image (the graph's outputs);
    outputs: those tensors → the adapter's output for one image.
    The graph takes one image a call (torchvision's exported detectors do); a batch loops over its images.
    """

    module: nn.Module
    outputs: Callable[[list[Tensor]], Any]
    num_outputs: int


class GraphAdapter(Protocol):
    name: str

    def detection_graph(self, model: nn.Module, nms: NmsSettings | None = None) -> DetectionGraph | PerImageGraph: ...


# ---------------------------------------------------------------- selection (exportable)
class _NonMaxSuppression(torch.autograd.Function):
    """ONNX NonMaxSuppression: boxes (B, N, 4), scores (B, C, N) → selected (K, 3) [image, class, box].

    Eager (and while tracing for export) it computes the same with torchvision's NMS: per image and
    class, boxes scoring > `score_threshold`, greedy suppression of IoU > `iou_threshold`, at most
    `max_per_class` kept, by image then class then score."""

    @staticmethod
    def forward(ctx: Any, boxes: Tensor, scores: Tensor, max_per_class: int, iou_threshold: float,
                score_threshold: float) -> Tensor:
        import torchvision

        out = []
        for b in range(scores.shape[0]):
            for c in range(scores.shape[1]):
                s = scores[b, c]
                idx = (s > score_threshold).nonzero().squeeze(1)
                keep = idx[torchvision.ops.nms(boxes[b, idx], s[idx], iou_threshold)[:max_per_class]]
                out.append(torch.stack([torch.full_like(keep, b), torch.full_like(keep, c), keep], 1))
        return torch.cat(out) if out else torch.zeros(0, 3, dtype=torch.long)

    @staticmethod
    def symbolic(g: Any, boxes: Any, scores: Any, max_per_class: int, iou_threshold: float,
                 score_threshold: float) -> Any:
        # corner boxes: ONNX reads them as [y1, x1, y2, x2]; IoU does not care which axis is which
        return g.op("NonMaxSuppression", boxes, scores,
                    g.op("Constant", value_t=torch.tensor([max_per_class], dtype=torch.long)),
                    g.op("Constant", value_t=torch.tensor([iou_threshold], dtype=torch.float32)),
                    g.op("Constant", value_t=torch.tensor([score_threshold], dtype=torch.float32)),
                    center_point_box_i=0)


def select_detections(boxes: Tensor, scores: Tensor, nms: NmsSettings) -> Tensor:
    """Score filter + per-class NMS + best `max_det` per image, as exportable tensor ops.

    boxes (B, N, 4) x1 y1 x2 y2; scores (B, C, N) → (M, 7) rows [image, x1, y1, x2, y2, score, class],
    by score within each image. Same result as the island path's `batched_nms(...)[:max_det]` per
    image: capping each class at `max_det` first changes nothing, since no class can place more than
    `max_det` boxes in an image's best `max_det`.

    >>> b = torch.tensor([[[0., 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30]]])
    >>> s = torch.tensor([[[0.9, 0.8, 0.7]]])
    >>> rows = select_detections(b, s, NmsSettings(conf=0.1, iou=0.5, max_det=10))
    >>> [[round(v, 2) for v in r] for r in rows[:, [0, 5, 6]].tolist()]  # image, score, class
    [[0.0, 0.9, 0.0], [0.0, 0.7, 0.0]]
    """
    batch, classes, n = scores.shape[0], scores.shape[1], scores.shape[2]
    if not nms.multi_label:  # only each box's best class competes (argmax: ties go to the first, like max())
        best = scores.argmax(1, keepdim=True)  # (B, 1, N)
        scores = scores * (torch.arange(classes).view(1, -1, 1) == best).to(scores.dtype)
    selected = _NonMaxSuppression.apply(boxes, scores, nms.max_det, nms.iou, nms.conf)  # (K, 3)
    img, cls, box = selected[:, 0], selected[:, 1], selected[:, 2]
    score = scores.reshape(-1).index_select(0, (img * classes + cls) * n + box)
    xyxy = boxes.reshape(-1, 4).index_select(0, img * n + box)
    score, order = torch.sort(score, descending=True)
    img, cls, xyxy = img[order], cls[order], xyxy[order]
    # rank of each row within its image (rows are best first): a cumulative count per image
    onehot = (img.unsqueeze(1) == torch.arange(batch).unsqueeze(0)).to(torch.long)  # (K, B)
    rank = (onehot.cumsum(0) * onehot).sum(1) - 1
    keep = rank < nms.max_det
    rows = torch.cat([img.to(score.dtype).unsqueeze(1), xyxy, score.unsqueeze(1), cls.to(score.dtype).unsqueeze(1)], 1)
    return rows[keep]


def batched_nms_graph(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    """`torchvision.ops.batched_nms` as branch-free ONNX: one NonMaxSuppression over boxes offset
    per class, kept indices by decreasing score. torchvision's own export has an `If` for the
    empty case, for which OpenVINO 2026.4 returns one uninitialised row instead of none (measured)."""
    offset = torch.cat([boxes.reshape(-1), boxes.new_zeros(1)]).max() + 1  # never a reduction over nothing
    shifted = boxes + (idxs.to(boxes.dtype) * offset).unsqueeze(1)
    selected = _NonMaxSuppression.apply(shifted.unsqueeze(0), scores.unsqueeze(0).unsqueeze(0), 1 << 30,
                                        float(iou_threshold), float("-inf"))
    keep = selected[:, 2]
    order = torch.sort(scores.index_select(0, keep), descending=True)[1]
    return keep[order]


@contextlib.contextmanager
def graph_nms() -> Iterator[None]:
    """Inside: torchvision's detection code (which calls `torchvision.ops.boxes.batched_nms`) uses
    `batched_nms_graph` — for exporting torchvision detectors (Faster R-CNN)."""
    import torchvision.ops.boxes as box_ops

    saved = box_ops.batched_nms
    box_ops.batched_nms = batched_nms_graph
    try:
        yield
    finally:
        box_ops.batched_nms = saved


def split_rows(rows: Tensor, batch: int) -> list[Tensor]:
    """(M, 7) rows → per image (n, 6) x1 y1 x2 y2 score class, in row order (best first)."""
    img = rows[:, 0].long()
    return [rows[img == b, 1:] for b in range(batch)]


class _Whole(nn.Module):
    """decoder + selection: the module torch exports as one graph."""

    def __init__(self, decoder: nn.Module, nms: NmsSettings) -> None:
        super().__init__()
        self.decoder = decoder
        self.nms = nms

    def forward(self, x: Tensor) -> Tensor:
        boxes, scores = self.decoder(x)
        return select_detections(boxes.float(), scores.float(), self.nms)


# ---------------------------------------------------------------- lowering
class WholeGraphModule(nn.Module):
    """One compiled detector graph: x (B, 3, H, W) → the adapter's per-image output.

    `compiled` is the runtime module (`OpenVinoModule` / `OrtModule`) of the whole ONNX graph;
    `onnx_model` the graph itself (`save(path)` writes it).
    """

    def __init__(self, compiled: nn.Module, graph: DetectionGraph, name: str) -> None:
        super().__init__()
        self.compiled = compiled
        self.nms = graph.nms
        self._outputs = graph.outputs
        self.name = name

    @property
    def onnx_model(self) -> Any:
        return self.compiled.onnx_model

    def rows(self, x: Tensor) -> Tensor:
        """The graph's raw (M, 7) output rows."""
        out = self.compiled(x)
        return out[0] if isinstance(out, (tuple, list)) else out

    def forward(self, x: Tensor) -> Any:
        return self._outputs(self.rows(x), int(x.shape[0]))

    def save(self, path: Any) -> Any:
        return self.compiled.save(path)

    def runtime_coverage(self) -> Any:
        return self.compiled.runtime_coverage()


_UNSUPPORTED = (re.compile(r"operator '([^']+)'"), re.compile(r"Python operator (\w+)"),
                re.compile(r"(aten::\w+|prim::\w+)"))


def export_error(model_name: str, exc: Exception) -> ConfigError:
    """One line naming the operator the exporter could not write (or the exporter's first line)."""
    text = str(exc)
    op = next((m.group(1) for pat in _UNSUPPORTED if (m := pat.search(text))), None)
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    what = f"operator {op!r} has no ONNX form" if op else first
    return ConfigError(f"whole-graph export of {model_name or 'the model'}: {what} (opset 17); "
                       "use the island path (whole_graph=False) or replace that op")


def export_whole_graph(qmodel: Any, graph_of: Callable[[nn.Module], DetectionGraph | PerImageGraph], *,
                       quantized: bool, name: str = "") -> tuple[Any, DetectionGraph | PerImageGraph]:
    """The detector's whole ONNX graph (QDQ regions + float decode + NMS) and its declaration."""
    from qdet.quant.calibrate import quantization_disabled
    from qdet.runtimes.onnx_export import export_region

    model = copy.deepcopy(qmodel.model).eval()
    graph = graph_of(model)
    whole = graph.module if isinstance(graph, PerImageGraph) else _Whole(graph.decoder, graph.nms).eval()
    example = _example_image(qmodel)
    try:
        with warnings.catch_warnings(), _quiet_native_output():
            warnings.simplefilter("ignore")
            if quantized:
                onnx_model = export_region(whole, (example,), dynamic_batch=True, dynamic_spatial=True)
            else:
                with quantization_disabled(whole):
                    onnx_model = export_region(whole, (example,), dynamic_batch=True, dynamic_spatial=True)
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - torch.onnx's errors (UnsupportedOperatorError, SymbolicValueError, RuntimeError)
        raise export_error(name or qmodel.model_name, exc) from None
    return onnx_model, graph


@contextlib.contextmanager
def _quiet_native_output() -> Iterator[None]:
    """Silence the exporter's C++ prints (a failing export dumps its whole TorchScript graph to the
    terminal before raising); the error raised afterwards says what matters in one line."""
    import os
    import sys
    import tempfile

    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with tempfile.TemporaryFile() as sink:
        try:
            os.dup2(sink.fileno(), 1)
            os.dup2(sink.fileno(), 2)
            yield
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


def _example_image(qmodel: Any) -> Tensor:
    """One image of the recorded shape of the region fed by the image (the first region's first
    input); batch and spatial dims are dynamic in the export anyway."""
    for shapes in qmodel.input_shapes.values():
        if shapes and len(shapes[0]) == 4:
            g = torch.Generator().manual_seed(0)
            return torch.rand(1, *shapes[0][1:], generator=g)
    raise ConfigError("whole-graph export needs a region whose first input is the (B, C, H, W) image; re-quantize")


def lower_whole_graph(qmodel: Any, runtime: Any, adapter: GraphAdapter, *, quantized: bool = True,
                      nms: NmsSettings | None = None) -> WholeGraphModule:
    """`qmodel` as one graph on `runtime` (a `Runtime` with `compile_graph`)."""
    if not getattr(runtime, "runs_whole_graphs", False):
        raise ConfigError(f"runtime {runtime.name!r} cannot run a whole exported graph; use openvino or onnxruntime")
    declare = getattr(adapter, "detection_graph", None)
    if declare is None:
        raise ConfigError(f"model {adapter.name!r} declares no whole graph (its adapter has no detection_graph); "
                          "whole_graph=True covers the YOLOv5, Darknet, YOLOX, SSD and Faster R-CNN adapters")
    if quantized:
        runtime.warn_if_saturating(qmodel)
    onnx_model, graph = export_whole_graph(qmodel, lambda m: declare(m, nms), quantized=quantized, name=adapter.name)
    if isinstance(graph, PerImageGraph):
        _, out_spec = pytree.tree_flatten(tuple(torch.zeros(0) for _ in range(graph.num_outputs)))
        compiled = runtime.compile_graph(onnx_model, out_spec, name=f"{adapter.name} (whole graph)")
        return PerImageGraphModule(compiled, graph, adapter.name).eval()
    _, out_spec = pytree.tree_flatten((torch.zeros(0, 7),))
    compiled = runtime.compile_graph(onnx_model, out_spec, name=f"{adapter.name} (whole graph)")
    return WholeGraphModule(compiled, graph, adapter.name).eval()


class PerImageGraphModule(nn.Module):
    """A `PerImageGraph` compiled: a list of (3, H, W) images → the adapter's output per image,
    one runtime call each (the whole detector, transform to post-processing, in that call)."""

    def __init__(self, compiled: nn.Module, graph: PerImageGraph, name: str) -> None:
        super().__init__()
        self.compiled = compiled
        self._outputs = graph.outputs
        self.name = name
        self.nms = None

    @property
    def onnx_model(self) -> Any:
        return self.compiled.onnx_model

    def forward(self, images: Any) -> list[Any]:
        if isinstance(images, Tensor):
            images = list(images) if images.dim() == 4 else [images]
        return [self._outputs(list(self.compiled(img.unsqueeze(0)))) for img in images]

    def save(self, path: Any) -> Any:
        return self.compiled.save(path)

    def runtime_coverage(self) -> Any:
        return self.compiled.runtime_coverage()

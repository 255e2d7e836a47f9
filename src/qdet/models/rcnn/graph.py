"""Faster R-CNN's whole graph: torchvision's detector exported end to end around qdet's int8 regions.

torchvision writes its detection code to be ONNX-traceable (`torchvision._is_tracing()` paths): the
transform (normalise, resize, pad), anchor generation, proposal decode + per-level top-k + NMS,
MultiScaleRoIAlign (ONNX RoiAlign per FPN level, the level assignment k = ⌊4 + log2(√area / 224)⌋
as Log/Floor/Clip ops), box decoding and the per-class score filter + NMS + top-k all become ONNX
ops. Exported with the regions still fake-quantized, the QDQ rewrites make the four regions int8
exactly as on the island path. One image a call (torchvision's exported detectors take one).

    >>> whole = qdet.lower(qm, "openvino", whole_graph=True)  # doctest: +SKIP
    >>> whole([image])[0].keys()  # doctest: +SKIP
    dict_keys(['boxes', 'labels', 'scores'])
"""
from __future__ import annotations

from torch import Tensor, nn

from qdet.runtimes.whole_graph import PerImageGraph, graph_nms


class OneImage(nn.Module):
    """(1, 3, H, W) → (boxes, labels, scores) of that image: the module torch exports."""

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        self.detector = detector

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        with graph_nms():  # branch-free NMS: torchvision's exported `If` breaks empty outputs on OpenVINO
            out = self.detector([x[0]])[0]
        return out["boxes"], out["labels"], out["scores"]


def _to_dict(outs: list[Tensor]) -> dict[str, Tensor]:
    boxes, labels, scores = outs
    return {"boxes": boxes.float(), "labels": labels.long(), "scores": scores.float()}


def rcnn_graph(model: nn.Module) -> PerImageGraph:
    return PerImageGraph(OneImage(model.eval()), _to_dict, num_outputs=3)

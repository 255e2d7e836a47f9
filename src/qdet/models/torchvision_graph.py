"""torchvision detectors' whole graph (Faster R-CNN, SSD, SSDLite): the detector exported end to end
around qdet's int8 regions.

torchvision writes its detection code to be ONNX-traceable (`torchvision._is_tracing()` paths): the
transform (normalise, resize, pad), anchor / default-box generation, box decoding, and the
selection all become ONNX ops — for Faster R-CNN the proposal decode + per-level top-k + NMS and
MultiScaleRoIAlign (ONNX RoiAlign per FPN level, the level assignment k = ⌊4 + log2(√area / 224)⌋
as Log/Floor/Clip ops), for the SSDs the softmax, per-class score filter and top-k candidates;
both end in per-class NMS + top-k and the boxes rescaled to the input image. Exported with the
regions still fake-quantized, the QDQ rewrites make the regions int8 exactly as on the island
path. One image a call (torchvision's exported detectors take one).

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


def torchvision_detector_graph(model: nn.Module) -> PerImageGraph:
    """The declaration for a torchvision detector (list of images → list of dicts), one image a call."""
    return PerImageGraph(OneImage(model.eval()), _to_dict, num_outputs=3)

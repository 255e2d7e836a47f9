"""The automatic baseline qdet is compared with: the whole detector in one ONNX file, int8 by ORT.

torchvision's Faster R-CNN exports to ONNX whole (legacy TorchScript exporter: transform, anchors,
NMS and RoIAlign become ONNX ops), and onnxruntime's `quantize_static` turns that file into QDQ int8
with its own calibration. `OnnxDetector` runs such a file on onnxruntime or OpenVINO behind the
torchvision calling convention (`det([image]) -> [{"boxes", "labels", "scores"}]`), so the same
evaluation and timing code serves both.

    >>> export_detector(model, image, "frcnn.onnx")  # doctest: +SKIP
    >>> ort_quantize_static("frcnn.onnx", "frcnn_int8.onnx", calibration_images)  # doctest: +SKIP
    >>> OnnxDetector("frcnn_int8.onnx", runtime="openvino", threads=2)([image])  # doctest: +SKIP
"""
from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from qdet.errors import ConfigError

__all__ = ["CONV_GEMM", "OnnxDetector", "export_detector", "ort_quantize_static"]

CONV_GEMM: tuple[str, ...] = ("Conv", "Gemm", "MatMul")


def export_detector(model: nn.Module, example: Tensor, path: str | Path, *, opset: int = 17) -> Path:
    """Export the whole eval-mode detector (one (3, H, W) image in, boxes/labels/scores out), H and W dynamic."""
    path = Path(path)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), ([example],), str(path), dynamo=False, opset_version=opset,
                          input_names=["images"], output_names=["boxes", "labels", "scores"],
                          dynamic_axes={"images": {1: "height", 2: "width"}}, do_constant_folding=True)
    return path


def ort_quantize_static(fp32: str | Path, out: str | Path, images: Sequence[Tensor], *,
                        op_types: Sequence[str] | None = None) -> float:
    """onnxruntime's static QDQ quantization: per-channel int8 weights, uint8 MinMax activations.

    op_types: operator types to quantize (default: every type ORT supports). Returns the seconds taken.
    """
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter([{"images": img.detach().cpu().numpy().astype(np.float32)} for img in images])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.items, None)

    start = time.perf_counter()
    quantize_static(str(fp32), str(out), _Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax,
                    op_types_to_quantize=list(op_types) if op_types is not None else None)
    return time.perf_counter() - start


class OnnxDetector:
    """A whole-detector ONNX file on onnxruntime or OpenVINO, called like the torchvision model (batch 1)."""

    def __init__(self, path: str | Path, *, runtime: str = "onnxruntime", threads: int | None = None) -> None:
        data = Path(path).read_bytes()
        self.runtime = runtime
        if runtime == "onnxruntime":
            from qdet.runtimes.onnxruntime import make_session

            session = make_session(data, threads=threads)
            self._run = lambda x: session.run(None, {"images": x})
        elif runtime == "openvino":
            from qdet.runtimes.openvino import compile_onnx

            compiled = compile_onnx(data, threads=threads)  # RuntimeError when OpenVINO cannot compile it
            request = compiled.create_infer_request()
            self._run = lambda x: [np.array(request.infer({0: x})[o], copy=True) for o in compiled.outputs]
        else:
            raise ConfigError(f"unknown runtime {runtime!r} for a whole-detector ONNX file: onnxruntime or openvino")

    def __call__(self, images: Sequence[Tensor]) -> list[dict[str, Tensor]]:
        out = []
        for image in images:
            boxes, labels, scores = self._run(image.detach().cpu().numpy().astype(np.float32))
            out.append({"boxes": torch.from_numpy(np.asarray(boxes, dtype=np.float32)),
                        "labels": torch.from_numpy(np.asarray(labels)).long(),
                        "scores": torch.from_numpy(np.asarray(scores, dtype=np.float32))})
        return out

    def raw(self, image: Tensor) -> Any:
        """One run on a (3, H, W) image without output conversion (for timing)."""
        return self._run(image.detach().cpu().numpy().astype(np.float32))

"""OpenVINO: the same QDQ ONNX that `export_region` writes, compiled by OpenVINO for the CPU.

OpenVINO's low-precision transformations turn DequantizeLinear → Conv/MatMul → QuantizeLinear
chains into int8 kernels (VNNI / AMX where the CPU has them), keeping qdet's scales. Float islands
stay in PyTorch between the compiled regions, exactly as with onnxruntime.

Float operations that remain inside a region run in fp32 (INFERENCE_PRECISION_HINT=f32) by default:
OpenVINO would otherwise pick bf16 on CPUs that support it, which changes the numerics silently.

Example:
    >>> import qdet  # doctest: +SKIP
    >>> fast = qdet.lower(qmodel, "openvino", threads=2)  # doctest: +SKIP
    >>> fast([image])  # doctest: +SKIP
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils import _pytree as pytree

from qdet.errors import ConfigError, RuntimeUnavailable
from qdet.quant.prepare import PreparedRegion
from qdet.runtimes.base import Runtime, modules_available, register_runtime
from qdet.runtimes.executed import RuntimeCoverage, _rt, openvino_coverage
from qdet.runtimes.onnx_export import export_region, save_model

__all__ = ["OpenVinoModule", "OpenVinoRuntime", "compile_onnx"]


def _ov() -> Any:
    try:
        import openvino
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise RuntimeUnavailable("openvino is not installed; pip install 'qdet[openvino]'") from exc
    return openvino


def compile_onnx(model_bytes: bytes, *, threads: int | None, precision: str = "f32",
                 shapes: list[tuple[int, ...]] | None = None) -> Any:
    """Compile an ONNX model (bytes) for the CPU: latency hint, `threads` inference threads.

    `shapes` fixes every input's shape first: OpenVINO's CPU plugin plans memory and picks kernels
    once for static shapes; a dynamic model re-does shape inference on each call (YOLOv5n int8 at
    640²: 50 ms dynamic vs 27 ms static, measured here).

    With `QDET_OPENVINO_CPU_PINNING=0` in the environment (set in qdet's Ray workers) OpenVINO does not
    pin its threads to cores: it pins every process's first thread to the same core, so two one-thread
    worker processes ran YOLOv5n int8 at 54 ms a call each instead of 24 (measured here).
    """
    ov = _ov()
    core = ov.Core()
    config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": precision}
    if threads:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    if os.environ.get("QDET_OPENVINO_CPU_PINNING") == "0":
        config["ENABLE_CPU_PINNING"] = False
    model = core.read_model(model_bytes)
    if shapes is not None:
        model.reshape({i: ov.PartialShape(list(s)) for i, s in enumerate(shapes)})
    return core.compile_model(model, "CPU", config)


class OpenVinoModule(nn.Module):
    """An nn.Module facade over OpenVINO (float tensors in, float tensors out).

    Takes the region's inputs (any pytree of tensors: lists, dicts) and returns its output
    structure, like `OrtModule`. The model is compiled for the static input shapes it is called
    with, up to `max_static` shape sets (fixed-size inputs: letterboxed YOLO, KITTI frames); further
    new shapes run on one dynamic-shape compilation instead of recompiling every time.
    """

    max_static = 4

    def __init__(self, onnx_model: Any, out_spec: pytree.TreeSpec, *, threads: int | None, name: str = "",
                 precision: str = "f32") -> None:
        super().__init__()
        self.onnx_model = onnx_model
        self.out_spec = out_spec
        self.name = name
        self.threads = threads
        self.precision = precision
        self._bytes = onnx_model.SerializeToString()
        self._requests: dict[tuple[tuple[int, ...], ...] | None, Any] = {}
        self.num_inputs = len(onnx_model.graph.input)

    def _request(self, shapes: tuple[tuple[int, ...], ...]) -> Any:
        key: tuple[tuple[int, ...], ...] | None = shapes
        if key not in self._requests:
            static = sum(k is not None for k in self._requests) < self.max_static
            key = shapes if static else None
            if key not in self._requests:
                compiled = compile_onnx(self._bytes, threads=self.threads, precision=self.precision,
                                        shapes=list(shapes) if static else None)
                self._requests[key] = (compiled, compiled.create_infer_request())
        return self._requests[key]

    def set_threads(self, threads: int | None) -> None:
        """Run with `threads` inference threads from the next call on (recompiled when it changes)."""
        if threads != self.threads:
            self.threads, self._requests = threads, {}

    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), "_requests": {}}  # the ONNX graph travels; compiled again where it runs

    @property
    def compiled_shapes(self) -> list[tuple[tuple[int, ...], ...] | None]:
        """Input shapes compiled so far; None stands for the dynamic-shape compilation."""
        return list(self._requests)

    @property
    def compiled(self) -> Any:
        """The most recently compiled model (compiles the dynamic one if nothing ran yet)."""
        if not self._requests:
            compiled = compile_onnx(self._bytes, threads=self.threads, precision=self.precision)
            self._requests[None] = (compiled, compiled.create_infer_request())
        return list(self._requests.values())[-1][0]

    def forward(self, *args: Any) -> Any:
        flat, _ = pytree.tree_flatten(args)
        if len(flat) != self.num_inputs:
            raise ConfigError(f"region {self.name!r} takes {self.num_inputs} tensors, got {len(flat)}")
        feeds = {i: np.ascontiguousarray(t.detach().cpu().numpy(), dtype=np.float32) for i, t in enumerate(flat)}
        compiled, request = self._request(tuple(tuple(t.shape) for t in flat))
        # The inputs are read in place (no 5 MB copy of a 640² image per call); the outputs live in
        # the request's buffers, reused by the next call, so they are copied out.
        result = request.infer(feeds, share_inputs=True)
        outs = [torch.from_numpy(np.array(result[o], copy=True)) for o in compiled.outputs]
        return pytree.tree_unflatten(outs, self.out_spec)

    def save(self, path: str | Path) -> Path:
        """Write the QDQ ONNX this module was compiled from."""
        return save_model(self.onnx_model, path)

    def executed_ops(self) -> dict[str, int]:
        """Executed layer types and their runtime precision, e.g. {"Convolution/u8": 53, ...}."""
        counts: dict[str, int] = {}
        for op in self.compiled.get_runtime_model().get_ordered_ops():
            info = op.get_rt_info()
            kind = _rt(info, "layerType") or op.get_type_name()
            prec = _rt(info, "runtimePrecision") or "?"
            key = f"{kind}/{prec}"
            counts[key] = counts.get(key, 0) + 1
        return counts

    def runtime_coverage(self) -> RuntimeCoverage:
        """Convolutions/matmuls this compiled region executes in int8 (u8/i8 runtime precision) vs float."""
        return openvino_coverage(self.compiled, self.name)


@register_runtime
class OpenVinoRuntime(Runtime):
    name = "openvino"
    description = "QDQ ONNX with qdet's scales, compiled by OpenVINO for the CPU (int8 VNNI/AMX kernels)"

    precision: str = "f32"
    fuses_silu = True
    fuses_leaky_mish = True  # conv + LeakyRelu/Mish + FakeQuantize compile to one Convolution/u8 (post-ops)

    @classmethod
    def is_available(cls) -> bool:
        return modules_available("onnx", "openvino")

    def install_hint(self) -> str:
        return "pip install 'qdet[openvino]'"

    def lower_region(self, region: PreparedRegion, example_inputs: tuple[Any, ...], *, quantized: bool) -> nn.Module:
        from qdet.runtimes.onnxruntime import _Flat

        flat_in, in_spec = pytree.tree_flatten(example_inputs)
        with torch.no_grad():
            _, out_spec = pytree.tree_flatten(region.module(*example_inputs))
        model = export_region(_Flat(region.module, in_spec), tuple(flat_in), dynamic_batch=True, dynamic_spatial=True)
        return OpenVinoModule(model, out_spec, threads=self.threads, name=region.path, precision=self.precision)

    runs_whole_graphs = True
    int8_kernels_may_saturate = True

    def compile_graph(self, onnx_model: Any, out_spec: pytree.TreeSpec, *, name: str) -> nn.Module:
        if not self.is_available():
            raise RuntimeUnavailable(f"runtime {self.name!r} is not installed; {self.install_hint()}")
        module = OpenVinoModule(onnx_model, out_spec, threads=self.threads, name=name, precision=self.precision)
        # every input shape gets its own static compilation: OpenVINO 2026.4's dynamic-shape compile of
        # an int8 region followed by the decode's reshapes gives wrong numbers (measured: YOLO scores
        # off by up to 0.69; the regions alone and fp32 graphs are right)
        module.max_static = 1 << 30
        return module

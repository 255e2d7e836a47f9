"""onnxruntime: regions exported as QDQ ONNX (our scales) and run by ORT's int8 kernels.

ORT fuses DequantizeLinear → Conv → QuantizeLinear into QLinearConv (and likewise Add, Concat,
pooling, Gemm/MatMul) when every input and output of the op carries Q/DQ — which is why
`qdet.quant.prepare` quantizes every op's inputs and outputs, and ties pass-through ops.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils import _pytree as pytree

from qdet.errors import RuntimeUnavailable
from qdet.quant.prepare import PreparedRegion
from qdet.runtimes.base import Runtime, modules_available, register_runtime
from qdet.runtimes.executed import RuntimeCoverage, onnxruntime_coverage
from qdet.runtimes.onnx_export import export_region, save_model


class _Flat(nn.Module):
    """Takes flat tensors, rebuilds the region's input structure, returns flat outputs."""

    def __init__(self, inner: nn.Module, in_spec: pytree.TreeSpec) -> None:
        super().__init__()
        self.inner = inner
        self.in_spec = in_spec

    def forward(self, *flat: torch.Tensor) -> tuple[torch.Tensor, ...]:
        args = pytree.tree_unflatten(list(flat), self.in_spec)
        out, _ = pytree.tree_flatten(self.inner(*args))
        return tuple(out)


class OrtModule(nn.Module):
    """An nn.Module facade over an onnxruntime session (float tensors in, float tensors out)."""

    def __init__(self, onnx_model: Any, out_spec: pytree.TreeSpec, *, threads: int | None, name: str = "") -> None:
        super().__init__()
        self.onnx_model = onnx_model
        self.out_spec = out_spec
        self.name = name
        self.threads = threads
        self._session: Any = None
        self.input_names = [i.name for i in self.session.get_inputs()]

    @property
    def session(self) -> Any:
        """The onnxruntime session (created on first use: after unpickling, in the process that runs it)."""
        if self._session is None:
            self._session = make_session(self.onnx_model.SerializeToString(), threads=self.threads)
        return self._session

    def set_threads(self, threads: int | None) -> None:
        """Run with `threads` intra-op threads from the next call on (a new session when it changes)."""
        if threads != self.threads:
            self.threads, self._session = threads, None

    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), "_session": None}  # the ONNX graph travels, the session is rebuilt

    def forward(self, *args: Any) -> Any:
        flat, _ = pytree.tree_flatten(args)
        feeds = {n: t.detach().cpu().numpy().astype(np.float32, copy=False) for n, t in zip(self.input_names, flat)}
        outs = self.session.run(None, feeds)
        return pytree.tree_unflatten([torch.from_numpy(o) for o in outs], self.out_spec)

    def save(self, path: str | Path) -> Path:
        return save_model(self.onnx_model, path)

    def fused_ops(self) -> dict[str, int]:
        """Op types in ORT's optimised graph (e.g. how many QLinearConv ran int8)."""
        counts: dict[str, int] = {}
        for node in self.optimized_graph().node:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
        return counts

    def runtime_coverage(self) -> RuntimeCoverage:
        """Convolutions/matmuls of ORT's optimised graph that run int8 kernels (QLinearConv, QGemm, ...) vs float."""
        return onnxruntime_coverage(self.optimized_graph(), self.name)

    def optimized_graph(self) -> Any:
        """The ONNX graph onnxruntime runs after its optimisations (same level as the session)."""
        import tempfile

        import onnx

        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "opt.onnx"
            make_session(self.onnx_model.SerializeToString(), threads=1, optimized_path=out)
            return onnx.load(str(out)).graph


def make_session(model_bytes: bytes, *, threads: int | None, optimized_path: Path | None = None) -> Any:
    try:
        import onnxruntime as ort
    except ImportError as exc:  # pragma: no cover
        raise RuntimeUnavailable("onnxruntime is not installed; pip install 'qdet[onnx]'") from exc
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.inter_op_num_threads = 1
    if threads:
        opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    # Idle sessions must not spin on the cores: PyTorch (or another session) timed next would
    # share them with busy-waiting threads and look many times slower than it is.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if optimized_path is not None:
        opts.optimized_model_filepath = str(optimized_path)
    return ort.InferenceSession(model_bytes, sess_options=opts, providers=["CPUExecutionProvider"])


@register_runtime
class OnnxRuntime(Runtime):
    name = "onnxruntime"
    description = "QDQ ONNX with qdet's scales, run by onnxruntime's int8 CPU kernels"

    @classmethod
    def is_available(cls) -> bool:
        return modules_available("onnx", "onnxruntime")

    def lower_region(self, region: PreparedRegion, example_inputs: tuple[Any, ...], *, quantized: bool) -> nn.Module:
        flat_in, in_spec = pytree.tree_flatten(example_inputs)
        with torch.no_grad():
            _, out_spec = pytree.tree_flatten(region.module(*example_inputs))
        model = export_region(_Flat(region.module, in_spec), tuple(flat_in), dynamic_batch=True, dynamic_spatial=True)
        return OrtModule(model, out_spec, threads=self.threads, name=region.path)

    runs_whole_graphs = True
    int8_kernels_may_saturate = True

    def compile_graph(self, onnx_model: Any, out_spec: pytree.TreeSpec, *, name: str) -> nn.Module:
        if not self.is_available():
            raise RuntimeUnavailable(f"runtime {self.name!r} is not installed; {self.install_hint()}")
        return OrtModule(onnx_model, out_spec, threads=self.threads, name=name)

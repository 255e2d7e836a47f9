"""What a runtime really executes in int8, read back from the runtime itself after `lower`.

qdet's own coverage report (`qdet.coverage`) says which layers got int8 weights and quantizers;
whether the runtime then runs an int8 kernel for each of them is the runtime's decision (a Q/DQ
pair it cannot fuse leaves the conv in fp32, silently). This module asks the runtime:

* OpenVINO: the compiled model's runtime graph (`get_runtime_model()`); each executed node's
  rt_info has `layerType` (Convolution, FullyConnected, MatMul, ...) and `runtimePrecision`
  (u8/i8 for an int8 kernel, f32/bf16 otherwise).
* onnxruntime: the optimised graph ORT runs (written with `SessionOptions.optimized_model_filepath`
  at the session's own optimisation level): QLinearConv/ConvInteger/QGemm/QLinearMatMul/... are
  int8 kernels, Conv/FusedConv/Gemm/MatMul with DequantizeLinear inputs are fp32.

Each lowered region module that can tell implements `runtime_coverage() -> RuntimeCoverage`;
`runtime_coverage(lowered)` sums them over every compiled region of a lowered model.

    >>> import torch, qdet  # doctest: +SKIP
    >>> qm = qdet.quantize(model, batches)  # doctest: +SKIP
    >>> print(qdet.runtime_coverage(qdet.lower(qm, "openvino")).summary())  # doctest: +SKIP
    openvino executes 49 of 49 convolutions and 1 of 1 matmuls in int8
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

from torch import nn

INT8_PRECISIONS = frozenset({"u8", "i8"})

# OpenVINO CPU plugin layer types (rt_info "layerType").
OV_CONV_TYPES = frozenset({"Convolution", "GroupConvolution", "Deconvolution", "BinaryConvolution"})
OV_MATMUL_TYPES = frozenset({"FullyConnected", "MatMul", "Gemm"})

# onnxruntime op types in the optimised graph: int8 kernels and fp32 ones.
ORT_INT8_CONV = frozenset({"QLinearConv", "ConvInteger", "NhwcQLinearConv"})
ORT_FLOAT_CONV = frozenset({"Conv", "FusedConv", "NhwcFusedConv", "NhwcConv", "ConvTranspose"})
ORT_INT8_MATMUL = frozenset({"QLinearMatMul", "MatMulInteger", "QGemm", "MatMulIntegerToFloat",
                             "DynamicQuantizeMatMul"})
ORT_FLOAT_MATMUL = frozenset({"Gemm", "MatMul", "FusedMatMul", "FusedGemm", "MatMulNBits"})


@dataclass
class RuntimeCoverage:
    """Convolutions and matmuls (incl. Gemm/FullyConnected) a runtime executes, int8 vs float."""

    runtime: str
    int8_convs: int = 0
    float_convs: int = 0
    int8_matmuls: int = 0
    float_matmuls: int = 0
    # the runtime's node names of the float ones: torch.onnx scope names, i.e. the layer's module path
    # (torch.onnx shortens some to their last parts, e.g. "block.0.0/Conv" for features.1.0.block.0.0)
    float_names: list[str] = field(default_factory=list)

    @property
    def convs(self) -> int:
        return self.int8_convs + self.float_convs

    @property
    def matmuls(self) -> int:
        return self.int8_matmuls + self.float_matmuls

    def __add__(self, other: RuntimeCoverage) -> RuntimeCoverage:
        return RuntimeCoverage(self.runtime, self.int8_convs + other.int8_convs, self.float_convs + other.float_convs,
                               self.int8_matmuls + other.int8_matmuls, self.float_matmuls + other.float_matmuls,
                               self.float_names + other.float_names)

    def summary(self) -> str:
        """One line, e.g. "openvino executes 49 of 49 convolutions and 1 of 1 matmuls in int8"."""
        text = (f"{self.runtime} executes {self.int8_convs} of {self.convs} convolutions and "
                f"{self.int8_matmuls} of {self.matmuls} matmuls in int8")
        if self.float_names:
            more = f" (+{len(self.float_names) - 6} more)" if len(self.float_names) > 6 else ""
            text += f"; float: {', '.join(self.float_names[:6])}{more}"
        return text

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def runtime_coverage(lowered: nn.Module) -> RuntimeCoverage | None:
    """Int8 vs float convs/matmuls over every compiled region of `lowered` (from `qdet.lower`).

    None when no region can report it (the `reference`, `integer` and `torch` runtimes).
    """
    parts = [m.runtime_coverage() for m in lowered.modules() if callable(getattr(m, "runtime_coverage", None))]
    if not parts:
        return None
    total = parts[0]
    for part in parts[1:]:
        total = total + part
    return total


def classify(runtime: str, ops: Iterable[tuple[str, str, bool]], *, conv_types: frozenset[str],
             matmul_types: frozenset[str]) -> RuntimeCoverage:
    """Count (op type, name, is_int8) triples whose type is a conv or a matmul."""
    cov = RuntimeCoverage(runtime)
    for kind, name, int8 in ops:
        if kind in conv_types:
            if int8:
                cov.int8_convs += 1
            else:
                cov.float_convs += 1
                cov.float_names.append(name)
        elif kind in matmul_types:
            if int8:
                cov.int8_matmuls += 1
            else:
                cov.float_matmuls += 1
                cov.float_names.append(name)
    return cov


def openvino_coverage(compiled: Any, region: str = "") -> RuntimeCoverage:
    """From an OpenVINO CompiledModel: executed conv/matmul nodes and their runtime precision."""
    ops = []
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        kind = _rt(info, "layerType") or op.get_type_name()
        ops.append((kind, _name(region, op.get_friendly_name()), _rt(info, "runtimePrecision") in INT8_PRECISIONS))
    return classify("openvino", ops, conv_types=OV_CONV_TYPES, matmul_types=OV_MATMUL_TYPES)


def onnxruntime_coverage(optimized_graph: Any, region: str = "") -> RuntimeCoverage:
    """From the ONNX graph onnxruntime optimised (its nodes are what the session runs)."""
    int8_types = ORT_INT8_CONV | ORT_INT8_MATMUL
    ops = [(n.op_type, _name(region, n.name or n.op_type), n.op_type in int8_types) for n in optimized_graph.node]
    return classify("onnxruntime", ops, conv_types=ORT_INT8_CONV | ORT_FLOAT_CONV,
                    matmul_types=ORT_INT8_MATMUL | ORT_FLOAT_MATMUL)


def _rt(info: Any, key: str) -> str:
    if key not in info:
        return ""
    value = info[key]
    return str(getattr(value, "value", value))


def _name(region: str, name: str) -> str:
    """A runtime node name as the layer's module path in the whole model, then the runtime op
    ("/inner/inner.features.0.0/Conv" in region "backbone" → "backbone.features.0.0/Conv")."""
    name = name.removeprefix("/inner/").removeprefix("inner.").strip("/")  # the exporter's _Flat wrapper
    return f"{region}.{name}" if region else name

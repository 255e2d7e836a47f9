"""One interface for every place a quantized model runs.

A runtime *lowers* a `QuantizedModel`: each quantized region is replaced by a module that executes
it on the runtime (onnxruntime session, fbgemm int8 modules, ...); float islands stay in PyTorch.
`quantized=False` lowers the same BN-folded graph without quantizers: the float baseline on the
same runtime, so that speed-ups compare like with like.
"""
from __future__ import annotations

import copy
import warnings
from abc import ABC, abstractmethod
from typing import Any

from torch import fx, nn

from qdet.errors import ConfigError, RuntimeUnavailable
from qdet.qmodel import QuantizedModel, _get, _set, example_inputs
from qdet.quant.calibrate import quantization_disabled
from qdet.quant.opkinds import LEAKY_MISH, OpKind, op_kind
from qdet.quant.prepare import PreparedRegion


def modules_available(*names: str) -> bool:
    """True when every optional dependency a runtime needs can be imported."""
    import importlib.util

    return all(importlib.util.find_spec(n) is not None for n in names)


class Runtime(ABC):
    """Lowers regions of a QuantizedModel; subclasses register themselves in RUNTIMES."""

    name: str = ""
    description: str = ""
    # Applies SiLU inside its int8 conv kernel, so QuantConfig(fuse_silu=True) suits it best.
    fuses_silu: bool = False
    # Applies LeakyReLU/Mish inside its int8 conv kernel, so QuantConfig(fuse_leaky_mish=True) suits it.
    fuses_leaky_mish: bool = False
    # Can run a whole exported detector graph (`compile_graph`): the ONNX runtimes.
    runs_whole_graphs: bool = False
    # Its int8 convolutions/matmuls add u8×s8 pairs in int16 on x86 CPUs without VNNI (see OverflowFix).
    int8_kernels_may_saturate: bool = False

    def __init__(self, *, threads: int | None = None) -> None:
        self.threads = threads

    @classmethod
    def is_available(cls) -> bool:
        return True

    @abstractmethod
    def lower_region(self, region: PreparedRegion, example_inputs: tuple[Any, ...], *, quantized: bool) -> nn.Module:
        """Return a module that computes `region.module` on this runtime."""

    def lower(self, qmodel: QuantizedModel, *, quantized: bool = True) -> nn.Module:
        """A copy of `qmodel.model` whose regions run on this runtime."""
        if not self.is_available():
            raise RuntimeUnavailable(f"runtime {self.name!r} is not installed; {self.install_hint()}")
        if quantized and qmodel.config.fuse_silu and not self.fuses_silu and _has_silu(qmodel):
            warnings.warn(f"runtime {self.name!r} has no int8 conv+SiLU kernel: convs followed by SiLU run in float; "
                          "quantize with fuse_silu=False (--silu decomposed) for this runtime", stacklevel=2)
        if quantized and qmodel.config.fuse_leaky_mish and not self.fuses_leaky_mish and _has_kind(qmodel, LEAKY_MISH):
            warnings.warn(f"runtime {self.name!r} has no int8 conv+LeakyReLU/Mish kernel: convs followed by them may "
                          "run in float; quantize with fuse_leaky_mish=False (--leaky-mish separate) for this runtime",
                          stacklevel=2)
        if quantized:
            self.warn_if_saturating(qmodel)
        lowered = copy.deepcopy(qmodel.model)
        for path, region in qmodel.regions.items():
            shapes = qmodel.input_shapes.get(path)
            if not shapes:
                raise ConfigError(f"region {path!r} has no recorded input shape; re-quantize the model")
            example = example_inputs(shapes, getattr(qmodel, "input_structures", {}).get(path))
            region_copy = PreparedRegion(region.path, _get(lowered, path), region.layers, region.folded_bn)  # type: ignore[arg-type]
            if quantized:
                module = self.lower_region(region_copy, example, quantized=True)
            else:
                with quantization_disabled(region_copy.module):
                    module = self.lower_region(region_copy, example, quantized=False)
            lowered = _set(lowered, path, module)
        return lowered.eval()

    def warn_if_saturating(self, qmodel: QuantizedModel) -> None:
        """8-bit weights on a CPU whose int8 kernels saturate: results may differ from the simulation."""
        from qdet.bench.machine import int8_dot_saturates
        from qdet.quant.quantizer import weight_quantizers

        if not (self.int8_kernels_may_saturate and int8_dot_saturates()):
            return
        if any(q.spec.bits == 8 for _, q in weight_quantizers(qmodel.model)):
            warnings.warn(f"this CPU has no VNNI: {self.name}'s int8 kernels add weight×activation pairs in int16 and "
                          "saturate with 8-bit weights, so results may differ from qdet's simulation; quantize with "
                          "overflow_fix=OverflowFix.ALL (--overflow-fix all, the default 'auto' on this CPU)", stacklevel=3)

    def install_hint(self) -> str:
        return "pip install 'qdet[onnx]'"

    def compile_graph(self, onnx_model: Any, out_spec: Any, *, name: str) -> nn.Module:
        """A module running a whole ONNX graph (`qdet.runtimes.whole_graph`); ONNX runtimes only."""
        raise ConfigError(f"runtime {self.name!r} cannot run a whole exported graph; use openvino or onnxruntime")


def set_runtime_threads(lowered: nn.Module, threads: int | None) -> nn.Module:
    """Every ONNX-runtime region inside `lowered` (OpenVINO, onnxruntime, whole graphs) runs with
    `threads` threads from its next call on — what a one-thread worker does with a lowered model it
    received; parts that run in PyTorch follow torch's own setting."""
    for module in lowered.modules():
        if callable(getattr(module, "set_threads", None)):
            module.set_threads(threads)
    return lowered


def _has_silu(qmodel: QuantizedModel) -> bool:
    return _has_kind(qmodel, {OpKind.SILU})


def _has_kind(qmodel: QuantizedModel, kinds: frozenset[OpKind] | set[OpKind]) -> bool:
    return any(op_kind(node, region.module) in kinds
               for region in qmodel.regions.values() for node in region.module.graph.nodes)


class ReferenceRuntime(Runtime):
    """The fake-quant simulation itself (float arithmetic on int-grid values)."""

    name = "reference"
    description = "fake-quant simulation in PyTorch (float math on int8-grid values)"
    fuses_silu = True  # simulates whichever form was quantized
    fuses_leaky_mish = True

    def lower_region(self, region: PreparedRegion, example_inputs: tuple[Any, ...], *, quantized: bool) -> nn.Module:
        if quantized:
            return region.module
        return _FloatView(region.module)


def traced_module(region: PreparedRegion) -> fx.GraphModule:
    """The region's traced graph, which the interpreting runtimes (torch, integer) walk node by node."""
    if not isinstance(region.module, fx.GraphModule):
        raise ConfigError(f"region {region.path!r} is not a traced GraphModule; re-quantize the model")
    return region.module


class _FloatView(nn.Module):
    """Runs a prepared region with every quantizer disabled."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.inner = module

    def forward(self, *args: Any) -> Any:
        with quantization_disabled(self.inner):
            return self.inner(*args)


_RUNTIMES: dict[str, type[Runtime]] = {}


def register_runtime(cls: type[Runtime]) -> type[Runtime]:
    _RUNTIMES[cls.name] = cls
    return cls


register_runtime(ReferenceRuntime)


AUTO = "auto"
# Fastest first on x86 CPUs (measured here: OpenVINO's int8 YOLOv5n ~1.5x its fp32, onnxruntime's ~1x).
_AUTO_ORDER = ("openvino", "onnxruntime", "torch")


def resolve_runtime(name: str) -> str:
    """`name` itself, or for "auto" the fastest int8 runtime installed (OpenVINO, then onnxruntime)."""
    if name != AUTO:
        return name
    _load_builtin_runtimes()
    for candidate in _AUTO_ORDER:
        if candidate in _RUNTIMES and _RUNTIMES[candidate].is_available():
            return candidate
    return ReferenceRuntime.name


def get_runtime(name: str, *, threads: int | None = None) -> Runtime:
    """Runtime by name ("reference", "integer", "onnxruntime", "torch", "openvino", or "auto")."""
    _load_builtin_runtimes()
    name = resolve_runtime(name)
    try:
        cls = _RUNTIMES[name]
    except KeyError:
        raise ConfigError(f"unknown runtime {name!r}; choose one of: {', '.join(sorted(_RUNTIMES))}") from None
    return cls(threads=threads)


def runtime_names() -> list[str]:
    _load_builtin_runtimes()
    return sorted(_RUNTIMES)


def _load_builtin_runtimes() -> None:
    # Imported lazily: each pulls an optional dependency only when used.
    import importlib

    for mod in ("qdet.runtimes.onnxruntime", "qdet.runtimes.torch_int8", "qdet.runtimes.openvino", "qdet.runtimes.integer"):
        try:
            importlib.import_module(mod)
        except ImportError:  # the module itself is missing in a partial install
            pass

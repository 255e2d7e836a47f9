"""The `torch` runtime: real int8 execution through PyTorch's x86/fbgemm quantized kernels.

PyTorch's eager quantized API (torch.ao.nn.quantized modules, torch.quantize_per_tensor,
quint8/qint8 dtypes, torch.ops.quantized.*) is deprecated upstream. This module is the ONLY place
in qdet that may import or call it, so that its removal costs one file; nothing else in qdet
touches quantized tensors.

Lowering is one pass over a prepared region's fx graph, by node/module type (no model knowledge):

    Quantizer on a float value            → torch.quantize_per_tensor(x, scale, zp, quint8)
    QuantConv2d/QuantLinear [→ ReLU] → Q  → quantized Conv2d/ConvReLU2d, Linear/LinearReLU
    add/mul [→ ReLU] → Q, cat → Q         → torch.ops.quantized.add(_relu)/mul(_relu)/cat
    max-pool, flatten, view, nearest
      upsample, ReLU, slicing, ... (+Tied)→ the same op on the quint8 tensor (qparams unchanged)
    anything else (SiLU, sigmoid, avgpool,
      a layer kept float, ...)            → a float island: dequantize → float op → next Quantizer
    region outputs                        → dequantized to float

Every scale/zero point comes from qdet's calibrated quantizers, so the result agrees with the
fake-quant reference `qmodel(x)` up to the kernels' own requantization rounding. Caveat: on CPUs
without AVX512-VNNI/AVX-VNNI, fbgemm multiplies u8×s8 pairs into int16 (vpmaddubsw), which can
saturate with full-range uint8 activations; PyTorch's own x86 recipe uses 7-bit activations
(reduce_range) for that, qdet 7-bit weights (`OverflowFix`, chosen automatically on such CPUs).

`quantized=False` returns the same BN-folded graph with every quantizer node removed (plain
conv/linear), i.e. fp32 eager PyTorch whatever the quantizers' `enabled` flags are later.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from qdet.config import QuantConfig
    >>> from qdet.qmodel import quantize
    >>> from qdet.runtimes.base import get_runtime
    >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(288, 4)).eval()
    >>> qm = quantize(net, [torch.randn(2, 3, 8, 8) for _ in range(4)], QuantConfig(), progress=False)
    >>> int8 = get_runtime("torch").lower(qm)
    >>> int8(torch.randn(1, 3, 8, 8)).shape
    torch.Size([1, 4])
"""
from __future__ import annotations

import operator
import warnings
from typing import Any, Callable, Iterator

import torch
import torch.ao.nn.intrinsic.quantized as nniq
import torch.ao.nn.quantized as nnq
from torch import fx, nn
from torch.fx.node import map_arg

from qdet.errors import CalibrationError, ConfigError
from qdet.quant.opkinds import CLAMPS, GRID_KEEPING, OpKind, op_kind
from qdet.quant.prepare import PreparedRegion
from qdet.quant.quantizer import CastQuantizer, QuantConv2d, QuantLinear, Quantizer, TiedQuantizer, weight_codes
from qdet.quant.qparams import dequantize
from qdet.runtimes.base import Runtime, register_runtime, traced_module

QParams = tuple[float, int]  # (scale, zero point) of a quint8 value, known when lowering

_ENGINES = ("x86", "fbgemm")  # x86 picks fbgemm or oneDNN per op; fbgemm alone on older builds
_QUANT_ONLY = (Quantizer, TiedQuantizer, CastQuantizer)

_SHAPE_METHODS = {"size", "dim", "numel"}  # read shape only: a quint8 tensor answers like a float one


def _engine() -> str | None:
    supported = torch.backends.quantized.supported_engines
    return next((e for e in _ENGINES if e in supported), None)


@register_runtime
class TorchInt8Runtime(Runtime):
    """Int8 execution on CPU with PyTorch's x86/fbgemm quantized kernels (eager, deprecated API)."""

    name = "torch"
    description = "PyTorch native int8 kernels (x86/fbgemm), eager mode"
    int8_kernels_may_saturate = True

    @classmethod
    def is_available(cls) -> bool:
        return _engine() is not None

    def install_hint(self) -> str:
        return "this PyTorch build has neither the x86 nor the fbgemm quantized engine (needs an x86-64 CPU build)"

    def lower_region(self, region: PreparedRegion, example_inputs: tuple[Any, ...], *, quantized: bool) -> nn.Module:
        gm = traced_module(region)
        if not quantized:
            return _strip_quantizers(gm)
        engine = _engine()
        assert engine is not None  # Runtime.lower checked is_available()
        # Weights are prepacked for the engine current at construction; set it before building.
        torch.backends.quantized.engine = engine
        _check_specs(gm)
        with warnings.catch_warnings():
            # torch warns once per process that quantized tensors are deprecated: known, see docstring.
            warnings.filterwarnings("ignore", message=r"(?s).*quantiz.*deprecated")
            lowered = _Lowering(gm).run()
            try:
                with torch.no_grad():
                    lowered(*example_inputs)  # fail here, naming the region, rather than on first use
            except Exception as exc:  # a kernel refusing an op/shape: name the region, keep the cause
                raise ConfigError(
                    f"region {region.path or '<model>'!r} lowered to int8 kernels but does not run "
                    f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                    "skip the offending layer or use the reference runtime"
                ) from exc
        return lowered


# ---------------------------------------------------------------------------------------------
# spec checks: what the kernels can run


def _check_specs(gm: fx.GraphModule) -> None:
    """Raise ConfigError naming the layer for qparams the int8 kernels cannot represent."""
    weight_quants = {id(m.weight_quant) for m in gm.modules() if isinstance(m, (QuantConv2d, QuantLinear))}
    for _, q in gm.named_modules():
        if not isinstance(q, Quantizer):
            continue
        spec, layer = q.spec, q.layer_name or "?"
        if not q.calibrated:
            raise CalibrationError(f"layer {layer!r} was never calibrated; run qdet.quantize with calibration data")
        if id(q) in weight_quants:
            if spec.bits > 8 or not spec.signed:
                sign = "int" if spec.signed else "uint"
                raise ConfigError(
                    f"layer {layer!r}: the torch runtime (x86/fbgemm) runs int8 weights (or narrower signed codes) "
                    f"only, got {sign}{spec.bits}; use a signed weight spec of <= 8 bits, or the reference runtime"
                )
            if spec.axis not in (None, 0) or bool((q.zero_point != 0).any()):
                raise ConfigError(
                    f"layer {layer!r}: the torch runtime needs symmetric weights (zero point 0), per tensor or "
                    f"per output channel (axis 0); got axis={spec.axis}, symmetric={spec.symmetric}"
                )
        elif spec.bits != 8 or spec.signed or spec.axis is not None:
            kind = f"{'int' if spec.signed else 'uint'}{spec.bits} {'per-channel' if spec.axis is not None else 'per-tensor'}"
            raise ConfigError(
                f"layer {layer!r}: the torch runtime (x86/fbgemm) runs uint8 per-tensor activations only, got {kind}; "
                "use the default activation spec, or the reference/onnxruntime runtime"
            )


def _qparams(q: Quantizer) -> QParams:
    return float(q.scale), int(q.zero_point)


def _quantized_weight(mod: QuantConv2d | QuantLinear) -> torch.Tensor:
    """The BN-folded float weight on OUR grid (per-channel scales, zero point 0) as qint8."""
    wq = mod.weight_quant
    assert isinstance(wq, Quantizer)
    # snapped onto the grid first, so torch's own rounding (x * 1/s) cannot pick another code than
    # qdet's (float64 x / s): every runtime runs the codes the `.qdet` file stores
    w = dequantize(weight_codes(mod.weight.detach().float(), wq), wq.scale, wq.zero_point, wq.spec.axis)
    if wq.spec.axis is None:
        return torch.quantize_per_tensor(w, float(wq.scale), 0, torch.qint8)
    return torch.quantize_per_channel(w, wq.scale.float(), wq.zero_point.long(), axis=0, dtype=torch.qint8)


def _bias(mod: nn.Module) -> torch.Tensor | None:
    # fbgemm takes a float bias and adds it in the requantization step, so no int32 bias grid here.
    return None if mod.bias is None else mod.bias.detach().float()


def _int8_conv(mod: QuantConv2d, relu: bool, out: QParams) -> nn.Module | None:
    if isinstance(mod.padding, str) or mod.padding_mode != "zeros":
        return None  # quantized Conv2d takes numeric zero padding only: run it as a float island
    cls = nniq.ConvReLU2d if relu else nnq.Conv2d
    q = cls(mod.in_channels, mod.out_channels, mod.kernel_size, mod.stride, mod.padding,
            mod.dilation, mod.groups, bias=mod.bias is not None)
    q.set_weight_bias(_quantized_weight(mod), _bias(mod))
    q.scale, q.zero_point = out
    return q


def _int8_linear(mod: QuantLinear, relu: bool, out: QParams) -> nn.Module:
    cls = nniq.LinearReLU if relu else nnq.Linear
    q = cls(mod.in_features, mod.out_features, mod.bias is not None)  # Linear: bias_, LinearReLU: bias
    q.set_weight_bias(_quantized_weight(mod), _bias(mod))
    q.scale, q.zero_point = out
    return q


# ---------------------------------------------------------------------------------------------
# graph passes


class _Builder:
    """A new graph plus the modules/attributes it calls, copied from an old GraphModule."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.graph = fx.Graph()
        self.env: dict[fx.Node, fx.Node] = {}  # old node → new node
        self.attrs: dict[str, Any] = {}  # target → module / tensor of the new GraphModule

    def module(self, node: fx.Node) -> nn.Module | None:
        return self.gm.get_submodule(str(node.target)) if node.op == "call_module" else None

    def add_attr(self, stem: str, value: Any) -> str:
        """Register `value` under `stem` (suffixed when a different object already holds it)."""
        name, i = stem, 1
        while name in self.attrs and self.attrs[name] is not value:
            name, i = f"{stem}_{i}", i + 1
        self.attrs[name] = value
        return name

    def copy(self, node: fx.Node, transform: Callable[[fx.Node], fx.Node], module: Any = None) -> fx.Node:
        new = self.graph.node_copy(node, transform)
        if node.op == "call_module":
            new.target = self.add_attr(str(node.target), module if module is not None else self.module(node))
        elif node.op == "get_attr":
            new.target = self.add_attr(str(node.target), _fetch_attr(self.gm, str(node.target)))
        self.env[node] = new
        return new

    def finish(self, name: str) -> fx.GraphModule:
        self.graph.lint()
        return fx.GraphModule(self.attrs, self.graph, name)


def _fetch_attr(gm: fx.GraphModule, target: str) -> Any:
    obj: Any = gm
    for atom in target.split("."):
        obj = getattr(obj, atom)
    return obj


def _strip_quantizers(gm: fx.GraphModule) -> fx.GraphModule:
    """The float baseline: the same BN-folded graph with quantizers removed and plain conv/linear,
    so it runs in fp32 eager whatever the quantizers' enabled flags are later."""
    b = _Builder(gm)
    for node in gm.graph.nodes:
        mod = b.module(node)
        if isinstance(mod, _QUANT_ONLY):
            b.env[node] = b.env[node.args[0]]  # type: ignore[index]
            continue
        b.copy(node, b.env.__getitem__, _float_copy(mod) if isinstance(mod, (QuantConv2d, QuantLinear)) else None)
    return b.finish(f"Float{type(gm).__name__}")


def _float_copy(mod: QuantConv2d | QuantLinear) -> nn.Module:
    if isinstance(mod, QuantConv2d):
        new: nn.Module = nn.Conv2d(mod.in_channels, mod.out_channels, mod.kernel_size, mod.stride, mod.padding,
                                   mod.dilation, mod.groups, bias=mod.bias is not None, padding_mode=mod.padding_mode)
    else:
        new = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None)
    new.load_state_dict({k: v for k, v in mod.state_dict().items() if not k.startswith("weight_quant")})
    if getattr(mod, "uncorrected_bias", None) is not None:  # the float model has no bias correction
        with torch.no_grad():
            new.bias.copy_(mod.uncorrected_bias)
    return new.eval()


class _Lowering(_Builder):
    """Rewrites a calibrated region into int8 kernels; `qp` marks new nodes holding quint8 values."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.qp: dict[fx.Node, QParams] = {}  # new node → qparams of its quint8 value (or tuple of them)
        self.deq: dict[fx.Node, fx.Node] = {}  # new quint8 node → its dequantized float node
        self.float_islands: list[str] = []  # old node names run in float on dequantized values

    def run(self) -> fx.GraphModule:
        for node in self.gm.graph.nodes:
            if node in self.env:
                continue  # absorbed into an earlier pattern
            if node.op == "output":
                self.graph.output(map_arg(node.args[0], self.as_float))
            elif node.op in ("placeholder", "get_attr"):
                self.copy(node, self.env.__getitem__)
            elif not self.lower_quantizer(node) and not self.lower_pattern(node):
                self.lower_generic(node)
        gm = self.finish(f"TorchInt8{type(self.gm).__name__}")
        gm.float_islands = self.float_islands  # for reports: which ops ran dequantize → float → quantize
        return gm

    # ---- values ----
    def as_float(self, old: fx.Node) -> fx.Node:
        new = self.env[old]
        return self.dequantized(new) if new in self.qp else new

    def dequantized(self, new: fx.Node) -> fx.Node:
        if new not in self.deq:  # one dequantize per quint8 value, however many float users
            self.deq[new] = self.graph.call_method("dequantize", (new,))
        return self.deq[new]

    def is_q(self, arg: Any) -> bool:
        return isinstance(arg, fx.Node) and self.env.get(arg) in self.qp

    def quantize(self, value: fx.Node, target: QParams) -> fx.Node:
        """A quint8 node with qparams `target` (a no-op when `value` already is one)."""
        if self.qp.get(value) == target:
            return value
        if value in self.qp:  # requantize: different grid (rare: an input quantizer on a quint8 edge)
            value = self.dequantized(value)
        new = self.graph.call_function(torch.quantize_per_tensor, (value, target[0], target[1], torch.quint8))
        self.qp[new] = target
        return new

    # ---- quantizers ----
    def lower_quantizer(self, node: fx.Node) -> bool:
        mod = self.module(node)
        if isinstance(mod, Quantizer):
            target = _qparams(mod)
        elif isinstance(mod, TiedQuantizer):
            target = _qparams(mod.source)  # type: ignore[arg-type]
        else:
            return False
        self.env[node] = self.quantize(self.env[node.args[0]], target)  # type: ignore[index]
        return True

    # ---- fused patterns: op [→ ReLU] → Quantizer ----
    def output_chain(self, node: fx.Node) -> tuple[fx.Node | None, fx.Node] | None:
        """(relu or None, Quantizer node) when `node` feeds only that chain."""
        if len(node.users) != 1:
            return None
        (nxt,) = node.users
        act = None
        if self.activation(nxt):
            if len(nxt.users) != 1:
                return None
            act, (nxt,) = nxt, nxt.users
        return (act, nxt) if isinstance(self.module(nxt), Quantizer) else None

    def activation(self, node: fx.Node) -> str:
        """"relu", "relu6" or "" for a clamp that can fuse into the preceding op."""
        kind = op_kind(node, self.gm)
        return kind.value if kind in CLAMPS else ""

    def lower_pattern(self, node: fx.Node) -> bool:
        chain = self.output_chain(node)
        if chain is None:
            return False
        act, qnode = chain
        quant = self.module(qnode)
        assert isinstance(quant, Quantizer)
        out = _qparams(quant)
        if act is not None and self.activation(act) == "relu6" and (255 - out[1]) * out[0] > 6.0 * (1 + 1e-6):
            # ReLU6 = ReLU + the output grid's saturation only when the grid tops out at <= 6
            # (true when the observer saw ReLU6 outputs); otherwise it must clamp separately.
            return False
        new = self.lower_op(node, act is not None, out)
        if new is None:
            return False
        self.qp[new] = out
        for old in (node, act, qnode):
            if old is not None:
                self.env[old] = new
        return True

    def lower_op(self, node: fx.Node, relu: bool, out: QParams) -> fx.Node | None:
        """The int8 kernel call for `node` (None: the kernels cannot run it)."""
        mod = self.module(node)
        args = [a for a in node.args if isinstance(a, fx.Node)]
        if isinstance(mod, (QuantConv2d, QuantLinear)):
            if not isinstance(mod.weight_quant, Quantizer) or len(node.args) != 1 or not self.is_q(node.args[0]):
                return None
            qmod = _int8_conv(mod, relu, out) if isinstance(mod, QuantConv2d) else _int8_linear(mod, relu, out)
            if qmod is None:
                return None
            return self.graph.call_module(self.add_attr(str(node.target), qmod), (self.env[args[0]],))
        binary = node.op == "call_function" and len(node.args) == 2 and not node.kwargs and len(args) == 2
        binary = binary or (node.op == "call_method" and len(args) == 2 and not node.kwargs)
        if binary and all(self.is_q(a) for a in args):
            kind = op_kind(node, self.gm)
            if kind is OpKind.ADD:
                op = torch.ops.quantized.add_relu if relu else torch.ops.quantized.add
            elif kind is OpKind.MUL:
                op = torch.ops.quantized.mul_relu if relu else torch.ops.quantized.mul
            else:
                return None
            return self.graph.call_function(op, (self.env[args[0]], self.env[args[1]], out[0], out[1]))
        if node.op == "call_function" and node.target is torch.sigmoid and len(args) == 1 and self.is_q(args[0]):
            # PyTorch's int8 sigmoid has fixed output qparams (1/256, 0): the ones qdet fixes for uint8
            if not relu and abs(out[0] - 1 / 256) < 1e-12 and out[1] == 0:
                return self.graph.call_function(torch.sigmoid, (self.env[args[0]],))
        if node.op == "call_function" and op_kind(node) is OpKind.CAT and not relu:
            tensors = node.args[0] if node.args else node.kwargs.get("tensors")
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
            if isinstance(tensors, (list, tuple)) and all(self.is_q(t) for t in tensors):
                qs = [self.env[t] for t in tensors]  # type: ignore[index]
                return self.graph.call_function(torch.ops.quantized.cat, (qs, dim, out[0], out[1]))
        return None

    # ---- everything else ----
    def lower_generic(self, node: fx.Node) -> None:
        src = node.args[0] if node.args else None
        if self.keeps_grid(node) and self.is_q(src) and not any(self.is_q(a) for a in _nodes(node.args[1:], node.kwargs)):
            new = self.copy(node, self.env.__getitem__)
            self.qp[new] = self.qp[self.env[src]]  # type: ignore[index]
        elif (node.op == "call_method" and node.target in _SHAPE_METHODS) or _is_shape_attr(node):
            self.copy(node, self.env.__getitem__)
        else:
            if any(self.is_q(a) for a in _nodes(node.args, node.kwargs)):
                self.float_islands.append(str(node.target) if node.op == "call_module" else node.name)
            self.copy(node, self.as_float)

    def keeps_grid(self, node: fx.Node) -> bool:
        """Runs on quint8 with unchanged qparams; tuple results (chunk/split) only when indexed."""
        ok = op_kind(node, self.gm) in GRID_KEEPING
        if ok and node.target in (torch.chunk, torch.split, "chunk", "split"):
            ok = all(u.op == "call_function" and u.target is operator.getitem for u in node.users)
        return ok


def _nodes(*args: Any) -> Iterator[fx.Node]:
    found: list[fx.Node] = []
    map_arg(args, found.append)
    return iter(found)


def _is_shape_attr(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is getattr and node.args[1:2] in (("shape",), ("ndim",))


__all__ = ["TorchInt8Runtime"]

"""Insert quantizers into a traced region.

Rules (seed 002 §6.5, seed 003 residual policies):
  * weights of Conv2d/Linear are quantized (per channel by default), BN folded first;
  * the *output* of every value-changing op is quantized: conv/linear (after a fused ReLU/ReLU6,
    or SiLU with `fuse_silu`; otherwise SiLU is decomposed into sigmoid · x, both quantized),
    residual add (after its ReLU), concatenation, mul, SiLU/sigmoid/pooling/...;
  * ops that keep values on their input's grid (max-pool, flatten, reshape, nearest upsample,
    slicing, ReLU of a quantized value) re-apply the input's qparams (a TiedQuantizer), so that
    exported QDQ graphs keep every int8 kernel fed with int8;
  * the region's tensor inputs are quantized;
  * with ResidualPolicy.FUSE_CONV_ADD a conv that only feeds an add is not re-quantized.
Names: every quantized layer is named by its module path in the *whole* model (e.g.
"layer1.0.conv1", "layer1.0.add"), which is what skip lists, overrides and reports use.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.nn import functional as F

from qdet.config import Format, OverflowFix, QuantConfig, QuantSpec, ResidualPolicy, overflow_safe
from qdet.errors import ConfigError
from qdet.quant.equalize import equalize
from qdet.quant.fusion import decompose_silu, fold_batchnorms, frozen_batchnorm_types, modularize_functional_ops
from qdet.quant.opkinds import CLAMPS, GRID_KEEPING, LEAKY_MISH, WEIGHTED, OpKind, is_decode_op, module_kind, op_kind
from qdet.quant.qat import QATConvBn2d, fold_batchnorms_qat
from qdet.quant.quantizer import (
    CastQuantizer,
    QuantConv2d,
    QuantLinear,
    Quantizer,
    TiedQuantizer,
    link_input_quantizer,
    make_weight_quantizer,
)



@dataclass
class LayerRecord:
    """One quantized point, for reports and lowering."""

    name: str  # module path in the whole model
    kind: str  # "conv", "linear", "add", "cat", "input", "act", ...
    quantizer: str  # attribute name of its output quantizer in the region GraphModule ("" if none)
    weight_quantizer: str = ""  # "<module>.weight_quant" for conv/linear
    format: Format = Format.INT
    macs: int = 0  # multiply-accumulates per image (conv/linear), for the coverage report
    reason: str = ""  # why a conv/linear-like op stayed float ("" when quantized or user-skipped)


@dataclass
class PreparedRegion:
    """A region rewritten with quantizers, plus the record of what was quantized."""

    path: str
    module: fx.GraphModule
    layers: list[LayerRecord] = field(default_factory=list)
    folded_bn: list[str] = field(default_factory=list)
    float_ops: list[str] = field(default_factory=list)  # box-decode ops after the last conv/linear
    equalized: list[Any] = field(default_factory=list)  # cross-layer equalized pairs (qdet.quant.equalize)


class UntraceableError(ConfigError):
    """`torch.fx` could not trace a module's forward (data-dependent control flow, unsupported Python)."""


class _LeafTracer(fx.Tracer):
    """fx's tracer with declared leaf types, FrozenBatchNorm2d kept whole, and weight-free modules
    that fx cannot follow kept as one opaque node each (recorded in `opaque`, path → reason):
    a converter's Slice/Pad op or a helper with data-dependent Python then costs only itself, not
    the trace of everything around it. A module with parameters is never made opaque (its convs
    must be seen; when it cannot be traced the whole trace fails and `split` takes over)."""

    # leaf_types has a default: unpickling a GraphModule (Ray ships models to its workers) re-traces its
    # code with a subclass of the tracer it was made with, constructed without arguments
    def __init__(self, leaf_types: tuple[type[nn.Module], ...] = ()) -> None:
        super().__init__()
        self.leaf_types = leaf_types
        self.opaque: dict[str, str] = {}
        self._opaque_ids: set[int] = set()

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        # FrozenBatchNorm2d stays one node, so that the conv-BN fold finds it
        leaf = self.leaf_types + frozen_batchnorm_types()
        return id(m) in self._opaque_ids or isinstance(m, leaf) or super().is_leaf_module(m, qualname)

    def call_module(self, m: nn.Module, forward: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        path = self.path_of_module(m)
        if self.is_leaf_module(m, path) or any(True for _ in m.parameters()):
            return super().call_module(m, forward, args, kwargs)
        stack, calls = self.module_stack.copy(), dict(self.num_calls)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception as exc:  # noqa: BLE001 -- whatever fx cannot follow inside a weight-free module
            self.module_stack.clear()
            self.module_stack.update(stack)  # fx does not unwind its module stack on an exception
            self.num_calls = calls
            self.opaque.setdefault(path, f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:200])
            self._opaque_ids.add(id(m))
            return super().call_module(m, forward, args, kwargs)


def trace(module: nn.Module, leaf_types: tuple[type[nn.Module], ...] = ()) -> fx.GraphModule:
    """Symbolically trace `module`; a clear ConfigError when its forward is not traceable.

    Weight-free submodules that fx cannot follow become single nodes that run float; they are
    listed in the result's `meta["opaque"]` (module path → reason)."""
    tracer = _LeafTracer(leaf_types)
    try:
        graph = tracer.trace(module)
    except Exception as exc:  # fx raises many types; the user needs the module and the reason
        raise UntraceableError(
            f"cannot trace {type(module).__name__} for quantization ({type(exc).__name__}: {exc}); "
            "declare a smaller region or mark the offending submodule as a leaf in the adapter"
        ) from exc
    gm = fx.GraphModule(tracer.root, graph, type(module).__name__)
    if tracer.opaque:
        gm.graph.eliminate_dead_code()  # what the failed attempts had recorded before they raised
        gm.recompile()
    gm.meta["opaque"] = dict(tracer.opaque)
    return gm


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else prefix or name


class _Inserter:
    """Walks one traced graph in order and inserts quantizers by the rules above."""

    def __init__(self, gm: fx.GraphModule, prefix: str, cfg: QuantConfig) -> None:
        self.gm = gm
        self.prefix = prefix
        self.cfg = cfg
        self.out_q: dict[fx.Node, fx.Node] = {}  # node → its quantizer node (value on an int grid)
        self.source_q: dict[fx.Node, Quantizer] = {}  # node → Quantizer whose grid its value is on
        self.layers: list[LayerRecord] = []
        self.used_names: set[str] = set()
        self.fused_into_add: set[fx.Node] = set()  # convs whose output the add quantizes (FUSE_CONV_ADD)
        self.decode_tail: set[fx.Node] = set()
        self.float_ops: list[str] = []  # ops kept float as box decoding
        self.first_layers = _first_weighted_nodes(gm) if cfg.overflow_fix is OverflowFix.FIRST_LAYER else set()

    # ---------- naming and per-layer config ----------
    def layer_name(self, node: fx.Node) -> str:
        if node.op == "call_module":
            return _join(self.prefix, str(node.target))
        stack = node.meta.get("nn_module_stack") or {}
        owner = list(stack.keys())[-1].split("@")[0] if stack else ""
        base = str(node.target.__name__ if callable(node.target) else node.target)
        name = _join(self.prefix, _join(owner, base.strip("_")))
        unique, i = name, 1
        while unique in self.used_names:
            unique, i = f"{name}_{i}", i + 1
        self.used_names.add(unique)
        return unique

    def format_of(self, name: str) -> Format:
        for pattern in self.cfg.skip:
            if fnmatch.fnmatchcase(name, pattern):
                return Format.FLOAT
        fmt = self.cfg.format
        for ov in self.cfg.overrides:
            if ov.format is not None and fnmatch.fnmatchcase(name, ov.pattern):
                fmt = ov.format
        return fmt

    def weight_spec(self, node: fx.Node, name: str) -> QuantSpec:
        """The layer's weight spec, 7-bit where the overflow fix asks for it."""
        spec = self.spec_of(name, "weights")
        fix = self.cfg.overflow_fix
        if fix is OverflowFix.ALL or (fix is OverflowFix.FIRST_LAYER and node in self.first_layers):
            return overflow_safe(spec)
        return spec

    def spec_of(self, name: str, which: str) -> QuantSpec:
        spec: QuantSpec = getattr(self.cfg, which)
        for ov in self.cfg.overrides:
            override: QuantSpec | None = getattr(ov, which)
            if override is not None and fnmatch.fnmatchcase(name, ov.pattern):
                spec = override
        return spec

    # ---------- graph edits ----------
    def add_module(self, stem: str, module: nn.Module) -> str:
        attr = "q_" + stem.replace(".", "_")
        i = 1
        while hasattr(self.gm, attr):
            attr, i = f"q_{stem.replace('.', '_')}_{i}", i + 1
        self.gm.add_submodule(attr, module)
        return attr

    def insert_after(self, node: fx.Node, module: nn.Module, stem: str, *, exclude: set[fx.Node] = frozenset()) -> fx.Node:
        attr = self.add_module(stem, module)
        users = [u for u in node.users if u not in exclude]
        with self.gm.graph.inserting_after(node):
            qnode = self.gm.graph.call_module(attr, (node,))
        for user in users:
            user.replace_input_with(node, qnode)
        return qnode

    def quantize_output(self, node: fx.Node, name: str, kind: str, fmt: Format, weight_quantizer: str = "") -> None:
        """Quantize the value of `node` (every current user then reads the quantized value)."""
        if fmt is Format.FLOAT:
            self.layers.append(LayerRecord(name, kind, "", format=fmt))
            return
        if fmt in (Format.FP16, Format.BF16):
            module: nn.Module = CastQuantizer(fmt, name)
        else:
            module = Quantizer(self.spec_of(name, "activations"), name)
            if kind == "sigmoid":
                _fix_sigmoid_qparams(module)
        qnode = self.insert_after(node, module, f"{name}.out" if kind != "input" else name)
        self.out_q[node] = qnode
        if isinstance(module, Quantizer):
            self.source_q[node] = module
            self.source_q[qnode] = module
        self.layers.append(LayerRecord(name, kind, str(qnode.target), weight_quantizer, fmt))

    def ensure_input_quantized(self, consumer: fx.Node) -> None:
        """A quantized op must read int-grid values: quantize float inputs on that edge."""
        for arg in _tensor_args(consumer):
            if arg in self.source_q or arg in self.out_q.values() or arg in self.fused_into_add or not _is_float_tensor(arg):
                continue
            name = self.layer_name(arg) + ".in" if arg.op != "placeholder" else _join(self.prefix, arg.name)
            module = Quantizer(self.spec_of(name, "activations"), name)
            attr = self.add_module(name, module)
            with self.gm.graph.inserting_after(arg):
                qnode = self.gm.graph.call_module(attr, (arg,))
            consumer.replace_input_with(arg, qnode)
            self.source_q[qnode] = module
            self.layers.append(LayerRecord(name, "input", attr))

    # ---------- the pass ----------
    def run(self) -> list[LayerRecord]:
        nodes = list(self.gm.graph.nodes)
        self.decode_tail = box_decode_tail(self.gm)
        for node in nodes:
            if node.op == "placeholder":
                if _is_float_tensor(node):
                    self.quantize_output(node, _join(self.prefix, node.name), "input", self.cfg.format)
            elif node.op in ("call_module", "call_function", "call_method"):
                mod = self.gm.get_submodule(str(node.target)) if node.op == "call_module" else None
                conv_like = mod is not None and module_kind(mod) in WEIGHTED and (
                    _is_float_tensor(node) or _is_tensor_tuple(node))
                self.visit(node)
                if conv_like:
                    self.record_macs(node, mod, _join(self.prefix, str(node.target)))
        if self.cfg.share_concat_ranges:
            self.share_concat_ranges()
        self.gm.graph.lint()
        self.gm.recompile()
        return self.layers

    def share_concat_ranges(self) -> None:
        """Give each concatenation and its inputs one observer, hence one scale/zero point.

        With equal qparams an int8 concat is a copy instead of a requantization of every input
        (onnxruntime's QLinearConcat, fbgemm's cat), and nothing is rounded twice. Inputs already
        tied to another quantizer join through their source, so whole chains share one grid.
        """
        parent: dict[int, Quantizer] = {}

        def root(q: Quantizer) -> Quantizer:
            while id(q) in parent and parent[id(q)] is not q:
                q = parent[id(q)]
            return q

        members: list[Quantizer] = []
        for node in self.gm.graph.nodes:
            if node.op != "call_function" or node.target not in (torch.cat, torch.concat):
                continue
            out = self.source_q.get(self.out_q.get(node, node))
            # inserted quantizer nodes carry no shape metadata: read the list argument directly
            tensors = node.args[0] if node.args else node.kwargs.get("tensors", ())
            inputs = [self.source_q.get(a) for a in tensors if isinstance(a, fx.Node)]
            group = [q for q in [out, *inputs] if q is not None and q.observer is not None]
            if out is None or len(group) < 2 or any(q.spec != out.spec for q in group):
                continue
            for q in group:
                parent.setdefault(id(q), q)
                parent[id(root(q))] = root(out)
                members.append(q)
        for q in members:
            q.observer = root(q).observer  # one observer object per connected group

    def visit(self, node: fx.Node) -> None:
        if not _is_float_tensor(node) and not _is_tensor_tuple(node):
            return
        if node in self.decode_tail:
            self.float_ops.append(self.layer_name(node))
            return  # box decoding after the last conv/linear: a float island by op kind
        if _is_fused_activation(self.gm, node, self.cfg) and self._producer_absorbs(node):
            return  # handled by the op it follows
        if self._is_passthrough(node):
            self._tie(node)
            return
        mod = self.gm.get_submodule(str(node.target)) if node.op == "call_module" else None
        name = self.layer_name(node)
        fmt = self.format_of(name)
        kind = _kind(node, mod)
        unsupported = _unsupported_matmul(node, mod)
        if unsupported:
            self.layers.append(LayerRecord(name, "conv" if "conv" in unsupported else "linear", "", format=Format.FLOAT,
                                           macs=_macs(node, mod), reason=unsupported))
            return
        if kind in ("conv", "linear") and mod is not None:
            self._quantize_weight(node, mod, name, fmt)
        if kind in ("conv", "linear", "add", "cat", "mul") and fmt is not Format.FLOAT:
            self.ensure_input_quantized(node)
        if kind in ("conv", "linear") and fmt is not Format.FLOAT and node.args and isinstance(node.args[0], fx.Node):
            link_input_quantizer(self.gm.get_submodule(str(node.target)), self.source_q.get(node.args[0]))
        out_node = node
        act = _single_fused_activation_user(self.gm, node, self.cfg) if kind in ("conv", "linear", "add") else None
        if act is not None:
            out_node = act
        if kind == "conv" and self.cfg.residual is ResidualPolicy.FUSE_CONV_ADD and act is None and _feeds_add_only(node):
            self.fused_into_add.add(node)
            self.layers.append(LayerRecord(name, kind, "", weight_quantizer=f"{node.target}.weight_quant", format=fmt))
            return
        if self._is_region_output(out_node) and not self.cfg.quantize_outputs:
            self.layers.append(LayerRecord(name, kind, "", weight_quantizer=self._wq(node, kind), format=fmt))
            return
        self.quantize_output(out_node, name, kind, fmt, self._wq(node, kind))

    def record_macs(self, node: fx.Node, mod: nn.Module | None, name: str) -> None:
        for rec in reversed(self.layers):
            if rec.name == name:
                rec.macs = _macs(node, mod)
                return

    def _wq(self, node: fx.Node, kind: str) -> str:
        if kind not in ("conv", "linear"):
            return ""
        mod = self.gm.get_submodule(str(node.target))
        return f"{node.target}.weight_quant" if isinstance(mod, (QuantConv2d, QuantLinear)) else ""

    def _producer_absorbs(self, act: fx.Node) -> bool:
        src = act.args[0] if act.args else None
        if not isinstance(src, fx.Node) or len(src.users) != 1:
            return False
        mod = self.gm.get_submodule(str(src.target)) if src.op == "call_module" else None
        return _kind(src, mod) in ("conv", "linear", "add")

    def _is_passthrough(self, node: fx.Node) -> bool:
        return op_kind(node, self.gm) in GRID_KEEPING

    def _tie(self, node: fx.Node) -> None:
        src = node.args[0] if node.args else None
        source = self.source_q.get(src) if isinstance(src, fx.Node) else None
        if source is None:
            return  # float in, float out: a quantized consumer will quantize it
        if _is_tensor_tuple(node):
            self.source_q[node] = source  # getitem on it ties to the same grid
            return
        qnode = self.insert_after(node, TiedQuantizer(source, source.layer_name), f"{node.name}.tied")
        self.source_q[node] = source
        self.source_q[qnode] = source

    def _quantize_weight(self, node: fx.Node, mod: nn.Module, name: str, fmt: Format) -> None:
        if fmt is Format.FLOAT:
            return
        # a QAT conv-bn quantizes its BN-folded weight; it keeps its BN, so it is not replaced
        weight = mod.folded()[0].detach() if isinstance(mod, QATConvBn2d) else mod.weight
        if fmt in (Format.FP16, Format.BF16):
            wq: nn.Module = CastQuantizer(fmt, name + ".weight")
        else:
            wq = make_weight_quantizer(weight, self.weight_spec(node, name), name + ".weight")
        if isinstance(mod, QATConvBn2d):
            mod.weight_quant = wq
            return
        new = QuantConv2d.from_float(mod, wq) if isinstance(mod, nn.Conv2d) else QuantLinear.from_float(mod, wq)
        parent, _, attr = str(node.target).rpartition(".")
        setattr(self.gm.get_submodule(parent) if parent else self.gm, attr, new)

    def _is_region_output(self, node: fx.Node) -> bool:
        return any(u.op == "output" for u in node.users)


def box_decode_tail(gm: fx.GraphModule) -> set[fx.Node]:
    """Nodes that decode boxes after the last conv/linear, and what they feed: kept float.

    A node is in the tail when no conv/linear is reachable from it; there, decode ops, the ops
    feeding them and everything computed from them stay float.
    """
    nodes = list(gm.graph.nodes)
    feeds_weighted: set[fx.Node] = set()
    feeds_decode: set[fx.Node] = set()
    for node in reversed(nodes):
        users = list(node.users)
        if any(u in feeds_weighted or _has_weight(gm, u) for u in users):
            feeds_weighted.add(node)
        elif any(u in feeds_decode or is_decode_op(u) for u in users):
            feeds_decode.add(node)
    tail: set[fx.Node] = set()
    for node in nodes:
        if node.op in ("placeholder", "output", "get_attr") or node in feeds_weighted or _has_weight(gm, node):
            continue
        if is_decode_op(node) or node in feeds_decode or any(a in tail for a in node.all_input_nodes):
            tail.add(node)
    return tail


def _first_weighted_nodes(gm: fx.GraphModule) -> set[fx.Node]:
    """Conv/linear nodes with no conv/linear upstream of them in this graph."""
    weighted_upstream: dict[fx.Node, bool] = {}
    first: set[fx.Node] = set()
    for node in gm.graph.nodes:
        upstream = any(weighted_upstream.get(a, False) for a in node.all_input_nodes)
        weighted = _has_weight(gm, node)
        if weighted and not upstream:
            first.add(node)
        weighted_upstream[node] = upstream or weighted
    return first


def _has_weight(gm: fx.GraphModule, node: fx.Node) -> bool:
    return op_kind(node, gm) in WEIGHTED


def _fix_sigmoid_qparams(q: Quantizer) -> None:
    """Sigmoid's range is [0, 1]: fixed qparams, no observer (PyTorch's int8 sigmoid uses the same)."""
    levels = q.spec.qmax - q.spec.qmin + 1
    q.set_qparams(torch.tensor(1.0 / levels), torch.tensor(q.spec.qmin, dtype=torch.int32))
    q.observer = None


_NAMED_KINDS = {OpKind.CONV, OpKind.LINEAR, OpKind.ADD, OpKind.CAT, OpKind.MUL, OpKind.SIGMOID}


def _kind(node: fx.Node, mod: nn.Module | None) -> str:
    """The record kind: the op kind's name where the rules depend on it, else the op's own name."""
    kind = op_kind(node)
    if kind in _NAMED_KINDS:
        return kind.value
    if mod is not None:
        return type(mod).__name__.lower()
    if node.op == "call_function":
        return getattr(node.target, "__name__", "op")
    return str(node.target)


def _unsupported_matmul(node: fx.Node, mod: nn.Module | None) -> str:
    """Why a conv/linear/matmul-like op cannot be quantized here ("" when it can, or is no such op)."""
    if op_kind(node) is not OpKind.MATMUL:
        return ""
    if mod is not None:
        return f"{type(mod).__name__}: no int8 kernel path in qdet yet (Conv2d and Linear only)"
    what = getattr(node.target, "__name__", str(node.target))
    if node.op == "call_method":
        return f"Tensor.{what} on computed operands: kept float"
    return f"{what} on computed operands (not the model's parameters): kept float"


def _macs(node: fx.Node, mod: nn.Module | None) -> int:
    """Multiply-accumulates per sample of a conv/linear(-like) node, from its propagated shapes."""
    meta = node.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    if shape is None or len(shape) == 0:
        return 0
    per_sample = int(torch.Size(shape).numel()) // max(int(shape[0]), 1) if len(shape) > 1 else int(shape[0])
    if isinstance(mod, nn.Linear):
        return per_sample * mod.in_features
    if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return per_sample * (mod.in_channels // mod.groups) * int(torch.tensor(mod.kernel_size).prod())
    args = _tensor_args(node)
    if node.op == "call_function" and len(node.args) > 1 and isinstance(node.args[1], fx.Node):
        w = getattr(node.args[1].meta.get("tensor_meta"), "shape", None)
        if w is not None and len(w) >= 2:
            return per_sample * int(torch.Size(w[1:]).numel()) if node.target in (F.conv1d, F.conv2d, F.conv3d, torch.conv2d) \
                else per_sample * int(w[-1] if node.target is F.linear else w[-2])
    return per_sample if args else 0


def _tensor_args(node: fx.Node) -> list[fx.Node]:
    out: list[fx.Node] = []

    def visit(a: Any) -> None:
        if isinstance(a, fx.Node) and _is_float_tensor(a):
            out.append(a)
        elif isinstance(a, (list, tuple)):
            for x in a:
                visit(x)

    for a in node.args:
        visit(a)
    for a in node.kwargs.values():
        visit(a)
    return out


def _is_float_tensor(node: fx.Node) -> bool:
    meta = node.meta.get("tensor_meta")
    return meta is not None and hasattr(meta, "dtype") and meta.dtype.is_floating_point


def _is_tensor_tuple(node: fx.Node) -> bool:
    meta = node.meta.get("tensor_meta")
    return isinstance(meta, (tuple, list)) and len(meta) > 0 and all(hasattr(m, "dtype") for m in meta)


def fused_activation_kinds(cfg: QuantConfig) -> frozenset[OpKind]:
    """Activations that are part of the conv/linear/add before them (only their output is quantized):
    the clamps always; SiLU with `fuse_silu`; LeakyReLU and Mish with `fuse_leaky_mish`."""
    return CLAMPS | ({OpKind.SILU} if cfg.fuse_silu else set()) | (LEAKY_MISH if cfg.fuse_leaky_mish else set())


def _is_fused_activation(gm: fx.GraphModule, node: fx.Node, cfg: QuantConfig) -> bool:
    return op_kind(node, gm) in fused_activation_kinds(cfg)


def _single_fused_activation_user(gm: fx.GraphModule, node: fx.Node, cfg: QuantConfig) -> fx.Node | None:
    if len(node.users) != 1:
        return None
    (user,) = node.users
    return user if _is_fused_activation(gm, user, cfg) else None


def _feeds_add_only(node: fx.Node) -> bool:
    if len(node.users) != 1:
        return False
    (user,) = node.users
    return user.op == "call_function" and op_kind(user) is OpKind.ADD


def prepare_region(
    module: nn.Module,
    example_inputs: tuple[Any, ...],
    cfg: QuantConfig,
    *,
    prefix: str = "",
    leaf_types: tuple[type[nn.Module], ...] = (),
    qat: bool = False,
) -> PreparedRegion:
    """Trace `module`, fold BN, insert quantizers. `module` is not modified (it is traced, and the
    BN-folded / quantized replacements are new modules), but callers pass a copy anyway.
    With `qat`, each conv-bn pair becomes a trainable QATConvBn2d instead of a folded conv.

    >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    >>> region = prepare_region(net, (torch.randn(1, 3, 8, 8),), QuantConfig())
    >>> [layer.name for layer in region.layers]
    ['input_1', '0']
    """
    cfg = cfg.resolved()
    gm = trace(module, leaf_types)
    modularize_functional_ops(gm)
    folded = fold_batchnorms_qat(gm) if qat else fold_batchnorms(gm)
    # data-free and exact in float, so a load re-derives the same weights before the state is restored
    equalized = equalize(gm, high_bias_absorption=cfg.ptq.high_bias_absorption,
                         relu6_to_relu=cfg.ptq.relu6_to_relu) if cfg.ptq.cle and not qat else []
    if not cfg.fuse_silu:
        decompose_silu(gm)
    _propagate_shapes(gm, example_inputs)
    inserter = _Inserter(gm, prefix, cfg)
    layers = inserter.run()
    return PreparedRegion(prefix, gm, layers, [_join(prefix, f) for f in folded], inserter.float_ops,
                          equalized)


def _propagate_shapes(gm: fx.GraphModule, example_inputs: tuple[Any, ...]) -> None:
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(*example_inputs)
    except Exception as exc:
        raise ConfigError(
            f"running {gm.__class__.__name__} on the example input failed ({type(exc).__name__}: {exc}); "
            "check the input shape and preprocessing"
        ) from exc


def check_patterns(cfg: QuantConfig, layer_names: list[str]) -> None:
    """Every skip pattern / override must match a layer: a typo must not silently quantize it."""
    import difflib

    patterns = list(cfg.skip) + [ov.pattern for ov in cfg.overrides]
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in layer_names):
            close = difflib.get_close_matches(pattern, layer_names, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ConfigError(f"layer name or pattern {pattern!r} matches no quantizable layer{hint}")


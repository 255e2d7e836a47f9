"""One table of operation kinds (NNCF's "metatypes"): what a graph node computes, whatever its spelling.

A ReLU is a ReLU whether it is `nn.ReLU()`, `F.relu`, `torch.relu` or `x.relu()`; a BatchNorm is
one whether it is `nn.BatchNorm2d`, `nn.SyncBatchNorm` (in eval) or torchvision's
`FrozenBatchNorm2d`. Fusion, quantizer placement, every exporter and the coverage report ask
`op_kind(node)` instead of keeping their own `isinstance` lists, so a new spelling is taught once.

    >>> import torch
    >>> from torch import fx, nn
    >>> gm = fx.symbolic_trace(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU6(), nn.Flatten()))
    >>> [op_kind(n).value for n in gm.graph.nodes]
    ['input', 'conv', 'relu6', 'shape', 'output']
"""
from __future__ import annotations

import operator
from enum import Enum
from typing import Any

import torch
from torch import fx, nn
from torch.nn import functional as F


class OpKind(Enum):
    INPUT = "input"
    OUTPUT = "output"
    CONSTANT = "constant"  # get_attr: a parameter or buffer read
    CONV = "conv"  # nn.Conv2d (and what modularize_functional_ops turned into one)
    LINEAR = "linear"
    MATMUL = "matmul"  # conv/linear-like without an int8 path here: Conv1d/3d, transposed, matmul of activations
    BATCHNORM = "batchnorm"
    RELU = "relu"
    RELU6 = "relu6"
    SILU = "silu"
    SIGMOID = "sigmoid"
    LEAKY_RELU = "leaky_relu"
    MISH = "mish"
    ACTIVATION = "activation"  # other elementwise nonlinearities: Hardswish, GELU, ELU, Tanh, ...
    ADD = "add"  # of two tensors
    MUL = "mul"  # of two tensors
    CAT = "cat"
    MAXPOOL = "maxpool"
    AVGPOOL = "avgpool"
    UPSAMPLE_NEAREST = "upsample_nearest"
    UPSAMPLE = "upsample"  # bilinear and friends: values change
    ZERO_PAD = "zero_pad"
    SHAPE = "shape"  # view, reshape, permute, flatten, getitem, split, ...: values unchanged
    IDENTITY = "identity"  # nn.Identity, Dropout in eval
    META = "meta"  # size(), dim(): reads the shape only
    OTHER = "other"


# Kinds whose output values lie on their input's int grid (the input's qparams carry over).
GRID_KEEPING = frozenset({OpKind.MAXPOOL, OpKind.SHAPE, OpKind.IDENTITY, OpKind.ZERO_PAD, OpKind.UPSAMPLE_NEAREST,
                          OpKind.RELU})
# Clamps an int8 conv/linear/add applies for free (folded into the requantization range).
CLAMPS = frozenset({OpKind.RELU, OpKind.RELU6})
WEIGHTED = frozenset({OpKind.CONV, OpKind.LINEAR})
# Activations OpenVINO runs as post-ops of the int8 conv before its requantization (Darknet's leaky
# and mish); QuantConfig(fuse_leaky_mish=True) quantizes only their output.
LEAKY_MISH = frozenset({OpKind.LEAKY_RELU, OpKind.MISH})


def _frozen_bn_types() -> tuple[type[nn.Module], ...]:
    try:
        from torchvision.ops.misc import FrozenBatchNorm2d
    except ImportError:
        return ()
    return (FrozenBatchNorm2d,)


_ACTIVATION_MODULES = (nn.Hardswish, nn.Hardsigmoid, nn.GELU, nn.ELU, nn.Tanh, nn.Softplus,
                       nn.PReLU, nn.Hardtanh)
_MATMUL_MODULES = (nn.Conv1d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_SHAPE_MODULES = (nn.Flatten, nn.Unflatten)
_IDENTITY_MODULES = (nn.Identity, nn.Dropout, nn.Dropout2d)


# Leaf module types → kind, first match wins (ReLU6, a Hardtanh, and Upsample's mode are decided
# in module_kind before this table).
_MODULE_KINDS: tuple[tuple[tuple[type[nn.Module], ...], OpKind], ...] = (
    ((nn.Conv2d,), OpKind.CONV),
    ((nn.Linear,), OpKind.LINEAR),
    (_MATMUL_MODULES, OpKind.MATMUL),
    ((nn.modules.batchnorm._BatchNorm,), OpKind.BATCHNORM),
    ((nn.ReLU,), OpKind.RELU),
    ((nn.SiLU,), OpKind.SILU),
    ((nn.Sigmoid,), OpKind.SIGMOID),
    ((nn.LeakyReLU,), OpKind.LEAKY_RELU),
    ((nn.Mish,), OpKind.MISH),
    (_ACTIVATION_MODULES, OpKind.ACTIVATION),
    ((nn.MaxPool2d,), OpKind.MAXPOOL),
    ((nn.AvgPool2d, nn.AdaptiveAvgPool2d), OpKind.AVGPOOL),
    ((nn.ZeroPad2d,), OpKind.ZERO_PAD),
    (_SHAPE_MODULES, OpKind.SHAPE),
    (_IDENTITY_MODULES, OpKind.IDENTITY),
)


def module_kind(mod: nn.Module) -> OpKind:
    """The kind of a module called as a graph leaf."""
    if isinstance(mod, nn.Hardtanh) and (mod.min_val, mod.max_val) == (0.0, 6.0):  # nn.ReLU6 is one
        return OpKind.RELU6
    if isinstance(mod, nn.Upsample):
        return OpKind.UPSAMPLE_NEAREST if mod.mode == "nearest" else OpKind.UPSAMPLE
    if isinstance(mod, _frozen_bn_types()):
        return OpKind.BATCHNORM
    for types, kind in _MODULE_KINDS:
        if isinstance(mod, types):
            return kind
    return OpKind.OTHER


_FUNCTIONS: dict[Any, OpKind] = {
    F.relu: OpKind.RELU, torch.relu: OpKind.RELU, F.relu6: OpKind.RELU6,
    F.silu: OpKind.SILU, torch.sigmoid: OpKind.SIGMOID, F.sigmoid: OpKind.SIGMOID,
    F.hardswish: OpKind.ACTIVATION, F.hardsigmoid: OpKind.ACTIVATION, F.mish: OpKind.MISH,
    F.gelu: OpKind.ACTIVATION, F.leaky_relu: OpKind.LEAKY_RELU, torch.tanh: OpKind.ACTIVATION,
    F.elu: OpKind.ACTIVATION,
    torch.cat: OpKind.CAT, torch.concat: OpKind.CAT,
    F.max_pool2d: OpKind.MAXPOOL, F.avg_pool2d: OpKind.AVGPOOL, F.adaptive_avg_pool2d: OpKind.AVGPOOL,
    torch.flatten: OpKind.SHAPE, operator.getitem: OpKind.SHAPE, torch.reshape: OpKind.SHAPE,
    torch.transpose: OpKind.SHAPE, torch.permute: OpKind.SHAPE, torch.squeeze: OpKind.SHAPE,
    torch.unsqueeze: OpKind.SHAPE, torch.chunk: OpKind.SHAPE, torch.split: OpKind.SHAPE,
    F.dropout: OpKind.IDENTITY,
    F.conv1d: OpKind.MATMUL, F.conv2d: OpKind.MATMUL, F.conv3d: OpKind.MATMUL, torch.conv2d: OpKind.MATMUL,
    F.conv_transpose2d: OpKind.MATMUL, F.linear: OpKind.MATMUL, torch.matmul: OpKind.MATMUL,
    operator.matmul: OpKind.MATMUL, torch.bmm: OpKind.MATMUL, torch.mm: OpKind.MATMUL,
}
_METHODS: dict[str, OpKind] = {
    "relu": OpKind.RELU, "sigmoid": OpKind.SIGMOID, "tanh": OpKind.ACTIVATION,
    "view": OpKind.SHAPE, "reshape": OpKind.SHAPE, "flatten": OpKind.SHAPE, "permute": OpKind.SHAPE,
    "transpose": OpKind.SHAPE, "contiguous": OpKind.SHAPE, "chunk": OpKind.SHAPE, "split": OpKind.SHAPE,
    "squeeze": OpKind.SHAPE, "unsqueeze": OpKind.SHAPE, "__getitem__": OpKind.SHAPE,
    "size": OpKind.META, "dim": OpKind.META, "numel": OpKind.META,
    "matmul": OpKind.MATMUL, "bmm": OpKind.MATMUL, "mm": OpKind.MATMUL,
}
ADD_FUNCTIONS: frozenset[Any] = frozenset({operator.add, operator.iadd, torch.add})
MUL_FUNCTIONS: frozenset[Any] = frozenset({operator.mul, operator.imul, torch.mul})


def _two_tensors(node: fx.Node) -> bool:
    return sum(isinstance(a, fx.Node) for a in node.args) == 2


def op_kind(node: fx.Node, gm: nn.Module | None = None) -> OpKind:
    """What `node` computes (its owning GraphModule resolves call_module targets)."""
    if node.op == "placeholder":
        return OpKind.INPUT
    if node.op == "output":
        return OpKind.OUTPUT
    if node.op == "get_attr":
        return OpKind.CONSTANT
    if node.op == "call_module":
        root = gm if gm is not None else node.graph.owning_module
        return module_kind(root.get_submodule(str(node.target)))
    target = node.target
    if node.op == "call_method":
        if target in ("add", "add_") and _two_tensors(node):
            return OpKind.ADD
        if target in ("mul", "mul_") and _two_tensors(node):
            return OpKind.MUL
        return _METHODS.get(str(target), OpKind.OTHER)
    if target in ADD_FUNCTIONS:
        return OpKind.ADD if _two_tensors(node) else OpKind.OTHER
    if target in MUL_FUNCTIONS:
        return OpKind.MUL if _two_tensors(node) else OpKind.OTHER
    if target is F.interpolate:
        mode = node.kwargs.get("mode", node.args[3] if len(node.args) > 3 else "nearest")
        return OpKind.UPSAMPLE_NEAREST if mode == "nearest" else OpKind.UPSAMPLE
    if target is F.pad:
        mode = node.kwargs.get("mode", node.args[2] if len(node.args) > 2 else "constant")
        value = node.kwargs.get("value", node.args[3] if len(node.args) > 3 else 0)
        return OpKind.ZERO_PAD if mode == "constant" and not value else OpKind.OTHER
    if target is F.hardtanh:
        low = node.kwargs.get("min_val", node.args[1] if len(node.args) > 1 else -1.0)
        high = node.kwargs.get("max_val", node.args[2] if len(node.args) > 2 else 1.0)
        return OpKind.RELU6 if (low, high) == (0.0, 6.0) else OpKind.ACTIVATION
    try:
        return _FUNCTIONS.get(target, OpKind.OTHER)
    except TypeError:  # an unhashable target
        return OpKind.OTHER


# Ops that decode boxes (anchor/grid arithmetic, exp of sizes, NMS): where they come after the last
# conv/linear they stay float, with everything between them and the outputs (NNCF keeps NMS/TopK
# float the same way). Scalar or buffer (anchor grid) operands make mul/add decode arithmetic too.
_DECODE_FUNCTIONS: set[Any] = {
    torch.exp, torch.log, operator.sub, torch.sub, operator.truediv, torch.div, operator.pow, torch.pow,
    torch.meshgrid, torch.arange, torch.stack, torch.topk, torch.sort, torch.where, torch.clamp, torch.sigmoid_,
}
_DECODE_METHODS = {"exp", "log", "sub", "div", "pow", "clamp", "topk", "sort", "exp_", "sub_", "div_", "mul_", "add_"}
_DECODE_NAMES = {"nms", "batched_nms", "box_iou", "roi_align", "grid_sample"}


def is_decode_op(node: fx.Node) -> bool:
    """Box-decode arithmetic or NMS (qdet.quant.prepare keeps it float after the last conv/linear)."""
    if node.op == "call_method":
        return node.target in _DECODE_METHODS or (node.target in ("mul", "add") and _has_constant_operand(node))
    if node.op != "call_function":
        return False
    if node.target in _DECODE_FUNCTIONS or getattr(node.target, "__name__", "") in _DECODE_NAMES:
        return True
    return node.target in (operator.mul, torch.mul, operator.add, torch.add) and _has_constant_operand(node)


def _has_constant_operand(node: fx.Node) -> bool:
    """A number or a buffer/constant tensor (not a computed activation) as an operand."""
    return any(not isinstance(a, fx.Node) and isinstance(a, (int, float)) or isinstance(a, fx.Node) and a.op == "get_attr"
               for a in node.args)

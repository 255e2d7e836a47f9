"""Graph rewrites done before quantizers go in: Conv-BN folding, SiLU decomposition.

Folding BN into the preceding conv is exact in float (up to rounding):
    w' = w · γ / √(σ² + ε)          b' = (b − μ) · γ / √(σ² + ε) + β
so the quantizer sees the weights that will actually run. torchvision's `FrozenBatchNorm2d` (the
statistics and affine of pretrained detection backbones, fixed by definition) folds the same way.
"""
from __future__ import annotations

import operator
from collections.abc import Callable

import torch
from torch import fx, nn
from torch.nn import functional as F

from qdet.quant.opkinds import OpKind, module_kind, op_kind

# Set on an nn.BatchNorm2d that stands in for a FrozenBatchNorm2d (`rcnn.views.unfreeze_batchnorm`):
# QAT must then never normalise with batch statistics nor update the running ones.
FROZEN_STATISTICS = "frozen_statistics"


def frozen_batchnorm_types() -> tuple[type[nn.Module], ...]:
    """BN module types whose statistics never change (torchvision's FrozenBatchNorm2d when installed)."""
    try:
        from torchvision.ops.misc import FrozenBatchNorm2d
    except ImportError:  # torchvision is optional for classifiers without it
        return ()
    return (FrozenBatchNorm2d,)


def is_frozen_batchnorm(bn: nn.Module) -> bool:
    """A FrozenBatchNorm2d, or a BatchNorm2d marked as standing in for one.

    >>> bn = nn.BatchNorm2d(4)
    >>> is_frozen_batchnorm(bn), is_frozen_batchnorm(mark_frozen(bn))
    (False, True)
    """
    return isinstance(bn, frozen_batchnorm_types()) or bool(getattr(bn, FROZEN_STATISTICS, False))


def mark_frozen(bn: nn.BatchNorm2d) -> nn.BatchNorm2d:
    """Mark `bn` as frozen (statistics and affine fixed); returns it."""
    setattr(bn, FROZEN_STATISTICS, True)
    return bn


def _foldable_bn(module: nn.Module | None) -> bool:
    """BatchNorm2d, SyncBatchNorm (eval) or FrozenBatchNorm2d with running statistics to fold."""
    if module is None or module_kind(module) is not OpKind.BATCHNORM:
        return False
    return getattr(module, "running_var", None) is not None  # without running statistics it cannot fold


def fold_bn_weights(
    weight: torch.Tensor, bias: torch.Tensor | None, bn: nn.Module
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (weight, bias) of the conv with `bn` (BatchNorm2d or FrozenBatchNorm2d) folded in;
    weight is (C_out, ...)."""
    assert bn.running_mean is not None and bn.running_var is not None
    inv_std = torch.rsqrt(bn.running_var + bn.eps)
    gamma = bn.weight if bn.weight is not None else torch.ones_like(inv_std)
    beta = bn.bias if bn.bias is not None else torch.zeros_like(inv_std)
    factor = gamma * inv_std  # (C_out,)
    w = weight * factor.reshape(-1, *([1] * (weight.dim() - 1)))
    b = bias if bias is not None else torch.zeros_like(bn.running_mean)
    return w, (b - bn.running_mean) * factor + beta


def fold_conv_bn(conv: nn.Conv2d, bn: nn.Module) -> nn.Conv2d:
    """A new Conv2d (with bias) equal to bn(conv(x)) in eval mode."""
    fused = nn.Conv2d(
        conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
        conv.dilation, conv.groups, bias=True, padding_mode=conv.padding_mode,
    )
    with torch.no_grad():
        w, b = fold_bn_weights(conv.weight, conv.bias, bn)
        fused.weight.copy_(w)
        fused.bias.copy_(b)
    set_bn_stats(fused, bn)
    return fused


BN_STATS = "bn_stats"


def set_bn_stats(conv: nn.Module, bn: nn.Module) -> None:
    """Remember, on the BN-folded conv, the mean β and standard deviation |γ| its outputs had
    per channel under the BN's statistics: what the analytic bias correction and high-bias
    absorption need after the BN itself is gone. A plain attribute, not a buffer (not saved)."""
    gamma = bn.weight if bn.weight is not None else torch.ones_like(bn.running_mean)
    beta = bn.bias if bn.bias is not None else torch.zeros_like(bn.running_mean)
    setattr(conv, BN_STATS, (beta.detach().clone().float(), gamma.detach().abs().clone().float()))


def bn_stats(conv: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(mean, std) per output channel of a BN-folded conv (`set_bn_stats`), else None."""
    return getattr(conv, BN_STATS, None)


def _module(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    if node.op != "call_module":
        return None
    return gm.get_submodule(str(node.target))


def fold_batchnorms(gm: fx.GraphModule,
                    fuse: Callable[[nn.Conv2d, nn.Module], nn.Module] | None = None) -> list[str]:
    """Fold every `conv → bn` pair (conv output used only by the bn; BatchNorm2d with running
    statistics or FrozenBatchNorm2d, traced as a leaf by `prepare.trace`) in place; returns folded names.

    The conv module is replaced by `fuse(conv, bn)` (default: a BN-folded copy of the conv; QAT
    passes a module that keeps BN trainable), so a conv shared with other code is never mutated.
    """
    fuse = fuse or fold_conv_bn
    folded: list[str] = []
    for node in list(gm.graph.nodes):
        bn = _module(gm, node)
        if not _foldable_bn(bn) or not node.args:
            continue
        src = node.args[0]
        if not isinstance(src, fx.Node):
            continue
        conv = _module(gm, src)
        if type(conv) is not nn.Conv2d or len(src.users) != 1:
            continue
        _set_submodule(gm, str(src.target), fuse(conv, bn))
        node.replace_all_uses_with(src)
        gm.graph.erase_node(node)
        folded.append(str(src.target))
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return folded


def decompose_silu(gm: fx.GraphModule) -> int:
    """Rewrite SiLU as x · sigmoid(x) in place; returns how many were rewritten.

    Integer runtimes have no int8 SiLU, but they have int8 sigmoid (a lookup table, with fixed
    output qparams since its range is [0, 1]) and int8 mul. Quantizing the two halves lets every
    op stay int8 instead of falling back to float around each activation.
    """
    count = 0
    for node in list(gm.graph.nodes):
        if op_kind(node, gm) is not OpKind.SILU:
            continue
        stack = dict(node.meta.get("nn_module_stack") or {})
        if node.op == "call_module":
            stack[str(node.target)] = ("", nn.SiLU)  # names the halves "<act>.sigmoid", "<act>.mul"
        x = node.args[0]
        with gm.graph.inserting_after(node):
            sig = gm.graph.call_function(torch.sigmoid, (x,))
        with gm.graph.inserting_after(sig):
            mul = gm.graph.call_function(operator.mul, (x, sig))
        sig.meta["nn_module_stack"] = stack
        mul.meta["nn_module_stack"] = stack
        node.replace_all_uses_with(mul)
        gm.graph.erase_node(node)
        count += 1
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return count


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, name, module)


def modularize_functional_ops(gm: fx.GraphModule) -> list[str]:
    """Turn `F.conv2d` / `F.linear` calls on the model's own parameters into nn.Conv2d / nn.Linear.

    Tracing goes through user subclasses of nn.Conv2d/nn.Linear (they are not torch.nn leaves), so
    a conv with its own `forward` (static "same" padding, then `F.conv2d(x, self.weight, ...)`)
    reaches the graph as a functional call on parameters. It computes exactly a Conv2d, so it
    becomes one — sharing the parameters — and BN folding, weight quantization and every exporter
    see an ordinary conv. Calls whose weight is computed (not a parameter) stay functional: the
    coverage report lists them as float. Returns the names of the new modules.
    """
    created: list[str] = []
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in (F.conv2d, F.linear, torch.conv2d):
            continue
        args = _bind_functional(node)
        if args is None:
            continue
        weight, bias = args["weight"], args["bias"]
        if weight.dim() != (4 if node.target is not F.linear else 2):
            continue
        if node.target is F.linear:
            module: nn.Module = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
        else:
            groups = int(args.get("groups", 1))
            module = nn.Conv2d(weight.shape[1] * groups, weight.shape[0], tuple(weight.shape[2:]),
                               args.get("stride", 1), args.get("padding", 0), args.get("dilation", 1), groups,
                               bias=bias is not None)
        module.weight = weight
        if bias is not None:
            module.bias = bias
        # the conv/linear subclass that owns the weight is replaced in place: the layer keeps its name
        wnode = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
        owner = str(wnode.target).rpartition(".")[0] if isinstance(wnode, fx.Node) else ""
        owned = bool(owner) and _only_holds_weights(gm.get_submodule(owner))
        name = owner if owned else _free_name(gm, owner or node.name)
        _set_submodule(gm, name, module)
        with gm.graph.inserting_before(node):
            new = gm.graph.call_module(name, (node.args[0] if node.args else node.kwargs["input"],))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        created.append(name)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return created


def _only_holds_weights(module: nn.Module) -> bool:
    """The conv/linear that owns a functional call's weight — in a GraphModule, the plain holder fx
    copies for it (a Module with just weight/bias) — so the new module can take its place and name."""
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        return True
    own = {name for name, _ in module.named_parameters(recurse=False)}
    return type(module) is nn.Module and own <= {"weight", "bias"} and not any(True for _ in module.children())


def _bind_functional(node: fx.Node) -> dict | None:
    """`F.conv2d`/`F.linear` arguments by name with weight/bias resolved to Parameters, or None
    when the weight is not one of the model's parameters (or an argument is itself computed)."""
    names = ("input", "weight", "bias") if node.target is F.linear else (
        "input", "weight", "bias", "stride", "padding", "dilation", "groups")
    bound = dict(zip(names, node.args)) | dict(node.kwargs)
    gm = node.graph.owning_module
    out: dict = {}
    for key, value in bound.items():
        if key == "input":
            continue
        if isinstance(value, fx.Node):
            if value.op != "get_attr" or key not in ("weight", "bias"):
                return None
            try:
                value = gm.get_parameter(str(value.target))
            except AttributeError:  # a buffer or a plain tensor attribute: not a layer's weight
                return None
        out[key] = value
    out.setdefault("bias", None)
    return out if isinstance(out.get("weight"), nn.Parameter) else None


def _attr(root: nn.Module, path: str) -> object:
    obj: object = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _free_name(gm: fx.GraphModule, base: str) -> str:
    """`base` if no submodule/attribute of that path exists yet, else base_1, base_2, ..."""
    name, i = base, 1
    while _exists(gm, name):
        name, i = f"{base}_{i}", i + 1
    return name


def _exists(gm: fx.GraphModule, path: str) -> bool:
    try:
        _attr(gm, path)
        return True
    except AttributeError:
        return False

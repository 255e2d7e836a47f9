"""Graph capture that survives user code: split an untraceable region into traceable submodules.

`torch.fx` symbolic tracing fails on data-dependent control flow (`if x.sum() > 0`), on Python it
cannot follow (`len()` of a traced value, iterating a tensor) and on a few library calls. Rather
than leave such a model float, its region is replaced by its direct children that hold weights,
recursively, until every piece traces: the untraceable module's own code (the glue between its
children) then runs float, and is reported with the reason, while every conv/linear inside a
traceable child is still quantized. Children without weights (activations, a box decoder, NMS)
simply stay float inside the glue. Inside a region that does trace, a weight-free module fx cannot
follow (an ONNX converter's Slice with numpy indices, say) is one opaque float node (`trace`), listed
here with `opaque=True`. Containers (`nn.ModuleList`, `nn.ModuleDict`) have no forward
of their own and are always expanded.

    >>> import torch
    >>> from torch import nn
    >>> class Gate(nn.Module):  # data-dependent branch: fx cannot trace it
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.a, self.b = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 1)
    ...     def forward(self, x):
    ...         y = self.a(x)
    ...         return self.b(y) if y.mean() > 0 else y
    >>> from qdet.qmodel import RegionSpec
    >>> specs, untraced = split_untraceable(Gate(), [RegionSpec()])
    >>> [s.path for s in specs], [u.path for u in untraced]
    (['a', 'b'], ['(model)'])
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Protocol, Sequence, TypeVar

from torch import nn

from qdet.quant.prepare import UntraceableError, trace


@dataclass(frozen=True)
class UntracedModule:
    """A module whose own forward runs float because fx could not trace it, and why."""

    path: str  # dotted module path; "(model)" for the root
    reason: str
    own_weights: int = 0  # parameters it uses directly (not through a child region): they stay float
    opaque: bool = False  # a weight-free module kept whole as one float node inside a traced region


class _RegionLike(Protocol):
    path: str
    leaf_modules: tuple[type[nn.Module], ...]


S = TypeVar("S", bound=_RegionLike)

_CONTAINERS = (nn.ModuleList, nn.ModuleDict, nn.ParameterList, nn.ParameterDict)


def split_untraceable(root: nn.Module, specs: Sequence[S]) -> tuple[list[S], list[UntracedModule]]:
    """Regions that trace, replacing each untraceable one by its weighted children (recursively).

    Returns the traceable regions (in model order) and the modules whose forward stays float.
    """
    done: list[S] = []
    untraced: list[UntracedModule] = []
    pending = list(specs)
    while pending:
        spec = pending.pop(0)
        module = root.get_submodule(spec.path) if spec.path else root
        if not isinstance(module, _CONTAINERS):
            try:
                gm = trace(module, spec.leaf_modules)
                done.append(spec)
                untraced += [UntracedModule(_join(spec.path, leaf), why, opaque=True)
                             for leaf, why in gm.meta["opaque"].items()]
                continue
            except UntraceableError as exc:
                own = sum(p.numel() for p in module.parameters(recurse=False))
                untraced.append(UntracedModule(spec.path or "(model)", _reason(exc), own))
        children = [replace(spec, path=f"{spec.path}.{name}" if spec.path else name)
                    for name, child in module.named_children() if _has_weights(child)]
        pending = children + pending
    return done, untraced


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _has_weights(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def _reason(exc: UntraceableError) -> str:
    cause: Any = exc.__cause__ or exc
    text = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
    return f"{type(cause).__name__}: {text}"[:200]

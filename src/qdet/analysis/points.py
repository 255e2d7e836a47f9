"""The quantized points of a `QuantizedModel`, resolved to their quantizer modules.

Everything in `qdet.analysis` addresses a layer by its `LayerRecord.name` (the module path in the
whole model, e.g. "layer1.0.conv1"), never by a quantizer's attribute name, so that classifiers and
detectors (several regions) are handled alike.

    >>> import torch, qdet
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval()
    >>> qm = qdet.quantize(net, [torch.randn(2, 3, 8, 8)], progress=False)
    >>> [(p.name, p.kind, p.activation is not None, p.weight is not None) for p in quant_points(qm)]
    [('input_1', 'input', True, False), ('0', 'conv', True, True)]
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Iterable, Sequence

from torch import nn

from qdet.errors import ConfigError
from qdet.qmodel import QuantizedModel
from qdet.quant.quantizer import CastQuantizer, Quantizer, TiedQuantizer

__all__ = ["QuantPoint", "quant_points", "select_points", "toggled", "all_switches"]


@dataclass(frozen=True)
class QuantPoint:
    """One quantized layer: its output (activation) quantizer and its weight quantizer, if any."""

    name: str
    kind: str
    region: str
    activation: nn.Module | None  # Quantizer or CastQuantizer on the layer's output; None if not re-quantized
    weight: nn.Module | None  # the conv/linear weight quantizer; None for weightless ops

    @property
    def modules(self) -> tuple[nn.Module, ...]:
        """The quantizers whose `enabled` flag switches this layer between int8 and float."""
        return tuple(m for m in (self.activation, self.weight) if m is not None)


def _sub(root: nn.Module, path: str) -> nn.Module | None:
    if not path:
        return None
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


def quant_points(qmodel: QuantizedModel) -> list[QuantPoint]:
    """Every layer that has at least one quantizer, in graph order; names made unique ("name#2")."""
    points: list[QuantPoint] = []
    seen: dict[str, int] = {}
    for path, region in qmodel.regions.items():
        for rec in region.layers:
            act = _sub(region.module, rec.quantizer)
            weight = _sub(region.module, rec.weight_quantizer)
            if act is None and weight is None:
                continue  # kept float (skip list / float format): nothing to compare or toggle
            seen[rec.name] = seen.get(rec.name, 0) + 1
            name = rec.name if seen[rec.name] == 1 else f"{rec.name}#{seen[rec.name]}"
            points.append(QuantPoint(name, rec.kind, path, act, weight))
    return points


def select_points(
    points: Sequence[QuantPoint], names: Iterable[str] | None, *, need_activation: bool = False
) -> list[QuantPoint]:
    """`points` restricted to `names` (in graph order); a ConfigError names unknown layers.

    With `need_activation`, only points whose output is quantized qualify (capture needs an int8 value).
    """
    usable = [p for p in points if p.activation is not None] if need_activation else list(points)
    if names is None:
        return usable
    wanted = list(dict.fromkeys(names))
    by_name = {p.name: p for p in usable}
    known = [p.name for p in points]
    for name in wanted:
        if name in by_name:
            continue
        if name in known:
            raise ConfigError(
                f"layer {name!r} has no quantized output (its int8 value is consumed inside a fused op); "
                "choose a layer with an output quantizer"
            )
        close = difflib.get_close_matches(name, [p.name for p in usable], n=3)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ConfigError(f"unknown layer {name!r}: it is not a quantized layer of this model{hint}")
    keep = set(wanted)
    return [p for p in usable if p.name in keep]


def all_switches(qmodel: nn.Module) -> list[nn.Module]:
    """Every quantizer module with an `enabled` flag (tied quantizers follow their source)."""
    return [m for m in qmodel.modules() if isinstance(m, (Quantizer, TiedQuantizer, CastQuantizer))]


class toggled:
    """Context manager: set `enabled` on every quantizer of `model` to `default`, then to `not default`
    for the quantizers of `points`; restores every flag on exit (also on error).

        with toggled(qm, [point], default=False):   # only `point` quantized
            metric(qm)
        with toggled(qm, [point], default=True):    # everything quantized but `point`
            metric(qm)
    """

    def __init__(self, model: nn.Module, points: Iterable[QuantPoint], *, default: bool) -> None:
        self.model = model
        self.points = list(points)
        self.default = default
        self._saved: list[tuple[nn.Module, bool]] = []

    def __enter__(self) -> nn.Module:
        mods = all_switches(self.model)
        self._saved = [(m, bool(m.enabled)) for m in mods]
        for m in mods:
            # tied quantizers stay on: they re-apply their source only while the source is enabled
            m.enabled = True if isinstance(m, TiedQuantizer) else self.default
        for p in self.points:
            for m in p.modules:
                m.enabled = not self.default
        return self.model

    def __exit__(self, *exc: object) -> None:
        for m, enabled in self._saved:
            m.enabled = enabled


"""Paired per-layer error: float vs quantized activations at every quantized point, streamed.

The float reference is the same prepared graph with every quantizer disabled (BN folded, so the
graphs align exactly); the quantized value is each activation quantizer's output. Statistics are
accumulated batch by batch, so memory does not grow with the data. Relative measures use the
*float* activation as the denominator (seed 001's code used the quantized one).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable

import torch
from torch import nn

from qdet.qmodel import QuantizedModel
from qdet.quant.calibrate import activation_quantizers, default_transform, quantization_disabled


@dataclass(frozen=True)
class LayerError:
    name: str
    l1: float  # mean |float − int8|
    mse: float
    sqnr_db: float  # 10·log10(Σ float² / Σ (float − int8)²)
    cosine: float
    max_abs: float
    numel: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Acc:
    def __init__(self) -> None:
        self.abs = self.sq = self.ref_sq = self.q_sq = self.dot = 0.0
        self.max_abs = 0.0
        self.n = 0

    def add(self, ref: torch.Tensor, q: torch.Tensor) -> None:
        ref, q = ref.detach().double(), q.detach().double()
        d = ref - q
        self.abs += float(d.abs().sum())
        self.sq += float((d * d).sum())
        self.ref_sq += float((ref * ref).sum())
        self.q_sq += float((q * q).sum())
        self.dot += float((ref * q).sum())
        self.max_abs = max(self.max_abs, float(d.abs().max()))
        self.n += ref.numel()

    def result(self, name: str) -> LayerError:
        sqnr = math.inf if self.sq == 0 else 10 * math.log10(max(self.ref_sq, 1e-30) / self.sq)
        cos = self.dot / math.sqrt(max(self.ref_sq * self.q_sq, 1e-30))
        return LayerError(name, self.abs / self.n, self.sq / self.n, sqnr, cos, self.max_abs, self.n)


def layer_errors(
    qmodel: QuantizedModel,
    batches: Iterable[Any],
    transform_fn: Callable[[Any], Any] = default_transform,
) -> list[LayerError]:
    """Per-layer L1/MSE/SQNR/cosine/max error over `batches`, in graph order."""
    names = {id(q): q.layer_name for _, q in activation_quantizers(qmodel)}
    accs: dict[str, _Acc] = {}
    for batch in batches:
        inputs = transform_fn(batch)
        args = inputs if isinstance(inputs, tuple) else (inputs,)
        ref = _capture(qmodel, args, quantized=False)
        out = _capture(qmodel, args, quantized=True)
        for key, value in out.items():
            accs.setdefault(names[key], _Acc()).add(ref[key], value)
    return [acc.result(name) for name, acc in accs.items()]


def _capture(qmodel: QuantizedModel, args: tuple[Any, ...], *, quantized: bool) -> dict[int, torch.Tensor]:
    """Outputs of every activation quantizer (disabled quantizers output the float value)."""
    captured: dict[int, torch.Tensor] = {}
    hooks = []
    for _, q in activation_quantizers(qmodel):
        def hook(mod: nn.Module, _inp: Any, out: torch.Tensor) -> None:
            captured.setdefault(id(mod), out.detach().clone())
        hooks.append(q.register_forward_hook(hook))
    try:
        with torch.no_grad():
            if quantized:
                qmodel(*args)
            else:
                with quantization_disabled(qmodel):
                    qmodel(*args)
    finally:
        for h in hooks:
            h.remove()
    return captured


def compare(ref: torch.Tensor, q: torch.Tensor, name: str = "") -> LayerError:
    """The paired statistics of one float tensor `ref` against its quantized value `q`.

    >>> e = compare(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1.0, 2.0, 4.0]))
    >>> round(e.l1, 4), round(e.mse, 4), round(e.sqnr_db, 3)  # SQNR = 10·log10(14 / 1)
    (0.3333, 0.3333, 11.461)
    """
    acc = _Acc()
    acc.add(ref, q)
    return acc.result(name)


def absolute_error(ref: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """|q − f| elementwise.

    >>> absolute_error(torch.tensor([1.0, -2.0]), torch.tensor([1.5, -2.0])).tolist()
    [0.5, 0.0]
    """
    return (q - ref).abs()


def relative_error(ref: torch.Tensor, q: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """|q − f| / max(|f|, eps) elementwise: the denominator is the *float* activation.

    >>> relative_error(torch.tensor([2.0, 0.0]), torch.tensor([1.0, 0.5]), eps=0.1).tolist()
    [0.5, 5.0]
    """
    return (q - ref).abs() / ref.abs().clamp_min(eps)

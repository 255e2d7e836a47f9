"""What the integer runtime hands to hardware people and how it is checked against fake-quant.

`integer_params(qmodel)` lowers the model to the integer runtime, runs it once on the recorded
example inputs and returns, per layer, the integer parameters it used: input/output scales and
zero points, per-channel weight scales, `bias_int32`, the requantization multipliers `M0` (31-bit)
and shifts `n` (M = M0 · 2^-n), and for adds the per-input multipliers after a left shift of 20.
`export_integer_params` writes them as JSON atomically.

`layer_agreement` runs the fake-quant model and the integer runtime on the same batch and
counts, per activation quantizer, how many output codes differ by 0, 1 or more steps.

    >>> import torch, tempfile
    >>> from torch import nn
    >>> from qdet.qmodel import quantize
    >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval()
    >>> qm = quantize(net, [torch.randn(2, 3, 8, 8)], progress=False)
    >>> params = integer_params(qm)
    >>> sorted(params["layers"]["0"])[:3]
    ['accumulator_scale', 'bias_int32', 'input_scale']
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from qdet.fileio import write_text_atomically
from qdet.qmodel import QuantizedModel
from qdet.quant.calibrate import activation_quantizers
from qdet.quant.integer import M0_BITS
from qdet.quant.quantizer import Quantizer
from qdet.runtimes.integer import ADD_SHIFT, IntegerRegion, IntegerRuntime

FORMAT = "qdet-integer/2"  # /2: an add with its own output quantizer rounds once (no left_shift)


def integer_regions(lowered: nn.Module) -> list[IntegerRegion]:
    return [m for m in lowered.modules() if isinstance(m, IntegerRegion)]


def integer_params(qmodel: QuantizedModel) -> dict[str, Any]:
    """Per-layer integer parameters (JSON-ready) of `qmodel` on the integer runtime."""
    lowered = IntegerRuntime().lower(qmodel)  # lowering runs each region once on its example input
    layers: dict[str, Any] = {}
    for region in integer_regions(lowered):
        for name, p in region.params.items():
            layers[name] = {k: v for k, v in sorted(p.items()) if v is not None}
    return {
        "format": FORMAT,
        "model": qmodel.model_name,
        "conventions": {
            "real_value": "r = scale * (q - zero_point)",
            "accumulator": "acc = sum((q_x - Z_x) * q_w) + bias_int32, int32, scale accumulator_scale",
            "requantize": "q_out = clamp(Z_out + round_half_even(acc * M0 / 2^n), qmin, qmax), M0 / 2^n = requant_input_scale / output_scale",
            "M0_bits": M0_BITS,
            "add": "q_out = clamp(Z_out + round_half_even(((q1 - Z1) * M0_1 * 2^(n - n_1) + (q2 - Z2) * M0_2 * 2^(n - n_2)) / 2^n), "
                   "qmin, qmax), M0_i / 2^n_i = input_scale_i / output_scale, n = max(n_1, n_2), int64; a ReLU after the "
                   "add clamps at Z_out. An add without its own output quantizer (left_shift present): "
                   f"acc = round((q1 - Z1) * 2^{ADD_SHIFT} * M0_1 / 2^n_1) + round((q2 - Z2) * 2^{ADD_SHIFT} * M0_2 / 2^n_2), "
                   "then requantize like a conv",
            "relu": "clamp at 0 on the accumulator (at Z on codes)",
            "avgpool": "acc = sum(q - Z) over the window, accumulator scale = input scale / window",
        },
        "input_shapes": qmodel.input_shapes,
        "layers": layers,
    }


def export_integer_params(qmodel: QuantizedModel, path: str | Path) -> Path:
    """Write `integer_params(qmodel)` as JSON to `path` atomically (temp file + rename)."""
    return write_text_atomically(path, json.dumps(integer_params(qmodel), indent=1))


@dataclass
class LayerAgreement:
    """Output codes of one activation quantizer: integer runtime vs fake-quant."""

    name: str
    elements: int = 0
    equal: int = 0
    within_1: int = 0
    max_diff: int = 0

    @property
    def pct_equal(self) -> float:
        return 100.0 * self.equal / max(self.elements, 1)

    @property
    def pct_within_1(self) -> float:
        return 100.0 * self.within_1 / max(self.elements, 1)

    def add(self, fake: torch.Tensor, integer: torch.Tensor) -> None:
        diff = (fake.to(torch.int64) - integer.to(torch.int64)).abs()
        self.elements += diff.numel()
        self.equal += int((diff == 0).sum())
        self.within_1 += int((diff <= 1).sum())
        self.max_diff = max(self.max_diff, int(diff.max()) if diff.numel() else 0)


class _FakeCodes:
    """Forward hooks on activation quantizers: their output as integer codes, by layer name."""

    def __init__(self, model: nn.Module) -> None:
        self.codes: dict[str, torch.Tensor] = {}
        self.handles = []
        for _, q in activation_quantizers(model):
            self.handles.append(q.register_forward_hook(self._hook))

    def _hook(self, q: nn.Module, _args: Any, out: torch.Tensor) -> None:
        assert isinstance(q, Quantizer)
        codes = torch.round(out.detach().to(torch.float64) / q.scale.to(torch.float64)) + int(q.zero_point)
        self.codes[q.layer_name] = codes.to(torch.int32)  # codes of up to 16 bits; half of int64's memory

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def float64_reference(qmodel: QuantizedModel) -> QuantizedModel:
    """A float64 copy of the fake-quant model: the same simulation, without float32 round-off.

    In float32 a fake-quant value (q − Z)·S is itself rounded to 24 bits and the conv sums in
    float32, so y / S_out lands on the other side of a rounding tie about once in 10^5 outputs;
    through a 56-layer ResNet each such flip spreads into every later layer. In float64 those
    products and sums are exact to ~2^-50 relative, so the simulation computes the quantized
    model's real-number definition, which is what the integer runtime implements.
    """
    ref = copy.deepcopy(qmodel)
    ref.model.to(torch.float64)
    return ref


def _as_reference_dtype(model: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    """Cast floating tensor inputs to the model's float dtype (float64 for `float64_reference`)."""
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    return tuple(a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)


def layer_agreement(
    qmodel: QuantizedModel,
    lowered: nn.Module,
    inputs: Iterable[Any],
    stats: dict[str, LayerAgreement] | None = None,
    *,
    teacher_forced: bool = False,
    also: Sequence[tuple[QuantizedModel, dict[str, LayerAgreement]]] = (),
) -> tuple[dict[str, LayerAgreement], list[tuple[torch.Tensor, ...]]]:
    """Run both on each input (a tensor or tuple of tensors); per-layer stats and (fake, integer) outputs.

    End to end (default) a 1-step difference early on propagates into every later layer. With
    `teacher_forced` every integer layer reads the fake-quant codes of its inputs, so each layer's
    numbers measure that one op's integer arithmetic against its float simulation. `qmodel` may be
    a `float64_reference` (its inputs are cast to float64; the integer runtime gets them as given).
    `also`: more (reference, stats) pairs compared with the same integer run; their outputs follow
    in each output tuple, (fake, integer, *also). Teacher forcing reads `qmodel`'s codes.
    """
    stats = {} if stats is None else stats
    regions = integer_regions(lowered)
    # `qmodel` first: its codes teacher-force the integer run and its output leads each tuple
    refs = [(qmodel, stats), *also]
    hooks = [_FakeCodes(ref.model) for ref, _ in refs]
    outputs = []
    try:
        for x in inputs:
            args = x if isinstance(x, tuple) else (x,)
            for r in regions:
                r.record = {}
            with torch.no_grad():
                ref_outs = [ref(*_as_reference_dtype(ref.model, args)) for ref, _ in refs]
                for r in regions:
                    r.teacher = hooks[0].codes if teacher_forced else None
                int_out = lowered(*args)
            outputs.append((ref_outs[0], int_out, *ref_outs[1:]))
            for r in regions:
                assert r.record is not None
                for name, codes in r.record.items():
                    for h, (_, st) in zip(hooks, refs):
                        if name in h.codes:
                            st.setdefault(name, LayerAgreement(name)).add(h.codes[name], codes)
                r.record = {}  # drop this batch's codes now, not at the next batch
            for h in hooks:
                h.codes.clear()
    finally:
        for h in hooks:
            h.close()
        for r in regions:
            r.record = None
            r.teacher = None
    return stats, outputs


__all__ = ["FORMAT", "integer_params", "export_integer_params", "LayerAgreement", "layer_agreement", "float64_reference"]

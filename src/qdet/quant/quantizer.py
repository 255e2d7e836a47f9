"""Quantizer modules inserted into a model: activation/weight fake-quant, tied and cast quantizers.

A `Quantizer` has three independent switches, flipped by the phase context managers in
`qdet.quant.calibrate`: `observing` (feed the observer), `enabled` (apply fake-quant), and
`dynamic` (recompute qparams from every tensor: weights during QAT); during QAT `tracking`
activation quantizers update an EMA observer and their qparams at every training batch.
"""
from __future__ import annotations

from typing import Iterator, TypeVar

import torch
from torch import nn
from torch.nn import functional as F

from qdet.config import Format, QuantSpec
from qdet.errors import CalibrationError, ConfigError
from qdet.quant.observers import RangeObserver, make_observer
from qdet.quant.qparams import compute_qparams, fake_quantize
from qdet.quant.qparams import quantize as _quantize_codes


class Quantizer(nn.Module):
    """Fake-quantizes a tensor with a scale/zero point learned by an observer.

    >>> from qdet.config import default_activation_spec
    >>> q = Quantizer(default_activation_spec(), "conv1")
    >>> q.observing, q.enabled = True, False
    >>> _ = q(torch.linspace(0, 1, 101)); q.finalize()
    >>> float(q(torch.tensor(0.5))) == 0.5 or abs(float(q(torch.tensor(0.5))) - 0.5) <= float(q.scale) / 2
    True
    """

    def __init__(self, spec: QuantSpec, name: str = "", channels: int | None = None) -> None:
        super().__init__()
        self.spec = spec
        self.layer_name = name
        shape = (channels,) if spec.axis is not None and channels else ()
        self.register_buffer("scale", torch.ones(shape))
        self.register_buffer("zero_point", torch.zeros(shape, dtype=torch.int32))
        self.observer: RangeObserver | None = make_observer(spec, name)
        self.observing = False
        self.enabled = True
        self.dynamic = False
        self.tracking = False  # QAT: while training, update the observer and qparams every batch
        self.calibrated = False
        self.exact_rounding = False  # weights: round w / s computed in float64 (see weight_codes)
        self.exporting = False  # emit ATen fake-quant ops, which ONNX exports as QuantizeLinear/DequantizeLinear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dynamic:
            self._set_from(x.detach())
        elif self.observing:
            assert self.observer is not None
            self.observer.update(x)
        elif self.tracking and self.training and self.observer is not None:
            self.observer.update(x)
            try:
                self.set_qparams(*self.observer.qparams())
            except CalibrationError:
                pass  # an all-zero batch (dead ReLU) keeps the previous qparams
        if not self.enabled or not (self.calibrated or self.dynamic):
            return x
        if self.exporting:
            return export_fake_quantize(x, self)
        if self.exact_rounding:  # weights: w / s in float64, the codes `weight_codes` gives (ties decided exactly)
            return fake_quantize(x.double(), self.scale.double(), self.zero_point, self.spec.qmin, self.spec.qmax,
                                 self.spec.axis).to(x.dtype)
        return fake_quantize(x, self.scale, self.zero_point, self.spec.qmin, self.spec.qmax, self.spec.axis)

    def _set_from(self, x: torch.Tensor) -> None:
        axis = self.spec.axis
        if axis is None:
            lo, hi = x.min(), x.max()
        else:
            flat = x.transpose(0, axis).reshape(x.shape[axis], -1)
            lo, hi = flat.min(1).values, flat.max(1).values
        self.set_qparams(*compute_qparams(lo, hi, self.spec.qmin, self.spec.qmax, symmetric=self.spec.symmetric))

    def set_qparams(self, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        self.scale = scale.detach().to(torch.float32).reshape(self.scale.shape if scale.numel() == 1 else -1)
        self.zero_point = zero_point.detach().to(torch.int32).reshape(self.scale.shape)
        self.calibrated = True

    def finalize(self) -> None:
        """Turn what the observer saw into qparams; raises CalibrationError naming the layer."""
        if self.observer is None:
            return
        self.set_qparams(*self.observer.qparams())
        self.observer = None
        self.observing = False

    def reset_observer(self) -> None:
        self.observer = make_observer(self.spec, self.layer_name)

    @property
    def qrange(self) -> tuple[int, int]:
        return self.spec.qmin, self.spec.qmax

    def extra_repr(self) -> str:
        g = "per-channel" if self.spec.axis is not None else "per-tensor"
        sign = "int" if self.spec.signed else "uint"
        return f"{self.layer_name!r}, {sign}{self.spec.bits} {g}, {self.spec.observer.value}"


def export_fake_quantize(x: torch.Tensor, q: "Quantizer") -> torch.Tensor:
    """The same numerics through ATen's fake-quant ops, whose ONNX symbolics emit Q/DQ pairs.

    ONNX Q/DQ knows 8-bit ranges only; a narrow int8 range [-127, 127] is emitted as [-128, 127],
    which is identical because our scale never maps a weight beyond ±127. Narrower signed
    symmetric weights (7-bit weights for CPUs whose int8 kernels saturate, see `OverflowFix`, or
    4-bit ones) are int8 codes inside a smaller range: the exporter clamps such weights to their
    own range first (`onnx_export.export_mode`), so the int8 codes are the narrow ones.
    """
    spec = q.spec
    if spec.bits != 8 and not is_narrow_weight_spec(spec):
        raise ConfigError(f"layer {q.layer_name!r}: {spec.bits}-bit quantization cannot be exported to ONNX (8-bit only)")
    qmin, qmax = (-128, 127) if spec.signed else (0, 255)
    if spec.axis is not None and q.scale.numel() > 1:
        return torch.fake_quantize_per_channel_affine(x, q.scale, q.zero_point, spec.axis, qmin, qmax)
    return torch.fake_quantize_per_tensor_affine(x, float(q.scale), int(q.zero_point), qmin, qmax)


def is_narrow_weight_spec(spec: QuantSpec) -> bool:
    """Signed symmetric codes of fewer than 8 bits: int8 kernels run them as they are."""
    return spec.signed and spec.symmetric and spec.bits < 8


def clamp_to_grid_range(w: torch.Tensor, q: "Quantizer") -> torch.Tensor:
    """`w` limited to what `q` represents, [s·qmin, s·qmax] per channel (zero point 0)."""
    s = q.scale
    if q.spec.axis is not None and s.numel() > 1:
        s = s.reshape([-1 if d == q.spec.axis else 1 for d in range(w.dim())])
    return torch.maximum(torch.minimum(w, s * q.spec.qmax), s * q.spec.qmin)


class TiedQuantizer(nn.Module):
    """Re-applies the quantization of its source (max-pool, flatten, nearest upsample, slicing keep
    values on the input's grid). Exporters need it to see Q/DQ around these ops; numerically it is
    idempotent. The source is held without registering it, so it is not a second submodule."""

    def __init__(self, source: Quantizer, name: str = "") -> None:
        super().__init__()
        object.__setattr__(self, "source", source)
        self.layer_name = name
        self.enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        src: Quantizer = self.source  # type: ignore[assignment]
        if not self.enabled or not src.enabled or not src.calibrated:
            return x
        if src.exporting:
            return export_fake_quantize(x, src)
        return fake_quantize(x, src.scale, src.zero_point, src.spec.qmin, src.spec.qmax, src.spec.axis)


class CastQuantizer(nn.Module):
    """Round-trips a tensor through fp16 or bf16 (seed 003's half-float alternatives)."""

    def __init__(self, fmt: Format, name: str = "") -> None:
        super().__init__()
        if fmt not in (Format.FP16, Format.BF16):
            raise CalibrationError(f"CastQuantizer needs FP16 or BF16, got {fmt}")
        self.format = fmt
        self.layer_name = name
        self.enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        dtype = torch.float16 if self.format is Format.FP16 else torch.bfloat16
        return x.to(dtype).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.layer_name!r}, {self.format.value}"


_ConvT = TypeVar("_ConvT", bound=nn.Conv2d)


def copy_conv(cls: type[_ConvT], conv: nn.Conv2d) -> _ConvT:
    """A `cls` instance with `conv`'s geometry and copies of its weight and bias."""
    new = cls(
        conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
        conv.dilation, conv.groups, bias=conv.bias is not None, padding_mode=conv.padding_mode,
    )
    new.weight = nn.Parameter(conv.weight.detach().clone())
    if conv.bias is not None:
        new.bias = nn.Parameter(conv.bias.detach().clone())
    if hasattr(conv, "bn_stats"):  # BN statistics of a folded conv (fusion.set_bn_stats)
        new.bn_stats = conv.bn_stats
    return new


def link_input_quantizer(mod: nn.Module, source: "Quantizer | None") -> None:
    """Tell a QuantConv2d/QuantLinear which quantizer's grid its input is on (for `grid_bias`).

    Held without registering it (like TiedQuantizer.source): it is another layer's submodule.
    """
    object.__setattr__(mod, "input_quant", source)


def keep_uncorrected_bias(mod: nn.Module) -> None:
    """Before a bias correction first changes `mod.bias`: keep the float bias (a non-persistent
    buffer, zeros where there was none) for when the layer's weight quantizer is switched off —
    sensitivity analysis runs layers with float weights, which must not carry the correction."""
    if getattr(mod, "uncorrected_bias", None) is None:
        b = mod.bias.detach().clone() if mod.bias is not None else torch.zeros(mod.weight.shape[0], dtype=mod.weight.dtype)
        mod.register_buffer("uncorrected_bias", b, persistent=False)


def grid_bias(mod: "QuantConv2d | QuantLinear") -> torch.Tensor | None:
    """The bias an integer kernel adds: b rounded onto the int32 accumulator grid S_x · S_w.

    Every int8 runtime (and the `integer` runtime) adds round(b / (S_x·S_w)) to the int32
    accumulator, so the simulation adds exactly that value too; otherwise a per-channel offset of
    up to half an accumulator step moves near-tie outputs to the neighbouring code. The rounding is
    computed in float64 like the integer runtime's and passed straight through for gradients
    (QAT). The float bias is used while the grids are not known yet (calibration), when either
    quantizer is off, for per-channel inputs, and while exporting (ONNX runtimes round it themselves).
    """
    b = mod.bias
    xq, wq = getattr(mod, "input_quant", None), getattr(mod, "weight_quant", None)
    if isinstance(wq, Quantizer) and not wq.enabled and getattr(mod, "uncorrected_bias", None) is not None:
        return mod.uncorrected_bias  # a bias correction answers the rounded weights: off with them
    if b is None or not isinstance(xq, Quantizer) or not isinstance(wq, Quantizer):
        return b
    if not (xq.enabled and xq.calibrated and wq.enabled and (wq.calibrated or wq.dynamic)):
        return b
    if xq.exporting or wq.exporting or xq.scale.numel() != 1:
        return b
    step = xq.scale.detach().to(torch.float64).reshape(()) * wq.scale.detach().to(torch.float64).reshape(-1)
    snapped = (torch.round(b.detach().to(torch.float64) / step) * step).to(b.dtype)
    return b + (snapped - b.detach())


class QuantConv2d(nn.Conv2d):
    """Conv2d whose weight passes through a quantizer (BN already folded into weight/bias).

    The bias is the int32-grid one (`grid_bias`) once the input quantizer is linked and calibrated.
    """

    weight_quant: nn.Module

    @classmethod
    def from_float(cls, conv: nn.Conv2d, weight_quant: nn.Module) -> "QuantConv2d":
        q = copy_conv(cls, conv)
        q.weight_quant = weight_quant
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.weight_quant(self.weight), grid_bias(self))


class QuantLinear(nn.Linear):
    """Linear whose weight passes through a quantizer; int32-grid bias like QuantConv2d."""

    weight_quant: nn.Module

    @classmethod
    def from_float(cls, linear: nn.Linear, weight_quant: nn.Module) -> "QuantLinear":
        q = cls(linear.in_features, linear.out_features, bias=linear.bias is not None)
        q.weight = nn.Parameter(linear.weight.detach().clone())
        if linear.bias is not None:
            q.bias = nn.Parameter(linear.bias.detach().clone())
        q.weight_quant = weight_quant
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight_quant(self.weight), grid_bias(self))


def weight_codes(weight: torch.Tensor, q: Quantizer) -> torch.Tensor:
    """The int codes (int32) of `weight` on `q`'s grid: the ONE rounding of weights (w / s computed in
    float64, half to even) that `.qdet` files store, the simulation applies and every runtime runs.
    float64 decides ties exactly, as the ONNX exporter and the integer runtime always did.

    >>> from qdet.config import default_weight_spec
    >>> w = torch.tensor([[0.5, -1.0]]); q = make_weight_quantizer(w, default_weight_spec(), "w")
    >>> weight_codes(w, q).tolist()
    [[64, -127]]
    """
    return _quantize_codes(weight.double(), q.scale.double(), q.zero_point, q.spec.qmin, q.spec.qmax, q.spec.axis)


def weight_quantizers(model: nn.Module) -> Iterator[tuple[QuantConv2d | QuantLinear, Quantizer]]:
    """Every quantized conv/linear of `model` with its weight quantizer."""
    for m in model.modules():
        if isinstance(m, (QuantConv2d, QuantLinear)) and isinstance(m.weight_quant, Quantizer):
            yield m, m.weight_quant


def make_weight_quantizer(weight: torch.Tensor, spec: QuantSpec, name: str) -> Quantizer:
    """A weight quantizer calibrated on the weight itself (weights need no data)."""
    q = Quantizer(spec, name, channels=weight.shape[spec.axis] if spec.axis is not None else None)
    q.exact_rounding = True
    assert q.observer is not None
    q.observer.update(weight.detach())
    try:
        q.finalize()
    except CalibrationError:
        # an all-zero weight (pruned layer) still gets valid qparams: scale 1, zero point 0
        q.set_qparams(torch.ones_like(q.scale), torch.zeros_like(q.zero_point))
        q.observer = None
    return q

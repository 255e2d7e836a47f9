"""Typed configuration: enums and frozen dataclasses inside, strings only at the CLI/YAML edge.

Example:
    >>> import qdet
    >>> cfg = qdet.QuantConfig(activations=qdet.Observer.HISTOGRAM, weights=qdet.PerChannel(),
    ...                        skip=("fc",))
    >>> cfg.activations.observer
    <Observer.HISTOGRAM: 'histogram'>
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from enum import Enum
from typing import Any, Mapping

from qdet.errors import ConfigError


class Observer(Enum):
    """How an activation (or weight) range is estimated from data."""

    MINMAX = "minmax"
    MOVING_AVERAGE = "moving_average"
    HISTOGRAM = "histogram"  # range search minimising the quantization error of a histogram
    PERCENTILE = "percentile"
    ENTROPY = "entropy"  # KL divergence between float and quantized histograms
    MSE = "mse"  # clip-ratio search minimising MSE on sampled values


class ResidualPolicy(Enum):
    """Seed 003's two ways to quantize a residual block.

    QUANTIZED_ADD: the conv output is quantized, then the add output is quantized again.
    FUSE_CONV_ADD: the conv that feeds an add is not re-quantized; only the add (+ReLU) output is.
    """

    QUANTIZED_ADD = "quantized_add"
    FUSE_CONV_ADD = "fuse_conv_add"


class Format(Enum):
    """Number format of a layer: int8 (any bit width via specs), half floats, or left float."""

    INT = "int"
    FP16 = "fp16"
    BF16 = "bf16"
    FLOAT = "float"


@dataclass(frozen=True)
class PerTensor:
    """One scale/zero point for the whole tensor."""


@dataclass(frozen=True)
class PerChannel:
    """One scale/zero point per slice along `axis` (output channels of a conv weight by default)."""

    axis: int = 0


Granularity = PerTensor | PerChannel


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor is quantized.

    bits/signed define the integer range; symmetric forces zero point to the middle of the range.
    narrow_range drops the most negative value (int8 → [-127, 127]) so that -w and w map
    symmetrically, which integer kernels without saturation headroom rely on.
    """

    bits: int = 8
    signed: bool = False
    symmetric: bool = False
    granularity: Granularity = PerTensor()
    observer: Observer = Observer.HISTOGRAM
    narrow_range: bool = False
    percentile: float = 99.99  # used by Observer.PERCENTILE
    bins: int = 2048  # used by histogram-based observers
    averaging_constant: float = 0.01  # used by Observer.MOVING_AVERAGE (EMA factor)

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 16:
            raise ConfigError(f"bits={self.bits} is not supported (2..16)")
        if not 50.0 < self.percentile <= 100.0:
            raise ConfigError(f"percentile={self.percentile} must be in (50, 100]")

    @property
    def qmin(self) -> int:
        if self.signed:
            return -(2 ** (self.bits - 1)) + (1 if self.narrow_range else 0)
        return 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1

    @property
    def axis(self) -> int | None:
        return self.granularity.axis if isinstance(self.granularity, PerChannel) else None


def default_activation_spec(observer: Observer = Observer.HISTOGRAM) -> QuantSpec:
    """uint8 per-tensor affine: what onnxruntime, OpenVINO and fbgemm run fastest."""
    return QuantSpec(bits=8, signed=False, symmetric=False, granularity=PerTensor(), observer=observer)


def default_weight_spec(granularity: Granularity | None = None, bits: int = 8) -> QuantSpec:
    """int8 symmetric, per output channel, narrow range [-127, 127]."""
    return QuantSpec(
        bits=bits,
        signed=True,
        symmetric=True,
        granularity=granularity if granularity is not None else PerChannel(0),
        observer=Observer.MINMAX,
        narrow_range=True,
    )


@dataclass(frozen=True)
class LayerOverride:
    """Per-layer exception, matched by module name or fnmatch pattern (e.g. "model.24.*")."""

    pattern: str
    format: Format | None = None
    weights: QuantSpec | None = None
    activations: QuantSpec | None = None


@dataclass(frozen=True)
class QuantConfig:
    """Everything that defines a post-training quantization.

    activations: an `Observer` (shorthand for uint8 per-tensor affine with that observer) or a QuantSpec.
    weights: `PerChannel()` / `PerTensor()` (shorthand for int8 symmetric) or a QuantSpec.
    skip: module names or fnmatch patterns kept in float.
    format: Format.INT (default), or FP16/BF16 for the half-float alternatives of seed 003.
    quantize_outputs: quantize the last layer's output (needed for int8 kernels to run the last conv).
    share_concat_ranges: one scale/zero point for a concatenation and its inputs (the concat becomes
        a copy; measured on YOLOv5n it cost 0.8 mAP points for no speed-up, so it is off by default).
    fuse_silu: SiLU after a conv/linear/add is part of that op and only its output is quantized, as
        ReLU is. OpenVINO runs this as one int8 conv with a SiLU post-op (fewer rounding points, and
        about 2× faster than the decomposed form there); onnxruntime has no int8 conv+SiLU kernel and
        runs such convs in float, so the default (False) decomposes SiLU into x · sigmoid(x) with
        both halves quantized, which every int8 runtime executes.
    fuse_leaky_mish: LeakyReLU and Mish (Darknet's leaky/mish) after a conv/linear/add are part of
        that op, as fuse_silu does for SiLU: OpenVINO then runs conv + activation + requantize as one
        `Convolution/u8` kernel (its compiled model shows the activation among the conv's fused layers),
        one rounding point instead of two. onnxruntime has no such int8 kernel (its QDQ conv needs a
        Q right after the conv) and would run those convs in float, so the default (False) quantizes
        conv output and activation output separately, which every int8 runtime executes.
    bias_correction: after calibration, add (W − Q(W)) · E[x] to each conv/linear's bias, E[x] the
        per-channel mean of its float input on the calibration set: the mean shift weight rounding
        causes is given back (NNCF's default "fast bias correction" does the same). Off by default
        until it is measured on every bundled model.
    """

    activations: QuantSpec | Observer = Observer.HISTOGRAM
    weights: QuantSpec | Granularity = PerChannel(0)
    residual: ResidualPolicy = ResidualPolicy.QUANTIZED_ADD
    skip: tuple[str, ...] = ()
    overrides: tuple[LayerOverride, ...] = ()
    format: Format = Format.INT
    quantize_outputs: bool = True
    share_concat_ranges: bool = False
    fuse_silu: bool = False
    fuse_leaky_mish: bool = False
    bias_correction: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.activations, Observer):
            object.__setattr__(self, "activations", default_activation_spec(self.activations))
        if isinstance(self.weights, (PerTensor, PerChannel)):
            object.__setattr__(self, "weights", default_weight_spec(self.weights))
        object.__setattr__(self, "skip", tuple(self.skip))
        object.__setattr__(self, "overrides", tuple(self.overrides))
        if not isinstance(self.activations, QuantSpec) or not isinstance(self.weights, QuantSpec):
            raise ConfigError("activations and weights must be QuantSpec (or an Observer / PerChannel shorthand)")

    # ---- serialisation at the edge (JSON in saved artefacts and --json output) ----
    def to_dict(self) -> dict[str, Any]:
        return _encode(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "QuantConfig":
        return _decode_config(data)


@dataclass(frozen=True)
class QATConfig:
    """The quantization-aware training schedule (seed 002).

    freeze_bn_after: from this step on, BN folds with its running statistics (no batch statistics,
        no running-statistics updates); None: never. Default 1 (only the first step uses batch
        statistics), as `qdet qat` does: measured on ResNet20 4-bit, BN frozen after step 1 recovered
        68.8 % of the PTQ top-1 drop, BN trained for 200 steps only 10.4 % (small fine-tuning batches
        give noisy statistics; the pretrained running ones are better). BN that is frozen by
        definition (torchvision's FrozenBatchNorm2d) never uses batch statistics.
    freeze_observers_after: from this step on, activation ranges stop moving; None: never.
    activation_observer: replaces the config's activation observer (EMA min/max by default).
    calibration_batches: batches that set the initial activation ranges before training.
    """

    freeze_bn_after: int | None = 1
    freeze_observers_after: int | None = 300
    activation_observer: Observer = Observer.MOVING_AVERAGE
    calibration_batches: int = 8

    def __post_init__(self) -> None:
        for name in ("freeze_bn_after", "freeze_observers_after"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name}={value} must be a positive step count or None")
        if self.calibration_batches < 1:
            raise ConfigError(f"calibration_batches={self.calibration_batches} must be at least 1")


def parse_enum(enum_type: type[Enum], value: str | Enum, option: str) -> Any:
    """String → enum with an error that names the option and lists valid values."""
    if isinstance(value, enum_type):
        return value
    try:
        return enum_type(str(value).lower().replace("-", "_"))
    except ValueError:
        valid = ", ".join(e.value for e in enum_type)
        raise ConfigError(f"unknown {option} {value!r}; choose one of: {valid}") from None


def _encode(obj: Any) -> Any:
    if isinstance(obj, Enum):
        return obj.value
    if dataclasses.is_dataclass(obj):
        out = {"__type__": type(obj).__name__}
        for f in dataclasses.fields(obj):
            out[f.name] = _encode(getattr(obj, f.name))
        return out
    if isinstance(obj, (tuple, list)):
        return [_encode(v) for v in obj]
    return obj


_TYPES = {t.__name__: t for t in (PerTensor, PerChannel, QuantSpec, LayerOverride, QuantConfig)}
_ENUM_FIELDS = {"observer": Observer, "residual": ResidualPolicy, "format": Format}


def _decode(value: Any, name: str = "") -> Any:
    if isinstance(value, dict) and "__type__" in value:
        cls = _TYPES.get(value["__type__"])
        if cls is None:
            raise ConfigError(f"unknown config type {value['__type__']!r} in saved config")
        kwargs = {k: _decode(v, k) for k, v in value.items() if k != "__type__"}
        return cls(**kwargs)
    if isinstance(value, list):
        return tuple(_decode(v, name) for v in value)
    if name in _ENUM_FIELDS and value is not None:
        return parse_enum(_ENUM_FIELDS[name], value, name)
    return value


def _decode_config(data: Mapping[str, Any]) -> QuantConfig:
    cfg = _decode(dict(data))
    if not isinstance(cfg, QuantConfig):
        raise ConfigError("saved config is not a QuantConfig")
    return cfg


__all__ = [
    "Observer",
    "ResidualPolicy",
    "Format",
    "PerTensor",
    "PerChannel",
    "QuantSpec",
    "LayerOverride",
    "QuantConfig",
    "QATConfig",
    "default_activation_spec",
    "default_weight_spec",
    "parse_enum",
]

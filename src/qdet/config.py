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
    MEAN_MINMAX = "mean_minmax"  # mean over calibration samples of each sample's min and max (NNCF's default)
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


class OverflowFix(Enum):
    """7-bit weights against the int16 saturation of int8 dot products on x86 CPUs without VNNI.

    Without AVX-512 VNNI, AVX-VNNI or AMX, the int8 convolutions and matmuls of onnxruntime,
    OpenVINO and fbgemm multiply uint8 activation codes by int8 weight codes and add each pair in
    int16 with saturation (vpmaddubsw): 255·127 + 255·127 = 64,770 does not fit 32,767, so where large
    codes meet the kernel's result differs from qdet's simulation (the OpenVINO documentation calls
    it the saturation issue). 7-bit weight codes (|q| <= 63) cannot saturate: 2·255·63 = 32,130.

    AUTO: ALL when the machine that quantizes has such kernels (`qdet.bench.machine.int8_dot_saturates`),
        NONE otherwise; `quantize` stores the resolved value, so a saved model means one thing.
    NONE: 8-bit weights everywhere. FIRST_LAYER: 7-bit weights on each region's first conv/linear
        (those with no conv/linear before them; NNCF's default). ALL: every 8-bit weight becomes 7-bit.
    Only signed symmetric 8-bit weight specs are changed; narrower ones cannot saturate.
    """

    AUTO = "auto"
    NONE = "none"
    FIRST_LAYER = "first_layer"
    ALL = "all"


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


def overflow_safe(spec: QuantSpec) -> QuantSpec:
    """A signed symmetric 8-bit weight spec as 7 bits ([-63, 63]); other specs as they are."""
    if spec.bits == 8 and spec.signed and spec.symmetric:
        return dataclasses.replace(spec, bits=7)
    return spec


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


class BiasCorrectionMode(Enum):
    """Where the per-channel mean shift that bias correction removes is measured.

    EMPIRICAL: per conv/linear in graph order, the layer's output mean on the calibration data
        with its upstream layers already quantized (and corrected) vs the float model's (what
        NNCF's fast bias correction measures); catches shifts that rounding upstream propagates.
    ANALYTIC: data-free (Nagel et al. 2019): E[x] of each layer's input from the BatchNorm
        statistics of the conv before it (β, γ through its ReLU/ReLU6/identity), shift
        (W − Q(W))·E[x]; layers whose input has no BN statistics are left as they are.
    FLOAT_MEANS: E[(W − Q(W)) * x] from the float inputs seen during calibration, per position
        (the conv's own padding: border outputs see fewer taps) where the input size is fixed;
        the default. On EfficientNet-Lite1 it cut the int8 logits' MSE to float by 62 % and on
        YOLOv5n it took the int8 mAP drop from −0.65 to −0.07 points (README); the per-channel
        form without padding, its first version, was worse than no correction on Lite1.
    """

    EMPIRICAL = "empirical"
    ANALYTIC = "analytic"
    FLOAT_MEANS = "float_means"


@dataclass(frozen=True)
class BiasCorrection:
    """Fold the mean output shift quantization causes into each conv/linear's bias.

    max_images: calibration images the EMPIRICAL mode measures on (the first ones)."""

    mode: BiasCorrectionMode = BiasCorrectionMode.EMPIRICAL
    max_images: int = 1024

    def __post_init__(self) -> None:
        if self.max_images < 1:
            raise ConfigError(f"bias correction max_images={self.max_images} must be at least 1")


@dataclass(frozen=True)
class AdaRound:
    """Adaptive rounding (Nagel et al. 2020) of each conv/linear's weights, layer by layer.

    Each weight is rounded down or up (never further than one step from round-to-nearest) by a
    learned soft variable h(V) (rectified sigmoid), optimised with Adam to reproduce the float
    layer's output from the *quantized* inputs of the layers before it (asymmetric
    reconstruction), with a regulariser λ·Σ(1 − |2h − 1|^β) pushing h to 0/1 while β anneals
    from beta_start to beta_end after `warmup` of the iterations.

    iterations per layer; batch_size images per step drawn (seeded) from at most max_images."""

    iterations: int = 1000
    batch_size: int = 32
    max_images: int = 1024
    lr: float = 1e-2
    reg_weight: float = 0.01
    beta_start: float = 20.0
    beta_end: float = 2.0
    warmup: float = 0.2
    seed: int = 0

    def __post_init__(self) -> None:
        if self.iterations < 1 or self.batch_size < 1 or self.max_images < 1:
            raise ConfigError(f"AdaRound iterations={self.iterations}, batch_size={self.batch_size}, "
                              f"max_images={self.max_images} must all be at least 1")
        if not 0.0 <= self.warmup < 1.0:
            raise ConfigError(f"AdaRound warmup={self.warmup} must be in [0, 1)")
        if self.lr <= 0 or self.reg_weight < 0 or self.beta_start < self.beta_end or self.beta_end <= 0:
            raise ConfigError("AdaRound needs lr > 0, reg_weight >= 0 and beta_start >= beta_end > 0")


@dataclass(frozen=True)
class PTQAlgorithms:
    """Post-training algorithms beyond round-to-nearest, composable; applied in this order:

    cle: cross-layer equalization (Nagel et al. 2019) of conv→(ReLU/LeakyReLU/identity)→conv/linear
        chains, depthwise included, on the BN-folded float model before calibration (exact in
        float); ReLU6 chains are left alone (scaling would move where ReLU6 clips).
    relu6_to_relu: with cle, replace each ReLU6 between two convs by ReLU and equalize those chains
        too, as Nagel et al. do for MobileNetV2 (AIMET before 2.4 did it unasked; 2.4+ asks the user
        to). Not exact: the float model changes wherever a pre-activation exceeds 6. Depthwise
        models with ReLU6 (MobileNetV2, EfficientNet-Lite) have no other chain, so without it cle
        does nothing on them.
    high_bias_absorption: with cle, move β − 3γ (BN statistics) of each equalized conv's bias
        into the next layer where ReLU passes it through unchanged.
    adaround: learned rounding per layer (`AdaRound`), None: round to nearest.
    bias_correction: per-channel mean output shift folded into the biases (`BiasCorrection`);
        default: FLOAT_MEANS (closed form, during calibration, no extra pass), None: off.

        >>> import qdet
        >>> cfg = qdet.QuantConfig(ptq=qdet.PTQAlgorithms(cle=True, adaround=qdet.AdaRound(iterations=500)))
        >>> qdet.QuantConfig.from_dict(cfg.to_dict()) == cfg
        True
    """

    cle: bool = False
    high_bias_absorption: bool = True
    adaround: AdaRound | None = None
    bias_correction: BiasCorrection | None = BiasCorrection(BiasCorrectionMode.FLOAT_MEANS)
    relu6_to_relu: bool = False

    def __post_init__(self) -> None:
        if self.relu6_to_relu and not self.cle:
            raise ConfigError("PTQAlgorithms relu6_to_relu=True needs cle=True (it only serves equalization)")

    @property
    def layerwise(self) -> bool:
        """Whether a layer-by-layer pass over calibration data is needed (AdaRound, empirical BC)."""
        bc = self.bias_correction
        return self.adaround is not None or (bc is not None and bc.mode is BiasCorrectionMode.EMPIRICAL)


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
    ptq: `PTQAlgorithms` (cross-layer equalization, AdaRound, bias correction); default: none.
    overflow_fix: `OverflowFix`: 7-bit weights where int8 kernels saturate (x86 without VNNI); AUTO
        (default) decides from the machine that quantizes and stores the decision.
    bias_correction: the original flag, kept so that older `.qdet` files load: True means (now the default)
        ptq.bias_correction=BiasCorrection(BiasCorrectionMode.FLOAT_MEANS), (W − Q(W))·E[x] with float
        input means. Prefer `ptq=PTQAlgorithms(bias_correction=BiasCorrection())` (empirical).
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
    ptq: PTQAlgorithms = PTQAlgorithms()
    overflow_fix: OverflowFix = OverflowFix.AUTO

    def __post_init__(self) -> None:
        object.__setattr__(self, "overflow_fix", parse_enum(OverflowFix, self.overflow_fix, "overflow_fix"))
        if not isinstance(self.ptq, PTQAlgorithms):
            raise ConfigError(f"ptq={self.ptq!r} must be a qdet.PTQAlgorithms")
        if self.bias_correction is True:  # the original flag: float-input-means bias correction
            legacy = BiasCorrection(BiasCorrectionMode.FLOAT_MEANS)
            if self.ptq.bias_correction not in (None, legacy):
                raise ConfigError("bias_correction=True (float-means correction) conflicts with "
                                  f"ptq.bias_correction={self.ptq.bias_correction}; set only ptq")
            object.__setattr__(self, "ptq", dataclasses.replace(self.ptq, bias_correction=legacy))
        if isinstance(self.activations, Observer):
            object.__setattr__(self, "activations", default_activation_spec(self.activations))
        if isinstance(self.weights, (PerTensor, PerChannel)):
            object.__setattr__(self, "weights", default_weight_spec(self.weights))
        object.__setattr__(self, "skip", tuple(self.skip))
        object.__setattr__(self, "overrides", tuple(self.overrides))
        if not isinstance(self.activations, QuantSpec) or not isinstance(self.weights, QuantSpec):
            raise ConfigError("activations and weights must be QuantSpec (or an Observer / PerChannel shorthand)")

    def resolved(self) -> "QuantConfig":
        """This config with `overflow_fix` AUTO decided for this machine (ALL or NONE)."""
        if self.overflow_fix is not OverflowFix.AUTO:
            return self
        from qdet.bench.machine import int8_dot_saturates

        fix = OverflowFix.ALL if int8_dot_saturates() else OverflowFix.NONE
        return dataclasses.replace(self, overflow_fix=fix)

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


_TYPES = {t.__name__: t for t in (PerTensor, PerChannel, QuantSpec, LayerOverride, QuantConfig, PTQAlgorithms,
                                   AdaRound, BiasCorrection)}
_ENUM_FIELDS = {"observer": Observer, "residual": ResidualPolicy, "format": Format, "mode": BiasCorrectionMode,
                "overflow_fix": OverflowFix}


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
    data = dict(data)
    if data.get("__type__") == "QuantConfig":
        data.setdefault("overflow_fix", OverflowFix.NONE.value)  # saved before the option: 8-bit weights
    cfg = _decode(data)
    if not isinstance(cfg, QuantConfig):
        raise ConfigError("saved config is not a QuantConfig")
    return cfg


__all__ = [
    "Observer",
    "ResidualPolicy",
    "OverflowFix",
    "Format",
    "PerTensor",
    "PerChannel",
    "QuantSpec",
    "LayerOverride",
    "QuantConfig",
    "PTQAlgorithms",
    "AdaRound",
    "BiasCorrection",
    "BiasCorrectionMode",
    "QATConfig",
    "default_activation_spec",
    "default_weight_spec",
    "parse_enum",
]

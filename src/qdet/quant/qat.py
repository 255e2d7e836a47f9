"""Quantization-aware training numerics (seed 002): BN folded into the conv weight at every
forward, fake-quantized weights with straight-through gradients, EMA activation ranges, and the
freeze schedule (BN statistics after K steps, observers after M steps).

Conv + BN during training (one convolution per forward, as in Krishnamoorthi 2018 §3.2):

    f = γ / √(σ²_run + ε)                         (C_out,)
    w_q = fake_quant(w · f)                       the weight int8 inference will use
    y = BN_batch(conv(x, w_q) / f)                before freeze: batch statistics normalise,
                                                   running statistics keep updating
    y = conv(x, w_q) + (b − μ_run) · f + β        after freeze (and in eval): exactly the folded
                                                   conv that `convert` produces

The weight quantizers are `dynamic` (per-channel symmetric qparams recomputed from the current
folded weight each step); activation quantizers `track` an EMA of min/max while training.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import fx, nn

from qdet.errors import CalibrationError
from qdet.quant.fusion import fold_batchnorms, fold_bn_weights, is_frozen_batchnorm, mark_frozen
from qdet.quant.quantizer import (
    QuantConv2d,
    Quantizer,
    QuantLinear,
    copy_conv,
    make_weight_quantizer,
    weight_quantizers,
)


class QATConvBn2d(QuantConv2d):
    """A Conv2d and its BatchNorm2d trained together, BN folded into the (fake-quantized) weight.

    >>> conv, bn = nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4).eval()
    >>> m = QATConvBn2d.from_conv_bn(conv, bn).eval()
    >>> x = torch.randn(1, 3, 8, 8)
    >>> bool(torch.allclose(m(x), bn(conv(x)), atol=1e-5))
    True
    """

    bn: nn.BatchNorm2d

    @classmethod
    def from_conv_bn(cls, conv: nn.Conv2d, bn: nn.Module) -> "QATConvBn2d":
        """`bn`: a BatchNorm2d (trained until the schedule freezes it), or a FrozenBatchNorm2d / a
        BatchNorm2d marked frozen, whose statistics and affine stay fixed from the start."""
        m = copy_conv(cls, conv)
        frozen = is_frozen_batchnorm(bn)
        m.bn = _as_frozen_batchnorm2d(bn) if frozen else copy.deepcopy(bn)
        m.weight_quant = nn.Identity()  # the quantizer pass replaces it
        m.bn_frozen = frozen
        return m.train(bn.training)  # a fresh module is in train mode: shape propagation would update BN

    def _factor(self) -> torch.Tensor:
        assert self.bn.running_var is not None
        gamma = self.bn.weight if self.bn.weight is not None else torch.ones_like(self.bn.running_var)
        return gamma * torch.rsqrt(self.bn.running_var + self.bn.eps)  # (C_out,)

    def folded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight, bias) with the running statistics folded in (what int8 inference runs)."""
        return fold_bn_weights(self.weight, self.bias, self.bn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self._factor()
        w_q = self.weight_quant(self.weight * f.reshape(-1, 1, 1, 1))
        if self.training and not self.bn_frozen:
            y = self._conv_forward(x, w_q, None) / f.reshape(1, -1, 1, 1)
            if self.bias is not None:
                y = y + self.bias.reshape(1, -1, 1, 1)
            self.bn.train()
            return self.bn(y)  # batch statistics; updates the running ones
        _, b = self.folded()
        return self._conv_forward(x, w_q, b)

    def to_quant_conv(self) -> QuantConv2d:
        """The folded conv with a static weight quantizer: the module PTQ would have produced."""
        w, b = self.folded()
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                         self.dilation, self.groups, bias=True, padding_mode=self.padding_mode)
        with torch.no_grad():
            conv.weight.copy_(w)
            conv.bias.copy_(b)
        wq = self.weight_quant
        spec_q = wq if isinstance(wq, Quantizer) else None
        if spec_q is None:  # weight left in float/half by a skip or format override
            return QuantConv2d.from_float(conv, wq)
        return QuantConv2d.from_float(conv, make_weight_quantizer(conv.weight, spec_q.spec, spec_q.layer_name))


def _as_frozen_batchnorm2d(bn: nn.Module) -> nn.BatchNorm2d:
    """A BatchNorm2d copy of a frozen BN with its affine not trainable (torchvision trains neither)."""
    assert bn.running_var is not None and bn.running_mean is not None
    out = nn.BatchNorm2d(bn.running_var.numel(), eps=float(bn.eps), device=bn.running_var.device,
                         dtype=bn.running_var.dtype)
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var"):
            src = getattr(bn, name, None)
            if src is not None:
                getattr(out, name).copy_(src)
    out.weight.requires_grad_(False)
    out.bias.requires_grad_(False)
    return mark_frozen(out).train(bn.training)


def fold_batchnorms_qat(gm: fx.GraphModule) -> list[str]:
    """Like `fusion.fold_batchnorms`, but keeps BN trainable: conv → bn becomes one QATConvBn2d."""
    return fold_batchnorms(gm, QATConvBn2d.from_conv_bn)


def _activation_quantizers(model: nn.Module) -> Iterator[Quantizer]:
    weight_qs = {id(q) for _, q in weight_quantizers(model)}
    for m in model.modules():
        if isinstance(m, Quantizer) and id(m) not in weight_qs:
            yield m


def start_qat(model: nn.Module) -> None:
    """After the initial range calibration: weights re-quantized every step, activations tracked.

    The observers keep their state (EMA continues from the calibrated range) instead of being
    discarded as PTQ's `finalize` does.
    """
    for _, q in weight_quantizers(model):
        q.dynamic = True
    for q in _activation_quantizers(model):
        if q.observer is not None and q.observer.num_batches > 0:
            q.set_qparams(*q.observer.qparams())
            q.tracking = True


def freeze_bn(model: nn.Module) -> int:
    """Stop BN statistics: every QATConvBn2d folds with its running statistics from now on (frozen
    BN, e.g. torchvision's FrozenBatchNorm2d, already does from the start)."""
    count = 0
    for m in model.modules():
        if isinstance(m, QATConvBn2d):
            m.bn_frozen = True
            count += 1
    return count


def freeze_observers(model: nn.Module) -> int:
    """Activation ranges stop moving (the weights keep training under fixed activation grids)."""
    count = 0
    for q in _activation_quantizers(model):
        if q.tracking:
            q.tracking = False
            count += 1
    return count


def convert_qat(model: nn.Module) -> None:
    """In place: fold BN for good, fix weight qparams from the trained weights, drop observers."""
    from qdet.quant.calibrate import finalize

    for gm in [m for m in model.modules() if isinstance(m, fx.GraphModule)]:
        for name, mod in list(gm.named_modules()):
            if isinstance(mod, QATConvBn2d):
                parent, _, attr = name.rpartition(".")
                setattr(gm.get_submodule(parent) if parent else gm, attr, mod.to_quant_conv())
    for mod, q in weight_quantizers(model):
        q.dynamic = False
        q.set_qparams(*_static_weight_qparams(mod.weight.detach(), q))
    for q in _activation_quantizers(model):
        q.tracking = False
        if q.observer is not None and q.observer.num_batches == 0:
            raise CalibrationError(f"layer {q.layer_name!r} never saw data during QAT calibration")
    finalize(model)  # EMA ranges → qparams; int32 bias check


def _static_weight_qparams(weight: torch.Tensor, q: Quantizer) -> tuple[torch.Tensor, torch.Tensor]:
    fresh = make_weight_quantizer(weight, q.spec, q.layer_name)
    return fresh.scale, fresh.zero_point


@dataclass
class QATSchedule:
    """Call `step()` after every optimiser step (the helper loop does); it applies the freezes.

    >>> sched = QATSchedule(nn.Identity(), freeze_bn_after=2, freeze_observers_after=3)
    >>> [sched.step() for _ in range(3)]
    [[], ['bn'], ['observers']]
    """

    model: nn.Module
    freeze_bn_after: int | None = None
    freeze_observers_after: int | None = None
    steps: int = 0

    def step(self) -> list[str]:
        """Advance one step; returns which freezes happened at it ("bn", "observers")."""
        self.steps += 1
        events = []
        if self.freeze_bn_after is not None and self.steps == self.freeze_bn_after:
            freeze_bn(self.model)
            events.append("bn")
        if self.freeze_observers_after is not None and self.steps == self.freeze_observers_after:
            freeze_observers(self.model)
            events.append("observers")
        return events

"""Bias correction: give back to each conv/linear the mean its rounded weights take away.

Rounding weights to int8 shifts each output channel's mean by E[(W − Q(W)) * x]: small per weight,
but on a depthwise conv with 9 or 25 weights per channel and BN-folded scales it is a systematic
offset that the next layers amplify. With the float inputs' means (collected during calibration,
when quantizers still pass values through; per position where sizes are fixed, so padding is
accounted for), the shift is removed from the bias in closed form — qdet's default
(`PTQAlgorithms().bias_correction`), the idea of NNCF's "fast bias correction" without re-running
each layer.

    >>> import torch
    >>> from torch import nn
    >>> from qdet.config import PTQAlgorithms, QuantConfig
    >>> from qdet.qmodel import quantize
    >>> net = nn.Sequential(nn.Conv2d(3, 8, 3, groups=1), nn.ReLU()).eval()
    >>> x = torch.rand(16, 3, 12, 12) + 2.0  # a large input mean makes the weight error show
    >>> plain = quantize(net, [x], QuantConfig(ptq=PTQAlgorithms(bias_correction=None)), progress=False)
    >>> corrected = quantize(net, [x], QuantConfig(), progress=False)
    >>> err = lambda qm: (qm(x) - net(x)).mean((0, 2, 3)).abs().max().item()
    >>> err(corrected) < err(plain)
    True
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import fx, nn

from qdet.quant.quantizer import QuantConv2d, QuantLinear, Quantizer, keep_uncorrected_bias


class _InputMean:
    """Running mean of a layer's input: per channel, and per position (C, H, W) while every batch
    has the same shape and the map is small enough to keep (`POSITIONAL_LIMIT` elements)."""

    POSITIONAL_LIMIT = 1 << 22

    def __init__(self) -> None:
        self.sum: torch.Tensor | None = None
        self.count = 0
        self.pos_sum: torch.Tensor | None = None
        self.pos_count = 0
        self.positional_ok = True

    def add(self, x: torch.Tensor, channel_dim: int) -> None:
        x = x.detach().to(torch.float64)
        dims = [d for d in range(x.dim()) if d != channel_dim % x.dim()]
        s = x.sum(dims)
        self.sum = s if self.sum is None else self.sum + s
        self.count += x.numel() // x.shape[channel_dim]
        if channel_dim != 1 or x.dim() < 3 or x[0].numel() > self.POSITIONAL_LIMIT:
            self.positional_ok = False
        if not self.positional_ok:
            return
        if self.pos_sum is not None and self.pos_sum.shape != x.shape[1:]:
            self.positional_ok, self.pos_sum = False, None  # varying input sizes: per channel only
            return
        p = x.sum(0)
        self.pos_sum = p if self.pos_sum is None else self.pos_sum + p
        self.pos_count += x.shape[0]

    def mean(self) -> torch.Tensor | None:
        return None if self.sum is None or not self.count else self.sum / self.count

    def positional_mean(self) -> torch.Tensor | None:
        """(C, H, W) mean over samples, or None where it was not kept."""
        return self.pos_sum / self.pos_count if self.positional_ok and self.pos_sum is not None else None


@contextmanager
def input_means(model: nn.Module) -> Iterator[dict[nn.Module, _InputMean]]:
    """Accumulate the per-channel mean of every quantized conv/linear's input while the block runs."""
    means: dict[nn.Module, _InputMean] = {}
    handles = []
    for mod in model.modules():
        if isinstance(mod, (QuantConv2d, QuantLinear)):
            acc = means.setdefault(mod, _InputMean())
            dim = 1 if isinstance(mod, QuantConv2d) else -1

            def hook(_m: nn.Module, args: tuple, acc: _InputMean = acc, dim: int = dim) -> None:
                if args and isinstance(args[0], torch.Tensor) and args[0].is_floating_point():
                    acc.add(args[0], dim)

            handles.append(mod.register_forward_pre_hook(hook))
    try:
        yield means
    finally:
        for h in handles:
            h.remove()


def correct_biases(means: dict[nn.Module, _InputMean] | dict[nn.Module, torch.Tensor]) -> int:
    """Add the output mean shift rounding causes, E[(W − Q(W)) * x], to each layer's bias (creating
    one if needed); returns how many changed. `means`: per layer, its input's mean (a per-channel
    tensor, or an accumulator of one).

    Where the accumulator kept the per-position input mean, the shift is that mean convolved with
    W − Q(W) (the conv's own stride, padding, groups) and averaged over output positions: exact for
    a linear layer, and it knows that border outputs see fewer taps. A 5×5 depthwise conv on an 8×8
    map applies on average about half its kernel; the per-channel form (kernel sum × channel mean)
    would over-correct every border position."""
    changed = 0
    for mod, acc in means.items():
        mean = acc.mean() if isinstance(acc, _InputMean) else acc.to(torch.float64)
        positional = acc.positional_mean() if isinstance(acc, _InputMean) else None
        wq = getattr(mod, "weight_quant", None)
        if mean is None or not isinstance(wq, Quantizer) or not wq.calibrated:
            continue
        with torch.no_grad():
            w = mod.weight.detach().to(torch.float64)
            err = w - wq(mod.weight.detach()).to(torch.float64)  # what rounding took away
            if isinstance(mod, QuantLinear):
                shift = err @ mean
            elif positional is not None:
                shift = mod._conv_forward(positional.unsqueeze(0), err, None).mean((0, *range(2, err.dim())))
            else:
                groups = mod.groups
                per_group = mean.reshape(groups, -1)  # (groups, C_in / groups)
                out_per_group = err.shape[0] // groups
                summed = err.sum(tuple(range(2, err.dim()))).reshape(groups, out_per_group, -1)
                shift = torch.einsum("goi,gi->go", summed, per_group).reshape(-1)
            keep_uncorrected_bias(mod)
            if mod.bias is None:
                mod.bias = nn.Parameter(torch.zeros(err.shape[0], dtype=mod.weight.dtype))
            mod.bias.add_(shift.to(mod.bias.dtype))
        changed += 1
    return changed


def _normal_cdf(z: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1 + torch.erf(z / math.sqrt(2)))


def _normal_pdf(z: torch.Tensor) -> torch.Tensor:
    return torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)


def clipped_normal_mean(mu: torch.Tensor, sigma: torch.Tensor, lo: float | None, hi: float | None) -> torch.Tensor:
    """E[clip(y, lo, hi)] for y ~ N(mu, sigma²) per channel (None: no bound on that side).

    >>> round(float(clipped_normal_mean(torch.tensor([0.0]), torch.tensor([1.0]), 0.0, None)), 4)  # E[relu]
    0.3989
    """
    mu, sigma = mu.double(), sigma.double().clamp_min(1e-12)

    def partial(c: float) -> tuple[torch.Tensor, torch.Tensor]:  # Φ(z), E[y·1{y<c}] with z = (c − μ)/σ
        z = (c - mu) / sigma
        return _normal_cdf(z), mu * _normal_cdf(z) - sigma * _normal_pdf(z)

    mean = mu.clone()
    if lo is not None:
        p_lo, m_lo = partial(lo)
        mean = mean - m_lo + lo * p_lo  # below lo: replace y by lo
    if hi is not None:
        p_hi, m_hi = partial(hi)
        # above hi: replace y by hi; E[y·1{y>hi}] = μ − E[y·1{y<hi}]
        mean = mean - (mu - m_hi) + hi * (1 - p_hi)
    return mean


def analytic_input_means(gm: fx.GraphModule) -> dict[nn.Module, torch.Tensor]:
    """Data-free E[x] per channel of each quantized conv/linear's input, from the BN statistics
    of the conv producing it (through quantizers, zero padding and one ReLU/ReLU6/LeakyReLU/identity): the analytic
    variant of bias correction (Nagel et al. 2019). Layers fed by anything else are left out."""
    from qdet.quant.fusion import bn_stats
    from qdet.quant.opkinds import OpKind, op_kind
    from qdet.quant.quantizer import TiedQuantizer

    clips = {OpKind.RELU: (0.0, None), OpKind.RELU6: (0.0, 6.0), OpKind.IDENTITY: (None, None)}
    out: dict[nn.Module, torch.Tensor] = {}
    for node in gm.graph.nodes:
        mod = gm.get_submodule(str(node.target)) if node.op == "call_module" else None
        if not isinstance(mod, (QuantConv2d, QuantLinear)) or not node.args:
            continue
        src, bounds, slope = node.args[0], (None, None), None
        while isinstance(src, fx.Node):
            m = gm.get_submodule(str(src.target)) if src.op == "call_module" else None
            if isinstance(m, (Quantizer, TiedQuantizer)):
                src = src.args[0]
                continue
            kind = op_kind(src, gm)
            # zero padding (TF "same" convs pad before the conv) shifts the mean only at the borders,
            # as a conv's own padding does: the analytic correction ignores both
            if kind in (OpKind.IDENTITY, OpKind.ZERO_PAD):
                src = src.args[0]
                continue
            if bounds == (None, None) and slope is None and not isinstance(m, (QuantConv2d, QuantLinear)):
                if kind in clips:
                    bounds = clips[kind]
                    src = src.args[0]
                    continue
                if kind is OpKind.LEAKY_RELU and isinstance(m, nn.LeakyReLU):
                    slope = float(m.negative_slope)
                    src = src.args[0]
                    continue
            break
        producer = gm.get_submodule(str(src.target)) if isinstance(src, fx.Node) and src.op == "call_module" else None
        stats = bn_stats(producer) if producer is not None else None
        if stats is None:
            continue
        mean = clipped_normal_mean(stats[0], stats[1], *bounds)
        if slope is not None:  # LeakyReLU(y) = ReLU(y) + slope · min(y, 0), E[min(y, 0)] = μ − E[ReLU(y)]
            relu = clipped_normal_mean(stats[0], stats[1], 0.0, None)
            mean = relu + slope * (stats[0].double() - relu)
        channels = mod.in_channels if isinstance(mod, QuantConv2d) else mod.in_features
        if mean.numel() == channels:
            out[mod] = mean
    return out

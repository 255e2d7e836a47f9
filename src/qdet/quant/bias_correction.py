"""Bias correction: give back to each conv/linear the mean its rounded weights take away.

Rounding weights to int8 shifts each output channel's mean by (W − Q(W)) · E[x]: small per weight,
but on a depthwise conv with 9 weights per channel and BN-folded scales it is a systematic offset
that the next layers amplify. With the per-channel input means of the float activations (collected
during calibration, when quantizers still pass values through), the shift is removed from the bias
in closed form — the idea of NNCF's "fast bias correction", computed here from input means and the
weight error instead of by re-running each layer.

    >>> import torch
    >>> from torch import nn
    >>> from qdet.config import QuantConfig
    >>> from qdet.qmodel import quantize
    >>> net = nn.Sequential(nn.Conv2d(3, 8, 3, groups=1), nn.ReLU()).eval()
    >>> x = torch.rand(16, 3, 12, 12) + 2.0  # a large input mean makes the weight error show
    >>> plain = quantize(net, [x], QuantConfig(), progress=False)
    >>> corrected = quantize(net, [x], QuantConfig(bias_correction=True), progress=False)
    >>> err = lambda qm: (qm(x) - net(x)).mean((0, 2, 3)).abs().max().item()
    >>> err(corrected) < err(plain)
    True
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from qdet.quant.quantizer import QuantConv2d, QuantLinear, Quantizer


class _InputMean:
    def __init__(self) -> None:
        self.sum: torch.Tensor | None = None
        self.count = 0

    def add(self, x: torch.Tensor, channel_dim: int) -> None:
        dims = [d for d in range(x.dim()) if d != channel_dim % x.dim()]
        s = x.detach().to(torch.float64).sum(dims)
        self.sum = s if self.sum is None else self.sum + s
        self.count += x.numel() // x.shape[channel_dim]

    def mean(self) -> torch.Tensor | None:
        return None if self.sum is None or not self.count else self.sum / self.count


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


def correct_biases(means: dict[nn.Module, _InputMean]) -> int:
    """Add (W − Q(W)) · E[x] to each layer's bias (creating one if needed); returns how many changed."""
    changed = 0
    for mod, acc in means.items():
        mean = acc.mean()
        wq = getattr(mod, "weight_quant", None)
        if mean is None or not isinstance(wq, Quantizer) or not wq.calibrated:
            continue
        with torch.no_grad():
            w = mod.weight.detach().to(torch.float64)
            err = w - wq(mod.weight.detach()).to(torch.float64)  # what rounding took away
            if isinstance(mod, QuantLinear):
                shift = err @ mean
            else:
                groups = mod.groups
                per_group = mean.reshape(groups, -1)  # (groups, C_in / groups)
                out_per_group = err.shape[0] // groups
                summed = err.sum((2, 3)).reshape(groups, out_per_group, -1)  # (groups, C_out/g, C_in/g)
                shift = torch.einsum("goi,gi->go", summed, per_group).reshape(-1)
            if mod.bias is None:
                mod.bias = nn.Parameter(torch.zeros(err.shape[0], dtype=mod.weight.dtype))
            mod.bias.add_(shift.to(mod.bias.dtype))
        changed += 1
    return changed
